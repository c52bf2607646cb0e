"""Whole tensors and FSDP shards: what the trainer and EWC need to treat a sharded
parameter (a ``DTensor`` after ``fully_shard``) like a plain one.

Checkpoints, the Fisher and θ* are stored whole; a rank of an FSDP group holds its shard of
each. Outside a group both functions hand a plain tensor through.
"""

from __future__ import annotations

import torch


def whole(tensor: torch.Tensor) -> torch.Tensor:
    """A tensor FSDP shards across the group, gathered whole (a collective: every rank calls
    it, in the same order); any other tensor as it is."""
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def shard_like(
    tensor: torch.Tensor, like: torch.Tensor, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """A whole tensor as ``like`` holds it, on its device and in its dtype (or ``dtype``): this
    rank's shard when ``like`` is an FSDP ``DTensor`` (cut locally: every rank has it whole)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    tensor = tensor.to(like.device, dtype or like.dtype)
    if isinstance(like, DTensor):
        return distribute_tensor(tensor, like.device_mesh, like.placements, src_data_rank=None)
    return tensor
