"""The vLLM backend end to end: `forgetguard serve --backend vllm` evaluates the reference model
on a suite it has never seen, beside a transformers worker, and the two agree item by item;
multiple-choice log-likelihoods and NLL/token agree within tolerance; a LoRA adapter served
unmerged by vLLM answers as peft does; one engine without LoRA serves every base job and one
with LoRA (at the adapter's rank) the adapter job; the top-k next tokens agree, so KL between
the engines is ~0; `/compare` of the two engines is a 409 naming the backend.

Tolerances, float32 on CPU (measured: log-likelihoods differ by ~1e-5, answers identical):
per-item correctness equal on >= 95 % of items, multiple-choice predictions equal on >= 95 %
and every log-likelihood within 0.01 nats, NLL/token within 0.1 % relative.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.core.config import Settings
from tests.conftest import start_serve, start_worker, wait_for

UNSEEN = json.loads((Path(__file__).parent / "data" / "unseen_general_40.json").read_text())
LOGLIK_TOLERANCE = 0.01
NLL_RELATIVE_TOLERANCE = 1e-3
KL_TOLERANCE = 1e-4  # nats/token; measured ~3e-11 between the engines in float32
AGREEMENT = 0.95

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.reference,
    pytest.mark.slow,
    pytest.mark.one_db,
    pytest.mark.timeout(2400),
]


def _random_adapter(model_dir: Path, out: Path) -> Path:
    """A LoRA adapter with random (non-zero) A and B on q/v: it changes answers for sure."""
    import torch
    from peft import LoraConfig, get_peft_model

    from workers.engine.loading import load_model

    torch.manual_seed(0)
    model = load_model(model_dir, torch.device("cpu"), dtype=torch.float32)
    config = LoraConfig(
        r=8, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False
    )
    get_peft_model(model, config).save_pretrained(out)
    return out


def _finished(http: httpx.Client, evaluation_id: str, timeout: float) -> dict[str, Any]:
    def done() -> dict[str, Any] | None:
        body: dict[str, Any] = http.get(f"/evaluations/{evaluation_id}").json()
        return body if body["status"] in ("succeeded", "failed", "cancelled") else None

    body: dict[str, Any] = wait_for(done, timeout, interval=1.0, what=f"{evaluation_id}")
    assert body["status"] == "succeeded", body["error"]
    return body


def _items(http: httpx.Client, evaluation_id: str) -> dict[tuple[str, str], dict[str, Any]]:
    out: dict[tuple[str, str], dict[str, Any]] = {}
    cursor = None
    while True:
        params: dict[str, Any] = {"limit": 500, **({"cursor": cursor} if cursor else {})}
        page = http.get(f"/evaluations/{evaluation_id}/items", params=params).json()
        for row in page["data"]:
            out[(row["suite"], row["item_id"])] = row
        if not page["has_more"]:
            return out
        cursor = page["next_cursor"]


def test_vllm_agrees_with_transformers_and_serves_adapters_unmerged(
    settings: Settings, reference_model_dir: Path, tmp_path: Path, vllm_env: None
) -> None:
    adapter = _random_adapter(reference_model_dir, tmp_path / "models" / "random-lora")
    serve_log, worker_log = tmp_path / "serve.log", tmp_path / "worker.log"
    server, http = start_serve(
        settings, "--workers", "1", "--device", "cpu", "--backend", "vllm", log=serve_log
    )
    http.timeout = 120
    worker = start_worker(settings, log=worker_log)  # a transformers worker beside it
    try:
        plain = {"prompt_format": "plain", "cache": False}
        runs = {  # name: (suites, adapter)
            "base": ([UNSEEN, "general-text"], None),
            "mc": (["general-mc"], None),
            # vLLM's LoRA kernels on CPU are plain torch: the adapter runs the QA suite only.
            "adapter": ([UNSEEN], str(adapter)),
        }
        ids: dict[str, str] = {}
        for backend in ("transformers", "vllm"):
            for name, (suites, adapter_path) in runs.items():
                model = {"path": str(reference_model_dir), "backend": backend}
                if adapter_path:
                    model["adapter_path"] = adapter_path
                body = {"model": model, "suites": suites, **plain}
                response = http.post("/evaluations", json=body)
                assert response.status_code == 202, response.text
                ids[f"{backend}-{name}"] = response.json()["id"]
        results = {key: _finished(http, value, 1500) for key, value in ids.items()}
        items = {key: _items(http, value) for key, value in ids.items()}

        engine = results["vllm-base"]["model"]["engine"]
        assert engine["backend"] == "vllm" and engine["dtype"] == "float32"
        assert engine["version"].startswith("vllm ") and engine["weights_hashed"] is True
        assert results["transformers-base"]["model"]["engine"]["backend"] == "transformers"

        def agreement(a: str, b: str, suite: str, field: str) -> float:
            keys = [k for k in items[a] if k[0] == suite]
            assert len(keys) == len(UNSEEN["items"]) or suite != UNSEEN["name"]
            same = sum(items[a][k][field] == items[b][k][field] for k in keys)
            return same / len(keys)

        # General QA on a suite neither engine has seen: per-item correctness.
        qa = agreement("transformers-base", "vllm-base", UNSEEN["name"], "passed")
        assert qa >= AGREEMENT, f"per-item correctness agrees on {qa:.1%} only"
        # Multiple choice: the same prediction, log-likelihoods within tolerance.
        mc = agreement("transformers-mc", "vllm-mc", "general-mc", "response")
        assert mc >= AGREEMENT
        for key, row in items["transformers-mc"].items():
            for ours, theirs in zip(
                row["details"]["logliks"], items["vllm-mc"][key]["details"]["logliks"], strict=True
            ):
                assert abs(ours - theirs) <= LOGLIK_TOLERANCE, (key, ours, theirs)
        # NLL/token on the same texts.
        for key, row in items["transformers-base"].items():
            if key[0] == "general-text":
                other = items["vllm-base"][key]
                assert other["details"]["tokens"] == row["details"]["tokens"]
                relative = abs(other["score"] - row["score"]) / row["score"]
                assert relative <= NLL_RELATIVE_TOLERANCE, (key, relative)
                assert other["details"]["topk"]["targets"] == row["details"]["topk"]["targets"]
        # KL to base from vLLM's top-k: the engines' distributions agree, so it is ~0.
        across = http.get(
            "/compare",
            params={
                "before": ids["transformers-base"],
                "after": ids["vllm-base"],
                "allow_backend_mismatch": "true",
            },
        )
        assert across.status_code == 200, across.text
        kl = across.json()["drift"]["kl_per_token"]
        assert kl is not None and 0.0 <= kl < KL_TOLERANCE, kl

        # The adapter, unmerged in vLLM, answers as peft does, and it did change answers.
        lora = agreement("transformers-adapter", "vllm-adapter", UNSEEN["name"], "response")
        assert lora >= AGREEMENT, f"vLLM's adapter answers equal peft's on {lora:.1%} only"
        changed = agreement("vllm-base", "vllm-adapter", UNSEEN["name"], "response")
        assert changed < 1.0, "the adapter changed no answer: it was not applied"
        same_engine = http.get(
            "/compare",
            params={
                "before": ids["vllm-base"],
                "after": ids["vllm-adapter"],
                "suites": UNSEEN["name"],
            },
        )
        assert same_engine.status_code == 200, same_engine.text
        assert not any("changed nothing" in w for w in same_engine.json().get("warnings", []))

        # Different engines are not compared silently.
        refused = http.get(
            "/compare", params={"before": ids["transformers-base"], "after": ids["vllm-base"]}
        )
        assert refused.status_code == 409
        assert "backend differs: 'transformers' before, 'vllm' after" in refused.json()["detail"]

        workers = {w["backend"]: w for w in http.get("/workers").json()["data"]}
        assert workers["vllm"]["engine_version"].startswith("vllm ")
        assert workers["transformers"]["engine_version"].startswith("transformers ")
    finally:
        for proc in (worker, server):
            proc.send_signal(signal.SIGTERM)
        for proc in (worker, server):
            proc.wait(timeout=120)
        http.close()
    # The base and multiple-choice runs shared an engine without LoRA; the adapter (rank 8)
    # got one with LoRA up to rank 8, never a slower rank-64 one.
    log = serve_log.read_text(errors="replace")
    starts = [line for line in log.splitlines() if "starting vLLM" in line]
    assert len(starts) == 2, log[-3000:]
    assert "(no LoRA)" in starts[0] and "(LoRA up to rank 8)" in starts[1], starts


def test_a_lora_fine_tune_is_evaluated_before_and_after_on_vllm(
    settings: Settings, reference_model_dir: Path, tmp_path: Path, vllm_env: None
) -> None:
    """A fine-tune job with ``evaluation.backend: "vllm"`` on a vLLM worker: training in torch,
    both evaluations on the in-process engine (the adapter served unmerged), KL to base from
    vLLM's top-k, and held-out domain figures."""
    from fastapi.testclient import TestClient

    from app.main import create_app

    records = [
        {"prompt": f"What is drug {name}?", "completion": f"Drug {name} treats {use}."}
        for name, use in [
            ("alpha", "pain"),
            ("beta", "fever"),
            ("gamma", "cough"),
            ("delta", "asthma"),
            ("epsilon", "gout"),
            ("zeta", "acne"),
            ("eta", "nausea"),
            ("theta", "anemia"),
            ("iota", "malaria"),
            ("kappa", "angina"),
        ]
    ]
    worker_log = tmp_path / "worker.log"
    worker = start_worker(settings, "--backend", "vllm", log=worker_log)
    try:
        with TestClient(create_app(settings)) as client:
            response = client.post(
                "/finetune-jobs",
                json={
                    "base_model": {"path": str(reference_model_dir)},
                    "dataset": {"examples": records},
                    "method": "lora",
                    "hyperparameters": {"learning_rate": 3e-4, "max_steps": 4},
                    "evaluation": {
                        "backend": "vllm",
                        "suites": [{**UNSEEN, "items": UNSEEN["items"][:10]}, "general-text"],
                        "prompt_format": "plain",
                        "generation": {"max_new_tokens": 16},
                        "domain": {"holdout": 0.3, "seed": 1},
                    },
                },
            )
            assert response.status_code == 202, response.text
            job_id = response.json()["id"]

            def finished() -> dict[str, Any] | None:
                body: dict[str, Any] = client.get(f"/finetune-jobs/{job_id}").json()
                return body if body["status"] in ("succeeded", "failed", "cancelled") else None

            job = wait_for(finished, 1500, interval=2.0, what="the fine-tune job")
            assert job["status"] == "succeeded", (job["error"], worker_log.read_text()[-3000:])
            for which in ("before", "after"):
                evaluation = client.get(f"/evaluations/{job[f'{which}_evaluation_id']}").json()
                assert evaluation["model"]["engine"]["backend"] == "vllm", which
            after = client.get(f"/evaluations/{job['after_evaluation_id']}").json()
            assert after["model"]["adapter_path"] == job["output_path"]
            comparison = job["comparison"]
            assert comparison["verdict"] in ("pass", "fail")
            kl = comparison["drift"]["kl_per_token"]
            assert kl is not None and kl > 0  # the adapter moved the distributions
            assert comparison["domain"]["held_out_records"] == 3
            assert comparison["domain"]["kl_per_token"] > 0
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.wait(timeout=120)
    starts = [line for line in worker_log.read_text().splitlines() if "starting vLLM" in line]
    assert len(starts) == 2 and "(no LoRA)" in starts[0] and "rank 16" in starts[1], starts
