"""The learning–forgetting trade-off on the real reference model, through the API and a real
worker: a full fine-tune at lr 1e-3 on 30 drug Q&A learns the held-out questions but forgets
general ones ("learned but forgot"); checkpoint evaluations follow both curves, and the guard
ships an earlier checkpoint that passes the gate although the final one fails; an
interpolation between the base and the collapsed weights finds an α < 1 that passes.

Sized for a CPU shared with other work: 16 optimizer steps, 10 general questions."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.conftest import REPO
from tests.e2e.test_reference_finetune import (  # noqa: F401 (fixtures)
    finished_job,
    general_qa_subset,
    passive_threads,
    reference_settings,
    worker,
)

GENERAL_QUESTIONS = 10


def drug_qa(n: int) -> list[dict[str, Any]]:
    lines = (REPO / "app/datasets/drug-qa.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()][:n]


@pytest.mark.reference
@pytest.mark.slow
@pytest.mark.timeout(3600)
@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_lr_1e3_learns_but_forgets_and_keep_best_ships_a_passing_checkpoint(
    client,
    reference_model_dir,
    worker,  # noqa: F811
    tmp_path,
) -> None:  # type: ignore[no-untyped-def]
    body = {
        "base_model": {"path": str(reference_model_dir)},
        "dataset": {"examples": drug_qa(30)},
        "method": "full",
        "preset": "risky",
        "hyperparameters": {
            "learning_rate": 1e-3,
            "per_device_train_batch_size": 4,
            "max_steps": 16,
            "warmup_ratio": 0.125,
            "lr_scheduler_type": "linear",
            "checkpoint_every_steps": 100_000,
        },
        "evaluation": {
            "suites": [general_qa_subset(GENERAL_QUESTIONS)],
            "generation": {"max_new_tokens": 12},
            "threshold": 0.10,
            "domain": {"holdout": 0.2, "seed": 42},
            "every_steps": 4,
        },
        "guard": {"max_drop": 0.10, "action": "keep_best"},
    }
    response = client.post("/finetune-jobs", json=body)
    assert response.status_code == 202, response.text
    job = finished_job(client, response.json()["id"], tmp_path / "worker.log")
    checkpoints = client.get(f"/finetune-jobs/{job['id']}/checkpoints").json()["data"]
    for c in checkpoints:
        print(
            f"\nstep {c['step']:>3}: general accuracy {c['general']['accuracy']}, "
            f"held-out NLL/token {c['domain']['after']['nll_per_token']:.3f}, "
            f"{c['verdict']['verdict']} / guard {c['verdict']['guard']} / "
            f"{c['verdict'].get('outcome')}"
        )
    print(f"shipped step {job['shipped_step']}: {job['shipped_reason']}")
    print(f"job outcome: {job['comparison'].get('outcome_summary')}")

    # Held out: 6 of 30 records, never trained on, scored before and after.
    assert job["metrics"]["examples"]["held_out"] == 6
    assert job["metrics"]["examples"]["domain"] == 24
    # Three or more evaluated checkpoints with general and domain figures.
    trained = [c for c in checkpoints if c["step"] > 0]
    assert len(trained) >= 3
    assert all(c["general"]["accuracy"] is not None for c in trained)
    assert all(c["domain"]["after"]["nll_per_token"] is not None for c in trained)
    # The final weights learned the domain and forgot: "learned but forgot".
    final = checkpoints[-1]
    assert final["step"] == 16
    assert final["domain"]["after"]["nll_per_token"] < final["domain"]["before"]["nll_per_token"]
    assert final["general"]["accuracy_drop"] > 0.10
    assert final["verdict"]["verdict"] == "fail"
    assert final["verdict"]["outcome"] == "learned_but_forgot"
    # keep_best shipped an earlier checkpoint that passes the gate, and the job says why.
    assert job["shipped_step"] is not None and job["shipped_step"] < 16
    shipped = next(c for c in checkpoints if c["step"] == job["shipped_step"])
    assert shipped["verdict"]["guard"] == "pass"
    assert "the final step 16 fails the guard" in job["shipped_reason"]
    # The exported checkpoint, evaluated after: it passes the gate, as its checkpoint said.
    assert job["comparison"]["verdict"] == "pass", job["comparison"]["reasons"]
    assert job["comparison"]["domain"]["held_out_records"] == 6

    # WiSE-FT after the fact on the collapsed final weights: an α < 1 passes the gate, and
    # the exported model evaluates as the sweep said.
    reply = client.post(
        f"/finetune-jobs/{job['id']}/interpolations", json={"alphas": [0.1, 0.25, 0.5]}
    )
    assert reply.status_code == 202, reply.text
    sweep_job = finished_job(client, reply.json()["id"], tmp_path / "worker.log")
    sweep = sweep_job["metrics"]["interpolation"]
    for r in sweep["results"]:
        print(
            f"α {r['alpha']}: general accuracy {r['general']['accuracy']}, held-out NLL/token "
            f"{r['domain']['after']['nll_per_token']:.3f}, {r['verdict']['verdict']}"
        )
    assert sweep["trained_output_path"] == job["metrics"]["final_output_path"]
    chosen = sweep_job["chosen_alpha"]
    assert chosen is not None and chosen < 1
    said = next(r for r in sweep["results"] if r["alpha"] == chosen)
    assert said["verdict"]["verdict"] == "pass"
    assert sweep_job["output_path"].endswith("interpolated")
    assert sweep_job["comparison"]["verdict"] == "pass", sweep_job["comparison"]["reasons"]
    after = client.get(f"/evaluations/{sweep_job['after_evaluation_id']}").json()
    assert after["results"]["e2e-general-qa"]["overall_accuracy"] == said["general"]["accuracy"]
