"""Domain evaluation: held-out NLL as training measures it, and a whole job on a worker."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import start_worker
from tests.workers.finetune.jobs import plain_body, post_job, succeeded
from workers.engine.loading import load_model, load_tokenizer
from workers.finetune.data import collate, encode_records, pad_id, read_records
from workers.finetune.domain import completion_nll
from workers.finetune.ewc import sequence_loss

RECORDS = [
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
DOMAIN_QA = {
    "name": "tiny-drug-qa",
    "kind": "qa",
    "items": [
        {"id": "d1", "question": "What does drug alpha treat?", "answers": ["pain"]},
        {"id": "d2", "question": "What does drug beta treat?", "answers": ["fever"]},
    ],
}
GENERAL_QA = {
    "name": "tiny-general",
    "kind": "qa",
    "items": [
        {"id": "q1", "question": "What is the capital of France?", "answers": ["Paris"]},
    ],
}


def test_completion_nll_is_the_training_loss_per_record(tiny_model_dir) -> None:  # type: ignore[no-untyped-def]
    tokenizer = load_tokenizer(tiny_model_dir)
    model = load_model(tiny_model_dir, torch.device("cpu"))
    examples, _ = encode_records(tokenizer, RECORDS[:5], "plain", 128)
    per_record = completion_nll(model, examples, pad_id(tokenizer), batch_size=2)
    assert len(per_record) == 5
    for example, (nll, tokens) in zip(examples, per_record, strict=True):
        loss, count = sequence_loss(model.eval(), collate([example], pad_id(tokenizer)))
        loss = loss.detach()
        assert tokens == count == example.trained_tokens > 0
        assert nll == pytest.approx(float(loss), rel=1e-4)
    # Only the completion is scored: the prompt's tokens are not counted.
    prompt_only = len(tokenizer(RECORDS[0]["prompt"]).input_ids)
    assert per_record[0][1] < len(examples[0].input_ids) - prompt_only + 2


@pytest.mark.slow
@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_job_reports_what_it_learned_on_records_it_never_trained_on(
    client,
    settings,
    engine,
    tiny_model_dir,
    procs,
    tmp_path,
) -> None:  # type: ignore[no-untyped-def]
    body = plain_body(
        tiny_model_dir,
        RECORDS,
        method="full",
        hyperparameters={"learning_rate": 1e-3, "max_steps": 8},
        evaluation={
            "suites": [GENERAL_QA],
            "generation": {"max_new_tokens": 4},
            "domain": {"holdout": 0.3, "seed": 3, "suites": [DOMAIN_QA]},
        },
    )
    job_id = post_job(client, body)
    procs.append(start_worker(settings, log=tmp_path / "worker.log"))
    data = succeeded(client, engine, job_id, tmp_path / "worker.log")
    assert data["metrics"]["examples"]["held_out"] == 3
    assert data["metrics"]["examples"]["domain"] == 7
    job_dir = settings.artifacts_dir / job_id
    held = read_records(job_dir / "heldout.jsonl")
    trained = read_records(job_dir / "train.jsonl")
    assert len(held) == 3 and not [r for r in held if r in trained]
    domain = data["comparison"]["domain"]
    assert domain["held_out_records"] == 3
    assert domain["held_out"]["records"] == 3 and domain["held_out"]["statistics"]["n_pairs"] == 3
    # Full fine-tuning at lr 1e-3 on the same template: held-out NLL falls.
    assert domain["after"]["nll_per_token"] < domain["before"]["nll_per_token"]
    assert domain["gain"]["nll_per_token"] > 0
    assert "accuracy" in domain["before"] and "accuracy" in domain["after"]
    assert domain["before_evaluation_id"] and domain["after_evaluation_id"]
    assert data["comparison"]["outcome"] in (
        "learned_and_kept",
        "learned_but_forgot",
        "did_not_learn",
        "neither",
    )
    assert data["comparison"]["outcome_summary"]
    labels = {
        e["message"]
        for e in client.get(f"/finetune-jobs/{job_id}/events", params={"limit": 500}).json()["data"]
    }
    assert any(m.startswith("domain: held out 3 of 10 records") for m in labels)
