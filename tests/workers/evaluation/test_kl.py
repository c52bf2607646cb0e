"""KL to base end to end: real evaluations of a tiny model taught at two learning rates."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from tests.tiny_model import CORPUS, qa_texts, teach_tiny_model
from workers.main import Worker

TEXTS = {
    "name": "kl-text",
    "kind": "perplexity",
    "items": [{"id": f"t{i}", "text": text} for i, text in enumerate(CORPUS[:6])],
}


def evaluate(client: Any, model: Path) -> str:
    response = client.post(
        "/evaluations", json={"model": {"path": str(model)}, "suites": [TEXTS], "cache": False}
    )
    assert response.status_code == 202, response.text
    return str(response.json()["id"])


def test_kl_is_zero_against_itself_grows_with_the_learning_rate_and_gates(
    client: Any, tiny_model_dir: Path, tmp_path: Path
) -> None:
    tuned = {}
    for lr in (1e-4, 3e-3):
        path = tmp_path / "models" / f"lr{lr}"
        shutil.copytree(tiny_model_dir, path)
        tuned[lr] = teach_tiny_model(path, qa_texts(), steps=10, lr=lr)
    base = evaluate(client, tiny_model_dir)
    ids = {lr: evaluate(client, path) for lr, path in tuned.items()}
    worker = Worker(client.app.state.settings, device="cpu", once=True, worker_id="inproc")
    assert worker.run() == 0

    def compare(after: str, **query: Any) -> dict[str, Any]:
        response = client.get("/compare", params={"before": base, "after": after, **query})
        assert response.status_code == 200, response.text
        return dict(response.json())

    itself = compare(base, max_kl=0.0)
    assert itself["drift"]["kl_per_token"] == 0.0 and itself["verdict"] == "pass"
    gentle, hard = (compare(ids[lr])["drift"] for lr in (1e-4, 3e-3))
    assert 0.0 < gentle["kl_per_token"] < hard["kl_per_token"]
    suite = hard["suites"]["kl-text"]
    assert suite["kl_positions"] == suite["tokens_before"]
    assert 0.0 <= suite["kl_missing_fraction"] <= 1.0
    limit = (gentle["kl_per_token"] + hard["kl_per_token"]) / 2
    assert compare(ids[1e-4], max_kl=limit)["verdict"] == "pass"
    failed = compare(ids[3e-3], max_kl=limit)
    assert failed["verdict"] == "fail"
    assert any("KL(base ‖ candidate) on 'kl-text'" in r for r in failed["reasons"])
