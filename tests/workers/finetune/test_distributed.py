"""DDP, FSDP and DeepSpeed on this CPU: two ``torchrun`` ranks over gloo against one process.

The same global batch (one process: ``per_device_train_batch_size`` 2; two processes: 1 each,
with the same accumulation) gives the same loss curve and weights to float32 rounding: each
rank's gradient is its share of the global token-summed loss over the global token count,
DDP (all-reduce), FSDP and DeepSpeed ZeRO-2 (reduce-scatter) average, and the trainer scales by
the world size, so only the order of the float32 sums differs. Measured on the tiny model: DDP
LoRA 8.5e-8 relative on the losses and 1e-7 absolute on weights of size 0.13; FSDP LoRA 6.6e-8
and 4.5e-8; FSDP full fine-tuning 5.4e-8 and 3.0e-7; ZeRO-2 LoRA 8.7e-8 and 1.2e-7, full
fine-tuning 8.3e-8 and 1.2e-7, QLoRA 1.3e-7 and 2e-7 (gradient norms within 4.1e-7 relative).
The tolerance, ``rel`` 1e-5 on the losses and ``atol`` 1e-6 on the weights, is at least three
times that, and far below what a wrong normalization gives (a mean of per-rank token means
instead of the global token mean is off by around 1e-2).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest
import torch

from app.finetune.schemas import FinetuneJobCreate
from tests.samples import MEDICINE_RECORDS
from tests.workers.finetune.disk import fill, tmpfs
from workers.context import Interrupted, UserError
from workers.engine.loading import load_tokenizer
from workers.finetune.artifacts import base_checksum
from workers.finetune.data import encode_records, pad_id
from workers.finetune.distributed import Hooks, train_distributed
from workers.finetune.ewc import EWCRegularizer, per_sample_fisher
from workers.finetune.statefile import DiskFull
from workers.finetune.training import GuardStop, StepLog, Trainer, prepare_model, read_weights

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

CPU = torch.device("cpu")
# Nine examples: with a global micro-batch of 2 the last one holds one, so rank 1 runs the
# weight-0 micro-batch that keeps DDP's all-reduce in step.
RECORDS = [
    *MEDICINE_RECORDS,
    *(
        {"prompt": f"What is {i} times three?", "completion": f"{i} times three is {3 * i}."}
        for i in range(5)
    ),
]
STEPS = 8


IMPORTANCE = 1e4  # EWC's: large enough that the penalty moves the tiny model's weights


def _request(
    model_dir: Path, processes: int, strategy: str = "ddp", method: str = "lora", ewc: bool = False
) -> FinetuneJobCreate:
    return FinetuneJobCreate.model_validate(
        {
            "base_model": {"path": str(model_dir)},
            "dataset": {"examples": RECORDS},
            "method": method,
            "preset": "risky",
            # Dropout draws other masks per rank than in one process: off for the comparison.
            "lora": {"lora_dropout": 0.0} if method in ("lora", "qlora") else None,
            "hyperparameters": {
                "learning_rate": 1e-3,
                "max_steps": STEPS,
                "per_device_train_batch_size": 2 // processes,
                "gradient_accumulation_steps": 2,
                "checkpoint_every_steps": 3,
            },
            "ewc": {"importance": IMPORTANCE} if ewc else None,
            "evaluation": None,
            "resources": {"processes": processes, "strategy": strategy},
        }
    )


@pytest.fixture(scope="module")
def encoded(tiny_model_dir: Path) -> tuple[list[Any], int]:
    tokenizer = load_tokenizer(tiny_model_dir)
    return encode_records(tokenizer, RECORDS, "chat", 512)[0], pad_id(tokenizer)


def _single(
    model_dir: Path,
    encoded: tuple[list[Any], int],
    tmp: Path,
    method: str = "lora",
    fisher: dict[str, torch.Tensor] | None = None,
) -> tuple[Any, Any]:
    examples, pad = encoded
    request = _request(model_dir, 1, method=method, ewc=fisher is not None)
    model = prepare_model(model_dir, CPU, request, request.resolved().seed)
    steps: list[StepLog] = []
    trainer = Trainer(
        model,
        examples,
        request.resolved(),
        pad_id=pad,
        checkpoint_dir=tmp,
        on_step=steps.append,
        ewc=None if fisher is None else EWCRegularizer(model, fisher, IMPORTANCE),
    )
    trainer.train()
    return steps, {n: p.detach().clone() for n, p in trainer.params}


@dataclass
class Group:
    """What a two-rank group reported, and the weights of its last checkpoint."""

    steps: list[StepLog] = field(default_factory=list)
    checkpoints: list[int] = field(default_factory=list)
    layouts: list[dict[str, Any]] = field(default_factory=list)
    stopped_at: int | None = None
    base_checksum: str | None = None
    weights: dict[str, torch.Tensor] = field(default_factory=dict)


def _group(
    model_dir: Path,
    encoded: tuple[list[Any], int],
    tmp: Path,
    on_step: Any = None,
    strategy: str = "ddp",
    method: str = "lora",
    fisher: dict[str, torch.Tensor] | None = None,
    evaluate: Any = None,
    evaluate_steps: tuple[int, ...] = (),
    request: FinetuneJobCreate | None = None,
) -> Group:
    examples, pad = encoded
    request = request or _request(model_dir, 2, strategy, method, ewc=fisher is not None)
    out = Group()

    def record(entry: StepLog) -> None:
        out.steps.append(entry)
        if on_step is not None:
            on_step(entry)

    hooks = Hooks(
        step=record,
        checkpoint=lambda step, path: out.checkpoints.append(step),
        check_stop=lambda: None,
        started=out.layouts.append,
    )
    if evaluate is not None:
        hooks = replace(hooks, evaluate=evaluate)
    result = train_distributed(
        examples=examples,
        request=request,
        hp=request.resolved(),
        base_dir=model_dir,
        device=CPU,
        pad_id=pad,
        checkpoint_dir=tmp / "checkpoints",
        work_dir=tmp / "distributed",
        state={},
        hooks=hooks,
        evaluate_steps=evaluate_steps,
        fisher=fisher,
    )
    out.stopped_at, out.base_checksum = result.stopped_at, result.base_checksum
    (layout,) = out.layouts
    assert layout["processes"] == 2 and layout["strategy"] == strategy
    share = layout["parameters_per_rank"] / layout["parameters"]
    # DDP and ZeRO-2: every rank holds the whole model; FSDP: rank 0 its half (rounded up per
    # tensor).
    assert share == 1.0 if strategy != "fsdp" else 0.5 <= share < 0.55, layout
    (final,) = (tmp / "checkpoints").glob("step-*")  # the last step's: the group's result
    assert final.name == f"step-{out.steps[-1].step:08d}"
    # What each rank wrote: DDP's rank 0 everything; FSDP's ranks their shards of the weights
    # and optimizer state, nothing whole; DeepSpeed's ranks their ZeRO partitions.
    files = {p.relative_to(final).as_posix() for p in final.rglob("*") if p.is_file()}
    shards = {
        "ddp": {"trainable.safetensors", "optimizer.pt"},
        "fsdp": {"sharded/.metadata", "sharded/__0_0.distcp", "sharded/__1_0.distcp"},
        "deepspeed": {
            "trainable.safetensors",
            "deepspeed/zero_pp_rank_0_mp_rank_00_optim_states.pt",
            "deepspeed/zero_pp_rank_1_mp_rank_00_optim_states.pt",
        },
    }[strategy]
    assert shards <= files, files
    if strategy == "fsdp":
        assert not {"trainable.safetensors", "optimizer.pt"} & files, files
    out.weights = read_weights(final)
    return out


@pytest.mark.parametrize(
    ("strategy", "method"),
    [
        ("ddp", "lora"),
        ("fsdp", "lora"),
        ("fsdp", "full"),
        ("ddp", "qlora"),
        ("fsdp", "qlora"),
        ("deepspeed", "lora"),
        ("deepspeed", "full"),
        ("deepspeed", "qlora"),
    ],
)
def test_two_processes_match_one_process_with_the_same_global_batch(
    tiny_model_dir: Path, encoded: tuple[list[Any], int], tmp_path: Path, strategy: str, method: str
) -> None:
    """QLoRA too: each rank's base is 4-bit NF4 (bitsandbytes' CPU backend here), sharded as
    it is under FSDP, and the ranks report its checksum after training: the base as loaded."""
    one, one_weights = _single(tiny_model_dir, encoded, tmp_path / "one", method)
    two = _group(tiny_model_dir, encoded, tmp_path / "two", strategy=strategy, method=method)
    assert [s.step for s in two.steps] == list(range(1, STEPS + 1))
    assert [s.tokens for s in two.steps] == [s.tokens for s in one]  # the same global batches
    losses = [s.loss for s in two.steps]
    assert losses == pytest.approx([s.loss for s in one], rel=1e-5)
    assert losses[-1] < losses[0]  # it trained
    # Clipped alike: DeepSpeed clips by its own norm, the others by clip_grad_norm_'s.
    norms = [s.grad_norm for s in two.steps]
    assert norms == pytest.approx([s.grad_norm for s in one], rel=1e-5)
    assert two.checkpoints == [3, 6] and two.stopped_at is None
    if method == "full":
        assert two.base_checksum is None
    else:
        request = _request(tiny_model_dir, 1, method=method)
        base = prepare_model(tiny_model_dir, CPU, request, request.resolved().seed)
        assert two.base_checksum == base_checksum(base)
    assert set(two.weights) == set(one_weights)
    for name, tensor in one_weights.items():
        torch.testing.assert_close(two.weights[name], tensor, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp", "deepspeed"])
def test_ewc_in_a_group_matches_one_process(
    tiny_model_dir: Path, encoded: tuple[list[Any], int], tmp_path: Path, strategy: str
) -> None:
    """The worker's Fisher, handed to the ranks: each anchors θ* on its own copy (its shard
    under FSDP) and adds the penalty's gradient after the gradients are averaged."""
    examples, pad = encoded
    request = _request(tiny_model_dir, 1, method="full")
    base = prepare_model(tiny_model_dir, CPU, request, request.resolved().seed)
    fisher = per_sample_fisher(base, examples[:4], pad)
    one, one_weights = _single(tiny_model_dir, encoded, tmp_path / "one", "full", fisher)
    two = _group(tiny_model_dir, encoded, tmp_path / "two", None, strategy, "full", fisher)
    penalties = [s.ewc_penalty for s in two.steps]
    assert penalties[0] == 0.0 and all(p is not None and p > 0 for p in penalties[1:])
    assert penalties == pytest.approx([s.ewc_penalty for s in one], rel=1e-4)
    assert [s.loss for s in two.steps] == pytest.approx([s.loss for s in one], rel=1e-5)
    for name, tensor in one_weights.items():
        torch.testing.assert_close(two.weights[name], tensor, rtol=1e-5, atol=1e-6)


