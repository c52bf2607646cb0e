"""The training loop: step plan, AdamW + scheduler, autocast, RNG state, exact resume.

The loop is our own (AdamW + ``transformers.get_scheduler``) rather than the HF ``Trainer``,
because every optimizer step must renew the job's lease in the same transaction that records
the step (so a cancelled job stops within one step and a worker that lost its lease writes
nothing), add the EWC penalty, and checkpoint everything needed to resume: trainable weights,
optimizer, scheduler, RNG state and step, written atomically.

Resumption is exact: the data order of epoch ``e`` is a permutation seeded by ``seed + e``,
and the RNG state (dropout) is restored, so a job killed at any point and resumed from its
last checkpoint ends at the same step with the same weights as an uninterrupted run.
"""

from __future__ import annotations

import math
import os
import shutil
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from app.finetune.schemas import FinetuneJobCreate, ResolvedHyperparameters, planned_total_steps
from workers.context import Interrupted, UserError
from workers.engine import transformers_backend as engine
from workers.engine.loading import load_model
from workers.finetune.data import Example, collate
from workers.finetune.ewc import EWCRegularizer, sequence_loss, trainable_named_parameters
from workers.finetune.sharding import shard_like, whole
from workers.finetune.statefile import raise_if_disk_full, read_state, write_json

LOSS_CURVE_POINTS = 200
# The folders of a group's checkpoint that hold what each rank writes of its own: ZeRO's
# optimizer partitions (DeepSpeed), the shards of the weights and optimizer state (FSDP).
DEEPSPEED_TAG = "deepspeed"
SHARDED = "sharded"
WEIGHTS = "trainable.safetensors"  # the whole trainable weights, where not sharded


# --------------------------------------------------------------------------- the step plan


@dataclass(frozen=True)
class StepPlan:
    """How many optimizer steps the job takes (HF ``Trainer`` arithmetic)."""

    examples: int
    batch_size: int
    accumulation: int
    micro_batches_per_epoch: int
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int


def plan_steps(n_examples: int, hp: ResolvedHyperparameters, processes: int = 1) -> StepPlan:
    """Micro-batches per epoch, optimizer steps (the last one of an epoch may accumulate fewer).

    A micro-batch is ``per_device_train_batch_size`` examples on each of ``processes``: with
    more processes, ``batch_size`` is the global micro-batch that the ranks split.
    """
    batch_size = hp.per_device_train_batch_size * processes
    micro = math.ceil(n_examples / batch_size)
    per_epoch = math.ceil(micro / hp.gradient_accumulation_steps)
    total = planned_total_steps(n_examples, hp, processes)
    return StepPlan(
        examples=n_examples,
        batch_size=batch_size,
        accumulation=hp.gradient_accumulation_steps,
        micro_batches_per_epoch=micro,
        steps_per_epoch=per_epoch,
        total_steps=total,
        warmup_steps=math.ceil(hp.warmup_ratio * total),  # TrainingArguments.get_warmup_steps
    )


def thin(curve: Sequence[dict[str, Any]], points: int = LOSS_CURVE_POINTS) -> list[dict[str, Any]]:
    """At most ``points`` evenly spaced entries, always keeping the first and the last."""
    if len(curve) <= points:
        return list(curve)
    picks = sorted({round(i * (len(curve) - 1) / (points - 1)) for i in range(points)})
    return [curve[i] for i in picks]


# --------------------------------------------------------------------------- the trainer


@dataclass
class StepLog:
    step: int
    total_steps: int
    epoch: float
    loss: float
    learning_rate: float
    grad_norm: float | None
    ewc_penalty: float | None
    tokens: int
    seconds: float


