"""Turn a suite's pending items into scored item rows: one scorer per kind, one driver per request.

``SCORERS`` holds the worker half of each suite kind (``app.suites.kinds.KINDS`` holds the
rest): how an item is put to the model and how the result is scored. The kind's ``request``
type ("generate", "loglikelihood", "token_nll") picks the driver, which makes the matching
``Backend`` call. A driver gets the loaded model, the suite definition, the items still to do,
and ``emit(rows)``, which persists a batch of finished rows (and raises if the job was
cancelled or the lease lost).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from app.comparison.kl import TOPK, stored_topk
from app.suites.checks import failed_rule
from app.suites.kinds import DEFAULT_PROMPT_TEMPLATE, KINDS, RequestType, render_prompt
from workers.engine.base import Backend, Prompt, TokenTopK

Emit = Callable[[list[dict[str, Any]]], None]
Item = dict[str, Any]
FLUSH_EVERY = 8  # rows per database write while generating: resumable, not chatty
CHUNK = 32  # items per log-likelihood pass between database writes


@dataclass(frozen=True)
class RunSettings:
    prompt_format: str  # "chat" | "plain"
    max_new_tokens: int
    stop: tuple[str, ...]


def message_text(item: Item, suite: dict[str, Any], fmt: str) -> str:
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


@dataclass(frozen=True)
class Scorer:
    """The worker half of a suite kind: how an item is put to the model, how it is scored.

    ``score(item, result)`` returns the row's fields (``passed``, ``score``, ``category``,
    ``severity``, ``details``; ``response`` to override the driver's). ``result`` is what the
    kind's request type returns for the item: the stripped generated text (generate), one
    ``(loglik, is_greedy)`` per continuation (loglikelihood), ``(nll_sum, tokens)`` (token_nll).
    """

    score: Callable[[Item, Any], dict[str, Any]]
    # The text the model is asked (generate, loglikelihood) or reads raw (token_nll).
    text: Callable[[Item, dict[str, Any], str], str] = message_text
    # loglikelihood: the continuations whose likelihood is measured after each item's text.
    continuations: Callable[[Item], Sequence[str]] | None = None
    # token_nll: ask the backend for this many next tokens per position too (``token_topk``);
    # the scorer then gets a ``TokenTopK``, or ``(nll_sum, tokens)`` if the backend can't.
    topk: int = 0


Pending = Sequence[tuple[int, Item]]  # (position in the suite, item) still to do
Driver = Callable[[Backend, dict[str, Any], Pending, RunSettings, Emit, Scorer], None]


def _row(
    position: int, item: Item, prompt: str, response: str | None, scored: dict[str, Any]
) -> dict[str, Any]:
    """An item row as every driver writes it: position, prompt, response, the scorer's fields."""
    return {
        "item_id": item["id"],
        "position": position,
        "prompt": prompt,
        "response": response,
        **scored,
    }


def _generate(
    backend: Backend,
    suite: dict[str, Any],
    items: Pending,
    settings: RunSettings,
    emit: Emit,
    scorer: Scorer,
) -> None:
    """Greedy answers, scored as each finishes; rows written every ``FLUSH_EVERY``."""
    texts = [scorer.text(item, suite, settings.prompt_format) for _, item in items]
    chat = settings.prompt_format == "chat"
    prompts = [Prompt(t, chat) for t in texts]
    buffer = _Buffer(emit)

    def on_result(index: int, text: str) -> None:
        position, item = items[index]
        # The lesson scores the stripped continuation; we store what we scored.
        response = text.strip()
        buffer.add(_row(position, item, texts[index], response, scorer.score(item, response)))

    backend.generate(
        prompts, max_new_tokens=settings.max_new_tokens, stop=settings.stop, on_result=on_result
    )
    buffer.flush()


def _loglikelihood(
    backend: Backend,
    suite: dict[str, Any],
    items: Pending,
    settings: RunSettings,
    emit: Emit,
    scorer: Scorer,
) -> None:
    """log p(continuation | text) for each item's continuations, ``CHUNK`` items a pass."""
    if scorer.continuations is None:
        raise ValueError("a loglikelihood kind's scorer must say its continuations")
    fmt = settings.prompt_format
    for start in range(0, len(items), CHUNK):
        chunk = items[start : start + CHUNK]
        requests: list[tuple[Prompt, str]] = []
        texts, counts = [], []
        for _, item in chunk:
            text = scorer.text(item, suite, fmt)
            texts.append(text)
            context = Prompt(text, fmt == "chat")
            continuations = scorer.continuations(item)
            counts.append(len(continuations))
            for continuation in continuations:
                # lm-eval's target delimiter: a space after "Answer:"; none after a chat turn start.
                requests.append((context, continuation if fmt == "chat" else f" {continuation}"))
        results = backend.loglikelihood(requests)
        rows, offset = [], 0
        for (position, item), text, n in zip(chunk, texts, counts, strict=True):
            rows.append(
                _row(position, item, text, None, scorer.score(item, results[offset : offset + n]))
            )
            offset += n
        emit(rows)


