"""Suite-kind runners: turn a suite's pending items into scored item rows.

``RUNNERS`` mirrors ``app.suites.kinds.KINDS``: one function per kind. A runner gets the
loaded model, the suite definition, the items still to do, and ``emit(rows)``, which persists
a batch of finished rows (and raises if the job was cancelled or the lease lost).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from app.suites.checks import run_check
from app.suites.kinds import DEFAULT_PROMPT_TEMPLATE, render_prompt
from workers.engine import transformers_backend as engine

Emit = Callable[[list[dict[str, Any]]], None]
Score = Callable[[dict[str, Any], str], dict[str, Any]]  # (item, response) -> row fields
FLUSH_EVERY = 8  # rows per database write while generating: resumable, not chatty


@dataclass(frozen=True)
class RunSettings:
    prompt_format: str  # "chat" | "plain"
    max_new_tokens: int
    stop: tuple[str, ...]
    batch_size: int | str = "auto"


# (model, tokenizer, suite, pending (position, item) pairs, settings, emit)
Runner = Callable[
    [Any, Any, dict[str, Any], Sequence[tuple[int, dict[str, Any]]], RunSettings, Emit], None
]


def _message_text(item: dict[str, Any], suite: dict[str, Any], fmt: str) -> str:
    """What the model is asked: the suite template in plain format, the bare question in chat."""
    question = item.get("question", item.get("prompt", ""))
    if "prompt" in item:  # checklist items carry their prompt verbatim
        return str(item["prompt"])
    if fmt == "chat":
        return str(question)
    return render_prompt(suite.get("prompt_template") or DEFAULT_PROMPT_TEMPLATE, str(question))


def encode_prompt(tokenizer: Any, text: str, fmt: str) -> list[int]:
    """Token ids for one prompt: the chat template in chat format, plain tokenization otherwise.

    Plain prompts are tokenized with the tokenizer's defaults, as the lesson's ``pipeline`` does;
    the chat template already contains its special tokens.
    """
    if fmt == "chat":
        rendered = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
        )
        return list(tokenizer(rendered, add_special_tokens=False).input_ids)
    return list(tokenizer(text).input_ids)


class _Buffer:
    def __init__(self, emit: Emit) -> None:
        self.emit = emit
        self.rows: list[dict[str, Any]] = []

    def add(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        if len(self.rows) >= FLUSH_EVERY:
            self.flush()

    def flush(self) -> None:
        if self.rows:
            rows, self.rows = self.rows, []
            self.emit(rows)


def _generate_rows(
    model: Any,
    tokenizer: Any,
    suite: dict[str, Any],
    items: Sequence[tuple[int, dict[str, Any]]],
    settings: RunSettings,
    emit: Emit,
    score: Score,
) -> None:
    texts = [_message_text(item, suite, settings.prompt_format) for _, item in items]
    prompts = [encode_prompt(tokenizer, t, settings.prompt_format) for t in texts]
    buffer = _Buffer(emit)

    def on_result(index: int, text: str) -> None:
        position, item = items[index]
        # The lesson scores the stripped continuation; we store what we scored.
        response = text.strip()
        buffer.add(
            {
                "item_id": item["id"],
                "position": position,
                "prompt": texts[index],
                "response": response,
                **score(item, response),
            }
        )

    engine.generate(
        model,
        tokenizer,
        prompts,
        max_new_tokens=settings.max_new_tokens,
        stop=settings.stop,
        batch_size=settings.batch_size,
        on_result=on_result,
    )
    buffer.flush()


def _generative(score: Score) -> Runner:
    """A runner that answers every item greedily and scores the answer with ``score``."""

    def run(
        model: Any,
        tokenizer: Any,
        suite: dict[str, Any],
        items: Sequence[tuple[int, dict[str, Any]]],
        settings: RunSettings,
        emit: Emit,
    ) -> None:
        _generate_rows(model, tokenizer, suite, items, settings, emit, score)

    run.__doc__ = score.__doc__
    return run


def _score_qa(item: dict[str, Any], response: str) -> dict[str, Any]:
    """Greedy answers; correct when any accepted answer is a case-insensitive substring."""
    answer = response.lower()
    correct = any(a.lower() in answer for a in item["answers"])
    return {
        "passed": correct,
        "score": float(correct),
        "category": item.get("category"),
        "severity": None,
        "details": {"question": item["question"], "answers": item["answers"]},
    }


def _score_checklist(item: dict[str, Any], response: str) -> dict[str, Any]:
    """Greedy responses checked by the declarative check of each item."""
    passed = run_check(item["check"], response)
    return {
        "passed": passed,
        "score": float(passed),
        "category": item.get("category"),
        "severity": item.get("severity"),
        "details": {"test": item["test"]},
    }


run_qa = _generative(_score_qa)
run_checklist = _generative(_score_checklist)


CHUNK = 32  # items per log-likelihood pass between database writes


def run_multiple_choice(
    model: Any,
    tokenizer: Any,
    suite: dict[str, Any],
    items: Sequence[tuple[int, dict[str, Any]]],
    settings: RunSettings,
    emit: Emit,
) -> None:
    """lm-eval scoring: argmax of log p(choice | prompt) (acc) and per byte of choice (acc_norm)."""
    fmt = settings.prompt_format
    for start in range(0, len(items), CHUNK):
        chunk = items[start : start + CHUNK]
        requests: list[tuple[list[int], list[int]]] = []
        texts = []
        for _, item in chunk:
            text = _message_text(item, suite, fmt)
            texts.append(text)
            context = encode_prompt(tokenizer, text, fmt)
            for choice in item["choices"]:
                # lm-eval's target delimiter: a space after "Answer:"; none after a chat turn start.
                continuation = choice if fmt == "chat" else f" {choice}"
                requests.append(
                    (context, list(tokenizer(continuation, add_special_tokens=False).input_ids))
                )
        results = engine.loglikelihood(model, tokenizer, requests, batch_size=settings.batch_size)
        rows, offset = [], 0
        for (position, item), text in zip(chunk, texts, strict=True):
            n = len(item["choices"])
            logliks = [r[0] for r in results[offset : offset + n]]
            offset += n
            pred = max(range(n), key=lambda i: logliks[i])
            normed = [
                ll / max(1, len(c.encode())) for ll, c in zip(logliks, item["choices"], strict=True)
            ]
            pred_norm = max(range(n), key=lambda i: normed[i])
            rows.append(
                {
                    "item_id": item["id"],
                    "position": position,
                    "prompt": text,
                    "response": item["choices"][pred],
                    "passed": pred == item["gold"],
                    "score": logliks[item["gold"]],
                    "category": item.get("category"),
                    "severity": None,
                    "details": {
                        "question": item["question"],
                        "choices": item["choices"],
                        "gold": item["gold"],
                        "logliks": logliks,
                        "pred": pred,
                        "pred_norm": pred_norm,
                        "correct_norm": pred_norm == item["gold"],
                    },
                }
            )
        emit(rows)


def run_perplexity(
    model: Any,
    tokenizer: Any,
    suite: dict[str, Any],
    items: Sequence[tuple[int, dict[str, Any]]],
    settings: RunSettings,
    emit: Emit,
) -> None:
    """Negative log-likelihood per token of each text (no prompt format: raw text)."""
    for start in range(0, len(items), CHUNK):
        chunk = items[start : start + CHUNK]
        ids = [list(tokenizer(item["text"]).input_ids) for _, item in chunk]
        results = engine.token_nll(model, tokenizer, ids, batch_size=settings.batch_size)
        emit(
            [
                {
                    "item_id": item["id"],
                    "position": position,
                    "prompt": item["text"],
                    "response": None,
                    "passed": None,
                    "score": nll / tokens if tokens else None,
                    "category": item.get("category"),
                    "severity": None,
                    "details": {"nll_sum": nll, "tokens": tokens},
                }
                for (position, item), (nll, tokens) in zip(chunk, results, strict=True)
            ]
        )


RUNNERS: dict[str, Runner] = {
    "qa": run_qa,
    "checklist": run_checklist,
    "multiple_choice": run_multiple_choice,
    "perplexity": run_perplexity,
}
