"""The drivers send whatever requests a kind builds, and hand each item its own results.

A kind may ask several requests per item, with stop strings or a prompt format of their own,
and with contexts that differ per request (partial scoring). Each driver is checked against
the same requests sent to the backend one at a time, on a tiny model.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from app.suites.kinds import KINDS
from app.suites.registry import Request, SuiteKind
from workers.engine.base import Prompt
from workers.engine.transformers_backend import TransformersBackend
from workers.evaluation.scoring import DRIVERS, RunSettings

MAX_NEW = 8
ITEMS = [
    (0, {"id": "a", "question": "What is the capital of France?"}),
    (1, {"id": "b", "question": "Who wrote Hamlet?"}),
]
SUITE = {"name": "s", "kind": "qa", "items": [item for _, item in ITEMS]}


@pytest.fixture(scope="module")
def backend(tiny_model_dir: Path) -> Iterator[TransformersBackend]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    yield TransformersBackend(model, tokenizer)
    torch.set_num_threads(threads)


def _kind(**how: Any) -> SuiteKind:
    """A kind that only the drivers read: its requests and how its results are kept."""
    return dataclasses.replace(KINDS["qa"], **how)


def _keep(item: Any, results: Sequence[Any], suite: Any) -> dict[str, Any]:
    return {"passed": None, "score": None, "category": None, "severity": None,
            "details": {"results": list(results)}}  # fmt: skip


def _run(kind: SuiteKind, backend: TransformersBackend, stop: tuple[str, ...] = ()) -> list[Any]:
    rows: list[dict[str, Any]] = []
    settings = RunSettings(prompt_format="plain", max_new_tokens=MAX_NEW, stop=stop)
    DRIVERS[kind.request](backend, kind, SUITE, ITEMS, settings, rows.extend)
    return sorted(rows, key=lambda r: r["position"])


def test_several_generations_per_item_each_with_its_own_stop_and_format(
    backend: TransformersBackend,
) -> None:
    def ask(item: Any, suite: Any, fmt: str) -> list[Request]:
        q = item["question"]
        return [Request(q), Request(f"Q: {q}", stop=("a", "e")), Request(q, chat=True)]

    rows = _run(_kind(requests=ask, score=_keep), backend, stop=("\n",))
    for (_, item), row in zip(ITEMS, rows, strict=True):
        q = item["question"]

        def alone(prompt: Prompt, stop: tuple[str, ...]) -> str:
            return backend.generate([prompt], max_new_tokens=MAX_NEW, stop=stop)[0].strip()

        expected = [
            alone(Prompt(q, False), ("\n",)),
            alone(Prompt(f"Q: {q}", False), ("\n", "a", "e")),
            alone(Prompt(q, True), ("\n",)),
        ]
        assert row["details"]["results"] == expected
        assert "a" not in expected[1] and "e" not in expected[1]
        # The row shows the first request and its answer unless the kind says otherwise.
        assert row["prompt"] == q and row["response"] == expected[0]


def test_loglikelihood_requests_may_differ_in_their_context(
    backend: TransformersBackend,
) -> None:
    def ask(item: Any, suite: Any, fmt: str) -> list[Request]:
        # Partial scoring: the choices differ in the context, the continuation is shared.
        return [Request(f"{item['question']} {w}", continuation=" Yes") for w in ("A", "B")]

    kind = _kind(request="loglikelihood", requests=ask, score=_keep)
    rows = _run(kind, backend)
    for (_, item), row in zip(ITEMS, rows, strict=True):
        expected = backend.loglikelihood(
            [(Prompt(f"{item['question']} {w}", False), " Yes") for w in ("A", "B")]
        )
        assert [tuple(r) for r in row["details"]["results"]] == expected
        assert row["prompt"] == f"{item['question']} A" and row["response"] is None


def test_several_texts_per_item_for_token_nll(backend: TransformersBackend) -> None:
    def ask(item: Any, suite: Any, fmt: str) -> list[Request]:
        return [Request(item["question"]), Request(item["question"].upper())]

    rows = _run(_kind(request="token_nll", requests=ask, score=_keep, topk=0), backend)
    for (_, item), row in zip(ITEMS, rows, strict=True):
        q = item["question"]
        assert [tuple(r) for r in row["details"]["results"]] == backend.token_nll([q, q.upper()])


def test_a_kind_that_asks_nothing_for_an_item_is_an_error(backend: TransformersBackend) -> None:
    with pytest.raises(ValueError, match="asked nothing for item 'a'"):
        _run(_kind(requests=lambda item, suite, fmt: [], score=_keep), backend)
