"""The EWC stage: the Fisher information of the general data, from the cache or computed."""

from __future__ import annotations

import random
import time
from typing import TYPE_CHECKING, Any

from workers.context import UserError
from workers.finetune.data import encode_records, pad_id, records_sha256
from workers.finetune.ewc import (
    fisher_cache_key,
    load_fisher,
    per_sample_fisher,
    save_fisher,
    trainable_named_parameters,
)
from workers.finetune.stages.data import answer_pending, general_items
from workers.finetune.training import autocast_for

if TYPE_CHECKING:
    from workers.finetune.stages.context import StageRun


def ewc_fisher(
    run: StageRun,
    model: Any,
    tokenizer: Any,
    base_fp: str,
    fmt: str,
    eval_definitions: list[dict[str, Any]],
) -> dict[str, Any]:
    """The diagonal Fisher of ``model``'s trainable parameters on the job's general data:
    from the cache, or computed from per-sample squared gradients (and cached)."""
    spec = run.request.ewc
    assert spec is not None
    items = general_items(run, spec, "ewc", eval_definitions)
    random.Random(run.hp.seed).shuffle(items)
    items = items[: spec.fisher_samples]
    key = fisher_cache_key(
        [
            base_fp,
            run.request.method,
            run.request.lora.model_dump() if run.request.lora else None,
            run.hp.seed,
            records_sha256(items),
            spec.completions,
            spec.max_new_tokens,
            fmt,
            run.hp.max_seq_length,
            str(next(model.parameters()).dtype),
        ]
    )
    path = run.settings.cache_dir / "ewc" / f"{key}.safetensors"
    fisher = load_fisher(path)
    names = {n for n, _ in trainable_named_parameters(model)}
    if fisher is not None and set(fisher) == names:
        run.event(f"ewc: Fisher information from cache ({len(items)} samples)", data={"key": key})
    else:
        records = answer_pending(run, items, spec, tokenizer, base_fp, fmt)
        examples, _ = encode_records(tokenizer, records, fmt, run.hp.max_seq_length)
        if not examples:
            raise UserError("ewc: no general example has tokens to compute the Fisher on")
        phase = "ewc: computing the Fisher information"
        run.stage(phase, total=len(examples), unit="examples")
        beat = time.monotonic()

        def on_sample(index: int) -> None:
            nonlocal beat
            run.ctx.check_stop()
            progress = run.progress(phase, unit="examples", done=index, store="no")
            if time.monotonic() - beat > 2.0:
                beat = time.monotonic()
                run.event(
                    f"ewc: Fisher sample {index}/{len(examples)}", level="debug", progress=progress
                )

        fisher = per_sample_fisher(
            model,
            examples,
            pad_id(tokenizer),
            autocast=autocast_for(run.device),
            on_sample=on_sample,
        )
        save_fisher(path, fisher, {"base_fingerprint": base_fp, "samples": str(len(examples))})
        run.event(
            f"ewc: Fisher information from {len(examples)} per-sample gradients",
            data={"samples": len(examples), "key": key},
            progress=run.progress(phase, unit="examples", done=len(examples), store="no"),
        )
    return fisher