def autocast_for(device: torch.device) -> AbstractContextManager[Any]:
    """bf16 autocast on CUDA when supported (fp32 master weights); nothing on CPU."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return nullcontext()


def _rng_state(device: torch.device) -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])


class GuardStop(Exception):  # noqa: N818 (a signal, not an error)
    """Raised by an evaluation callback: end training at this step (``guard.action=stop``)."""


def _torch_save(value: Any, path: Path) -> None:
    """``torch.save`` through a Python file, so a full disk keeps its ``ENOSPC`` as the cause."""
    with path.open("wb") as fh:
        torch.save(value, fh)
        fh.flush()
        os.fsync(fh.fileno())


@contextmanager
def _checkpoint_writes(step: int, tmp: Path) -> Iterator[None]:
    """Writes of the checkpoint of ``step`` into its staging folder ``tmp`` (one process's, or
    a rank's part): on failure no partial folder is left, and a full disk says so."""
    try:
        yield
    except BaseException as exc:  # torch.distributed.checkpoint's CheckpointException is one
        try:  # DeepSpeed's torch.save to a path loses ENOSPC: ask the device, before cleaning
            raise_if_disk_full(exc, f"the checkpoint of step {step}", tmp.parent)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        raise


def _never() -> None:
    return None


def _adamw(groups: list[dict[str, Any]], lr: float) -> torch.optim.AdamW:
    """AdamW with TrainingArguments' betas and eps; the fused kernel where it exists.

    The fused step is about ten times faster on CPU for a 135M model (0.25 s against 2.4 s),
    which is most of a full fine-tuning step there.
    """
    try:
        return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), eps=1e-8, fused=True)
    except (RuntimeError, ValueError):  # a device or dtype without the fused kernel
        return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), eps=1e-8)


@dataclass(frozen=True)
class Rank:
    """This process's place in a process group (``torch.distributed`` is initialized).

    ``wrapped`` is the module the forward pass goes through, whose backward averages the
    gradients across ranks: the ``DistributedDataParallel`` wrapper (DDP), or the model itself
    once ``fully_shard`` made its parameters ``DTensor`` shards (FSDP). The trainer keeps the
    plain model for names and checkpoints; parameter names are the same under either.
    """

    rank: int
    world: int
    wrapped: torch.nn.Module
    strategy: str = "ddp"
    # DeepSpeed's engine (strategy ``deepspeed``, also ``wrapped``): it reduces the gradients
    # as the backward computes them, clips, steps the trainer's optimizer (whose state ZeRO
    # partitions across the ranks) and checkpoints that state, a shard per rank.
    engine: Any = None