def test_the_guard_stops_a_group_at_the_checkpoint_the_worker_evaluated(
    tiny_model_dir: Path, encoded: tuple[list[Any], int], tmp_path: Path
) -> None:
    evaluated: list[int] = []

    def evaluate(step: int) -> None:
        # The worker evaluates the group's checkpoint of the step: it is on disk, complete.
        assert (tmp_path / "checkpoints" / f"step-{step:08d}" / "state.json").is_file()
        evaluated.append(step)
        if step == 4:
            raise GuardStop(step)

    group = _group(
        tiny_model_dir, encoded, tmp_path, evaluate=evaluate, evaluate_steps=(2, 4, 6, 8)
    )
    assert evaluated == [2, 4] and group.stopped_at == 4
    assert [s.step for s in group.steps] == [1, 2, 3, 4]  # every rank stopped there


@pytest.mark.parametrize("strategy", ["ddp", "fsdp", "deepspeed"])
def test_a_stopped_group_checkpoints_and_resumes_to_the_same_weights(
    tiny_model_dir: Path, encoded: tuple[list[Any], int], tmp_path: Path, strategy: str
) -> None:
    """Every strategy's checkpoint (FSDP's and DeepSpeed's sharded per rank) resumes to the
    same weights and optimizer state, to the bit."""
    straight = _group(tiny_model_dir, encoded, tmp_path / "straight", strategy=strategy)

    def shut_down_at_5(entry: StepLog) -> None:
        if entry.step == 5:
            raise Interrupted("worker is shutting down")

    with pytest.raises(Interrupted):
        _group(tiny_model_dir, encoded, tmp_path / "stopped", shut_down_at_5, strategy=strategy)
    saved = sorted(p.name for p in (tmp_path / "stopped" / "checkpoints").glob("step-*"))
    assert saved == ["step-00000005"]  # the stopped step, checkpointed by rank 0

    resumed = _group(tiny_model_dir, encoded, tmp_path / "stopped", strategy=strategy)
    assert [s.step for s in resumed.steps] == list(range(6, STEPS + 1))
    assert resumed.checkpoints == [6]
    for name, tensor in straight.weights.items():
        assert torch.equal(resumed.weights[name], tensor), name  # same batches, same sums


