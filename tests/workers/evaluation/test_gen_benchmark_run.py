"""A GSM8K-shaped ``gen_benchmark`` suite through the real worker loop and ``/compare``."""

from __future__ import annotations

from typing import Any

from workers.main import Worker

SUITE: dict[str, Any] = {
    "name": "gsm8k-mini",
    "kind": "gen_benchmark",
    "description": "five GSM8K-shaped items",
    "num_fewshot": 2,
    "max_new_tokens": 20,
    "items": [
        {
            "id": str(k),
            "category": "gsm8k",
            "question": f"What is {k} plus {k}?",
            "answer": f"{k} + {k} = {2 * k}\n#### {2 * k}",
            "target": str(2 * k),
        }
        for k in range(5)
    ],
}


def test_a_gen_benchmark_suite_runs_aggregates_and_compares(client, tiny_model_dir) -> None:  # type: ignore[no-untyped-def]
    created = client.post(
        "/evaluations",
        json={
            "model": {"path": str(tiny_model_dir)},
            "suites": [SUITE],
            "prompt_format": "plain",
            "generation": {"max_new_tokens": 3},
        },
    ).json()
    worker = Worker(client.app.state.settings, device="cpu", once=True, worker_id="inproc")
    assert worker.run() == 0
    ev = client.get(f"/evaluations/{created['id']}").json()
    assert ev["status"] == "succeeded", ev["error"]
    result = ev["results"]["gsm8k-mini"]
    assert result["kind"] == "gen_benchmark" and result["total"] == 5
    assert set(result["exact_match"]) == {"strict-match", "flexible-extract"}

    items = client.get(f"/evaluations/{ev['id']}/items?suite=gsm8k-mini").json()["data"]
    for item in items:
        prompt = item["prompt"]
        assert prompt.count("Question: ") == 3 and prompt.endswith("?\nAnswer:")
        assert set(item["details"]["filtered"]) == {"strict-match", "flexible-extract"}
        assert "Question:" not in (item["response"] or "")
    # The suite's 20 tokens, not the evaluation's 3: the tiny model's babble is longer.
    assert max(len(item["response"] or "") for item in items) > 3 * 8

    body = client.get("/compare", params={"before": ev["id"], "after": ev["id"]}).json()
    part = body["gen_benchmark"]
    assert part["exact_match_before"] == part["exact_match_after"] == result["exact_match"]
    assert body["verdict"] == "pass"
