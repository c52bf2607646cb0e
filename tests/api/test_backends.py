"""Backends on the API side: served models only on allow-listed endpoints (403 otherwise,
nothing queued), the engine recorded with every evaluation, ``/compare`` refusing runs made on
different engines, an adapter that changed nothing, and ``GET /workers`` showing engines."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select, update

from app.core.config import Settings
from app.core.database import make_engine
from app.core.tables import Evaluation
from app.jobs.queue import register_worker
from app.main import create_app
from tests.api.test_compare import ALL, QA_SUITE, finish, submit

ENDPOINT = "http://127.0.0.1:9/v1"
MC_SUITE = {
    "name": "tiny-mc",
    "kind": "multiple_choice",
    "items": [{"id": "m1", "question": "2+2?", "choices": ["3", "4"], "gold": 1}],
}


@pytest.fixture
def served_client(settings: Settings) -> Any:
    """A client whose server allows one endpoint (written with a trailing slash)."""
    allowed = Settings(**{**settings.model_dump(), "endpoints": [ENDPOINT + "/"]})
    with TestClient(create_app(allowed)) as client:
        yield client


def _count(client: Any) -> int:
    with client.app.state.sessionmaker() as session:
        return int(session.execute(select(func.count()).select_from(Evaluation)).scalar_one())


def _served(endpoint: str = ENDPOINT, **extra: Any) -> dict[str, Any]:
    return {
        "model": {"backend": "openai", "endpoint": endpoint, "model": "smollm2"},
        "suites": [QA_SUITE],
        **extra,
    }


def test_an_endpoint_not_on_the_allow_list_is_403_and_nothing_is_queued(
    served_client: Any,
) -> None:
    for endpoint in ("http://169.254.169.254/latest", "http://127.0.0.1:9/v1/../admin"):
        response = served_client.post("/evaluations", json=_served(endpoint))
        assert response.status_code == 403, response.text
        assert response.headers["content-type"] == "application/problem+json"
        assert "FORGETGUARD_ENDPOINTS" in response.json()["detail"]
    assert _count(served_client) == 0


def test_no_endpoint_is_allowed_by_default(client: Any) -> None:
    response = client.post("/evaluations", json=_served())
    assert response.status_code == 403
    assert _count(client) == 0


def test_a_served_model_on_an_allowed_endpoint_is_queued_for_any_worker(
    served_client: Any,
) -> None:
    response = served_client.post("/evaluations", json=_served(prompt_format="plain"))
    assert response.status_code == 202, response.text
    body = response.json()
    assert body["model"]["backend"] == "openai"
    assert body["model"]["endpoint"] == ENDPOINT
    assert body["model"]["path"] == "smollm2"
    assert body["model"]["fingerprint"] is None  # the worker asks the server
    assert body["status"] == "queued"


def test_a_chat_evaluation_of_a_logprob_suite_on_a_server_is_422(served_client: Any) -> None:
    response = served_client.post("/evaluations", json={**_served(), "suites": [MC_SUITE]})
    assert response.status_code == 422, response.text
    assert "tiny-mc" in response.json()["detail"] and "plain" in response.json()["detail"]
    plain = served_client.post(
        "/evaluations", json={**_served(), "suites": [MC_SUITE], "prompt_format": "plain"}
    )
    assert plain.status_code == 202, plain.text


@pytest.mark.parametrize(
    "model",
    [
        {"backend": "openai", "model": "x"},  # no endpoint
        {"backend": "openai", "endpoint": ENDPOINT, "model": "x", "path": "models/x"},
        {"backend": "vllm"},  # no path
        {"path": "models/x", "endpoint": ENDPOINT},
        {"path": "models/x", "backend": "tensorrt"},
    ],
)
def test_model_fields_must_fit_the_backend(client: Any, model: dict[str, Any]) -> None:
    response = client.post("/evaluations", json={"model": model})
    assert response.status_code == 422, response.text
    assert _count(client) == 0


def test_a_local_backend_is_recorded_and_keys_the_cache_apart(
    client: Any, tiny_model_dir: Path
) -> None:
    first = submit(client, tiny_model_dir)
    vllm = client.post(
        "/evaluations",
        json={"model": {"path": str(tiny_model_dir), "backend": "vllm"}, "suites": [QA_SUITE]},
    )
    assert vllm.status_code == 202
    assert vllm.json()["model"]["backend"] == "vllm"
    with client.app.state.sessionmaker() as session:
        keys = {
            row.backend: row.cache_key
            for row in session.execute(select(Evaluation)).scalars()
            if row.id in (first, vllm.json()["id"])
        }
    assert keys["transformers"] != keys["vllm"]


def _record_engine(client: Any, evaluation_id: str, **engine: Any) -> None:
    with client.app.state.sessionmaker() as session, session.begin():
        session.execute(
            update(Evaluation)
            .where(Evaluation.id == evaluation_id)
            .values(backend=engine["backend"], engine=engine)
        )


def test_compare_across_backends_is_409_naming_them_unless_allowed(
    client: Any, tiny_model_dir: Path
) -> None:
    before, after = submit(client, tiny_model_dir), submit(client, tiny_model_dir)
    finish(client, before, ALL)
    finish(client, after, ALL)
    engine = {"device": "cpu", "dtype": "float32"}
    _record_engine(client, before, backend="transformers", version="transformers 5.0", **engine)
    _record_engine(client, after, backend="vllm", version="vllm 0.32.0", **engine)
    refused = client.get("/compare", params={"before": before, "after": after})
    assert refused.status_code == 409
    detail = refused.json()["detail"]
    assert "backend differs: 'transformers' before, 'vllm' after" in detail
    assert "allow_backend_mismatch=true" in detail
    allowed = client.get(
        "/compare", params={"before": before, "after": after, "allow_backend_mismatch": "true"}
    )
    assert allowed.status_code == 200, allowed.text
    warnings = allowed.json()["warnings"]
    assert any("backend differs" in w for w in warnings)


def test_compare_across_dtypes_is_409(client: Any, tiny_model_dir: Path) -> None:
    before, after = submit(client, tiny_model_dir), submit(client, tiny_model_dir)
    finish(client, before, ALL)
    finish(client, after, ALL)
    common = {"backend": "vllm", "device": "cpu", "version": "vllm 0.32.0"}
    _record_engine(client, before, dtype="float32", **common)
    _record_engine(client, after, dtype="bfloat16", **common)
    refused = client.get("/compare", params={"before": before, "after": after})
    assert refused.status_code == 409
    assert "dtype differs: 'float32' before, 'bfloat16' after" in refused.json()["detail"]


def test_an_adapter_that_changed_nothing_is_flagged(client: Any, tiny_model_dir: Path) -> None:
    base, candidate, changed = (submit(client, tiny_model_dir) for _ in range(3))
    finish(client, base, ALL - {"q03"})
    finish(client, candidate, ALL - {"q03"})  # every answer and score equal to the base's
    finish(client, changed, ALL - {"q04"})
    with client.app.state.sessionmaker() as session, session.begin():
        session.execute(
            update(Evaluation)
            .where(Evaluation.id.in_((candidate, changed)))
            .values(adapter_path="artifacts/adapter")
        )
    flagged = client.get("/compare", params={"before": base, "after": candidate}).json()
    assert any("the adapter changed nothing" in w for w in flagged["warnings"])
    normal = client.get("/compare", params={"before": base, "after": changed}).json()
    assert not any("the adapter changed nothing" in w for w in normal.get("warnings", []))


def test_a_qlora_adapter_is_fingerprinted_nf4_and_refused_on_vllm(
    client: Any, settings: Settings, tiny_model_dir: Path
) -> None:
    from safetensors.torch import save_file
    from torch import zeros

    adapter = settings.model_roots[-1] / "qlora-adapter"
    adapter.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    save_file({"lora_A": zeros(1)}, str(adapter / "adapter_model.safetensors"))
    (adapter / "base_quantization.json").write_text('{"quantization": "nf4"}')
    model = {"path": str(tiny_model_dir), "adapter_path": str(adapter)}

    plain = client.post("/evaluations", json={"model": model, "suites": [QA_SUITE]})
    assert plain.status_code == 202, plain.text
    fingerprint = plain.json()["model"]["fingerprint"]
    assert fingerprint.startswith("sha256:") and fingerprint.endswith("+nf4")
    served = client.post(
        "/evaluations", json={"model": {**model, "backend": "vllm"}, "suites": [QA_SUITE]}
    )
    assert served.status_code == 422, served.text
    assert served.headers["content-type"] == "application/problem+json"
    assert "nf4" in served.json()["detail"] and "'transformers'" in served.json()["detail"]
    (adapter / "base_quantization.json").write_text('{"quantization": "int3"}')
    unknown = client.post("/evaluations", json={"model": model, "suites": [QA_SUITE]})
    assert unknown.status_code == 422 and "'int3'" in unknown.json()["detail"]
    assert _count(client) == 1


def test_workers_show_backend_devices_dtype_and_engine_version(
    client: Any, settings: Settings
) -> None:
    engine = make_engine(settings.database_url)
    register_worker(
        engine,
        worker_id="gpu-host-1",
        device="cuda:0,cuda:1",
        kinds=("evaluation", "finetune"),
        backend="vllm",
        dtype="bfloat16",
        engine_version="vllm 0.32.0",
    )
    engine.dispose()
    [worker] = client.get("/workers").json()["data"]
    assert worker["backend"] == "vllm"
    assert worker["device"] == "cuda:0,cuda:1"
    assert worker["dtype"] == "bfloat16"
    assert worker["engine_version"] == "vllm 0.32.0"


def test_the_gate_submits_both_sides_on_the_backend_it_was_given() -> None:
    from forgetguard.gate import GateOptions, evaluation_body

    body = evaluation_body(GateOptions(backend="vllm"), "models/base", "out/adapter", "after")
    assert body["model"] == {
        "path": "models/base",
        "adapter_path": "out/adapter",
        "backend": "vllm",
    }
    assert "backend" not in evaluation_body(GateOptions(), "models/base", None, "b")["model"]