def test_a_rank_s_user_error_fails_the_group_with_its_message(
    tiny_model_dir: Path, encoded: tuple[list[Any], int], tmp_path: Path
) -> None:
    """An error the request causes in the ranks reaches the job as itself: it fails at once
    with the rank's message, instead of being retried as the group's exit status."""
    request = _request(tiny_model_dir, 2)
    request = request.model_copy(
        update={"lora": request.lora.model_copy(update={"target_modules": ["no_such_proj"]})}
    )
    with pytest.raises(UserError, match="LoRA configuration does not fit this model"):
        _group(tiny_model_dir, encoded, tmp_path, request=request)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp", "deepspeed"])
def test_a_full_disk_at_a_group_s_checkpoint_says_so_and_leaves_no_partial_folder(
    tiny_model_dir: Path, encoded: tuple[list[Any], int], tmp_path: Path, strategy: str
) -> None:
    """Rank 0's files (DDP) or every rank's shards (FSDP, DeepSpeed) meet a full disk: the
    group fails with the worker's own disk-full error, naming the checkpoint."""
    checkpoints = tmp_path / "checkpoints"
    checkpoints.mkdir()
    with tmpfs(checkpoints) as mounted:
        if not mounted:
            pytest.skip("a tmpfs cannot be mounted here (needs root in a container that may)")
        fill(checkpoints)
        with pytest.raises(DiskFull, match="the disk is full: the checkpoint of step 3"):
            _group(tiny_model_dir, encoded, tmp_path, strategy=strategy)
        assert [p.name for p in checkpoints.iterdir()] == ["filler"]


