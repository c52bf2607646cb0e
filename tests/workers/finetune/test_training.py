"""The training loop on the tiny model: step arithmetic, loss, exact resume, LoRA's frozen base."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch

from app.finetune.schemas import FinetuneJobCreate, Hyperparameters, resolve_hyperparameters
from tests.samples import MEDICINE_RECORDS
from workers.context import Interrupted
from workers.engine.loading import load_model, load_tokenizer
from workers.finetune.artifacts import base_checksum, parameter_counts, save_output
from workers.finetune.data import collate, encode_records
from workers.finetune.ewc import sequence_loss
from workers.finetune.training import (
    Trainer,
    assert_base_frozen,
    plan_steps,
    prepare_model,
    thin,
)

CPU = torch.device("cpu")
RECORDS = [
    *MEDICINE_RECORDS,
    {"prompt": "What is insulin?", "completion": "Insulin is a hormone that lowers blood glucose."},
]


# Tiny tensors: one torch thread (the conftest fixture).
pytestmark = pytest.mark.usefixtures("one_thread")


def _request(model_dir: Path, method: str = "lora", **hp: Any) -> FinetuneJobCreate:
    return FinetuneJobCreate.model_validate(
        {
            "base_model": {"path": str(model_dir)},
            "dataset": {"examples": RECORDS},
            "method": method,
            "preset": "risky",
            "hyperparameters": hp,
        }
    )


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path) -> Any:
    return load_tokenizer(tiny_model_dir)


@pytest.fixture(scope="module")
def examples(tokenizer: Any) -> list[Any]:
    return encode_records(tokenizer, RECORDS, "chat", 512)[0]


@pytest.mark.parametrize(
    ("n", "bs", "accum", "epochs", "steps_per_epoch", "total"),
    [
        (20, 1, 1, 10, 20, 200),  # the lesson's risky preset on 20 examples
        (20, 4, 4, 3, 2, 6),  # the safe preset: 5 micro-batches → 2 steps (the last takes 1)
        (83, 4, 4, 3, 6, 18),
        (5, 8, 1, 2.5, 1, 3),  # fractional epochs round up
    ],
)
def test_step_plan_follows_the_trainer_arithmetic(
    n: int, bs: int, accum: int, epochs: float, steps_per_epoch: int, total: int, tmp_path: Path
) -> None:
    from transformers import TrainingArguments

    hp = resolve_hyperparameters(
        "full",
        "safe",
        Hyperparameters(
            per_device_train_batch_size=bs,
            gradient_accumulation_steps=accum,
            num_train_epochs=epochs,
        ),
    )
    plan = plan_steps(n, hp)
    assert (plan.steps_per_epoch, plan.total_steps) == (steps_per_epoch, total)
    args = TrainingArguments(output_dir=str(tmp_path), warmup_steps=hp.warmup_ratio)
    assert plan.warmup_steps == args.get_warmup_steps(total) == math.ceil(0.05 * total)


def test_every_example_is_seen_once_per_epoch(
    tiny_model_dir: Path, examples: list[Any], tmp_path: Path
) -> None:
    request = _request(tiny_model_dir, per_device_train_batch_size=2, gradient_accumulation_steps=2)
    model = prepare_model(tiny_model_dir, CPU, request, seed=0)
    trainer = Trainer(model, examples, request.resolved(), pad_id=0, checkpoint_dir=tmp_path)
    for epoch in range(2):
        steps = range(
            epoch * trainer.plan.steps_per_epoch, (epoch + 1) * trainer.plan.steps_per_epoch
        )
        seen = [i for step in steps for batch in trainer.step_batches(step) for i in batch]
        assert sorted(seen) == list(range(len(examples)))
    assert trainer.epoch_order(0) != trainer.epoch_order(1)


def test_loss_is_the_models_own_token_mean_loss(
    tiny_model_dir: Path, tokenizer: Any, examples: list[Any]
) -> None:
    model = load_model(tiny_model_dir, CPU)
    batch = collate(examples[:3], tokenizer.pad_token_id)
    loss_sum, tokens = sequence_loss(model, batch)
    with torch.no_grad():
        reference = model(**batch).loss
    assert float(loss_sum.detach()) / tokens == pytest.approx(float(reference), rel=1e-5)


def _train(
    model_dir: Path,
    examples: list[Any],
    tokenizer: Any,
    ckpt: Path,
    *,
    stop_at: int | None = None,
    **hp: Any,
) -> Trainer:
    request = _request(model_dir, **hp)
    model = prepare_model(model_dir, CPU, request, seed=request.resolved().seed)

    def check_stop() -> None:
        if stop_at is not None and trainer.global_step >= stop_at:
            raise Interrupted("test stop")

    trainer = Trainer(
        model,
        examples,
        request.resolved(),
        pad_id=tokenizer.pad_token_id,
        checkpoint_dir=ckpt,
        check_stop=check_stop,
    )
    trainer.restore()
    trainer.train()
    return trainer


def test_resuming_from_a_checkpoint_ends_exactly_where_an_uninterrupted_run_ends(
    tiny_model_dir: Path, tokenizer: Any, examples: list[Any], tmp_path: Path
) -> None:
    hp = {
        "max_steps": 12,
        "checkpoint_every_steps": 5,
        "learning_rate": 1e-3,
        "per_device_train_batch_size": 2,
    }
    straight = _train(tiny_model_dir, examples, tokenizer, tmp_path / "a", **hp)

    with pytest.raises(Interrupted):
        _train(tiny_model_dir, examples, tokenizer, tmp_path / "b", stop_at=7, **hp)
    # SIGTERM at step 7 checkpointed step 7 (not only the periodic one at step 5).
    assert [p.name for p in (tmp_path / "b").glob("step-*")] == ["step-00000007"]
    assert not list((tmp_path / "b").glob(".tmp*"))
    resumed = _train(tiny_model_dir, examples, tokenizer, tmp_path / "b", **hp)

    assert resumed.resumed_from == [7]
    assert resumed.global_step == straight.global_step == 12
    assert [p["loss"] for p in resumed.loss_curve] == [p["loss"] for p in straight.loss_curve]
    for (name, a), (_, b) in zip(straight.params, resumed.params, strict=True):
        assert torch.equal(a, b), name  # LoRA dropout included: the RNG state was restored


def test_lora_freezes_the_base_and_saves_a_loadable_adapter(
    tiny_model_dir: Path, tokenizer: Any, examples: list[Any], tmp_path: Path
) -> None:
    from peft import PeftModel

    request = _request(tiny_model_dir, max_steps=6, learning_rate=5e-3)
    model = prepare_model(tiny_model_dir, CPU, request, seed=0)
    assert_base_frozen(model)
    counts = parameter_counts(model)
    assert 0 < counts["fraction"] < 0.05 and counts["trainable"] == sum(
        p.numel() for n, p in model.named_parameters() if "lora_" in n
    )
    before = base_checksum(model)
    trainer = Trainer(
        model,
        examples,
        request.resolved(),
        pad_id=tokenizer.pad_token_id,
        checkpoint_dir=tmp_path / "c",
    )
    trainer.train()
    assert base_checksum(model) == before
    assert trainer.loss_curve[-1]["loss"] < trainer.loss_curve[0]["loss"]

    out = tmp_path / "adapter"
    save_output(model, tokenizer, request, tiny_model_dir, out)
    assert (out / "adapter_model.safetensors").is_file() and (out / "adapter_config.json").is_file()
    loaded = PeftModel.from_pretrained(load_model(tiny_model_dir, CPU), out).eval()
    batch = collate(examples[:2], tokenizer.pad_token_id)
    model.eval()
    with torch.no_grad():
        assert torch.allclose(model(**batch).logits, loaded(**batch).logits, atol=1e-5)


def test_a_trainable_base_weight_is_caught(tiny_model_dir: Path) -> None:
    model = prepare_model(tiny_model_dir, CPU, _request(tiny_model_dir), seed=0)
    next(p for n, p in model.named_parameters() if "lora_" not in n).requires_grad_(True)
    with pytest.raises(RuntimeError, match="should be frozen"):
        assert_base_frozen(model)


def test_full_fine_tuning_moves_the_base_and_saves_a_model_dir(
    tiny_model_dir: Path, tokenizer: Any, examples: list[Any], tmp_path: Path
) -> None:
    request = _request(tiny_model_dir, method="full", max_steps=3, learning_rate=1e-3)
    model = prepare_model(tiny_model_dir, CPU, request, seed=0)
    assert parameter_counts(model)["fraction"] == 1.0
    before = base_checksum(model)
    Trainer(
        model, examples, request.resolved(), pad_id=tokenizer.pad_token_id, checkpoint_dir=tmp_path
    ).train()
    assert base_checksum(model) != before
    out = tmp_path / "model"
    save_output(model, tokenizer, request, tiny_model_dir, out)
    reloaded = load_model(out, CPU)
    assert base_checksum(reloaded) == base_checksum(model)
    assert (out / "tokenizer.json").is_file()


def test_thin_keeps_the_ends() -> None:
    curve = [{"step": i} for i in range(1, 1001)]
    thinned = thin(curve, 50)
    assert len(thinned) == 50 and thinned[0]["step"] == 1 and thinned[-1]["step"] == 1000
    assert thin(curve[:10], 50) == curve[:10]
