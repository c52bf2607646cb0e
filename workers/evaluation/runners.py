"""Suite-kind runners: turn a suite's pending items into scored item rows.

``RUNNERS`` mirrors ``app.suites.kinds.KINDS``: one function per kind. A runner gets the
loaded model, the suite definition, the items still to do, and ``emit(rows)``, which persists
a batch of finished rows (and raises if the job was cancelled or the lease lost).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from app.suites.checks import failed_rule
from app.suites.kinds import DEFAULT_PROMPT_TEMPLATE, render_prompt
from workers.engine.base import Backend, Prompt

Emit = Callable[[list[dict[str, Any]]], None]
Score = Callable[[dict[str, Any], str], dict[str, Any]]  # (item, response) -> row fields
FLUSH_EVERY = 8  # rows per database write while generating: resumable, not chatty


@dataclass(frozen=True)
class RunSettings:
    prompt_format: str  # "chat" | "plain"
    max_new_tokens: int
    stop: tuple[str, ...]


# (backend, suite, pending (position, item) pairs, settings, emit)
Runner = Callable[
    [Backend, dict[str, Any], Sequence[tuple[int, dict[str, Any]]], RunSettings, Emit], None
]


def _message_text(item: dict[str, Any], suite: dict[str, Any], fmt: str) -> str:
    """What the model is asked: the suite template in plain format, the bare question in chat."""
    question = item.get("question", item.get("prompt", ""))
    if "prompt" in item:  # checklist items carry their prompt verbatim
        return str(item["prompt"])
    if fmt == "chat":
        return str(question)
    return render_prompt(suite.get("prompt_template") or DEFAULT_PROMPT_TEMPLATE, str(question))


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
    backend: Backend,
    suite: dict[str, Any],
    items: Sequence[tuple[int, dict[str, Any]]],
    settings: RunSettings,
    emit: Emit,
    score: Score,
) -> None:
    texts = [_message_text(item, suite, settings.prompt_format) for _, item in items]
    chat = settings.prompt_format == "chat"
    prompts = [Prompt(t, chat) for t in texts]
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

    backend.generate(
        prompts, max_new_tokens=settings.max_new_tokens, stop=settings.stop, on_result=on_result
    )
    buffer.flush()


def _generative(score: Score) -> Runner:
    """A runner that answers every item greedily and scores the answer with ``score``."""

    def run(
        backend: Backend,
        suite: dict[str, Any],
        items: Sequence[tuple[int, dict[str, Any]]],
        settings: RunSettings,
        emit: Emit,
    ) -> None:
        _generate_rows(backend, suite, items, settings, emit, score)

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
    rule = failed_rule(item["check"], response)
    passed = rule is None
    details: dict[str, Any] = {"test": item["test"]}
    if rule is not None:
        details["failed_rule"] = rule  # which rule to read the response against
    return {
        "passed": passed,
        "score": float(passed),
        "category": item.get("category"),
        "severity": item.get("severity"),
        "details": details,
    }


run_qa = _generative(_score_qa)
run_checklist = _generative(_score_checklist)


CHUNK = 32  # items per log-likelihood pass between database writes


def run_multiple_choice(
    backend: Backend,
    suite: dict[str, Any],
    items: Sequence[tuple[int, dict[str, Any]]],
    settings: RunSettings,
    emit: Emit,
) -> None:
    """lm-eval scoring: argmax of log p(choice | prompt) (acc) and per byte of choice (acc_norm)."""
    fmt = settings.prompt_format
    for start in range(0, len(items), CHUNK):
        chunk = items[start : start + CHUNK]
        requests: list[tuple[Prompt, str]] = []
        texts = []
        for _, item in chunk:
            text = _message_text(item, suite, fmt)
            texts.append(text)
            context = Prompt(text, fmt == "chat")
            for choice in item["choices"]:
                # lm-eval's target delimiter: a space after "Answer:"; none after a chat turn start.
                requests.append((context, choice if fmt == "chat" else f" {choice}"))
        results = backend.loglikelihood(requests)
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
    backend: Backend,
    suite: dict[str, Any],
    items: Sequence[tuple[int, dict[str, Any]]],
    settings: RunSettings,
    emit: Emit,
) -> None:
    """Negative log-likelihood per token of each text (no prompt format: raw text)."""
    for start in range(0, len(items), CHUNK):
        chunk = items[start : start + CHUNK]
        results = backend.token_nll([item["text"] for _, item in chunk])
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
