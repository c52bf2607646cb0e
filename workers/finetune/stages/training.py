"""The training stage: data, model, EWC, the training loop, the saved output."""

from __future__ import annotations

import gc
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from app.finetune.schemas import ResolvedHyperparameters
from workers.context import UserError
from workers.finetune.artifacts import (
    CHECKPOINTS,
    TRAINING_DONE,
    TrainingOutcome,
    base_checksum,
    parameter_counts,
    reloads_exactly,
    save_output,
)
from workers.finetune.data import encode_records, pad_id
from workers.finetune.distributed import Hooks, train_distributed
from workers.finetune.ewc import EWCRegularizer
from workers.finetune.stages.checkpoints import CheckpointEvaluator
from workers.finetune.stages.data import training_records
from workers.finetune.stages.ewc import ewc_fisher
from workers.finetune.statefile import write_json
from workers.finetune.training import StepLog, Trainer, assert_base_frozen, prepare_model, thin

if TYPE_CHECKING:
    from workers.finetune.stages.context import StageRun

CPU = torch.device("cpu")


def run_training(
    run: StageRun,
    base_dir: Path,
    tokenizer: Any,
    base_fp: str,
    fmt: str,
    eval_definitions: list[dict[str, Any]],
    hp: ResolvedHyperparameters,
) -> TrainingOutcome:
    """Prepare data and model, train with checkpoints, save the artifact; record the outcome."""
    request = run.request
    try:
        records, meta = training_records(run, tokenizer, base_fp, fmt, eval_definitions)
        examples, stats = encode_records(tokenizer, records, fmt, hp.max_seq_length)
    except ValueError as exc:
        raise UserError(f"training data: {exc}") from None
    if stats.truncated:
        run.warn(
            f"{stats.truncated} of {stats.records} training examples are longer than "
            f"max_seq_length {hp.max_seq_length} tokens and were truncated"
        )
    if stats.dropped:
        run.warn(
            f"{stats.dropped} training examples had nothing left to train on after truncation "
            "and were left out"
        )
    if not examples:
        raise UserError("no training example has tokens to train on")

    run.models.clear()  # the evaluation copy of the base model is not needed while training
    processes = request.resources.processes
    # A process group trains on the devices. The worker's copy counts, checksums, computes
    # EWC's Fisher, evaluates the group's checkpoints and exports the result: it waits on the
    # CPU, taking no accelerator memory from the ranks, and is on the device only to compute.
    # A 4-bit base (QLoRA) stays where it is loaded: small, and bitsandbytes places it once.
    parked = processes > 1 and request.quantization is None
    model = prepare_model(base_dir, run.device, request, hp.seed, place=CPU if parked else None)
    counts = parameter_counts(model)
    checksum_before = base_checksum(model) if request.adapter else None
    ewc = fisher = None
    if request.ewc is not None and processes == 1:  # θ*: the weights now
        computed = ewc_fisher(run, model, tokenizer, base_fp, fmt, eval_definitions)
        ewc = EWCRegularizer(model, computed, request.ewc.importance)
    elif request.ewc is not None:  # for the group's ranks, which anchor θ* on their own copy
        with _on_device(model, run.device):
            computed = ewc_fisher(run, model, tokenizer, base_fp, fmt, eval_definitions)
            fisher = {name: tensor.cpu() for name, tensor in computed.items()}
            del computed  # off the device before the ranks start

    trainer = Trainer(
        model,
        examples,
        hp,
        processes=request.resources.processes,
        pad_id=pad_id(tokenizer),
        checkpoint_dir=run.job_dir / CHECKPOINTS,
        ewc=ewc,
        on_step=partial(_on_step, run),
        check_stop=run.ctx.check_stop,
        on_checkpoint=partial(_on_checkpoint, run),
        state={"base_checksum": checksum_before},
    )
    plan = trainer.plan
    evaluator = None
    spec = request.evaluation
    if spec is not None and (spec.every_steps is not None or spec.checkpoints is not None):
        evaluator = CheckpointEvaluator(
            run,
            model,
            tokenizer,
            fmt,
            eval_definitions,
            plan.total_steps,
            keep_final_answers=reloads_exactly(model, request, base_dir),
        )
        trainer.evaluate_steps = frozenset(evaluator.steps)
        trainer.on_evaluate = evaluator
        evaluator.base()
    resumed = trainer.restore()
    if resumed is not None:
        run.event(
            f"resumed from the checkpoint at step {resumed} of {plan.total_steps}",
            data={"step": resumed, "total_steps": plan.total_steps},
        )
        checksum_before = trainer.state.get("base_checksum", checksum_before)
    if evaluator is not None:  # its exact size, now that the steps are known
        evaluator.plan()
    run.stage(
        "training",
        done=trainer.global_step,
        total=plan.total_steps,
        unit="steps",
        data={"plan": asdict(plan), "trainable_parameters": counts},
    )
    run.event("trainable parameters", data=counts, trainable_parameters=counts)
    if processes > 1:
        hooks = Hooks(
            step=partial(_on_step, run),
            checkpoint=partial(_on_checkpoint, run),
            check_stop=run.ctx.check_stop,
            started=partial(_on_group_started, run),
        )
        if evaluator is not None:
            hooks = replace(hooks, evaluate=partial(_evaluate_checkpoint, run, trainer, evaluator))
        group = train_distributed(
            examples=examples,
            request=request,
            hp=hp,
            base_dir=base_dir,
            device=run.device,
            pad_id=trainer.pad_id,
            checkpoint_dir=trainer.checkpoint_dir,
            work_dir=run.job_dir / "distributed",
            state=trainer.state,
            hooks=hooks,
            evaluate_steps=trainer.evaluate_steps,
            fisher=fisher,
        )
        trainer.stopped_at, checksum_after = group.stopped_at, group.base_checksum
        # The group's last checkpoint holds the trained weights and the loss curve: loaded
        # here, the rest (the artifact, the metrics) is the single-process path's.
        trainer.restore()
        trainer.resumed_from = trainer.resumed_from[:-1]  # loading the result is no resume
        trainer.last_ewc_penalty = (trainer.loss_curve or [{}])[-1].get("ewc_penalty")
    else:
        trainer.train()
        checksum_after = base_checksum(model) if request.adapter else None

    base_weights = None
    if request.adapter:
        assert_base_frozen(model)
        base_weights = {
            "checksum_before": checksum_before,
            "checksum_after": checksum_after,
            "unchanged": checksum_before == checksum_after,
        }
        if checksum_before != checksum_after:
            raise RuntimeError(
                f"LoRA training changed the frozen base: {checksum_before} → {checksum_after}"
            )
    run.stage("saving", phase="training", unit="steps")
    out = run.job_dir / ("adapter" if request.adapter else "model")
    save_output(model, tokenizer, request, base_dir, out)
    final_out = out
    shipped_out: Path | None = out
    shipped = None
    if evaluator is not None and request.guard is not None:
        # The final weights stay in ``out`` (an interpolation starts from them); a shipped
        # earlier checkpoint is exported beside them and becomes the job's output.
        shipped = evaluator.ship(trainer.global_step, stopped=trainer.stopped_at is not None)
        what = "nothing" if shipped["step"] is None else f"step {shipped['step']}"
        run.event(f"shipping {what}: {shipped['reason']}", data=shipped)
        if shipped["step"] is None:
            shipped_out = None  # no output; the after-evaluation measures the final weights
        elif shipped["step"] != trainer.global_step:
            shipped_out = run.job_dir / f"shipped-step-{shipped['step']}"
            save_output(model, tokenizer, request, base_dir, shipped_out)
    metrics: dict[str, Any] = {
        "global_step": trainer.global_step,
        "total_steps": plan.total_steps,
        "steps_per_epoch": plan.steps_per_epoch,
        "warmup_steps": plan.warmup_steps,
        "num_train_epochs": hp.num_train_epochs,
        "examples": {
            "domain": meta["domain"],
            "replay": meta["replay"],
            "held_out": meta.get("held_out", 0),
            "trained": len(examples),
            "truncated": stats.truncated,
            "dropped": stats.dropped,
        },
        "final_loss": trainer.loss_curve[-1]["loss"] if trainer.loss_curve else None,
        "loss_curve": thin(trainer.loss_curve),
        "train_seconds": round(trainer.train_seconds, 2),
        "resumed_from_steps": trainer.resumed_from,
        "hyperparameters": hp.model_dump(),
        "prompt_format": fmt,
        "device": str(run.device),
    }
    if request.resources.processes > 1:
        metrics["resources"] = request.resources.model_dump()
    if meta.get("dataset") is not None:
        # The dataset as the job split it: a later interpolation sweep is checked against it.
        metrics["dataset"] = meta["dataset"]
    if base_weights is not None:
        metrics["base_weights"] = base_weights
    if request.quantization is not None:
        # The base trained on, and evaluated after training with the adapter (fingerprint +nf4).
        metrics["quantization"] = request.quantization
    if evaluator is not None:
        metrics["evaluation_steps"] = evaluator.steps
    if trainer.stopped_at is not None:
        metrics["stopped_at_step"] = trainer.stopped_at
    if shipped is not None:
        metrics["shipped"] = shipped
        metrics["final_output_path"] = str(final_out)
    if request.ewc is not None:
        metrics["ewc"] = {
            "importance": request.ewc.importance,
            "final_penalty": trainer.last_ewc_penalty,
        }
    outcome = TrainingOutcome(
        output_path=None if shipped_out is None else str(shipped_out),
        trainable_parameters=counts,
        metrics=metrics,
    )
    del trainer, model, ewc
    gc.collect()
    if run.device.type == "cuda":
        torch.cuda.empty_cache()
    write_json(run.job_dir / TRAINING_DONE, asdict(outcome))
    shutil.rmtree(run.job_dir / CHECKPOINTS, ignore_errors=True)
    run.event(
        "saved",
        data={"output_path": outcome.output_path},
        output_path=outcome.output_path,
        checkpoint_path=None,
        trainable_parameters=counts,
        metrics=metrics,
    )
    return outcome