def _token_nll(
    backend: Backend,
    suite: dict[str, Any],
    items: Pending,
    settings: RunSettings,
    emit: Emit,
    scorer: Scorer,
) -> None:
    """Negative log-likelihood of each item's raw text (no prompt format), ``CHUNK`` a pass."""
    for start in range(0, len(items), CHUNK):
        chunk = items[start : start + CHUNK]
        texts = [scorer.text(item, suite, settings.prompt_format) for _, item in chunk]
        results: Sequence[Any] | None = None
        if scorer.topk:
            try:
                results = backend.token_topk(texts, scorer.topk)
            except NotImplementedError:
                results = None  # this backend has no full distributions: NLL only
        if results is None:
            results = backend.token_nll(texts)
        emit(
            [
                _row(position, item, text, None, scorer.score(item, result))
                for (position, item), text, result in zip(chunk, texts, results, strict=True)
            ]
        )


# One driver per Backend method: the kind's request type picks it, never the kind's name.
DRIVERS: dict[RequestType, Driver] = {
    "generate": _generate,
    "loglikelihood": _loglikelihood,
    "token_nll": _token_nll,
}
SCORERS: dict[str, Scorer] = {}


def register_scorer(kind: str, scorer: Scorer) -> Scorer:
    """Register the worker half of suite kind ``kind`` (its entry is in ``KINDS``)."""
    if kind in SCORERS:
        raise ValueError(f"suite kind {kind!r} already has a scorer")
    SCORERS[kind] = scorer
    return scorer


def unregister_scorer(kind: str) -> None:
    """Remove a kind's scorer (tests that add a throwaway kind clean up with this)."""
    SCORERS.pop(kind, None)


def run_items(
    kind: str,
    backend: Backend,
    suite: dict[str, Any],
    items: Pending,
    settings: RunSettings,
    emit: Emit,
) -> None:
    """Score ``items`` of a suite of ``kind``: its request type's driver with its scorer."""
    if kind not in KINDS or kind not in SCORERS:
        raise ValueError(f"suite kind {kind!r} is not registered on this worker")
    DRIVERS[KINDS[kind].request](backend, suite, items, settings, emit, SCORERS[kind])


def _score_qa(item: Item, response: str) -> dict[str, Any]:
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


def _score_checklist(item: Item, response: str) -> dict[str, Any]:
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


def _score_multiple_choice(item: Item, results: Sequence[tuple[float, bool]]) -> dict[str, Any]:
    """lm-eval: argmax of log p(choice | prompt) (acc) and per byte of choice (acc_norm)."""
    choices = item["choices"]
    n = len(choices)
    logliks = [r[0] for r in results]
    pred = max(range(n), key=lambda i: logliks[i])
    normed = [ll / max(1, len(c.encode())) for ll, c in zip(logliks, choices, strict=True)]
    pred_norm = max(range(n), key=lambda i: normed[i])
    return {
        "response": choices[pred],
        "passed": pred == item["gold"],
        "score": logliks[item["gold"]],
        "category": item.get("category"),
        "severity": None,
        "details": {
            "question": item["question"],
            "choices": choices,
            "gold": item["gold"],
            "logliks": logliks,
            "pred": pred,
            "pred_norm": pred_norm,
            "correct_norm": pred_norm == item["gold"],
        },
    }


def _score_perplexity(item: Item, result: tuple[float, int] | TokenTopK) -> dict[str, Any]:
    """Negative log-likelihood per token of the text; nothing passes or fails.

    With a ``TokenTopK`` result the row also keeps ``topk``: per predicted position the ``k``
    most probable next-token ids and their log-probabilities, what a later comparison needs
    for KL(base ‖ candidate) without loading the base again.
    """
    details: dict[str, Any]
    if isinstance(result, TokenTopK):
        nll, tokens = result.nll_sum, result.tokens
        details = {
            "nll_sum": nll,
            "tokens": tokens,
            "topk": stored_topk(result.ids, result.logprobs, result.targets),
        }
    else:
        nll, tokens = result
        details = {"nll_sum": nll, "tokens": tokens}
    return {
        "passed": None,
        "score": nll / tokens if tokens else None,
        "category": item.get("category"),
        "severity": None,
        "details": details,
    }


register_scorer("qa", Scorer(_score_qa))
register_scorer("checklist", Scorer(_score_checklist))
register_scorer(
    "multiple_choice", Scorer(_score_multiple_choice, continuations=lambda item: item["choices"])
)
register_scorer(
    "perplexity",
    # Next tokens per predicted position, for KL to the base later (app/comparison/kl.py).
    Scorer(_score_perplexity, text=lambda item, suite, fmt: item["text"], topk=TOPK),
)