class Trainer:
    """AdamW + scheduler over tokenized examples, with EWC, checkpoints and exact resume."""

    def __init__(
        self,
        model: torch.nn.Module,
        examples: Sequence[Example],
        hp: ResolvedHyperparameters,
        *,
        pad_id: int,
        checkpoint_dir: Path,
        ewc: EWCRegularizer | None = None,
        on_step: Callable[[StepLog], None] | None = None,
        check_stop: Callable[[], None] = _never,
        on_checkpoint: Callable[[int, Path], None] | None = None,
        state: dict[str, Any] | None = None,
        evaluate_steps: Sequence[int] = (),
        on_evaluate: Callable[[int], None] | None = None,
        rank: Rank | None = None,
        processes: int = 1,
    ) -> None:
        from transformers import get_scheduler

        self.model = model
        self.examples = list(examples)
        self.hp = hp
        self.pad_id = pad_id
        self.checkpoint_dir = checkpoint_dir
        self.ewc = ewc
        self.on_step = on_step
        self.check_stop = check_stop
        self.on_checkpoint = on_checkpoint
        self.evaluate_steps = frozenset(evaluate_steps)
        self.on_evaluate = on_evaluate
        self.stopped_at: int | None = None
        self.device = next(model.parameters()).device
        self.autocast = autocast_for(self.device)
        self.rank = rank
        # ``processes`` without ``rank``: the worker's copy, which plans like its group's ranks
        # and never steps its optimizer (it loads the group's checkpoints, not their optimizer).
        self.group_copy = rank is None and processes > 1
        self.plan = plan_steps(len(self.examples), hp, processes if rank is None else rank.world)
        self.params = trainable_named_parameters(model)
        # As the HF Trainer does: no weight decay on biases and normalization weights.
        decay = [p for n, p in self.params if not ("bias" in n or "norm" in n.lower())]
        no_decay = [p for n, p in self.params if "bias" in n or "norm" in n.lower()]
        groups = [
            {"params": decay, "weight_decay": hp.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
        self.optimizer = _adamw([g for g in groups if g["params"]], hp.learning_rate)
        self.scheduler = get_scheduler(
            hp.lr_scheduler_type,
            self.optimizer,
            num_warmup_steps=self.plan.warmup_steps,
            num_training_steps=self.plan.total_steps,
        )
        self.global_step = 0
        self.checkpointed_step = -1
        self.loss_curve: list[dict[str, Any]] = []
        self.train_seconds = 0.0
        self.resumed_from: list[int] = []
        self.last_ewc_penalty: float | None = None
        # Anything the caller wants carried in every checkpoint (e.g. the base checksum).
        self.state = dict(state or {})
        self._rng = _rng_state(self.device)
        self._orders: dict[int, list[int]] = {}

    # -- data order

    def epoch_order(self, epoch: int) -> list[int]:
        """The shuffled example order of ``epoch``: a function of the seed and epoch only."""
        if epoch not in self._orders:
            generator = torch.Generator().manual_seed(self.hp.seed + epoch)
            self._orders = {epoch: torch.randperm(len(self.examples), generator=generator).tolist()}
        return self._orders[epoch]

    def step_batches(self, step: int) -> list[list[int]]:
        """Example indexes of each micro-batch that optimizer step ``step`` accumulates."""
        epoch, k = divmod(step, self.plan.steps_per_epoch)
        order = self.epoch_order(epoch)
        first = k * self.plan.accumulation
        last = min(first + self.plan.accumulation, self.plan.micro_batches_per_epoch)
        bs = self.plan.batch_size
        return [order[m * bs : (m + 1) * bs] for m in range(first, last)]

    # -- checkpoints

    def _checkpoints(self) -> list[Path]:
        if not self.checkpoint_dir.is_dir():
            return []
        return sorted(p for p in self.checkpoint_dir.glob("step-*") if (p / "state.json").is_file())

    def save_checkpoint(self) -> Path:
        """Write weights, optimizer, scheduler, RNG and step to ``step-N`` (atomically).

        In a process group rank 0 writes the small files (scheduler, RNG, state). DDP keeps
        every rank's weights and optimizer identical: rank 0 writes them as one process does.
        Under FSDP each rank writes its shards of the weights and optimizer state
        (``sharded/``, ``torch.distributed.checkpoint``): no rank ever holds the whole state.
        Under DeepSpeed each rank writes its ZeRO partition of the optimizer state
        (``deepspeed/``) and rank 0 the whole weights, which ZeRO-2 keeps on every rank.
        """
        from safetensors.torch import save_file

        step = self.global_step
        final = self.checkpoint_path(step)
        writer = self.rank is None or self.rank.rank == 0
        engine = self._engine
        tmp = self._staging(step)
        if writer:
            shutil.rmtree(tmp, ignore_errors=True)
        weights: dict[str, torch.Tensor] | None = None
        optimizer: dict[str, Any] | None = None
        if self._fsdp:
            import torch.distributed.checkpoint as dcp

            if writer:
                with _checkpoint_writes(step, tmp):
                    tmp.mkdir(parents=True)
            torch.distributed.barrier()
            with _checkpoint_writes(step, tmp):
                dcp.save(self._sharded_state(), checkpoint_id=str(tmp / SHARDED))
        else:
            if engine is not None:  # ZeRO's optimizer partitions, one file per rank
                with _checkpoint_writes(step, tmp):
                    engine.save_checkpoint(
                        str(tmp),
                        tag=DEEPSPEED_TAG,
                        save_latest=False,
                        exclude_frozen_parameters=True,
                    )
            if writer:
                weights = {n: p.detach().cpu() for n, p in self.params}
            if writer and engine is None:
                optimizer = self.optimizer.state_dict()
                optimizer["state"] = {
                    i: {k: v.cpu() for k, v in entry.items()}
                    for i, entry in optimizer["state"].items()
                }
        if not writer:
            self.checkpointed_step = step
            return final
        state = {
            "global_step": step,
            "total_steps": self.plan.total_steps,
            "examples": len(self.examples),
            "loss_curve": self.loss_curve,
            "train_seconds": self.train_seconds,
            "resumed_from": self.resumed_from,
            "state": self.state,
        }
        with _checkpoint_writes(step, tmp):
            tmp.mkdir(parents=True, exist_ok=True)  # the ranks' shards may be in it
            if weights is not None:
                save_file({n: w.contiguous() for n, w in weights.items()}, str(tmp / WEIGHTS))
            if optimizer is not None:
                _torch_save(optimizer, tmp / "optimizer.pt")
            _torch_save(self.scheduler.state_dict(), tmp / "scheduler.pt")
            _torch_save(self._rng, tmp / "rng.pt")
            write_json(tmp / "state.json", state)
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        for older in self._checkpoints():
            if older != final:
                shutil.rmtree(older, ignore_errors=True)
        self.checkpointed_step = step
        if self.on_checkpoint is not None:
            self.on_checkpoint(step, final)
        return final

    def checkpoint_path(self, step: int) -> Path:
        return self.checkpoint_dir / f"step-{step:08d}"

    def _staging(self, step: int) -> Path:
        """Where the checkpoint of ``step`` is written before it is renamed into place: in a
        group, rank 0's folder for every rank (FSDP and DeepSpeed ranks write their shards)."""
        tmp = [self.checkpoint_dir / f".tmp-step-{step:08d}-{os.getpid()}"]
        if self.rank is not None:
            torch.distributed.broadcast_object_list(tmp, src=0)
        return tmp[0]

    @property
    def _fsdp(self) -> bool:
        return self.rank is not None and self.rank.strategy == "fsdp"

    def _sharded_state(self) -> dict[str, Any]:
        """This FSDP rank's shards of the trainable weights and the optimizer state, keyed by
        parameter name: what ``torch.distributed.checkpoint`` saves, and loads into."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        model, optimizer = get_state_dict(
            self.model, self.optimizer, options=StateDictOptions(ignore_frozen_params=True)
        )
        return {"model": model, "optimizer": optimizer}

    @property
    def _engine(self) -> Any:
        """DeepSpeed's engine, in a ``deepspeed`` group; else None."""
        return self.rank.engine if self.rank is not None else None

    def load_weights(self, path: Path) -> None:
        """The trainable weights of the checkpoint in ``path``, into the model."""
        weights = read_weights(path)
        params = dict(self.params)
        if set(weights) != set(params):
            raise RuntimeError(
                f"checkpoint {path.name} holds other parameters than this model trains"
            )
        with torch.no_grad():
            for name, tensor in weights.items():
                params[name].copy_(shard_like(tensor, params[name]))

    def restore(self) -> int | None:
        """Load the latest checkpoint, if any; returns its step."""
        checkpoints = self._checkpoints()
        if not checkpoints:
            return None
        path = checkpoints[-1]
        state = read_state(path / "state.json")
        if state is None:
            # A torn checkpoint (written before writes were atomic): train again from the start.
            shutil.rmtree(path, ignore_errors=True)
            return None
        if state["examples"] != len(self.examples) or state["total_steps"] != self.plan.total_steps:
            raise RuntimeError(
                f"checkpoint {path.name} was made for other training data; not resuming from it"
            )
        engine = self._engine
        if engine is not None:  # the weights and ZeRO's fp32 master copy, with its optimizer
            engine.load_checkpoint(
                str(path),
                tag=DEEPSPEED_TAG,
                load_module_strict=False,  # the frozen base is not in it
                load_lr_scheduler_states=False,  # the trainer's own, below
            )
        elif self._fsdp:  # this rank's shards, of the weights and the optimizer state
            import torch.distributed.checkpoint as dcp
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

            sharded = self._sharded_state()
            dcp.load(sharded, checkpoint_id=str(path / SHARDED))
            set_state_dict(
                self.model,
                self.optimizer,
                model_state_dict=sharded["model"],
                optim_state_dict=sharded["optimizer"],
                # The frozen base is not in it: dcp.load has checked every trainable key.
                options=StateDictOptions(ignore_frozen_params=True, strict=False),
            )
        else:
            self.load_weights(path)
            if not self.group_copy:
                self._load_optimizer(path)
        self.scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
        self._rng = torch.load(path / "rng.pt", weights_only=True)
        _set_rng_state(self._rng, self.device)
        self.global_step = self.checkpointed_step = int(state["global_step"])
        self.loss_curve = list(state["loss_curve"])
        self.train_seconds = float(state["train_seconds"])
        self.resumed_from = [*state["resumed_from"], self.global_step]
        self.state = dict(state["state"])
        return self.global_step

    def _load_optimizer(self, path: Path) -> None:
        file = path / "optimizer.pt"
        if not file.is_file():
            raise RuntimeError(
                f"checkpoint {path.name} holds no optimizer state in this trainer's format "
                "(it was written by another strategy)"
            )
        # load_state_dict moves the moments to each parameter's device and dtype.
        self.optimizer.load_state_dict(torch.load(file, map_location="cpu", weights_only=True))

    # -- the loop

    def train(self) -> None:
        """Train to ``plan.total_steps``; on ``Interrupted``, checkpoint the last finished step."""
        try:
            if self.global_step in self.evaluate_steps:  # resumed at an evaluated step
                self._evaluate()
            for step in range(self.global_step, self.plan.total_steps):
                self._step(step)
        except GuardStop:
            self.stopped_at = self.global_step
        except Interrupted:
            if self.global_step > max(self.checkpointed_step, 0):
                self.save_checkpoint()
            raise

    def _step(self, step: int) -> None:
        started = time.monotonic()
        self.model.train()
        indexes = self.step_batches(step)
        # Token-mean over the whole accumulated step (not a mean of micro-batch means), so a
        # short last micro-batch does not weigh as much as a full one. In a process group the
        # count is the global one (every rank knows every index), so the summed gradient
        # equals one process's over the same global batch.
        tokens = sum(self.examples[i].trained_tokens for idx in indexes for i in idx)
        forward, scale = self.model, 1.0
        if self.rank is not None:
            forward, scale = self.rank.wrapped, float(self.rank.world)  # DDP averages: undo
            # Every rank runs every micro-batch's backward (DDP's all-reduce needs all of
            # them); one left without examples (a short last micro-batch) runs the first
            # example with weight 0.
            mine = [idx[self.rank.rank :: self.rank.world] for idx in indexes]
            weights = [1.0 if part else 0.0 for part in mine]
            indexes = [part or idx[:1] for part, idx in zip(mine, indexes, strict=True)]
            # Dropout as a function of (seed, step, rank): resumable without per-rank RNG files.
            torch.manual_seed(self.hp.seed + 1_000_003 * (step + 1) + self.rank.rank)
        else:
            weights = [1.0] * len(indexes)
        engine = self._engine
        loss_sum, penalty = 0.0, None
        for position, (idx, weight) in enumerate(zip(indexes, weights, strict=True)):
            self.check_stop()  # SIGTERM or a lost lease: stop between micro-batches
            batch = collate([self.examples[i] for i in idx], self.pad_id)
            batch = {k: v.to(self.device) for k, v in batch.items()}
            loss, _ = sequence_loss(forward, batch, self.autocast)
            scaled = loss * (weight * scale) / max(tokens, 1)
            if engine is None:
                scaled.backward()
            else:
                if self.ewc is not None and position == len(indexes) - 1:
                    # ZeRO reduces each gradient as the backward computes it: none is left to
                    # add EWC's to afterwards, so its penalty joins the last backward. Every
                    # rank adds the same one, which the averaging keeps as it is.
                    term = self.ewc.penalty(self.model)
                    scaled, penalty = scaled + term, float(term.detach())
                engine.backward(scaled, scale_wrt_gas=False)
            loss_sum += weight * float(loss.detach())
        if self.rank is not None:
            total = torch.tensor([loss_sum], dtype=torch.float64)
            torch.distributed.all_reduce(total)
            loss_sum = float(total)
        lr = float(self.scheduler.get_last_lr()[0])
        if engine is None:
            penalty = self.ewc.add_gradient(self.model) if self.ewc is not None else None
            grad_norm = None
            if self.hp.max_grad_norm > 0:
                norm = torch.nn.utils.clip_grad_norm_(
                    [p for _, p in self.params], self.hp.max_grad_norm
                )
                grad_norm = float(whole(norm))
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        else:  # the same update: it clips to max_grad_norm (its config) as clip_grad_norm_ does
            engine.step()
            norm = engine.get_global_grad_norm()
            grad_norm = float(norm) if self.hp.max_grad_norm > 0 and norm is not None else None
        self.scheduler.step()
        self.global_step = step + 1
        self._rng = _rng_state(self.device)
        seconds = time.monotonic() - started
        self.train_seconds += seconds
        loss_value = loss_sum / max(tokens, 1)
        self.last_ewc_penalty = penalty
        entry = StepLog(
            step=self.global_step,
            total_steps=self.plan.total_steps,
            epoch=round(self.global_step / self.plan.steps_per_epoch, 4),
            loss=loss_value,
            learning_rate=lr,
            grad_norm=grad_norm,
            ewc_penalty=penalty,
            tokens=tokens,
            seconds=round(seconds, 4),
        )
        point = {
            "step": entry.step,
            "loss": round(loss_value, 6),
            "learning_rate": lr,
            "epoch": entry.epoch,
        }
        if penalty is not None:
            point["ewc_penalty"] = penalty
        self.loss_curve.append(point)
        if self.on_step is not None:
            self.on_step(entry)
        every = self.hp.checkpoint_every_steps
        if self.global_step % every == 0 and self.global_step < self.plan.total_steps:
            self.save_checkpoint()
        if self.global_step in self.evaluate_steps:
            self._evaluate()

    def _evaluate(self) -> None:
        """Evaluate the weights of this step, checkpointed first so a killed worker resumes
        here and does not train the step again before evaluating it. In a process group the
        worker evaluates that checkpoint, the last step's included."""
        if self.on_evaluate is None:
            return
        last = self.global_step == self.plan.total_steps
        if self.checkpointed_step != self.global_step and (not last or self.rank is not None):
            self.save_checkpoint()
        self.on_evaluate(self.global_step)


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """The whole trainable weights of the checkpoint in ``path``, by parameter name, on the
    CPU: from ``trainable.safetensors``, or gathered from an FSDP group's shards (read here
    without a process group)."""
    sharded = path / SHARDED
    if not sharded.is_dir():
        from safetensors.torch import load_file

        return load_file(str(path / WEIGHTS))
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = dcp.FileSystemReader(str(sharded))
    stored = reader.read_metadata().state_dict_metadata
    weights = {
        key.removeprefix("model."): torch.empty(tuple(meta.size), dtype=meta.properties.dtype)
        for key, meta in stored.items()
        if key.startswith("model.") and isinstance(meta, TensorStorageMetadata)
    }
    with warnings.catch_warnings():  # that it reads in one process: it was asked to
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load({"model": weights}, storage_reader=reader, no_dist=True)
    return weights


# --------------------------------------------------------------------------- model preparation


def prepare_model(
    base_dir: Path,
    device: torch.device,
    request: FinetuneJobCreate,
    seed: int,
    *,
    place: torch.device | None = None,
) -> Any:
    """The base model ready to train on ``device``: fp32 for full fine-tuning; LoRA adapters on
    a frozen base (for QLoRA a 4-bit NF4 base, whose layers compute in the load dtype).
    ``place``: where its weights are loaded, when not on ``device`` itself."""
    dtype = (
        torch.float32
        if not request.adapter or device.type != "cuda"
        else engine.select_dtype(device)
    )
    model = load_model(base_dir, place or device, dtype=dtype, quantization=request.quantization)
    model.config.use_cache = False  # no KV cache while training
    torch.manual_seed(seed)  # LoRA's initialization, dropout
    if not request.adapter:
        for param in model.parameters():
            param.requires_grad_(True)
        return model
    from peft import LoraConfig, TaskType, get_peft_model

    spec = request.lora
    assert spec is not None
    config = LoraConfig(
        task_type=TaskType.CAUSAL_LM,
        r=spec.r,
        lora_alpha=spec.lora_alpha,  # type: ignore[arg-type]
        target_modules=spec.target_modules,
        lora_dropout=spec.lora_dropout,
        use_rslora=spec.use_rslora,
        bias="none",
    )
    try:
        model = get_peft_model(model, config)
    except ValueError as exc:  # e.g. target modules that the model does not have
        raise UserError(f"LoRA configuration does not fit this model: {exc}") from None
    assert_base_frozen(model)
    return model


def assert_base_frozen(model: torch.nn.Module) -> None:
    """The lesson's check: every non-LoRA parameter has ``requires_grad=False``."""
    for name, param in model.named_parameters():
        if "lora_" not in name and param.requires_grad:
            raise RuntimeError(f"base weight {name} should be frozen but is trainable")
