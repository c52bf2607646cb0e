"""Elastic Weight Consolidation (the lesson's Mitigation 4).

The penalty is the lesson's ``EWCRegularizer.ewc_loss``: ``importance · Σ F (θ − θ*)²`` over
the trainable parameters, with θ* the weights before fine-tuning and F the diagonal Fisher.

Where this differs from the lesson, and why: the lesson squares the gradient of each *batch's
mean* loss. The diagonal Fisher is the expectation of the *per-sample* squared gradient, and
``mean(g)² ≤ mean(g²)`` (Jensen), so squaring batch means underestimates F, more so the larger
the batch and the more samples disagree. :func:`per_sample_fisher` squares each sample's
gradient; :func:`batch_mean_fisher` is the lesson's estimate, kept for comparison.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from workers.finetune.data import IGNORE_INDEX, Example, collate
from workers.finetune.sharding import shard_like, whole


def trainable_named_parameters(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def sequence_loss(
    model: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    autocast: AbstractContextManager[Any] | None = None,
) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over trained tokens, and how many tokens that is."""
    with autocast or nullcontext():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    targets = batch["labels"][:, 1:]
    logits = logits[:, :-1].float()
    loss = F.cross_entropy(
        logits.reshape(-1, logits.size(-1)),
        targets.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    return loss, int((targets != IGNORE_INDEX).sum())


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def per_sample_fisher(
    model: torch.nn.Module,
    examples: Sequence[Example],
    pad_id: int,
    *,
    autocast: AbstractContextManager[Any] | None = None,
    on_sample: Callable[[int], None] | None = None,
) -> dict[str, torch.Tensor]:
    """Diagonal empirical Fisher: the mean over samples of each sample's squared gradient.

    Each sample's loss is its mean token loss (what ``model(**batch).loss`` gives at batch
    size 1). ``on_sample(i)`` runs before each sample (progress, cancellation).
    """
    params = trainable_named_parameters(model)
    fisher = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params}
    was_training = model.training
    model.eval()  # no dropout: the Fisher of the model as it is
    device = _device(model)
    try:
        for index, example in enumerate(examples):
            if on_sample is not None:
                on_sample(index)
            model.zero_grad(set_to_none=True)
            batch = {k: v.to(device) for k, v in collate([example], pad_id).items()}
            loss_sum, tokens = sequence_loss(model, batch, autocast)
            (loss_sum / max(tokens, 1)).backward()
            for name, param in params:
                if param.grad is not None:
                    fisher[name] += param.grad.detach().float() ** 2
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    for name in fisher:
        fisher[name] /= max(len(examples), 1)
    return fisher


def batch_mean_fisher(
    model: torch.nn.Module, examples: Sequence[Example], pad_id: int, batch_size: int
) -> dict[str, torch.Tensor]:
    """The lesson's ``update_fisher``: squared gradient of each batch's mean loss, averaged."""
    params = trainable_named_parameters(model)
    fisher = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params}
    model.eval()
    device = _device(model)
    batches = [examples[i : i + batch_size] for i in range(0, len(examples), batch_size)]
    for chunk in batches:
        model.zero_grad(set_to_none=True)
        batch = {k: v.to(device) for k, v in collate(chunk, pad_id).items()}
        loss_sum, tokens = sequence_loss(model, batch)
        (loss_sum / max(tokens, 1)).backward()
        for name, param in params:
            if param.grad is not None:
                fisher[name] += param.grad.detach().float() ** 2
    model.zero_grad(set_to_none=True)
    for name in fisher:
        fisher[name] /= max(len(batches), 1)
    return fisher


class EWCRegularizer:
    """Holds θ* and F for the trainable parameters; computes or applies the penalty.

    On a rank of an FSDP group both are its shards, like the parameters; the penalty's value
    is summed across the group (every rank calls :meth:`add_gradient` at each step).
    """

    def __init__(
        self, model: torch.nn.Module, fisher: dict[str, torch.Tensor], importance: float
    ) -> None:
        self.importance = float(importance)
        params = dict(trainable_named_parameters(model))
        missing = sorted(set(params) - set(fisher))
        if missing:
            raise ValueError(
                f"the Fisher lacks {len(missing)} trainable parameters, e.g. {missing[0]}"
            )
        self.fisher = {n: shard_like(fisher[n], params[n], torch.float32) for n in params}
        # θ*: the weights before fine-tuning (copied now, before the first step).
        self.original = {n: p.detach().to(torch.float32).clone() for n, p in params.items()}

    def penalty(self, model: torch.nn.Module) -> torch.Tensor:
        """``importance · Σ F (θ − θ*)²`` as a differentiable tensor (the lesson's ``ewc_loss``)."""
        total = torch.zeros((), device=_device(model))
        for name, param in trainable_named_parameters(model):
            diff = param.float() - self.original[name]
            total = total + (self.fisher[name] * diff**2).sum()
        return self.importance * total

    @torch.no_grad()
    def add_gradient(self, model: torch.nn.Module) -> float:
        """Add the penalty's gradient ``2 · importance · F (θ − θ*)`` to grads; return its value.

        The same update as back-propagating :meth:`penalty` added to the loss, without keeping
        two parameter-sized temporaries in the autograd graph (which matters for large models).
        """
        value = 0.0
        for name, param in trainable_named_parameters(model):
            diff = param.detach().float() - self.original[name]
            weighted = self.fisher[name] * diff
            value += float(whole((weighted * diff).sum()))
            grad = (2.0 * self.importance) * weighted
            if param.grad is None:
                param.grad = grad.to(param.dtype)
            else:
                param.grad.add_(grad.to(param.grad.dtype))
        return self.importance * value


# --------------------------------------------------------------------------- cache


def fisher_cache_key(parts: Iterable[Any]) -> str:
    """A cache key over everything the Fisher depends on (model, parameters, data, settings)."""
    return hashlib.sha256(json.dumps(list(parts), sort_keys=True, default=str).encode()).hexdigest()


def load_fisher(path: Path) -> dict[str, torch.Tensor] | None:
    """A cached Fisher, or None when absent or unreadable."""
    from safetensors.torch import load_file

    if not path.is_file():
        return None
    try:
        return dict(load_file(str(path)))
    except Exception:  # a torn file from a killed worker: recompute
        return None


def save_fisher(path: Path, fisher: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Store a Fisher atomically as safetensors."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    save_file(
        {k: v.detach().cpu().contiguous() for k, v in fisher.items()}, str(tmp), metadata=metadata
    )
    tmp.replace(path)
