"""Every suite kind through the real worker loop (in-process) on a tiny model."""

from __future__ import annotations

import math

import pytest

from workers.main import Worker

SUITES = [
    {
        "name": "k-qa",
        "kind": "qa",
        "items": [
            {
                "id": "a",
                "question": "What is the capital of France?",
                "answers": ["Paris"],
                "category": "geo",
            },
            {
                "id": "b",
                "question": "Who wrote Hamlet?",
                "answers": ["Shakespeare"],
                "category": "lit",
            },
            {"id": "c", "question": "What is 2 plus 2?", "answers": ["4"], "category": "math"},
        ],
    },
    {
        "name": "k-check",
        "kind": "checklist",
        "items": [
            {
                "id": "any",
                "test": "Says anything",
                "prompt": "Say something.",
                "severity": "low",
                "check": {"type": "min_words", "value": 0},
            },
            {
                "id": "never",
                "test": "Impossible",
                "prompt": "Say hi.",
                "severity": "critical",
                "check": {"type": "contains", "value": "\u2603\u2603\u2603"},
            },
        ],
    },
    {
        "name": "k-mc",
        "kind": "multiple_choice",
        "items": [
            {
                "id": "m1",
                "question": "What is the capital of Italy?",
                "choices": ["Rome", "Oslo", "a much longer wrong answer"],
                "gold": 0,
                "category": "geo",
            },
            {
                "id": "m2",
                "question": "What color is the sky?",
                "choices": ["green", "blue"],
                "gold": 1,
            },
        ],
    },
    {
        "name": "k-text",
        "kind": "perplexity",
        "items": [
            {
                "id": "t1",
                "text": "The capital of France is Paris. It is a large city.",
                "category": "geo",
            },
            {"id": "t2", "text": "Water boils at one hundred degrees Celsius at sea level."},
        ],
    },
]


@pytest.mark.parametrize("prompt_format", ["plain", "chat"])
def test_all_kinds_score_and_aggregate(client, tiny_model_dir, prompt_format) -> None:  # type: ignore[no-untyped-def]
    created = client.post(
        "/evaluations",
        json={
            "model": {"path": str(tiny_model_dir)},
            "suites": SUITES,
            "prompt_format": prompt_format,
            "generation": {"max_new_tokens": 12},
        },
    ).json()
    worker = Worker(client.app.state.settings, device="cpu", once=True, worker_id="inproc")
    assert worker.run() == 0
    ev = client.get(f"/evaluations/{created['id']}").json()
    assert ev["status"] == "succeeded", ev["error"]
    assert ev["progress"] == {
        "done": 9,
        "total": 9,
        "stage": "done",
        "percent": 100.0,
        "eta_seconds": 0.0,
    }
    assert ev["prompt_format"] == prompt_format and ev["model"]["fingerprint"].startswith("sha256:")
    res = ev["results"]

    qa = res["k-qa"]
    assert qa["total"] == 3 and set(qa["by_category"]) == {"geo", "lit", "math"}

    check = res["k-check"]
    assert (check["passed"], check["failed"], check["score"]) == (1, 1, 0.5)
    assert (
        check["failures"][0]["test"] == "Impossible"
        and check["failures"][0]["severity"] == "critical"
    )

    items = {
        i["item_id"]: i
        for i in client.get(f"/evaluations/{ev['id']}/items?suite=k-mc").json()["data"]
    }
    for item in items.values():
        logliks = item["details"]["logliks"]
        assert all(ll < 0 for ll in logliks)
        assert item["details"]["pred"] == max(range(len(logliks)), key=logliks.__getitem__)
        assert item["passed"] == (item["details"]["pred"] == item["details"]["gold"])
    mc = res["k-mc"]
    assert mc["total"] == 2 and mc["acc"] == sum(i["passed"] for i in items.values()) / 2
    assert mc["acc_norm"] == sum(i["details"]["correct_norm"] for i in items.values()) / 2

    text = res["k-text"]
    texts = client.get(f"/evaluations/{ev['id']}/items?suite=k-text").json()["data"]
    nll = sum(t["details"]["nll_sum"] for t in texts)
    tokens = sum(t["details"]["tokens"] for t in texts)
    assert tokens > 10 and text["tokens"] == tokens
    assert math.isclose(text["nll_per_token"], nll / tokens)
    assert math.isclose(text["perplexity"], math.exp(nll / tokens))
    # What KL to the base needs later: the top-k next tokens at every predicted position.
    for t in texts:
        top = t["details"]["topk"]
        assert top["k"] == 16 and len(top["targets"]) == 16
        assert len(top["ids"]) == len(top["logprobs"]) == t["details"]["tokens"]
        assert all(len(r) == 16 and r == sorted(r, reverse=True) for r in top["logprobs"])
        assert all(math.fsum(math.exp(v) for v in r) <= 1.0 + 1e-4 for r in top["logprobs"])


def test_a_model_that_disappears_fails_the_job_with_a_reason(
    client, tiny_model_dir, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    import shutil

    settings = client.app.state.settings
    copy = settings.model_roots[-1] / "vanishing"
    shutil.copytree(tiny_model_dir, copy)
    created = client.post(
        "/evaluations", json={"model": {"path": str(copy)}, "suites": SUITES[:1]}
    ).json()
    shutil.rmtree(copy)  # the file system changes between submission and loading
    Worker(settings, device="cpu", once=True, worker_id="inproc").run()
    ev = client.get(f"/evaluations/{created['id']}").json()
    assert ev["status"] == "failed" and "not a directory" in ev["error"]
    assert ev["attempts"] == 1  # a user error is not retried
