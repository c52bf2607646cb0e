"""Many adapters, one base load: ``"model": {"path": BASE, "adapters": [...]}`` evaluated by a
real worker loads the base once, switches adapters on it, and gives each adapter exactly the
results and item rows of its own evaluation on a fresh worker."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from app.core.config import Settings
from tests.conftest import start_worker
from tests.tiny_model import build_lora_adapter

pytestmark = pytest.mark.slow

# One suite per request type: generate (qa), loglikelihood (multiple_choice), token_nll and
# top-k (perplexity), so every path through the model is compared.
QA = {
    "name": "adapters-qa",
    "kind": "qa",
    "items": [
        {"id": f"q{i}", "question": q, "answers": [a], "category": ("geo", "misc")[i % 2]}
        for i, (q, a) in enumerate(
            [
                ("What is the capital of France?", "Paris"),
                ("What is two plus two?", "Four"),
                ("What do bees make?", "honey"),
                ("How many legs does a spider have?", "Eight"),
                ("What is frozen water called?", "Ice"),
                ("What is the largest ocean on Earth?", "Pacific"),
            ]
        )
    ],
}
MC = {
    "name": "adapters-mc",
    "kind": "multiple_choice",
    "items": [
        {
            "id": "m1",
            "question": "What is the capital of Italy?",
            "choices": ["Rome", "Oslo"],
            "gold": 0,
        },
        {"id": "m2", "question": "What color is the sky?", "choices": ["green", "blue"], "gold": 1},
    ],
}
TEXT = {
    "name": "adapters-text",
    "kind": "perplexity",
    "items": [
        {"id": "t1", "text": "The river runs through the old town, past the market."},
        {"id": "t2", "text": "Scientists study the stars to learn how the universe began."},
    ],
}
COMPARED = ("item_id", "suite", "prompt", "response", "passed", "score", "category", "details")


def _body(model: dict[str, Any], label: str) -> dict[str, Any]:
    return {
        "model": model,
        "suites": [QA, MC, TEXT],
        "prompt_format": "plain",
        "generation": {"max_new_tokens": 8},
        "label": label,
        # Every run computes for itself: an adapter's separate run must not be the group's copy.
        "cache": False,
    }


def _run_worker(settings: Settings, log: Path) -> str:
    """One real worker that takes every queued job, then exits; its log."""
    worker = start_worker(settings, "--kinds", "evaluation", "--once", log=log)
    assert worker.wait(timeout=300) == 0, log.read_text()[-3000:]
    return log.read_text()


def _items(client: Any, evaluation_id: str) -> list[dict[str, Any]]:
    page = client.get(f"/evaluations/{evaluation_id}/items", params={"limit": 500}).json()
    assert not page["has_more"]
    return [{key: row[key] for key in COMPARED} for row in page["data"]]


def _finished(client: Any, evaluation_id: str) -> dict[str, Any]:
    body: dict[str, Any] = client.get(f"/evaluations/{evaluation_id}").json()
    assert body["status"] == "succeeded", body["error"]
    return body


def test_three_adapters_load_the_base_once_and_equal_their_own_evaluations(
    client: Any, settings: Settings, tiny_model_dir: Path, tmp_path: Path
) -> None:
    adapters = [
        str(build_lora_adapter(tiny_model_dir, tmp_path / "models" / f"lora-{n}", seed=n))
        for n in (1, 2, 3)
    ]
    base = str(tiny_model_dir)
    # The base first, then its three adapters, then the base again: one worker, one load.
    before = client.post("/evaluations", json=_body({"path": base}, "base"))
    assert before.status_code == 202, before.text
    response = client.post("/evaluations", json=_body({"path": base, "adapters": adapters}, "ck"))
    assert response.status_code == 202, response.text
    group = response.json()
    assert [e["model"]["adapter_path"] for e in group["data"]] == adapters
    after = client.post("/evaluations", json=_body({"path": base}, "base-after-adapters"))

    log = _run_worker(settings, tmp_path / "group-worker.log")
    assert log.count("loaded base") == 1, log[-3000:]
    assert log.count("base kept loaded") == 4  # three adapters switched in, then removed

    shared = [_finished(client, e["id"]) for e in group["data"]]
    assert [e["model"]["engine"]["base_reused"] for e in shared] == [True, True, True]
    assert _finished(client, before.json()["id"])["model"]["engine"]["base_reused"] is False
    assert _finished(client, after.json()["id"])["model"]["engine"]["base_reused"] is True

    # Each adapter (and the base) on its own, each on a fresh worker: the reference.
    references = {}
    for adapter in [*adapters, None]:
        model = {"path": base} | ({"adapter_path": adapter} if adapter else {})
        alone = client.post("/evaluations", json=_body(model, "alone")).json()
        own_log = _run_worker(settings, tmp_path / f"worker-{len(references)}.log")
        assert own_log.count("loaded base") == 1
        references[adapter] = _finished(client, alone["id"])
        assert references[adapter]["model"]["engine"]["base_reused"] is False

    for evaluation, adapter in zip(shared, adapters, strict=True):
        reference = references[adapter]
        assert evaluation["model"]["fingerprint"] == reference["model"]["fingerprint"]
        assert evaluation["results"] == reference["results"]
        assert _items(client, evaluation["id"]) == _items(client, reference["id"])
    # The base, got back from under the adapters, answers as a freshly loaded one.
    base_after = _finished(client, after.json()["id"])
    assert base_after["results"] == references[None]["results"]
    assert _items(client, after.json()["id"]) == _items(client, references[None]["id"])

    # The adapters differ from each other and from the base: a switch that did not happen
    # (or a base that kept an adapter) would make two of these equal.
    answers = [
        [row["response"] for row in _items(client, e["id"]) if row["suite"] == QA["name"]]
        for e in [_finished(client, before.json()["id"]), *shared]
    ]
    assert len({tuple(a) for a in answers}) == 4, answers

    # Each adapter's evaluation compares with the base like any evaluation.
    for evaluation in shared:
        compared = client.get(
            "/compare", params={"before": before.json()["id"], "after": evaluation["id"]}
        )
        assert compared.status_code == 200, compared.text
        assert compared.json()["verdict"] in ("pass", "fail")


def test_a_vllm_engine_is_sized_for_the_adapters_still_to_run(
    client: Any, settings: Settings, tiny_model_dir: Path, tmp_path: Path
) -> None:
    """What ``_open_vllm`` sizes the engine's LoRA rank for: the group's other unfinished
    adapters, checked again (one removed since submission is left to fail on its own)."""
    from types import SimpleNamespace

    from sqlalchemy import update

    from app.core.tables import Evaluation
    from workers.evaluation.run import group_adapter_dirs

    paths = [
        build_lora_adapter(tiny_model_dir, tmp_path / "models" / f"rank-{n}", seed=n, r=2 * n)
        for n in (1, 2, 3, 4)
    ]
    body = _body({"path": str(tiny_model_dir), "adapters": [str(p) for p in paths]}, "sized")
    ids = [e["id"] for e in client.post("/evaluations", json=body).json()["data"]]
    with client.app.state.sessionmaker() as session, session.begin():
        session.execute(
            update(Evaluation).where(Evaluation.id == ids[1]).values(status="succeeded")
        )
    (paths[3] / "adapter_config.json").unlink()
    single = _body({"path": str(tiny_model_dir), "adapter_path": str(paths[0])}, "alone")
    alone_id = client.post("/evaluations", json=single).json()["id"]
    ctx: Any = SimpleNamespace(sessionmaker=client.app.state.sessionmaker)
    with client.app.state.sessionmaker() as session:
        first, alone = session.get(Evaluation, ids[0]), session.get(Evaluation, alone_id)
        assert first is not None and alone is not None
        assert group_adapter_dirs(ctx, settings, first) == [paths[2].resolve()]
        assert group_adapter_dirs(ctx, settings, alone) == []  # queued alone: no siblings
