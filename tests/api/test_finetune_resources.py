"""resources.processes: refused at submission when no worker could ever take the job, stored
on the job, and claimed only by a worker that holds as many processes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from app.core.database import make_engine, session_factory
from app.core.tables import FinetuneJob
from app.jobs.queue import claim, register_worker
from tests.api.test_finetune_jobs import EXAMPLES


def body(model: Path, **resources: Any) -> dict[str, Any]:
    return {
        "base_model": {"path": str(model)},
        "dataset": {"examples": EXAMPLES},
        "evaluation": None,
        "resources": resources,
    }


def test_a_job_larger_than_every_worker_is_refused_until_one_is_live(
    client, settings, tiny_model_dir
) -> None:  # type: ignore[no-untyped-def]
    engine = make_engine(settings.database_url)
    # No live worker and FORGETGUARD_MAX_PROCESSES 1 (the default): nothing could take it.
    response = client.post("/finetune-jobs", json=body(tiny_model_dir, processes=2))
    assert response.status_code == 422, response.text
    assert "--processes 2" in response.json()["detail"]

    register_worker(engine, worker_id="small", device="cpu", kinds=("finetune",), processes=1)
    register_worker(engine, worker_id="evals", device="cpu", kinds=("evaluation",), processes=4)
    assert client.post("/finetune-jobs", json=body(tiny_model_dir, processes=2)).status_code == 422

    register_worker(engine, worker_id="big", device="cpu", kinds=("finetune",), processes=2)
    response = client.post("/finetune-jobs", json=body(tiny_model_dir, processes=2))
    assert response.status_code == 202, response.text
    job_id = response.json()["id"]
    assert response.json()["resources"] == {"processes": 2, "strategy": "ddp"}
    with session_factory(engine)() as session:
        row = session.get(FinetuneJob, job_id)
        assert row is not None and row.processes == 2
    workers = {w["id"]: w["processes"] for w in client.get("/workers").json()["data"]}
    assert workers == {"small": 1, "evals": 4, "big": 2}

    # The one-process worker leaves it queued; the two-process worker takes it.
    kinds = ("finetune",)
    assert claim(engine, worker_id="small", kinds=kinds, lease_seconds=60, processes=1) is None
    taken = claim(engine, worker_id="big", kinds=kinds, lease_seconds=60, processes=2)
    assert taken is not None and taken.id == job_id


def test_a_deployment_may_declare_workers_that_have_not_started(
    client, settings, tiny_model_dir
) -> None:  # type: ignore[no-untyped-def]
    settings.max_processes = 2  # FORGETGUARD_MAX_PROCESSES: its largest worker
    response = client.post("/finetune-jobs", json=body(tiny_model_dir, processes=2))
    assert response.status_code == 202, response.text
    sharded = client.post("/finetune-jobs", json=body(tiny_model_dir, processes=2, strategy="fsdp"))
    assert sharded.status_code == 202, sharded.text
    assert sharded.json()["resources"] == {"processes": 2, "strategy": "fsdp"}
    zero = body(tiny_model_dir, processes=2, strategy="deepspeed")
    zero = client.post("/finetune-jobs", json=zero)
    assert zero.status_code == 202 and zero.json()["resources"]["strategy"] == "deepspeed"
    # QLoRA, EWC, checkpoint evaluations and the guard train in a group as in one process.
    quantized = {**body(tiny_model_dir, processes=2, strategy="fsdp"), "method": "qlora"}
    assert client.post("/finetune-jobs", json=quantized).status_code == 202
    mitigated = {
        **body(tiny_model_dir, processes=2),
        "ewc": {"fisher_samples": 4},
        "evaluation": {"suites": ["general-qa"], "every_steps": 2},
        "guard": {"action": "stop"},
    }
    assert client.post("/finetune-jobs", json=mitigated).status_code == 202
    assert client.post("/finetune-jobs", json=body(tiny_model_dir, processes=3)).status_code == 422


def test_what_a_process_group_cannot_run_is_a_422(client, tiny_model_dir) -> None:  # type: ignore[no-untyped-def]
    for resources, word in (
        ({"processes": 2, "strategy": "zero3"}, "strategy"),
        ({"processes": 9}, "processes"),
    ):
        response = client.post("/finetune-jobs", json=body(tiny_model_dir, **resources))
        assert response.status_code == 422 and word in response.text, (resources, response.text)
