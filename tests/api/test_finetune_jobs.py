"""POST/GET /finetune-jobs: validation (422/403), queueing, events pagination, cancel."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from app.core.database import make_engine, session_factory
from app.core.tables import Evaluation, FinetuneCheckpoint, FinetuneEvent
from tests.samples import CAPITAL_QUESTION

EXAMPLES = [
    {"prompt": "What is aspirin?", "completion": "Aspirin is an NSAID used for pain and fever."},
    {"text": "Q: What is metformin?\nA: A medicine that lowers blood sugar."},
    {
        "messages": [
            {"role": "user", "content": "What is warfarin?"},
            {"role": "assistant", "content": "An anticoagulant."},
        ]
    },
]
QA_SUITE = {
    "name": "tiny-qa",
    "kind": "qa",
    "items": [
        CAPITAL_QUESTION,
    ],
}


def body(model: Path, **extra: Any) -> dict[str, Any]:
    return {
        "base_model": {"path": str(model)},
        "dataset": {"examples": EXAMPLES},
        "evaluation": {"suites": [QA_SUITE, "forgetting-checklist"]},
        **extra,
    }


def test_post_queues_a_job_and_points_to_it(client, tiny_model_dir) -> None:  # type: ignore[no-untyped-def]
    response = client.post(
        "/finetune-jobs", json=body(tiny_model_dir, method="lora", preset="safe", label="drugs")
    )
    assert response.status_code == 202, response.text
    job = response.json()
    assert response.headers["location"] == f"/finetune-jobs/{job['id']}"
    assert job["status"] == "queued" and job["label"] == "drugs" and job["warnings"] == []
    assert job["hyperparameters"]["learning_rate"] == 2e-4  # the safe preset's LoRA rate
    assert job["hyperparameters"]["lr_scheduler_type"] == "cosine"
    assert job["lora"]["r"] == 16 and job["lora"]["target_modules"] == ["q_proj", "v_proj"]
    assert job["dataset"] == {
        "examples": 3,
        "path": None,
        "prompt_format": None,
    }  # counted, not echoed
    # Suites are pinned to versions, so before and after run the very same ones.
    assert job["evaluation"]["suites"] == ["tiny-qa@1", "forgetting-checklist@1"]
    for key in (
        "before_evaluation_id",
        "after_evaluation_id",
        "comparison",
        "output_path",
        "trainable_parameters",
        "metrics",
    ):
        assert job[key] is None
    assert client.get(f"/finetune-jobs/{job['id']}").json()["id"] == job["id"]
    assert [j["id"] for j in client.get("/finetune-jobs").json()["data"]] == [job["id"]]


def test_overrides_apply_to_the_preset_and_a_high_rate_warns(client, tiny_model_dir) -> None:  # type: ignore[no-untyped-def]
    response = client.post(
        "/finetune-jobs",
        json=body(
            tiny_model_dir,
            method="full",
            preset="risky",
            hyperparameters={"learning_rate": 1e-3, "per_device_train_batch_size": 2},
        ),
    )
    assert response.status_code == 202, response.text
    job = response.json()
    hp = job["hyperparameters"]
    assert (hp["learning_rate"], hp["per_device_train_batch_size"], hp["num_train_epochs"]) == (
        1e-3,
        2,
        10,
    )
    assert len(job["warnings"]) == 1 and "rule of thumb for full fine-tuning" in job["warnings"][0]
    events = client.get(f"/finetune-jobs/{job['id']}/events").json()["data"]
    assert [e["level"] for e in events] == ["info", "warning"]
    assert events[1]["message"] == job["warnings"][0]


def test_unknown_hyperparameter_is_422_and_queues_nothing(client, tiny_model_dir) -> None:  # type: ignore[no-untyped-def]
    response = client.post(
        "/finetune-jobs", json=body(tiny_model_dir, hyperparameters={"learnig_rate": 1e-4})
    )
    assert response.status_code == 422
    assert response.headers["content-type"].startswith("application/problem+json")
    assert "learnig_rate" in json.dumps(response.json()["errors"])
    assert client.get("/finetune-jobs").json()["data"] == []


def test_impossible_hyperparameters_are_422(client, tiny_model_dir) -> None:  # type: ignore[no-untyped-def]
    for extra in (
        {"hyperparameters": {"learning_rate": 0}},
        {"hyperparameters": {"learning_rate": -1}},
        {"hyperparameters": {"num_train_epochs": 0}},
        {"lora": {"r": 0}},
        {"method": "full", "lora": {"r": 4}},
    ):
        response = client.post("/finetune-jobs", json=body(tiny_model_dir, **extra))
        assert response.status_code == 422, (extra, response.text)


def test_a_qlora_job_is_queued_unless_vllm_would_evaluate_it(client, tiny_model_dir) -> None:  # type: ignore[no-untyped-def]
    response = client.post(
        "/finetune-jobs",
        json=body(tiny_model_dir, method="qlora", evaluation={"suites": [QA_SUITE]}),
    )
    assert response.status_code == 202, response.text
    job = response.json()
    assert job["method"] == "qlora" and job["lora"]["r"] == 16 and job["warnings"] == []
    assert job["hyperparameters"]["learning_rate"] == 2e-4
    refused = client.post(
        "/finetune-jobs",
        json=body(
            tiny_model_dir, method="qlora", evaluation={"suites": [QA_SUITE], "backend": "vllm"}
        ),
    )
    assert refused.status_code == 422, refused.text
    assert refused.headers["content-type"].startswith("application/problem+json")
    assert "backend 'vllm' cannot load that base" in json.dumps(refused.json()["errors"])
    assert [j["id"] for j in client.get("/finetune-jobs").json()["data"]] == [job["id"]]


def test_empty_dataset_is_422(client, tiny_model_dir, settings) -> None:  # type: ignore[no-untyped-def]
    response = client.post(
        "/finetune-jobs", json={**body(tiny_model_dir), "dataset": {"examples": []}}
    )
    assert response.status_code == 422
    empty = settings.data_roots[0] / "empty.jsonl"
    empty.write_text("\n")
    response = client.post(
        "/finetune-jobs", json={**body(tiny_model_dir), "dataset": {"path": str(empty)}}
    )
    assert response.status_code == 422 and "no records" in response.json()["detail"]


def test_bad_inline_record_is_422_naming_it(client, tiny_model_dir) -> None:  # type: ignore[no-untyped-def]
    examples = [*EXAMPLES, {"prompt": "What is heparin?"}]
    response = client.post(
        "/finetune-jobs", json={**body(tiny_model_dir), "dataset": {"examples": examples}}
    )
    assert response.status_code == 422
    assert "examples[3] (record 4)" in response.json()["detail"]
    assert "'completion'" in response.json()["detail"]


def test_bad_jsonl_line_is_422_naming_the_line(client, tiny_model_dir, settings) -> None:  # type: ignore[no-untyped-def]
    path = settings.data_roots[0] / "drugs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in EXAMPLES) + '\n{"answer": "x"}\n')
    response = client.post(
        "/finetune-jobs", json={**body(tiny_model_dir), "dataset": {"path": str(path)}}
    )
    assert response.status_code == 422
    assert "line 4" in response.json()["detail"]
    path.write_text("\n".join(json.dumps(r) for r in EXAMPLES) + "\n")
    response = client.post(
        "/finetune-jobs", json={**body(tiny_model_dir), "dataset": {"path": str(path)}}
    )
    assert response.status_code == 202, response.text
    assert response.json()["dataset"]["path"] == str(path)


def test_base_model_outside_the_roots_is_403(client, tmp_path) -> None:  # type: ignore[no-untyped-def]
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    response = client.post("/finetune-jobs", json=body(outside))
    assert response.status_code == 403
    assert "outside the allowed roots" in response.json()["detail"]
    assert client.get("/finetune-jobs").json()["data"] == []


def test_dataset_outside_the_data_roots_is_403(client, tiny_model_dir, tmp_path) -> None:  # type: ignore[no-untyped-def]
    outside = tmp_path / "secret.jsonl"
    outside.write_text(json.dumps({"text": "x"}) + "\n")
    for spec in (
        {"dataset": {"path": str(outside)}},
        {"replay": {"path": str(outside)}},
        {"ewc": {"path": str(outside)}},
    ):
        response = client.post("/finetune-jobs", json={**body(tiny_model_dir), **spec})
        assert response.status_code == 403, spec
        assert "FORGETGUARD_DATA_ROOTS" in response.json()["detail"]


def test_the_artifacts_dir_is_readable_as_a_model_root(client, settings, tiny_model_dir) -> None:  # type: ignore[no-untyped-def]
    # A job's output can be fine-tuned again or evaluated where it lies: the artifacts dir is
    # a root for reading (the dir itself is no model: 422, not 403). Clients never name where
    # anything is written: outputs go under the artifacts dir by job id.
    settings.artifacts_dir.mkdir(parents=True, exist_ok=True)
    response = client.post("/finetune-jobs", json=body(settings.artifacts_dir))
    assert response.status_code == 422 and "no config.json" in response.json()["detail"]
    named = body(tiny_model_dir, output_path=str(settings.artifacts_dir / "mine"))
    assert client.post("/finetune-jobs", json=named).status_code == 422


def test_unknown_replay_suite_is_422(client, tiny_model_dir) -> None:  # type: ignore[no-untyped-def]
    response = client.post(
        "/finetune-jobs", json=body(tiny_model_dir, replay={"source": "no-such-suite"})
    )
    assert response.status_code == 422
    assert response.json()["errors"][0]["loc"] == ["body", "replay", "source"]


def test_replay_and_ewc_suite_sources_are_pinned(client, tiny_model_dir) -> None:  # type: ignore[no-untyped-def]
    response = client.post(
        "/finetune-jobs",
        json=body(
            tiny_model_dir,
            method="full",
            replay={"source": "general-qa", "fraction": 1.0},
            ewc={"source": "general-text", "fisher_samples": 8},
        ),
    )
    assert response.status_code == 202, response.text
    job = response.json()
    assert job["replay"]["source"] == "general-qa@1" and job["ewc"]["source"] == "general-text@1"
    default = client.post("/finetune-jobs", json=body(tiny_model_dir, replay={})).json()
    assert default["replay"]["source"] == "self" and default["replay"]["fraction"] == 0.1


def test_events_paginate_oldest_first(client, tiny_model_dir, settings) -> None:  # type: ignore[no-untyped-def]
    job = client.post("/finetune-jobs", json=body(tiny_model_dir)).json()
    engine = make_engine(settings.database_url)
    with session_factory(engine)() as session:
        for step in range(1, 8):
            session.add(
                FinetuneEvent(
                    job_id=job["id"], message=f"step {step}", data={"step": step, "loss": 1 / step}
                )
            )
        session.commit()
    engine.dispose()
    seen, cursor, pages = [], None, 0
    while True:
        params = {"limit": 3, **({"cursor": cursor} if cursor else {})}
        page = client.get(f"/finetune-jobs/{job['id']}/events", params=params).json()
        pages += 1
        seen += page["data"]
        assert set(page) == {"data", "has_more", "next_cursor"}
        if not page["has_more"]:
            assert page["next_cursor"] is None
            break
        cursor = page["next_cursor"]
    assert pages == 3 and len(seen) == 8  # "queued" + 7 steps
    assert [e["message"] for e in seen] == ["queued", *[f"step {i}" for i in range(1, 8)]]
    assert set(seen[1]) == {"id", "created_at", "level", "message", "data"}
    assert seen[1]["data"] == {"step": 1, "loss": 1.0} and isinstance(seen[1]["id"], str)
    warnings = client.get(f"/finetune-jobs/{job['id']}/events", params={"level": "warning"}).json()
    assert warnings["data"] == []
    assert client.get("/finetune-jobs/ft_nope/events").status_code == 404


def test_checkpoints_are_a_page_by_step_like_every_other_list(
    client, tiny_model_dir, settings
) -> None:  # type: ignore[no-untyped-def]
    job = client.post("/finetune-jobs", json=body(tiny_model_dir)).json()
    engine = make_engine(settings.database_url)
    with session_factory(engine)() as session:
        for step in (10, 0, 5, 20, 15):  # stored out of order
            session.add(
                FinetuneCheckpoint(
                    job_id=job["id"], step=step, general={"accuracy": 1 - step / 100}
                )
            )
        session.commit()
    engine.dispose()
    steps, cursor, pages = [], None, 0
    while True:
        params = {"limit": 2, **({"cursor": cursor} if cursor else {})}
        page = client.get(f"/finetune-jobs/{job['id']}/checkpoints", params=params).json()
        pages += 1
        assert set(page) == {"data", "has_more", "next_cursor"}
        steps += [c["step"] for c in page["data"]]
        if not page["has_more"]:
            assert page["next_cursor"] is None
            break
        cursor = page["next_cursor"]
    assert pages == 3 and steps == [0, 5, 10, 15, 20]
    whole = client.get(f"/finetune-jobs/{job['id']}/checkpoints").json()
    assert [c["step"] for c in whole["data"]] == steps and whole["has_more"] is False
    assert whole["data"][1]["general"] == {"accuracy": 0.95}
    bad = client.get(f"/finetune-jobs/{job['id']}/checkpoints", params={"cursor": "x"})
    assert bad.status_code == 422


def test_cancel_a_queued_job_and_its_evaluations(client, tiny_model_dir, settings) -> None:  # type: ignore[no-untyped-def]
    job = client.post("/finetune-jobs", json=body(tiny_model_dir)).json()
    engine = make_engine(settings.database_url)
    with session_factory(engine)() as session:
        from app.core.tables import new_id

        session.add(
            Evaluation(
                id=new_id("ev"),
                model_path="m",
                generation={},
                suites=[],
                status="running",
                finetune_job_id=job["id"],
            )
        )
        session.commit()
    response = client.post(f"/finetune-jobs/{job['id']}/cancel")
    assert response.status_code == 200 and response.json()["status"] == "cancelled"
    with session_factory(engine)() as session:
        statuses = {
            e.status for e in session.query(Evaluation).filter_by(finetune_job_id=job["id"])
        }
    engine.dispose()
    assert statuses == {"cancelled"}
    events = client.get(f"/finetune-jobs/{job['id']}/events").json()["data"]
    assert events[-1]["message"] == "cancelled by request"
    assert client.post(f"/finetune-jobs/{job['id']}/cancel").status_code == 200  # idempotent
    assert client.post("/finetune-jobs/ft_nope/cancel").status_code == 404


def test_idempotency_key_returns_the_original_job(client, tiny_model_dir) -> None:  # type: ignore[no-untyped-def]
    headers = {"Idempotency-Key": "ft-1"}
    first = client.post("/finetune-jobs", json=body(tiny_model_dir), headers=headers)
    again = client.post("/finetune-jobs", json=body(tiny_model_dir), headers=headers)
    assert first.status_code == 202 and again.status_code == 200
    assert again.json()["id"] == first.json()["id"]
    other = client.post("/finetune-jobs", json=body(tiny_model_dir, label="x"), headers=headers)
    assert other.status_code == 422


def test_list_filters_by_status_and_paginates(client, tiny_model_dir) -> None:  # type: ignore[no-untyped-def]
    ids = [client.post("/finetune-jobs", json=body(tiny_model_dir)).json()["id"] for _ in range(3)]
    client.post(f"/finetune-jobs/{ids[0]}/cancel")
    page = client.get("/finetune-jobs", params={"limit": 2}).json()
    assert [j["id"] for j in page["data"]] == ids[::-1][:2] and page["has_more"]
    rest = client.get("/finetune-jobs", params={"limit": 2, "cursor": page["next_cursor"]}).json()
    assert [j["id"] for j in rest["data"]] == [ids[0]] and not rest["has_more"]
    cancelled = client.get("/finetune-jobs", params={"status": "cancelled"}).json()["data"]
    assert [j["id"] for j in cancelled] == [ids[0]]


def test_a_dataset_of_twenty_records_holds_out_a_fifth_by_default(client, tiny_model_dir) -> None:  # type: ignore[no-untyped-def]
    twenty = [
        {"prompt": f"What is drug {i}?", "completion": f"Drug {i} is a drug."} for i in range(20)
    ]
    job = client.post(
        "/finetune-jobs", json=body(tiny_model_dir, dataset={"examples": twenty})
    ).json()
    assert job["evaluation"]["domain"] == {
        "holdout": 0.2,
        "seed": 42,
        "suites": [],
        "min_gain": 0.05,
    }
    small = client.post("/finetune-jobs", json=body(tiny_model_dir)).json()
    assert small["evaluation"]["domain"] is None  # 3 records: nothing held out unless asked
    off = client.post(
        "/finetune-jobs",
        json=body(
            tiny_model_dir,
            dataset={"examples": twenty},
            evaluation={"suites": [QA_SUITE], "domain": False},
        ),
    ).json()
    assert off["evaluation"]["domain"] is False


def test_domain_holdout_that_leaves_nothing_to_train_is_422(client, tiny_model_dir) -> None:  # type: ignore[no-untyped-def]
    response = client.post(
        "/finetune-jobs",
        json=body(
            tiny_model_dir,
            dataset={"examples": EXAMPLES[:1]},
            evaluation={"suites": [QA_SUITE], "domain": {"holdout": 0.5}},
        ),
    )
    assert response.status_code == 422, response.text
    assert "no record to train on" in response.json()["detail"]
    empty = client.post(
        "/finetune-jobs",
        json=body(tiny_model_dir, evaluation={"suites": [QA_SUITE], "domain": {"seed": 1}}),
    )
    assert empty.status_code == 422 and "holdout" in empty.text


def test_domain_suites_are_pinned_like_the_general_ones(client, tiny_model_dir) -> None:  # type: ignore[no-untyped-def]
    domain_suite = {**QA_SUITE, "name": "tiny-drug-qa"}
    job = client.post(
        "/finetune-jobs",
        json=body(
            tiny_model_dir,
            evaluation={"suites": [QA_SUITE], "domain": {"suites": [domain_suite]}},
        ),
    ).json()
    assert job["evaluation"]["domain"]["suites"] == ["tiny-drug-qa@1"]


def test_checkpoints_of_an_unknown_job_are_404_and_a_guard_needs_a_cadence(
    client, tiny_model_dir
) -> None:  # type: ignore[no-untyped-def]
    assert client.get("/finetune-jobs/ft_nope/checkpoints").status_code == 404
    response = client.post(
        "/finetune-jobs", json=body(tiny_model_dir, guard={"max_drop": 0.05, "action": "stop"})
    )
    assert response.status_code == 422 and "every_steps" in response.text
    both = client.post(
        "/finetune-jobs",
        json=body(
            tiny_model_dir, evaluation={"suites": [QA_SUITE], "every_steps": 2, "checkpoints": 3}
        ),
    )
    assert both.status_code == 422
    ok = client.post(
        "/finetune-jobs",
        json=body(
            tiny_model_dir,
            evaluation={"suites": [QA_SUITE], "checkpoints": 3},
            guard={"action": "stop"},
        ),
    )
    assert ok.status_code == 202, ok.text
    job = ok.json()
    assert job["guard"] == {"max_drop": 0.05, "action": "stop"}
    assert job["shipped_step"] is None
    # The guard applies the rule book's max_drop (the evaluation block's) unless it gives its own.
    book = client.post(
        "/finetune-jobs",
        json=body(
            tiny_model_dir,
            evaluation={"suites": [QA_SUITE], "checkpoints": 3, "max_drop": 0.1, "alpha": 0.01},
            guard={"action": "stop"},
        ),
    ).json()
    assert book["guard"] == {"max_drop": 0.1, "action": "stop"}
    assert book["evaluation"]["alpha"] == 0.01 and book["evaluation"]["category_rule"] == "point"
    own = client.post(
        "/finetune-jobs",
        json=body(
            tiny_model_dir,
            evaluation={"suites": [QA_SUITE], "checkpoints": 3, "max_drop": 0.1},
            guard={"max_drop": 0.2, "action": "keep_best"},
        ),
    ).json()
    assert own["guard"] == {"max_drop": 0.2, "action": "keep_best"}
    assert client.get(f"/finetune-jobs/{job['id']}/checkpoints").json()["data"] == []


def test_an_unknown_evaluation_suite_is_reported_where_it_was_written(
    client, tiny_model_dir
) -> None:  # type: ignore[no-untyped-def]
    response = client.post(
        "/finetune-jobs",
        json={**body(tiny_model_dir), "evaluation": {"suites": ["general-qa", "genral-qa"]}},
    )
    assert response.status_code == 422
    assert response.json()["errors"][0]["loc"] == ["body", "evaluation", "suites", 1]
    assert "did you mean 'general-qa'?" in response.json()["detail"]


def test_target_modules_matching_nothing_are_refused_with_the_models_names(
    client, tiny_model_dir
) -> None:  # type: ignore[no-untyped-def]
    response = client.post(
        "/finetune-jobs",
        json=body(tiny_model_dir, method="lora", lora={"target_modules": ["q_proj", "query"]}),
    )
    assert response.status_code == 422, response.text
    problem = response.json()
    assert problem["errors"][0]["loc"] == ["body", "lora", "target_modules"]
    assert "['query']" in problem["detail"] and "'v_proj'" in problem["detail"]
    # Suffix names peft accepts ("self_attn.q_proj") and 'all-linear' pass.
    for targets in (["self_attn.q_proj", "v_proj"], "all-linear"):
        ok = client.post(
            "/finetune-jobs", json=body(tiny_model_dir, lora={"target_modules": targets})
        )
        assert ok.status_code == 202, ok.text


def test_the_default_method_is_stated_in_the_response(client, tiny_model_dir) -> None:  # type: ignore[no-untyped-def]
    job = client.post("/finetune-jobs", json=body(tiny_model_dir)).json()
    assert job["method"] == "lora" and job["lora"]["target_modules"] == ["q_proj", "v_proj"]
    assert job["hyperparameters"]["learning_rate"] == 2e-4  # the safe preset's LoRA rate


def test_hyperparameters_are_resolved_once_at_submission_and_stored(
    client, settings, tiny_model_dir
) -> None:  # type: ignore[no-untyped-def]
    from app.core.tables import FinetuneJob
    from app.finetune.schemas import FinetuneJobCreate, planned_total_steps

    sent = body(tiny_model_dir, method="lora", preset="safe", hyperparameters={"max_steps": 7})
    job = client.post("/finetune-jobs", json=sent).json()
    engine = make_engine(settings.database_url)
    try:
        with session_factory(engine)() as session:
            row = session.get(FinetuneJob, job["id"])
            assert row is not None and row.resolved is not None
            expected = FinetuneJobCreate.model_validate(sent).resolved()
            assert row.resolved["hyperparameters"] == expected.model_dump(mode="json")
            assert row.resolved["planned_steps"] == planned_total_steps(3, expected) == 7
            # What was stored is what the job trains with and shows, whatever the presets
            # say later: a job queued under other defaults keeps them.
            row.resolved = {
                **row.resolved,
                "hyperparameters": {**row.resolved["hyperparameters"], "learning_rate": 0.123},
            }
            session.commit()
        assert (
            client.get(f"/finetune-jobs/{job['id']}").json()["hyperparameters"]["learning_rate"]
            == 0.123
        )
        with session_factory(engine)() as session:  # a job queued before they were stored
            row = session.get(FinetuneJob, job["id"])
            assert row is not None
            row.resolved = None
            session.commit()
        shown = client.get(f"/finetune-jobs/{job['id']}").json()["hyperparameters"]
        assert shown == expected.model_dump(mode="json")
    finally:
        engine.dispose()
