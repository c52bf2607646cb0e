"""NLL per token on held-out completions: the training loss, measured on records never trained on.

The records are encoded exactly as training encodes them (``data.encode_records``: the loss
is taken on the completion / assistant part only), so the before and after figures are the
training objective on unseen data. Optionally the top-k next tokens at those same positions
are kept too, for KL(base ‖ candidate) on the domain prompts (``app.stats.kl``).
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from app.stats.kl import stored_topk
from workers.finetune.data import IGNORE_INDEX, Example, collate


@dataclass(frozen=True)
class CompletionScore:
    """One example: NLL summed over its trained tokens, how many, and (when asked) the top-k
    next tokens at each of those positions in :func:`app.stats.kl.stored_topk` form."""

    nll_sum: float
    tokens: int
    topk: dict[str, Any] | None = None


@torch.no_grad()
def completion_nll(
    model: torch.nn.Module,
    examples: Sequence[Example],
    pad_id: int,
    *,
    batch_size: int = 8,
    autocast: AbstractContextManager[Any] | None = None,
    topk: int = 0,
    topk_examples: int | None = None,
) -> list[CompletionScore]:
    """Per example, its :class:`CompletionScore`; eval mode, no dropout.

    ``topk`` > 0 keeps the top-k next tokens for the first ``topk_examples`` examples (all when
    None): enough for a KL estimate without storing every position of a large held-out set.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out: list[CompletionScore] = []
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
            wanted = topk_examples if topk_examples is not None else len(examples)
            tops: list[dict[str, Any] | None] = [None] * len(counts)
            if topk and start < wanted:
                values, indices = torch.log_softmax(logits[:, :-1].float(), dim=-1).topk(
                    min(topk, logits.shape[-1]), dim=-1
                )
                for r in range(min(len(counts), wanted - start)):
                    keep = targets[r] != IGNORE_INDEX
                    tops[r] = stored_topk(
                        indices[r][keep].tolist(),
                        values[r][keep].tolist(),
                        targets[r][keep].tolist(),
                    )
            out.extend(
                CompletionScore(float(s), int(n), top)
                for s, n, top in zip(nll.sum(dim=1), counts, tops, strict=True)
            )
    finally:
        model.train(was_training)
    return out
