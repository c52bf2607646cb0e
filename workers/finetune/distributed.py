"""Training as a process group (DDP, FSDP2 or DeepSpeed ZeRO-2): the worker launches
``torchrun``; every rank runs the same :class:`~workers.finetune.training.Trainer` on its share
of each global batch.

The worker process stays the job's only writer. Rank 0 reports each optimizer step (and each
checkpoint) to it over a local authenticated connection and waits for the answer; the worker
records the step under the lease with the same code as a single-process job, and answers
``stop`` when the lease is lost, the job was cancelled or the worker is shutting down. Rank 0
broadcasts the answer, so every rank stops after the same step, and the group checkpoints it
(DDP: rank 0, as a single process does; FSDP and DeepSpeed: each rank its shards, see
:meth:`~workers.finetune.training.Trainer.save_checkpoint`). A finished group
leaves a checkpoint at the last step, which the worker loads into its own model to export the
artifact exactly as a single-process job does.

Checkpoint evaluations run in the worker too: at an evaluated step the group checkpoints, rank
0 asks the worker to evaluate that checkpoint, and every rank waits for the answer (``go``,
``stop``, or ``guard``: the guard stops training there). EWC's Fisher is computed by the worker
before the group starts and handed to the ranks in a file; each rank anchors θ* on its own
copy of the base, which equals the worker's (same weights, same seed).

The worker runs ``python -m workers.finetune.distributed launch PID --nproc_per_node N ... -m
workers.finetune.distributed SPEC``: torchrun (``torch.distributed.run``), tied to the worker's
life, starting N ranks of this module on ``SPEC``, a JSON file in the job directory.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from multiprocessing.connection import Client, Connection, Listener
from pathlib import Path
from typing import Any

import torch

from app.finetune.schemas import FinetuneJobCreate, ResolvedHyperparameters
from app.jobs.queue import LeaseLost
from workers.context import Interrupted, UserError
from workers.finetune.artifacts import base_checksum
from workers.finetune.data import Example
from workers.finetune.ewc import EWCRegularizer, load_fisher, save_fisher
from workers.finetune.statefile import DiskFull, is_disk_full, write_json
from workers.finetune.training import GuardStop, Rank, StepLog, Trainer, prepare_model

AUTHKEY = "FORGETGUARD_DDP_AUTHKEY"  # the connection's key, passed to the ranks in their env
ANSWERS = ("go", "stop", "guard")  # the worker's answers to rank 0, broadcast by their index
# A rank that fails writes why beside the spec: FAILURE.format(rank=R), {"kind", "message"}.
FAILURE = "failure-rank{rank}.json"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


LAUNCH = "launch"  # ``-m workers.finetune.distributed launch PARENT_PID ARGS``: torchrun


def _launch(parent: int, args: list[str]) -> None:
    """Run ``torchrun ARGS`` in this process, which gets SIGTERM when the worker dies, even by
    SIGKILL (Linux ``PR_SET_PDEATHSIG``; set here, not in a ``preexec_fn``, which is unsafe in
    a worker with threads). torchrun stops its ranks on SIGTERM."""
    import runpy

    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass
    if os.getppid() != parent:  # the worker died before the line above: nothing to train for
        sys.exit(1)
    sys.argv = ["torchrun", *args]
    runpy.run_module("torch.distributed.run", run_name="__main__", alter_sys=True)


# --------------------------------------------------------------------------- the worker's side


def _ignore(*args: Any) -> None:
    return None


@dataclass(frozen=True)
class GroupResult:
    """How a group that ran to its end (or to the guard's stop) finished."""

    stopped_at: int | None  # the step the guard stopped training at, if it did
    base_checksum: str | None  # an adapter's base as the ranks hold it after training


@dataclass(frozen=True)
class Hooks:
    """What the worker does with rank 0's reports. ``started`` gets how the group trains (see
    :func:`_layout`) before the first step; ``evaluate(step)`` evaluates the checkpoint of an
    evaluated step (``GuardStop``: the guard ends training there). An exception from any other
    (a lost lease, ``Interrupted``) stops the group after the step."""

    step: Callable[[StepLog], None]
    checkpoint: Callable[[int, Path], None]
    check_stop: Callable[[], None]
    started: Callable[[dict[str, Any]], None] = _ignore
    evaluate: Callable[[int], None] = _ignore


def train_distributed(
    *,
    examples: Sequence[Example],
    request: FinetuneJobCreate,
    hp: ResolvedHyperparameters,
    base_dir: Path,
    device: torch.device,
    pad_id: int,
    checkpoint_dir: Path,
    work_dir: Path,
    state: dict[str, Any],
    hooks: Hooks,
    evaluate_steps: Iterable[int] = (),
    fisher: dict[str, torch.Tensor] | None = None,
) -> GroupResult:
    """Train in ``request.resources.processes`` ranks; returns once the last step is
    checkpointed in ``checkpoint_dir``. ``fisher``: EWC's (``request.ewc``), of the base's
    trainable parameters. An exception from a hook stops the group after that step,
    checkpointed, and is raised here once every rank has exited."""
    processes = request.resources.processes
    work_dir.mkdir(parents=True, exist_ok=True)
    fisher_path = work_dir / "fisher.safetensors"
    if request.ewc is not None:
        assert fisher is not None, "EWC needs the Fisher"
        save_fisher(fisher_path, fisher, {})
    key = secrets.token_bytes(32)
    listener = Listener(("127.0.0.1", 0), authkey=key)
    host, port = listener.address
    spec = {
        "examples": [[e.input_ids, e.labels] for e in examples],
        "request": request.model_dump(mode="json"),
        "hyperparameters": hp.model_dump(mode="json"),
        "base_dir": str(base_dir),
        "device": device.type,
        "pad_id": pad_id,
        "checkpoint_dir": str(checkpoint_dir),
        "state": state,
        "evaluate_steps": sorted(evaluate_steps),
        "fisher": str(fisher_path) if request.ewc is not None else None,
        "connect": [host, port],
        "threads": max(1, torch.get_num_threads() // processes),
    }
    write_json(work_dir / "spec.json", spec)
    command = [
        sys.executable,
        "-m",
        "workers.finetune.distributed",
        LAUNCH,
        str(os.getpid()),
        f"--nproc_per_node={processes}",
        "--nnodes=1",
        "--master_addr=127.0.0.1",
        f"--master_port={_free_port()}",
        "-m",
        "workers.finetune.distributed",
        str(work_dir / "spec.json"),
    ]
    env = {**os.environ, AUTHKEY: key.hex(), "OMP_NUM_THREADS": str(spec["threads"])}
    log_path = work_dir / "ranks.log"
    for stale in work_dir.glob(FAILURE.format(rank="*")):  # an earlier launch's
        stale.unlink()
    with log_path.open("ab") as log:
        group = subprocess.Popen(
            command,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: signalled only by this worker
        )
    try:
        return _serve(listener, group, hooks, log_path)
    except BaseException:
        _stop_group(group)
        raise
    finally:
        listener.close()


def _serve(
    listener: Listener, group: subprocess.Popen[bytes], hooks: Hooks, log_path: Path
) -> GroupResult:
    conn = _accept(listener, group, log_path)
    failure: BaseException | None = None
    guard_stop: int | None = None
    checksum: str | None = None
    with conn:
        while True:
            while not conn.poll(0.2):
                if group.poll() is not None:
                    if failure is not None:
                        raise failure
                    _raise_failed(group, log_path)
            try:
                message = conn.recv()
            except EOFError:  # rank 0 is done (or gone: its status says which)
                break
            kind, answer = message[0], "go"
            if kind == "done":
                checksum = message[1]
                conn.send("ok")
                break
            try:
                if failure is not None:
                    pass  # stopping: only the stop's own checkpoint is still recorded
                elif kind == "started":
                    hooks.started(message[1])
                    hooks.check_stop()
                elif kind == "step":
                    hooks.step(StepLog(**message[1]))
                    hooks.check_stop()
                elif kind == "evaluate":
                    try:
                        hooks.evaluate(int(message[1]))
                    except GuardStop:
                        guard_stop, answer = int(message[1]), "guard"
                    hooks.check_stop()
                if kind == "checkpoint" and not isinstance(failure, LeaseLost):
                    hooks.checkpoint(int(message[1]), Path(message[2]))
            except (Exception, Interrupted) as exc:
                failure = failure or exc
            # After a failure every rank stops after this step; rank 0 checkpoints it.
            conn.send(answer if failure is None else "stop")
    status = group.wait()
    if failure is not None:
        raise failure
    if status != 0:
        _raise_failed(group, log_path)
    return GroupResult(stopped_at=guard_stop, base_checksum=checksum)


def _accept(listener: Listener, group: subprocess.Popen[bytes], log_path: Path) -> Connection:
    """Rank 0's connection; fails when the group exits before making it."""
    accepted: list[Connection] = []
    thread = threading.Thread(target=lambda: accepted.append(listener.accept()), daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(0.2)
        if group.poll() is not None and not accepted:
            _raise_failed(group, log_path)
    return accepted[0]


def _raise_failed(group: subprocess.Popen[bytes], log_path: Path) -> None:
    """Raise why the group failed: a rank's own error where one reported it (a full disk, a
    request that cannot succeed), else the exit status and the tail of the ranks' log."""
    reports = []
    for path in sorted(log_path.parent.glob(FAILURE.format(rank="*"))):
        try:
            reports.append(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError):
            continue
    # The first cause, not its echo: a rank's failure breaks the other ranks' collectives.
    reports.sort(key=lambda report: report.get("kind") == "error")
    if reports and reports[0].get("kind") == "disk_full":
        raise DiskFull(errno.ENOSPC, str(reports[0]["message"]))
    if reports and reports[0].get("kind") == "user":
        raise UserError(str(reports[0]["message"]))
    tail = log_path.read_text(errors="replace")[-2000:]
    raise RuntimeError(f"the training process group exited with status {group.returncode}:\n{tail}")


def _report_failure(spec_path: str, exc: BaseException) -> None:
    """Leave ``exc`` where the worker reads it (:func:`_raise_failed`); best effort."""
    if is_disk_full(exc):
        kind, message = "disk_full", str(exc)
    elif isinstance(exc, UserError):
        kind, message = "user", str(exc)
    else:
        kind, message = "error", f"{type(exc).__name__}: {exc}"
    path = Path(spec_path).parent / FAILURE.format(rank=os.environ.get("RANK", "0"))
    try:
        write_json(path, {"kind": kind, "message": message})
    except OSError:
        pass  # the disk may be full: the log and the exit status still tell


def _stop_group(group: subprocess.Popen[bytes], grace: float = 30.0) -> None:
    """SIGTERM the group (torchrun stops its ranks), SIGKILL it after ``grace`` seconds."""
    if group.poll() is not None:
        return
    try:
        os.killpg(group.pid, signal.SIGTERM)
        group.wait(grace)
    except subprocess.TimeoutExpired:
        os.killpg(group.pid, signal.SIGKILL)
        group.wait()
    except ProcessLookupError:
        pass


# --------------------------------------------------------------------------- a rank's side


class _Reporter:
    """Rank 0 asks the worker after each step; every rank learns its answer by broadcast."""

    def __init__(self, rank: int, conn: Connection | None) -> None:
        self.rank = rank
        self.conn = conn

    def _ask(self, message: tuple[Any, ...]) -> str:
        """The worker's answer; ``stop`` raises ``Interrupted`` on every rank."""
        answer = torch.zeros(1, dtype=torch.int64)
        if self.conn is not None:
            self.conn.send(message)
            answer[0] = ANSWERS.index(self.conn.recv())
        torch.distributed.broadcast(answer, src=0)
        said = ANSWERS[int(answer.item())]
        if said == "stop":
            raise Interrupted("the worker stopped the training group")
        return said

    def started(self, layout: dict[str, Any]) -> None:
        self._ask(("started", layout))

    def step(self, entry: StepLog) -> None:
        self._ask(("step", asdict(entry)))

    def evaluate(self, step: int) -> None:
        if self._ask(("evaluate", step)) == "guard":
            raise GuardStop(step)

    def checkpoint(self, step: int, path: Path) -> None:
        if self.conn is not None:  # only rank 0 checkpoints; no collective here
            self.conn.send(("checkpoint", step, str(path)))
            self.conn.recv()


def _parallelize(
    model: torch.nn.Module, strategy: str, device: torch.device, world: int
) -> torch.nn.Module:
    """The module every rank's forward pass goes through.

    ``ddp``: a ``DistributedDataParallel`` replica. ``fsdp``: the model itself, sharded in
    place by FSDP2's ``fully_shard`` (the FSDP1 wrapper refuses the CPU): each transformer
    block is a unit of its own, as accelerate's transformer auto-wrap policy picks them (the
    model's ``_no_split_modules``), then the root, which holds the embeddings and a tied head.
    """
    if strategy == "ddp":
        return torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (world,))
    blocks = set(getattr(model, "_no_split_modules", None) or ())
    for module in list(model.modules()):
        if type(module).__name__ in blocks:
            fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


ZERO_STAGE = 2  # strategy ``deepspeed``: ZeRO-2; ``fsdp`` shards the parameters too (ZeRO-3)
INSTALL = "pip install -e '.[worker,deepspeed]' in the forgetguard checkout"


def require(strategy: str) -> None:
    """Raise a UserError saying what is missing unless this worker can launch ``strategy``
    (before the job loads anything: a group would fail only once its ranks start)."""
    import importlib.util

    if strategy == "deepspeed" and importlib.util.find_spec("deepspeed") is None:
        raise UserError(
            "strategy 'deepspeed' needs DeepSpeed, which this worker does not have; install "
            f"the deepspeed extra on the worker ({INSTALL}), or use strategy 'fsdp' or 'ddp'"
        )


def deepspeed_config(hp: ResolvedHyperparameters) -> dict[str, Any]:
    """The DeepSpeed config of a ``deepspeed`` group: ZeRO-2 partitions the gradients and the
    optimizer state across the ranks, each of which holds the whole model. The trainer owns
    the accumulation boundary (it calls ``step`` once per optimizer step, after the micro-
    batches of that step, which may be fewer at an epoch's end), the optimizer (its AdamW),
    the schedule, autocast and the loss's normalization; DeepSpeed clips to ``max_grad_norm``
    the way ``clip_grad_norm_`` does."""
    return {
        "train_micro_batch_size_per_gpu": hp.per_device_train_batch_size,
        "gradient_accumulation_steps": hp.gradient_accumulation_steps,
        "managed_gradient_accumulation": False,
        "gradient_clipping": hp.max_grad_norm,
        "zero_optimization": {"stage": ZERO_STAGE},
        "steps_per_print": 2**31 - 1,
    }


def _deepspeed(trainer: Trainer, hp: ResolvedHyperparameters) -> Any:
    """DeepSpeed's engine over the trainer's model and optimizer (on the process group this
    rank already joined)."""
    import deepspeed

    engine, *_ = deepspeed.initialize(
        model=trainer.model,
        optimizer=trainer.optimizer,
        config=deepspeed_config(hp),
        dist_init_required=False,
    )
    return engine


def _layout(model: torch.nn.Module, strategy: str, world: int) -> dict[str, Any]:
    """How the group trains, as rank 0 sees it: what share of the weights each rank holds."""
    from torch.distributed.tensor import DTensor

    total = held = 0
    for param in model.parameters():
        total += param.numel()
        held += (param.to_local() if isinstance(param, DTensor) else param).numel()
    layout = {
        "processes": world,
        "strategy": strategy,
        "backend": torch.distributed.get_backend(),
        "parameters": total,
        "parameters_per_rank": held,
    }
    if strategy == "deepspeed":
        layout["zero_stage"] = ZERO_STAGE
    return layout


def _rank_main(spec_path: str) -> int:
    import json

    spec = json.loads(Path(spec_path).read_text())
    torch.set_num_threads(int(spec["threads"]))
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", rank))
    cuda = spec["device"] == "cuda"
    if cuda:
        torch.cuda.set_device(local)
    device = torch.device(f"cuda:{local}" if cuda else "cpu")
    torch.distributed.init_process_group("nccl" if cuda else "gloo")
    conn = None
    if rank == 0:
        host, port = spec["connect"]
        conn = Client((host, int(port)), authkey=bytes.fromhex(os.environ[AUTHKEY]))
    try:
        request = FinetuneJobCreate.model_validate(spec["request"])
        hp = ResolvedHyperparameters.model_validate(spec["hyperparameters"])
        examples = [Example(input_ids=i, labels=lab) for i, lab in spec["examples"]]
        strategy = request.resources.strategy
        # FSDP shards as it moves the weights to the device: loaded on the CPU, no rank ever
        # holds the whole model on its accelerator. A 4-bit base is placed by bitsandbytes,
        # once: on its device.
        on_cpu = strategy == "fsdp" and request.quantization is None
        place = torch.device("cpu") if on_cpu else device
        model = prepare_model(Path(spec["base_dir"]), device, request, hp.seed, place=place)
        # DeepSpeed wraps the trainer's optimizer: its engine is made once the trainer is.
        wrapped = model if strategy == "deepspeed" else _parallelize(model, strategy, device, world)
        ewc = None
        if request.ewc is not None:  # θ*: this rank's base, before any checkpoint is restored
            fisher = load_fisher(Path(spec["fisher"]))
            assert fisher is not None, "the worker's Fisher file is unreadable"
            ewc = EWCRegularizer(model, fisher, request.ewc.importance)
        reporter = _Reporter(rank, conn)
        trainer = Trainer(
            model,
            examples,
            hp,
            pad_id=int(spec["pad_id"]),
            checkpoint_dir=Path(spec["checkpoint_dir"]),
            on_step=reporter.step,
            on_checkpoint=reporter.checkpoint,
            state=spec["state"],
            rank=Rank(rank=rank, world=world, wrapped=wrapped, strategy=strategy),
            ewc=ewc,
            evaluate_steps=spec["evaluate_steps"],
            on_evaluate=reporter.evaluate,
        )
        if strategy == "deepspeed":
            engine = _deepspeed(trainer, hp)
            trainer.rank = Rank(rank, world, wrapped=engine, strategy=strategy, engine=engine)
        trainer.restore()
        try:
            reporter.started(_layout(model, strategy, world))
            trainer.train()
        except Interrupted:
            # Every rank got the same stop; rank 0 may still be writing its checkpoint, and
            # torchrun ends the whole group when one rank exits with an error: wait for it and
            # exit 0. The worker knows why it stopped the group.
            torch.distributed.barrier()
            return 0
        trainer.on_checkpoint = None  # the last step's checkpoint is the group's result
        if trainer.checkpointed_step != trainer.global_step:
            trainer.save_checkpoint()
        # The lesson's check, where the training happened: the base is as it was loaded.
        checksum = base_checksum(model) if request.adapter else None
        torch.distributed.barrier()
        if conn is not None:
            conn.send(("done", checksum))
            conn.recv()
        return 0
    finally:
        if conn is not None:
            conn.close()


def _rank_exit(spec_path: str) -> None:
    """Run a rank and leave the process at once, without C++ teardown: tearing down gloo and
    the TCPStore client at interpreter exit sometimes aborted a rank that had finished ("terminate
    called without an active exception", SIGABRT), and torchrun then failed the whole group.
    Every rank has passed the final barrier (or the stop's) by then; nothing is left to run."""
    import traceback

    try:
        code = _rank_main(spec_path)
    except BaseException as exc:
        traceback.print_exc()
        _report_failure(spec_path, exc)
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    if sys.argv[1] == LAUNCH:
        _launch(int(sys.argv[2]), sys.argv[3:])
    else:
        _rank_exit(sys.argv[1])
