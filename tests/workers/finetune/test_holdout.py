"""Domain evaluation: held-out NLL as training measures it, and a whole job on a worker."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import start_worker
from tests.workers.finetune.jobs import plain_body, post_job, succeeded
from workers.engine.loading import load_model, load_tokenizer
from workers.finetune.data import collate, encode_records, pad_id, read_records
from workers.finetune.ewc import sequence_loss
from workers.finetune.holdout import completion_nll

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
    for example, score in zip(examples, per_record, strict=True):
        loss, count = sequence_loss(model.eval(), collate([example], pad_id(tokenizer)))
        loss = loss.detach()
        assert score.tokens == count == example.trained_tokens > 0
        assert score.nll_sum == pytest.approx(float(loss), rel=1e-4)
        assert score.topk is None  # not asked for
    # Only the completion is scored: the prompt's tokens are not counted.
    prompt_only = len(tokenizer(RECORDS[0]["prompt"]).input_ids)
    assert per_record[0].tokens < len(examples[0].input_ids) - prompt_only + 2


def test_completion_top_k_covers_the_scored_positions_and_gives_kl_to_base(  # type: ignore[no-untyped-def]
    tiny_model_dir,
) -> None:
    from app.comparison.learned import held_out_kl, nll_summary

    tokenizer = load_tokenizer(tiny_model_dir)
    model = load_model(tiny_model_dir, torch.device("cpu"))
    examples, _ = encode_records(tokenizer, RECORDS[:5], "plain", 128)
    scores = completion_nll(
        model, examples, pad_id(tokenizer), batch_size=2, topk=4, topk_examples=3
    )
    assert [s.topk is not None for s in scores] == [True, True, True, False, False]
    for example, score in zip(examples[:3], scores[:3], strict=True):
        top = score.topk
        assert top is not None and top["k"] == 4
        # One entry per trained token, most probable first, each a real log-probability.
        assert len(top["ids"]) == len(top["logprobs"]) == example.trained_tokens
        for row in top["logprobs"]:
            assert row == sorted(row, reverse=True) and all(v <= 0 for v in row)
        # The full-vocabulary log-softmax: the stored greedy token's value is its logit's.
        logits = model(input_ids=torch.tensor([example.input_ids])).logits[0, :-1]
        trained = [i for i, t in enumerate(example.labels[1:]) if t != -100]
        best = torch.log_softmax(logits[trained[0]], dim=-1).max()
        assert top["logprobs"][0][0] == pytest.approx(float(best), abs=1e-4)

    def summary(values: list) -> dict:  # type: ignore[type-arg]
        return nll_summary([(s.nll_sum, s.tokens) for s in values], [s.topk for s in values])

    same = held_out_kl(summary(scores), summary(scores))
    assert same["kl_per_token"] == 0.0 and same["kl_positions"] > 0
    with torch.no_grad():  # another model: the distributions move, and KL says so
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    moved = completion_nll(
        model, examples, pad_id(tokenizer), batch_size=2, topk=4, topk_examples=3
    )
    assert held_out_kl(summary(scores), summary(moved))["kl_per_token"] > 0.001


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
    # Full fine-tuning at lr 1e-3 on the same template: held-out NLL falls, and the
    # predictions on the domain prompts moved away from the base's.
    assert domain["after"]["nll_per_token"] < domain["before"]["nll_per_token"]
    assert domain["kl_per_token"] > 0
    # Every held-out completion token (3 records, under the cap) is a KL position.
    assert domain["held_out"]["kl_positions"] == domain["held_out"]["before"]["tokens"]
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
