"""NLL per token on held-out completions: the training loss, measured on records never trained on.

The records are encoded exactly as training encodes them (``data.encode_records``: the loss
is taken on the completion / assistant part only), so the before and after figures are the
training objective on unseen data.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
import torch.nn.functional as F

from workers.finetune.data import IGNORE_INDEX, Example, collate


@torch.no_grad()
def completion_nll(
    model: torch.nn.Module,
    examples: Sequence[Example],
    pad_id: int,
    *,
    batch_size: int = 8,
    autocast: AbstractContextManager[Any] | None = None,
) -> list[tuple[float, int]]:
    """Per example: ``(sum of NLL over its trained tokens, how many)``; eval mode, no dropout."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out: list[tuple[float, int]] = []
    try:
        for start in range(0, len(examples), batch_size):
            batch = collate(examples[start : start + batch_size], pad_id)
            batch = {k: v.to(device) for k, v in batch.items()}
            with autocast or nullcontext():
                logits = model(
                    input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
                ).logits
            targets = batch["labels"][:, 1:]
            nll = F.cross_entropy(
                logits[:, :-1].float().transpose(1, 2),
                targets,
                ignore_index=IGNORE_INDEX,
                reduction="none",
            )
            counts = (targets != IGNORE_INDEX).sum(dim=1)
            out.extend((float(s), int(n)) for s, n in zip(nll.sum(dim=1), counts, strict=True))
    finally:
        model.train(was_training)
    return out