def _on_step(run: StageRun, entry: StepLog) -> None:
    # The lease renewal and the step's record are one transaction: a cancelled job's
    # renewal fails (LeaseLost) and training stops after at most this one step.
    data = {k: v for k, v in asdict(entry).items() if v is not None}
    message = (
        f"step {entry.step}/{entry.total_steps}: loss {entry.loss:.4f}, "
        f"lr {entry.learning_rate:.3g}"
    )
    progress = run.progress(
        "training", unit="steps", done=entry.step, total=entry.total_steps, store="no"
    )
    run.event(message, data=data, progress=progress)
    run.ctx.hold_at("step", entry.step)


@contextmanager
def _on_device(model: Any, device: torch.device) -> Iterator[None]:
    """A process group's model, in the worker, on ``device`` for a while, then on the CPU
    (a model that is not on the CPU stays where it is)."""
    if device.type == "cpu" or next(model.parameters()).device.type != "cpu":
        yield
        return
    model.to(device)
    try:
        yield
    finally:
        model.to(CPU)
        if device.type == "cuda":
            torch.cuda.empty_cache()


def _evaluate_checkpoint(
    run: StageRun, trainer: Trainer, evaluator: CheckpointEvaluator, step: int
) -> None:
    """A group's checkpoint evaluation: its weights, in the worker's copy, on its device."""
    trainer.load_weights(trainer.checkpoint_path(step))
    with _on_device(trainer.model, run.device):
        evaluator(step)


def _on_group_started(run: StageRun, layout: dict[str, Any]) -> None:
    share = layout["parameters_per_rank"] / max(layout["parameters"], 1)
    held = f"each holds {share:.0%} of the model's {layout['parameters']:,} parameters"
    if "zero_stage" in layout:
        held += (
            f" and 1/{layout['processes']} of its gradients and optimizer state "
            f"(ZeRO stage {layout['zero_stage']})"
        )
    run.event(
        f"training in {layout['processes']} processes ({layout['strategy']} over "
        f"{layout['backend']}): {held}",
        data=layout,
    )


def _on_checkpoint(run: StageRun, step: int, path: Path) -> None:
    run.event(
        f"checkpoint at step {step}",
        data={"step": step, "path": str(path)},
        checkpoint_path=str(path),
    )
