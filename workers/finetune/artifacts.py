"""What a fine-tune job leaves in its directory: the layout, the saved output, checksums.

A job directory holds the training-data snapshot (``train.jsonl`` + ``train.json``), the
held-out domain split (``heldout.jsonl``, never trained on) and its NLL before and after, the
checkpoints of an unfinished training, the finished training's outcome (``training.json``)
and the output: ``adapter/`` for LoRA and QLoRA, ``model/`` for a full fine-tune.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from app.core.quantization import BASE_QUANTIZATION_FILE, marker
from app.finetune.schemas import FinetuneJobCreate
from workers.engine.transformers_backend import select_dtype
from workers.finetune.sharding import whole
from workers.finetune.statefile import raise_if_disk_full, write_json

CHECKPOINTS = "checkpoints"
TRAIN_SNAPSHOT = "train.jsonl"
TRAIN_SNAPSHOT_META = "train.json"
TRAINING_DONE = "training.json"
# The answers of the last checkpoint evaluation, by suite: the after-evaluation of the same
# weights takes them instead of generating them again (stages.checkpoints, stages.evaluation).
FINAL_ANSWERS = "final-answers.json"
# The domain dataset split for evaluation.domain.holdout: trained on, and never trained on.
DOMAIN_TRAIN = "domain-train.jsonl"
HELD_OUT = "heldout.jsonl"
# The dataset as the job first split it (record count, content hashes): the split is the job's.
DATASET_SPLIT = "dataset.json"


@dataclass
class TrainingOutcome:
    output_path: str | None  # None: nothing shipped (no checkpoint passed the guard)
    trainable_parameters: dict[str, Any]
    metrics: dict[str, Any]
    warnings: list[str] = field(default_factory=list)


def parameter_counts(model: torch.nn.Module) -> dict[str, Any]:
    """``{"trainable", "total", "fraction"}`` (shared weights counted once)."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"trainable": trainable, "total": total, "fraction": trainable / total if total else 0.0}


def base_checksum(model: torch.nn.Module) -> str:
    """``sha256:…`` over the names and bytes of every non-LoRA parameter (gathered whole on a
    rank of an FSDP group, so every rank must call it)."""
    digest = hashlib.sha256()
    for name, param in sorted(model.named_parameters(), key=lambda item: item[0]):
        if "lora_" in name:
            continue
        digest.update(name.encode())
        data = whole(param.detach()).cpu().contiguous().reshape(-1).view(torch.uint8)
        digest.update(data.numpy().tobytes())
    return "sha256:" + digest.hexdigest()


def save_output(
    model: Any, tokenizer: Any, request: FinetuneJobCreate, base_dir: Path, out: Path
) -> None:
    """An adapter (``adapter_model.safetensors`` + ``adapter_config.json``, and for QLoRA
    ``base_quantization.json``: its base is loaded in NF4) or a full model dir."""
    tmp = out.with_name(f".tmp-{out.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        if request.adapter:
            model.save_pretrained(tmp, safe_serialization=True)
            if request.quantization is not None:
                write_json(tmp / BASE_QUANTIZATION_FILE, marker(request.quantization))
        else:
            model.config.use_cache = True
            base_dtype = _config_dtype(base_dir)
            if base_dtype is not None and base_dtype != next(model.parameters()).dtype:
                model.to(base_dtype)  # fp32 master weights back to the base's storage dtype
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
    except Exception as exc:
        shutil.rmtree(tmp, ignore_errors=True)  # no partial output folder is left
        raise_if_disk_full(exc, f"the output {out.name!r}")
        raise
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)


def reloads_exactly(model: Any, request: FinetuneJobCreate, base_dir: Path) -> bool:
    """Whether an evaluation of the saved output computes with the very weights in memory.

    Evaluations load in ``select_dtype(device)``. The model must train in that dtype, and its
    output must hold the values trained: an adapter does (its base is frozen); a full model
    does unless :func:`save_output` casts it back to the base's storage dtype.
    """
    trained = model.get_input_embeddings().weight.dtype
    if trained != select_dtype(model.device):
        return False
    stored = _config_dtype(base_dir)
    return bool(request.adapter) or stored is None or stored == trained


def _config_dtype(model_dir: Path) -> torch.dtype | None:
    try:
        config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    name = config.get("dtype") or config.get("torch_dtype")
    value = getattr(torch, str(name), None) if name else None
    return value if isinstance(value, torch.dtype) else None
