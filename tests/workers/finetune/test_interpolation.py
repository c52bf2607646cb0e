"""Interpolation (WiSE-FT): weights between base and fine-tune, the choice of α, a whole sweep
on a worker (tiny model) and the after-the-fact route."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from tests.conftest import start_worker
from tests.workers.finetune.jobs import plain_body, post_job, succeeded
from tests.workers.finetune.test_holdout import GENERAL_QA, RECORDS
from workers.engine.loading import load_model
from workers.finetune.stages.interpolation import _Weights, choose

CPU = torch.device("cpu")


def _result(alpha: float, verdict: str, gain: float) -> dict[str, Any]:
    return {
        "alpha": alpha,
        "verdict": {"verdict": verdict},
        "domain": {"gain": {"relative_nll": gain}},
    }


def test_choose_the_largest_passing_alpha_or_the_best_domain_gain() -> None:
    results = [
        _result(0.25, "pass", 0.1),
        _result(0.5, "pass", 0.3),
        _result(0.75, "pass", 0.2),
        _result(1.0, "fail", 0.5),
    ]
    assert choose(results, "largest")["alpha"] == 0.75  # type: ignore[index]
    assert choose(results, "best_domain")["alpha"] == 0.5  # type: ignore[index]
    assert choose([_result(1.0, "fail", 0.5)], "largest") is None


def test_full_weights_are_the_straight_line_between_base_and_tuned(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    tuned_dir = tmp_path / "tuned"
    tuned = load_model(tiny_model_dir, CPU)
    with torch.no_grad():
        for param in tuned.parameters():
            param.add_(0.5)
    tuned.save_pretrained(tuned_dir)
    base = dict(load_model(tiny_model_dir, CPU).named_parameters())
    request = SimpleNamespace(method="full", adapter=False, quantization=None)
    run = SimpleNamespace(device=CPU, request=request)
    weights = _Weights(run, tiny_model_dir, tuned_dir)  # type: ignore[arg-type]
    for alpha in (0.0, 0.25, 1.0):
        weights.set(alpha)
        for name, param in weights.model.named_parameters():
            assert torch.allclose(param, base[name] + 0.5 * alpha, atol=1e-5), (alpha, name)


@pytest.mark.slow
@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_lora_sweep_exports_the_chosen_alpha_and_can_be_rerun_after_the_fact(
    client,
    settings,
    engine,
    tiny_model_dir,
    procs,
    tmp_path,
) -> None:  # type: ignore[no-untyped-def]
    from safetensors.torch import load_file

    body = plain_body(
        tiny_model_dir,
        RECORDS,
        method="lora",
        hyperparameters={"learning_rate": 1e-2, "max_steps": 6},
        evaluation={
            "suites": [GENERAL_QA],
            "generation": {"max_new_tokens": 4},
            "threshold": 1.0,  # every α passes: the largest one is chosen
            "domain": {"holdout": 0.3},
        },
        interpolation={"alphas": [1.0, 0.5]},
    )
    job_id = post_job(client, body)
    procs.append(start_worker(settings, log=tmp_path / "worker.log"))

    def finished(jid: str) -> dict[str, Any]:
        return succeeded(client, engine, jid, tmp_path / "worker.log")

    data = finished(job_id)
    sweep = data["metrics"]["interpolation"]
    assert [r["alpha"] for r in sweep["results"]] == [0.5, 1.0]
    for r in sweep["results"]:
        assert set(r) == {"alpha", "general", "domain", "verdict"}
        assert r["verdict"]["verdict"] == "pass" and r["domain"]["after"]["nll_per_token"]
    assert data["chosen_alpha"] == 1.0 and data["output_path"] == sweep["trained_output_path"]
    # α scales the update: the held-out NLL at α 0.5 lies between the base and α 1.
    half, full = (r["domain"]["after"]["nll_per_token"] for r in sweep["results"])
    before = sweep["results"][0]["domain"]["before"]["nll_per_token"]
    assert min(before, full) < half < max(before, full)

    # After the fact: only α 0.25 — a new job, no training, the adapter's B scaled by 0.25.
    reply = client.post(f"/finetune-jobs/{job_id}/interpolations", json={"alphas": [0.25]})
    assert reply.status_code == 202, reply.text
    child = finished(reply.json()["id"])
    assert child["chosen_alpha"] == 0.25 and child["output_path"].endswith("interpolated")
    # The split is the trained job's: recorded with it, and the sweep scored those records.
    assert data["metrics"]["dataset"]["records"] == len(RECORDS)
    assert child["metrics"]["dataset"] == data["metrics"]["dataset"]
    assert (
        child["comparison"]["domain"]["held_out_records"] == data["metrics"]["dataset"]["held_out"]
    )
    trained = load_file(str(Path(data["output_path"]) / "adapter_model.safetensors"))
    scaled = load_file(str(Path(child["output_path"]) / "adapter_model.safetensors"))
    assert set(trained) == set(scaled)
    for name, tensor in trained.items():
        factor = 0.25 if "lora_B" in name else 1.0
        assert torch.allclose(scaled[name], tensor * factor, atol=1e-6), name
    # The exported adapter evaluates as the sweep said (same device, same dtype).
    after = client.get(f"/evaluations/{child['after_evaluation_id']}").json()
    said = child["metrics"]["interpolation"]["results"][0]["general"]["accuracy"]
    assert after["results"]["tiny-general"]["overall_accuracy"] == said
    messages = [
        e["message"]
        for e in client.get(f"/finetune-jobs/{child['id']}/events", params={"limit": 500}).json()[
            "data"
        ]
    ]
    assert not [m for m in messages if m.startswith("step ")]  # nothing was trained again
    assert client.post("/finetune-jobs/ft_0000/interpolations", json={}).status_code == 404
