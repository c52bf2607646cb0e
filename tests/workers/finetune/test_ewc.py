"""EWC: the lesson's penalty value, its gradient, and a Fisher from per-sample gradients."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn as nn

from workers.engine.loading import load_model, load_tokenizer
from workers.finetune.data import encode_record
from workers.finetune.ewc import (
    EWCRegularizer,
    batch_mean_fisher,
    load_fisher,
    per_sample_fisher,
    save_fisher,
)

# Tiny tensors: one torch thread (the conftest fixture).
pytestmark = pytest.mark.usefixtures("one_thread")


def _toy() -> nn.Linear:
    layer = nn.Linear(2, 1)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, -2.0]]))
        layer.bias.copy_(torch.tensor([0.5]))
    return layer


def test_penalty_is_importance_times_fisher_weighted_squared_drift() -> None:
    model = _toy()
    fisher = {"weight": torch.tensor([[2.0, 0.5]]), "bias": torch.tensor([4.0])}
    ewc = EWCRegularizer(model, fisher, importance=10.0)
    assert float(ewc.penalty(model).detach()) == 0.0  # at θ* there is nothing to pay
    with torch.no_grad():
        model.weight.add_(torch.tensor([[0.1, -0.2]]))
        model.bias.add_(torch.tensor([0.3]))
    # 10 · (2·0.1² + 0.5·0.2² + 4·0.3²) = 10 · (0.02 + 0.02 + 0.36) = 4.0
    assert float(ewc.penalty(model).detach()) == pytest.approx(4.0)


def test_the_fused_gradient_equals_backpropagating_the_penalty() -> None:
    model = _toy()
    fisher = {"weight": torch.tensor([[2.0, 0.5]]), "bias": torch.tensor([4.0])}
    ewc = EWCRegularizer(model, fisher, importance=3.0)
    with torch.no_grad():
        model.weight.add_(torch.tensor([[0.4, 0.1]]))
        model.bias.sub_(torch.tensor([0.2]))
    ewc.penalty(model).backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}  # type: ignore[union-attr]
    value_autograd = float(ewc.penalty(model).detach())
    model.zero_grad(set_to_none=True)
    value = ewc.add_gradient(model)
    assert value == pytest.approx(value_autograd)
    for name, param in model.named_parameters():
        assert torch.allclose(param.grad, expected[name])  # type: ignore[arg-type]


def test_ewc_holds_a_weight_near_what_task_a_needs() -> None:
    # The lesson's single shared weight: Task B pulls it from 1.0 to -2.0; EWC resists.
    results = {}
    for importance in (0.0, 0.4):
        holder = nn.Module()
        holder.w = nn.Parameter(torch.tensor(1.0))
        # F = 2: the curvature of Task A's loss (w − 1)² at its optimum.
        ewc = EWCRegularizer(holder, {"w": torch.tensor(2.0)}, importance=max(importance, 1e-12))
        optimizer = torch.optim.SGD(holder.parameters(), lr=0.1)
        for _ in range(200):
            optimizer.zero_grad()
            ((holder.w + 2.0) ** 2).backward()
            ewc.add_gradient(holder)
            optimizer.step()
        results[importance] = float(holder.w.detach())
    assert results[0.0] == pytest.approx(-2.0, abs=1e-3)
    # Optimum of (w+2)² + 0.4·2·(w−1)²: w = (0.8 − 2) / 1.8
    assert results[0.4] == pytest.approx((0.8 - 2.0) / 1.8, abs=1e-3)


@pytest.fixture(scope="module")
def tiny(tiny_model_dir: Path) -> tuple[Any, Any]:
    tokenizer = load_tokenizer(tiny_model_dir)
    model = load_model(tiny_model_dir, torch.device("cpu"))
    return model, tokenizer


def _same_length_examples(tokenizer: Any, n: int) -> list[Any]:
    words = ["red", "blue", "green", "snow", "river", "stone", "tea", "bees", "fox", "dog"]
    examples = [encode_record(tokenizer, {"text": f"The {w} is here."}, "plain") for w in words]
    length = len(examples[0].input_ids)
    same = [e for e in examples if len(e.input_ids) == length]
    assert len(same) >= n, "need examples of equal token length"
    return same[:n]


def test_per_sample_fisher_is_not_the_squared_batch_mean_gradient(tiny: tuple[Any, Any]) -> None:
    model, tokenizer = tiny
    for param in model.parameters():
        param.requires_grad_(True)
    examples = _same_length_examples(tokenizer, 4)
    pad = tokenizer.pad_token_id
    per_sample = per_sample_fisher(model, examples, pad)
    one_batch = batch_mean_fisher(model, examples, pad, batch_size=len(examples))
    assert set(per_sample) == set(one_batch)
    # Equal-length samples: the batch loss is the mean of per-sample losses, so Jensen gives
    # mean(g²) ≥ mean(g)² element by element, and the batch-mean estimate falls short.
    for name in per_sample:
        assert (per_sample[name] >= one_batch[name] - 1e-9).all(), name
    total_ps = sum(float(f.sum()) for f in per_sample.values())
    total_bm = sum(float(f.sum()) for f in one_batch.values())
    assert total_ps > 1.2 * total_bm
    # With batches of one, the lesson's estimate is the per-sample one.
    singles = batch_mean_fisher(model, examples, pad, batch_size=1)
    for name in per_sample:
        assert torch.allclose(per_sample[name], singles[name], rtol=1e-4, atol=1e-10), name


def test_fisher_covers_only_trainable_parameters_and_round_trips(
    tiny: tuple[Any, Any], tmp_path: Path
) -> None:
    model, tokenizer = tiny
    for name, param in model.named_parameters():
        param.requires_grad_(name.endswith("q_proj.weight"))
    fisher = per_sample_fisher(model, _same_length_examples(tokenizer, 2), tokenizer.pad_token_id)
    assert fisher and all(name.endswith("q_proj.weight") for name in fisher)
    assert all(float(f.sum()) > 0 for f in fisher.values())
    save_fisher(tmp_path / "f.safetensors", fisher, {"k": "v"})
    loaded = load_fisher(tmp_path / "f.safetensors")
    assert loaded is not None and all(torch.equal(loaded[n], fisher[n]) for n in fisher)
    (tmp_path / "torn.safetensors").write_bytes(b"\x00\x01")
    assert load_fisher(tmp_path / "torn.safetensors") is None
    for param in model.parameters():
        param.requires_grad_(True)