def _group_processes(spec: Path) -> list[int]:
    """Live processes (torchrun and its ranks) started for the job whose spec is ``spec``."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes().decode(errors="replace")
            state = (proc / "stat").read_text().split()[2]
        except OSError:
            continue
        if str(spec) in cmdline and state != "Z":
            found.append(int(proc.name))
    return found


def _job_body(model_dir: Path, strategy: str = "ddp", **hp: Any) -> dict[str, Any]:
    return {
        "base_model": {"path": str(model_dir)},
        "dataset": {"examples": RECORDS},
        "method": "lora",
        "preset": "risky",
        "hyperparameters": {
            "learning_rate": 1e-3,
            "per_device_train_batch_size": 1,
            "gradient_accumulation_steps": 2,
            **hp,
        },
        "evaluation": None,
        "resources": {"processes": 2, "strategy": strategy},
    }


def _steps(engine: Any, job_id: str) -> list[int]:
    from tests.workers.finetune.jobs import events

    return [
        int(e.data["step"])
        for e in events(engine, job_id)
        if e.message.startswith("step ") and e.data
    ]


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
@pytest.mark.parametrize("strategy", ["ddp", "deepspeed"])
def test_a_killed_two_process_job_resumes_to_the_weights_of_an_uninterrupted_one(
    client, settings, fast_lease, engine, tiny_model_dir, procs, tmp_path, strategy
) -> None:  # type: ignore[no-untyped-def]
    """Real workers with ``--processes 2``: SIGKILLed while it holds after step 4 (its last
    checkpoint: step 3), the job's two ranks die with it; another worker resumes it from step
    3, and its adapter equals, bit for bit, the one an uninterrupted twin job exports. Under
    DeepSpeed the resumed ranks load ZeRO's optimizer shards, one per rank."""
    import signal

    from safetensors.torch import load_file

    from tests.conftest import start_worker, wait_for
    from tests.workers.finetune.jobs import STARTUP, events, job, post_job
    from workers.context import HOLD_AT

    settings.max_processes = 2
    request = _job_body(tiny_model_dir, strategy, max_steps=STEPS, checkpoint_every_steps=3)
    killed = post_job(client, request)

    def steps(job_id: str) -> list[int]:
        return _steps(engine, job_id)

    procs.append(
        start_worker(
            fast_lease, "--processes", "2", log=tmp_path / "a.log", env={HOLD_AT: "step:4"}
        )
    )
    wait_for(lambda: 4 in steps(killed), STARTUP + 120, 0.3, "step 4")
    spec = fast_lease.artifacts_dir / killed / "distributed" / "spec.json"
    assert len(_group_processes(spec)) == 3  # torchrun and two ranks
    procs[0].send_signal(signal.SIGKILL)
    procs[0].wait(timeout=30)
    wait_for(lambda: not _group_processes(spec), 60, 0.3, "the ranks to die with their worker")

    twin = post_job(client, request)
    procs.append(start_worker(fast_lease, "--processes", "2", log=tmp_path / "b.log"))
    for job_id in (killed, twin):
        wait_for(
            lambda: job(engine, job_id).status in ("succeeded", "failed"),  # noqa: B023
            STARTUP + 300,
            1.0,
            "the jobs",
        )
        done = job(engine, job_id)
        assert done.status == "succeeded", (done.error, (tmp_path / "b.log").read_text()[-3000:])
        assert done.metrics is not None and done.metrics["global_step"] == STEPS
        assert done.metrics["resources"] == {"processes": 2, "strategy": strategy}
    resumed = job(engine, killed)
    assert resumed.attempts == 2 and resumed.metrics is not None
    assert resumed.metrics["resumed_from_steps"] == [3]
    assert steps(killed) == [1, 2, 3, 4, 4, 5, 6, 7, 8]  # step 4 again: it was not saved
    if strategy == "deepspeed":
        (started, *_) = [e for e in events(engine, killed) if e.message.startswith("training in")]
        assert started.message.endswith(
            "each holds 100% of the model's " + f"{started.data['parameters']:,} parameters and "
            "1/2 of its gradients and optimizer state (ZeRO stage 2)"
        ), started.message
    a, b = (
        load_file(str(Path(str(job(engine, j).output_path)) / "adapter_model.safetensors"))
        for j in (killed, twin)
    )
    assert set(a) == set(b)
    for name in a:
        assert torch.equal(a[name], b[name]), name


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_worker_without_deepspeed_fails_a_deepspeed_job_once_saying_why(
    client, settings, tiny_model_dir, monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    import sys

    from tests.workers.finetune.jobs import post_job
    from workers.main import Worker

    settings.max_processes = 2
    job_id = post_job(client, _job_body(tiny_model_dir, "deepspeed", max_steps=2))
    monkeypatch.setitem(sys.modules, "deepspeed", None)  # as if it were not installed
    assert Worker(settings, device="cpu", once=True, worker_id="inproc", processes=2).run() == 0
    data = client.get(f"/finetune-jobs/{job_id}").json()
    assert data["status"] == "failed" and data["attempts"] == 1  # a user error: not retried
    assert "DeepSpeed" in data["error"] and "[worker,deepspeed]" in data["error"], data["error"]
    assert not (settings.artifacts_dir / job_id / "distributed").exists()  # no group started


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_cancel_stops_every_rank_within_one_step(
    client, settings, engine, tiny_model_dir, procs, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    from tests.conftest import start_worker, wait_for
    from tests.workers.finetune.jobs import STARTUP, events, job, post_job

    settings.max_processes = 2
    job_id = post_job(
        client, _job_body(tiny_model_dir, max_steps=5000, checkpoint_every_steps=1000)
    )
    procs.append(start_worker(settings, "--processes", "2", log=tmp_path / "worker.log"))
    wait_for(lambda: len(_steps(engine, job_id)) >= 3, STARTUP + 120, 0.3, "training steps")
    spec = settings.artifacts_dir / job_id / "distributed" / "spec.json"
    assert len(_group_processes(spec)) == 3
    response = client.post(f"/finetune-jobs/{job_id}/cancel")
    assert response.status_code == 200 and response.json()["status"] == "cancelled"
    wait_for(lambda: not _group_processes(spec), 60, 0.2, "every rank to stop")
    log = events(engine, job_id)
    cancel_at = next(i for i, e in enumerate(log) if e.message == "cancelled by request")
    # Each step is recorded by the worker under the lease before any rank trains the next:
    # after the cancel the renewal fails and no step is recorded.
    assert not [e for e in log[cancel_at:] if e.message.startswith("step ")]
    assert job(engine, job_id).status == "cancelled"
    assert procs[0].poll() is None  # the worker lives on


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_sigterm_checkpoints_the_group_s_last_step_and_releases_the_job(
    client, settings, engine, tiny_model_dir, procs, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    """An FSDP group: its shards are gathered into the checkpoint of the step it stopped at."""
    import signal

    from tests.conftest import start_worker, wait_for
    from tests.workers.finetune.jobs import STARTUP, events, job, post_job
    from workers.context import HOLD_AT

    settings.max_processes = 2
    job_id = post_job(
        client, _job_body(tiny_model_dir, "fsdp", max_steps=30, checkpoint_every_steps=1000)
    )
    procs.append(
        start_worker(
            settings, "--processes", "2", log=tmp_path / "worker.log", env={HOLD_AT: "step:4"}
        )
    )
    wait_for(lambda: 4 in _steps(engine, job_id), STARTUP + 120, 0.3, "step 4")
    procs[0].send_signal(signal.SIGTERM)
    assert procs[0].wait(timeout=120) == 0
    spec = settings.artifacts_dir / job_id / "distributed" / "spec.json"
    assert not _group_processes(spec)
    stopped = job(engine, job_id)
    assert stopped.status == "queued" and stopped.attempts == 0  # released, not failed
    saved = [
        int(e.data["step"]) for e in events(engine, job_id) if e.message.startswith("checkpoint")
    ]
    assert saved == [4] == [max(_steps(engine, job_id))]  # the step the group stopped after
    assert (settings.artifacts_dir / job_id / "checkpoints" / "step-00000004").is_dir()
    (started,) = [e for e in events(engine, job_id) if e.message.startswith("training in 2")]
    assert started.message.startswith("training in 2 processes (fsdp over gloo): each holds 5")
    assert (
        started.data is not None
        and started.data["parameters_per_rank"] < (started.data["parameters"])
    )


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_qlora_ewc_checkpoint_evaluations_and_the_guard_in_a_group_equal_one_process_s(
    client, settings, engine, tiny_model_dir, procs, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    """A QLoRA job on FSDP with EWC, checkpoint evaluations and the guard on a real
    ``--processes 2`` worker, and its one-process twin (the same global batch): the same
    checkpoint rows, EWC penalty, loss curve, shipped step and frozen base, and an
    after-evaluation on the same 4-bit base."""
    from app.core.database import session_factory
    from app.core.tables import Evaluation
    from tests.conftest import start_worker
    from tests.workers.finetune.jobs import events, plain_body, post_job, succeeded
    from tests.workers.finetune.test_holdout import GENERAL_QA
    from tests.workers.finetune.test_holdout import RECORDS as DRUGS

    settings.max_processes = 2

    def body(processes: int) -> dict[str, Any]:
        return plain_body(
            tiny_model_dir,
            DRUGS,
            method="qlora",
            lora={"lora_dropout": 0.0},  # one process draws other dropout masks than two
            hyperparameters={
                "learning_rate": 1e-3,
                "max_steps": 4,
                "per_device_train_batch_size": 2 // processes,
                "gradient_accumulation_steps": 2,
            },
            ewc={"importance": IMPORTANCE, "fisher_samples": 4},
            evaluation={
                "suites": [GENERAL_QA],
                "generation": {"max_new_tokens": 4},
                "domain": False,
                "every_steps": 2,
            },
            guard={"action": "keep_best"},
            resources={"processes": processes, "strategy": "fsdp"},
        )

    group_id, twin_id = post_job(client, body(2)), post_job(client, body(1))
    procs.append(start_worker(settings, "--processes", "2", log=tmp_path / "worker.log"))
    group, twin = (
        succeeded(client, engine, j, tmp_path / "worker.log") for j in (group_id, twin_id)
    )

    said = [e.message for e in events(engine, group_id)]
    assert any(m.startswith("training in 2 processes (fsdp over gloo)") for m in said)
    assert any(m.startswith("checkpoint evaluation at step 2:") for m in said)
    rows = {
        j: client.get(f"/finetune-jobs/{j}/checkpoints").json()["data"] for j in (group_id, twin_id)
    }
    assert [r["step"] for r in rows[group_id]] == [r["step"] for r in rows[twin_id]] == [0, 2, 4]
    for a, b in zip(rows[group_id], rows[twin_id], strict=True):
        assert a["general"]["accuracy"] == b["general"]["accuracy"]
        assert a["verdict"] == b["verdict"]
    g, t = group["metrics"], twin["metrics"]
    assert g["resources"] == {"processes": 2, "strategy": "fsdp"} and "resources" not in t
    assert g["ewc"]["final_penalty"] > 0
    assert g["ewc"]["final_penalty"] == pytest.approx(t["ewc"]["final_penalty"], rel=1e-4)
    assert [p["loss"] for p in g["loss_curve"]] == pytest.approx(
        [p["loss"] for p in t["loss_curve"]], rel=1e-5
    )
    assert group["shipped_step"] == twin["shipped_step"]
    assert group["shipped_reason"] == twin["shipped_reason"]
    assert g["base_weights"]["unchanged"] and g["base_weights"] == t["base_weights"]
    assert g["quantization"] == "nf4"
    with session_factory(engine)() as session:  # the after-evaluation ran the same 4-bit base
        after = session.get(Evaluation, group["after_evaluation_id"])
        assert after is not None and str(after.model_fingerprint).endswith("+nf4")
