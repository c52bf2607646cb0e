"""The evaluation cache: a finished evaluation with the same model fingerprint, suite contents,
prompt format and generation settings answers a new one at once, unless ``"cache": false``."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import update

from app.core.tables import Evaluation, EvaluationItem
from app.evaluations.cache import effective_prompt_format, has_chat_template
from tests.conftest import start_worker
from tests.stored import qa_row, store_finished

SUITE = {
    "name": "cache-qa",
    "kind": "qa",
    "items": [
        {"id": "q1", "question": "What is the capital of France?", "answers": ["Paris"]},
        {"id": "q2", "question": "What is the capital of Italy?", "answers": ["Rome"]},
    ],
}
RESULTS = {
    "cache-qa": {
        "kind": "qa",
        "overall_accuracy": 0.5,
        "correct": 1,
        "total": 2,
        "by_category": {"general": {"correct": 1, "total": 2, "accuracy": 0.5}},
    }
}


def post(client: Any, model: Path, **extra: Any) -> dict[str, Any]:
    body = {"model": {"path": str(model)}, "suites": [SUITE], **extra}
    response = client.post("/evaluations", json=body)
    # A cache hit is an existing, finished resource (200); new work is accepted (202).
    hit = response.status_code == 200 and response.json()["cached_from"] is not None
    queued = response.status_code == 202 and response.json()["status"] == "queued"
    assert hit or queued, response.text
    return dict(response.json())


def succeed(client: Any, evaluation_id: str, status: str = "succeeded") -> None:
    """What a worker leaves behind: item rows, results, status."""
    rows = [
        qa_row(
            evaluation_id,
            "cache-qa",
            n,
            item,
            response="Paris" if n == 0 else "Milan",
            passed=n == 0,
            category="general",
        )
        for n, item in enumerate(SUITE["items"])
    ]
    store_finished(
        client,
        evaluation_id,
        rows,
        status=status,
        results=RESULTS,
        progress={"done": 2, "total": 2, "stage": "done"},
    )


def test_a_repeated_evaluation_is_answered_from_the_cache(
    client: Any, tiny_model_dir: Path
) -> None:
    source = post(client, tiny_model_dir)
    assert source["status"] == "queued" and source["cached_from"] is None
    assert source["model"]["fingerprint"].startswith("sha256:")
    succeed(client, source["id"])
    response = client.post(
        "/evaluations",
        json={"model": {"path": str(tiny_model_dir)}, "suites": [SUITE], "label": "again"},
    )
    assert response.status_code == 200 and response.headers["location"].endswith(
        response.json()["id"]
    )
    hit = response.json()
    assert hit["status"] == "succeeded" and hit["cached_from"] == source["id"]
    # Created, started and finished at once: never started before it was created.
    assert hit["created_at"] == hit["started_at"] == hit["finished_at"]
    assert hit["id"] != source["id"] and hit["label"] == "again"
    assert hit["results"] == RESULTS
    assert hit["progress"]["done"] == hit["progress"]["total"] == 2
    assert hit["model"]["fingerprint"] == source["model"]["fingerprint"]
    items = client.get(f"/evaluations/{hit['id']}/items").json()["data"]
    assert [(i["item_id"], i["response"]) for i in items] == [("q1", "Paris"), ("q2", "Milan")]
    # A copy of a copy still points at the run that produced the items.
    assert post(client, tiny_model_dir)["cached_from"] == source["id"]
    # Comparing the copy with its source is allowed, and the response says what it is.
    body = client.get("/compare", params={"before": source["id"], "after": hit["id"]}).json()
    assert body["same_run"] is True and body["statistics"]["mcnemar_p_value"] == 1.0


def test_cache_false_queues_a_fresh_run(client: Any, tiny_model_dir: Path) -> None:
    succeed(client, post(client, tiny_model_dir)["id"])
    fresh = post(client, tiny_model_dir, cache=False)
    assert fresh["status"] == "queued" and fresh["cached_from"] is None


def test_another_suite_generation_or_prompt_format_misses(
    client: Any, tiny_model_dir: Path
) -> None:
    succeed(client, post(client, tiny_model_dir)["id"])
    assert post(client, tiny_model_dir, generation={"max_new_tokens": 10})["status"] == "queued"
    assert post(client, tiny_model_dir, prompt_format="plain")["status"] == "queued"
    other = {**SUITE, "items": SUITE["items"][:1]}
    response = client.post(
        "/evaluations", json={"model": {"path": str(tiny_model_dir)}, "suites": [other]}
    )
    assert response.json()["status"] == "queued"


def test_a_null_prompt_format_is_resolved_at_submission(client: Any, tiny_model_dir: Path) -> None:
    source = post(client, tiny_model_dir)  # the tiny model has a chat template
    assert source["prompt_format"] == "chat"
    succeed(client, source["id"])
    assert post(client, tiny_model_dir, prompt_format="chat")["cached_from"] == source["id"]


def test_the_fingerprint_is_content_not_path(
    client: Any, settings: Any, tiny_model_dir: Path
) -> None:
    source = post(client, tiny_model_dir)
    succeed(client, source["id"])
    models = settings.model_roots[2]
    same = shutil.copytree(tiny_model_dir, models / "same-weights")
    assert post(client, same)["cached_from"] == source["id"]
    changed = shutil.copytree(tiny_model_dir, models / "changed-weights")
    weights = changed / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # one byte of one weight
    weights.write_bytes(bytes(data))
    assert post(client, changed)["status"] == "queued"
    retemplated = shutil.copytree(tiny_model_dir, models / "new-template")
    (retemplated / "chat_template.jinja").write_text("{{ messages[0]['content'] }}")
    assert post(client, retemplated)["status"] == "queued"


def test_failed_runs_are_never_a_source(client: Any, tiny_model_dir: Path) -> None:
    succeed(client, post(client, tiny_model_dir)["id"], status="failed")
    assert post(client, tiny_model_dir)["status"] == "queued"


def test_chat_template_detection_reads_the_files_transformers_reads(tmp_path: Path) -> None:
    model = tmp_path / "m"
    model.mkdir()
    (model / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 8}))
    assert not has_chat_template(model)
    assert effective_prompt_format(None, model) == "plain"
    assert effective_prompt_format("chat", model) == "chat"
    (model / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ x }}"}))
    assert effective_prompt_format(None, model) == "chat"
    (model / "tokenizer_config.json").write_text("{}")
    (model / "chat_template.jinja").write_text("{{ x }}")
    assert has_chat_template(model)


@pytest.mark.slow
@pytest.mark.one_db
def test_a_run_queued_without_cache_becomes_a_source(
    client: Any, settings: Any, tiny_model_dir: Path, tmp_path: Path
) -> None:
    queued = post(client, tiny_model_dir, cache=False, generation={"max_new_tokens": 4})
    submitted_key = _cache_key(client, queued["id"])
    with client.app.state.sessionmaker() as session, session.begin():
        # Forget the submission's key: the worker must set it from the model it loaded.
        session.execute(
            update(Evaluation).where(Evaluation.id == queued["id"]).values(cache_key=None)
        )
    worker = start_worker(settings, "--once", log=tmp_path / "worker.log")
    assert worker.wait(timeout=240) == 0, (tmp_path / "worker.log").read_text()[-3000:]
    assert client.get(f"/evaluations/{queued['id']}").json()["status"] == "succeeded"
    assert _cache_key(client, queued["id"]) == submitted_key
    hit = post(client, tiny_model_dir, generation={"max_new_tokens": 4})
    assert hit["cached_from"] == queued["id"] and hit["status"] == "succeeded"


def _cache_key(client: Any, evaluation_id: str) -> str | None:
    with client.app.state.sessionmaker() as session:
        row = session.get(Evaluation, evaluation_id)
        assert row is not None
        return row.cache_key


def test_a_run_that_recorded_less_than_its_kind_now_records_is_no_source(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import dataclasses
    import hashlib

    from app.evaluations.cache import cache_key
    from app.suites.kinds import KINDS

    common: dict[str, Any] = {"fingerprint": "sha256:f", "prompt_format": "plain", "generation": {}}
    text = [{"name": "general-text", "content_hash": "h1", "kind": "perplexity"}]
    qa = [{"name": "general-qa", "content_hash": "h2", "kind": "qa"}]
    now = cache_key(suites=text, **common)
    # Before perplexity rows stored their top-k next tokens (records version 1), the key was
    # another: such a run cannot answer an evaluation whose comparison will want KL.
    monkeypatch.setitem(
        KINDS, "perplexity", dataclasses.replace(KINDS["perplexity"], records_version=1)
    )
    assert cache_key(suites=text, **common) != now
    monkeypatch.undo()
    assert cache_key(suites=text, **common) == now
    # A kind still on its first version keeps the key it always had.
    legacy = {**common, "suites": [["general-qa", "h2"]]}
    canonical = json.dumps(legacy, sort_keys=True, separators=(",", ":"))
    assert (
        cache_key(suites=qa, **common) == "sha256:" + hashlib.sha256(canonical.encode()).hexdigest()
    )


@pytest.mark.slow
@pytest.mark.one_db
def test_identical_evaluations_submitted_a_second_apart_share_one_run(
    client: Any, settings: Any, tiny_model_dir: Path, tmp_path: Path
) -> None:
    workers = [start_worker(settings, log=tmp_path / f"worker-{n}.log") for n in (1, 2)]
    try:
        generation = {"max_new_tokens": 4}
        first = post(client, tiny_model_dir, generation=generation)
        time.sleep(1.0)
        second = post(client, tiny_model_dir, generation=generation)
        assert first["status"] == second["status"] == "queued"  # nothing to copy yet
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            states = [client.get(f"/evaluations/{e['id']}").json() for e in (first, second)]
            if all(s["status"] in ("succeeded", "failed", "cancelled") for s in states):
                break
            time.sleep(0.5)
        logs = "".join((tmp_path / f"worker-{n}.log").read_text()[-2000:] for n in (1, 2))
        ran, copied = states
        assert ran["status"] == copied["status"] == "succeeded", logs
        # The second waited for the first (two idle workers) and was answered from it.
        assert copied["cached_from"] == ran["id"] and ran["cached_from"] is None
        assert copied["results"] == ran["results"]
        with client.app.state.sessionmaker() as session:
            counts = {
                e["id"]: session.query(EvaluationItem).filter_by(evaluation_id=e["id"]).count()
                for e in (first, second)
            }
        assert counts == {first["id"]: len(SUITE["items"]), second["id"]: 0}
    finally:
        for worker in workers:
            worker.terminate()
        for worker in workers:
            worker.wait(timeout=60)


OTHER_SUITE = {
    "name": "cache-qa-more",
    "kind": "qa",
    "items": [{"id": "m1", "question": "What is the capital of Spain?", "answers": ["Madrid"]}],
}


def _items(client: Any, evaluation_id: str, suite: str) -> list[dict[str, Any]]:
    """The item rows of one suite of an evaluation, without their own ids."""
    with client.app.state.sessionmaker() as session:
        rows = session.query(EvaluationItem).filter_by(evaluation_id=evaluation_id, suite=suite)
        return sorted(
            (
                {c: getattr(r, c) for c in ("item_id", "position", "prompt", "response", "passed")}
                for r in rows
            ),
            key=lambda r: r["position"],
        )


@pytest.mark.slow
@pytest.mark.one_db
def test_a_suite_already_answered_by_the_same_model_is_reused_and_the_rest_run(
    client: Any, settings: Any, tiny_model_dir: Path, tmp_path: Path
) -> None:
    log = tmp_path / "worker.log"

    def run(**extra: Any) -> dict[str, Any]:
        queued = post(client, tiny_model_dir, generation={"max_new_tokens": 4}, **extra)
        worker = start_worker(settings, "--once", log=log)
        assert worker.wait(timeout=240) == 0, log.read_text()[-3000:]
        done = client.get(f"/evaluations/{queued['id']}").json()
        assert done["status"] == "succeeded", done
        return dict(done)

    first = run()
    both = [SUITE, OTHER_SUITE]
    second = run(suites=both)  # a superset: a new whole-evaluation key, so no copy at submission
    assert second["cached_from"] is None
    reused = {s["name"]: s["reused_from"] for s in second["suites"]}
    assert reused == {"cache-qa": first["id"], "cache-qa-more": None}
    assert f"suite cache-qa reused from run {first['id']} (2 items)" in log.read_text()
    assert _items(client, second["id"], "cache-qa") == _items(client, first["id"], "cache-qa")
    assert len(_items(client, second["id"], "cache-qa-more")) == 1  # generated

    # Reused answers score exactly as answers generated again would.
    fresh = run(suites=both, cache=False)
    assert all(s["reused_from"] is None for s in fresh["suites"])
    assert fresh["results"] == second["results"]
