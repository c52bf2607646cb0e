"""Turn a suite's pending items into scored item rows: one driver per request type.

A suite kind (``app.suites.kinds.KINDS``) says how each item becomes requests and how their
results are scored; its ``request`` type ("generate", "loglikelihood", "token_nll") picks the
driver here, which only makes the matching ``Backend`` calls. A driver gets the loaded model,
the kind, the suite definition, the items still to do, and ``emit(rows)``, which persists a
batch of finished rows (and raises if the job was cancelled or the lease lost).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from app.evaluations.shards import BLOCK
from app.suites.kinds import KINDS
from app.suites.registry import Item, Request, RequestType, Suite, SuiteKind
from workers.engine.base import Backend, Prompt

Emit = Callable[[list[dict[str, Any]]], None]
FLUSH_EVERY = 8  # rows per database write while generating: resumable, not chatty
# Items per log-likelihood pass between database writes; a shard is dealt whole passes, so
# its batches are an unsharded run's (``app.evaluations.shards.BLOCK``).
CHUNK = BLOCK


@dataclass(frozen=True)
class RunSettings:
    prompt_format: str  # "chat" | "plain"
    max_new_tokens: int
    stop: tuple[str, ...]


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


Pending = Sequence[tuple[int, Item]]  # (position in the suite, item) still to do
Driver = Callable[[Backend, SuiteKind, Suite, Pending, RunSettings, Emit], None]


def _asked(kind: SuiteKind, suite: Suite, items: Pending, fmt: str) -> list[Sequence[Request]]:
    """Each item's requests, as its kind builds them; every item asks at least one."""
    asked = [kind.requests(item, suite, fmt) for _, item in items]
    for (_, item), requests in zip(items, asked, strict=True):
        if not requests:
            raise ValueError(f"suite kind {kind.name!r} asked nothing for item {item['id']!r}")
    return asked


def _prompt(request: Request, fmt: str) -> Prompt:
    return Prompt(request.text, fmt == "chat" if request.chat is None else request.chat)


def _row(
    kind: SuiteKind,
    suite: Suite,
    position: int,
    item: Item,
    requests: Sequence[Request],
    results: Sequence[Any],
    response: str | None,
) -> dict[str, Any]:
    """An item row as every driver writes it: position, prompt, response, the kind's score."""
    return {
        "item_id": item["id"],
        "position": position,
        "prompt": requests[0].text,
        "response": response,
        **kind.score(item, results, suite),
    }


def _generate(
    backend: Backend,
    kind: SuiteKind,
    suite: Suite,
    items: Pending,
    settings: RunSettings,
    emit: Emit,
) -> None:
    """Greedy answers; an item is scored as its last answer finishes, rows written every
    ``FLUSH_EVERY``. Requests with stop strings of their own go in a call of their own; a
    suite's own ``max_new_tokens`` replaces the evaluation's."""
    asked = _asked(kind, suite, items, settings.prompt_format)
    results: list[list[Any]] = [[None] * len(requests) for requests in asked]
    waiting = [len(requests) for requests in asked]
    groups: dict[tuple[str, ...], list[tuple[int, int]]] = {}
    for i, requests in enumerate(asked):
        for j, request in enumerate(requests):
            extra = tuple(s for s in request.stop if s not in settings.stop)
            groups.setdefault(settings.stop + extra, []).append((i, j))
    buffer = _Buffer(emit)
    # A suite that states its own limit (a benchmark's protocol: GSM8K's 256) runs at it, the
    # others at the evaluation's; both are bounded by the same schema limit, MAX_NEW_TOKENS.
    max_new_tokens = int(suite.get("max_new_tokens") or settings.max_new_tokens)

    for stop, members in groups.items():

        def on_result(index: int, text: str, members: list[tuple[int, int]] = members) -> None:
            i, j = members[index]
            # The lesson scores the stripped continuation; we store what we scored.
            results[i][j] = text.strip()
            waiting[i] -= 1
            if waiting[i] == 0:
                position, item = items[i]
                buffer.add(_row(kind, suite, position, item, asked[i], results[i], results[i][0]))

        backend.generate(
            [_prompt(asked[i][j], settings.prompt_format) for i, j in members],
            max_new_tokens=max_new_tokens,
            stop=stop,
            on_result=on_result,
        )
    buffer.flush()


def _chunks(items: Pending) -> list[Pending]:
    return [items[start : start + CHUNK] for start in range(0, len(items), CHUNK)]


def _split(results: Sequence[Any], asked: Sequence[Sequence[Request]]) -> list[Sequence[Any]]:
    """One flat list of results back into each item's share, in order."""
    out, offset = [], 0
    for requests in asked:
        out.append(results[offset : offset + len(requests)])
        offset += len(requests)
    return out


def _loglikelihood(
    backend: Backend,
    kind: SuiteKind,
    suite: Suite,
    items: Pending,
    settings: RunSettings,
    emit: Emit,
) -> None:
    """log p(continuation | text) of every request, ``CHUNK`` items a pass."""
    fmt = settings.prompt_format
    for chunk in _chunks(items):
        asked = _asked(kind, suite, chunk, fmt)
        results = backend.loglikelihood(
            [(_prompt(r, fmt), r.continuation) for requests in asked for r in requests]
        )
        emit(
            [
                _row(kind, suite, position, item, requests, mine, None)
                for (position, item), requests, mine in zip(
                    chunk, asked, _split(results, asked), strict=True
                )
            ]
        )


def _token_nll(
    backend: Backend,
    kind: SuiteKind,
    suite: Suite,
    items: Pending,
    settings: RunSettings,
    emit: Emit,
) -> None:
    """Negative log-likelihood of each request's raw text (no prompt format), ``CHUNK`` a pass."""
    for chunk in _chunks(items):
        asked = _asked(kind, suite, chunk, settings.prompt_format)
        texts = [r.text for requests in asked for r in requests]
        results: Sequence[Any] | None = None
        if kind.topk:
            try:
                results = backend.token_topk(texts, kind.topk)
            except NotImplementedError:
                results = None  # this backend has no full distributions: NLL only
        if results is None:
            results = backend.token_nll(texts)
        emit(
            [
                _row(kind, suite, position, item, requests, mine, None)
                for (position, item), requests, mine in zip(
                    chunk, asked, _split(results, asked), strict=True
                )
            ]
        )


# One driver per Backend method: the kind's request type picks it, never the kind's name.
DRIVERS: dict[RequestType, Driver] = {
    "generate": _generate,
    "loglikelihood": _loglikelihood,
    "token_nll": _token_nll,
}


def run_items(
    kind: str,
    backend: Backend,
    suite: Suite,
    items: Pending,
    settings: RunSettings,
    emit: Emit,
) -> None:
    """Score ``items`` of a suite of ``kind``: its request type's driver with its scorer."""
    entry = KINDS.get(kind)
    if entry is None:
        raise ValueError(f"suite kind {kind!r} is not registered on this worker")
    DRIVERS[entry.request](backend, entry, suite, items, settings, emit)
