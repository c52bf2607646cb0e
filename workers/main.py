"""The worker process: claim a job, keep its lease alive, run it, record the outcome.

One process per GPU (or one on CPU). SIGTERM/SIGINT: stop claiming, let the current batch
finish, give the job back to the queue, exit 0. That is bounded: if the batch has not returned
within ``shutdown_grace_seconds`` (or a second signal comes), the job is released from the
signal thread and the process exits 0 anyway.
"""

from __future__ import annotations

import ctypes
import logging
import os
import re
import resource
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import regex
from sqlalchemy.exc import DBAPIError, OperationalError

from app.core.config import Settings
from app.core.database import make_engine, session_factory
from app.core.errors import Problem
from app.core.tables import FinetuneEvent
from app.jobs.queue import (
    ClaimedJob,
    LeaseLost,
    abandon,
    claim,
    claimable_backends,
    default_worker_id,
    deregister_worker,
    fail,
    heartbeat,
    register_worker,
    release,
    still_held,
    worker_heartbeat,
)
from app.suites import versions
from workers.context import Interrupted, JobContext, UserError
from workers.engine import transformers_backend as compute
from workers.engine.loading import ModelCache
from workers.engine.process import CANNOT_START_EXIT, engine_missing
from workers.evaluation.run import run_evaluation

log = logging.getLogger("forgetguard.worker")

# Set by `forgetguard serve` for the workers it starts (app.cli.PARENT_PID_ENV).
PARENT_PID_ENV = "FORGETGUARD_PARENT_PID"

# A forced exit waits at most this long for the database to take the job back.
FORCE_EXIT_DATABASE_SECONDS = 10.0
# Longest pause between claim attempts while the database is unreachable.
MAX_DATABASE_RETRY_SECONDS = 30.0

JobRunner = Callable[[JobContext, ModelCache], Any]
WORKER_BACKENDS = ("transformers", "vllm", "openai")


def engine_description(backend: str, settings: Settings, device: Any) -> tuple[str, str, str]:
    """``(devices, dtype, engine version)`` a worker announces in ``GET /workers``."""
    if backend == "vllm":
        from workers.engine import vllm_backend

        vllm_settings = vllm_backend.VLLMSettings(
            tensor_parallel_size=settings.vllm_tensor_parallel_size,
            data_parallel_size=settings.vllm_data_parallel_size,
        )
        return (
            vllm_backend.device_description(vllm_settings),
            settings.vllm_dtype,
            vllm_backend.engine_version(),
        )
    import transformers

    dtype = str(compute.select_dtype(device)).removeprefix("torch.")
    return str(device), dtype, f"transformers {transformers.__version__}"


# Errors that retrying cannot cure: the job fails at once instead of using up its attempts.
# (Model loading turns unreadable weights or a bad tokenizer into UserError itself.)
PERMANENT_ERRORS: tuple[type[BaseException], ...] = (UserError, Problem, re.error, regex.error)


class CannotStart(RuntimeError):
    """The worker cannot run at all in this environment; the message says what to do."""


# How often a busy worker looks whether its job was cancelled, between lease renewals.
CANCEL_POLL_SECONDS = 1.0
# How often a worker started by `forgetguard serve` checks that serve is still alive.
PARENT_POLL_SECONDS = 1.0
_PR_SET_PDEATHSIG = 1


def cap_memory(limit_bytes: int) -> None:
    """Cap this process's address space (``FORGETGUARD_WORKER_MAX_MEMORY_BYTES``; 0: none).

    An allocation past the cap raises MemoryError in the job, which then fails, instead of the
    host swapping or the kernel's OOM killer picking a victim.
    """
    if limit_bytes <= 0:
        return
    _soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard != resource.RLIM_INFINITY:
        limit_bytes = min(limit_bytes, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit_bytes, hard))
    log.info("worker address space capped at %d bytes", limit_bytes)


def _job_runners() -> dict[str, JobRunner]:
    runners: dict[str, JobRunner] = {"evaluation": run_evaluation}
    try:
        from workers.finetune.job import run_finetune
    except ImportError:  # fine-tuning support not installed in this build
        return runners
    runners["finetune"] = run_finetune
    return runners


class Worker:
    """Claims and runs jobs until told to stop."""

    def __init__(
        self,
        settings: Settings,
        *,
        device: str = "auto",
        kinds: tuple[str, ...] = ("evaluation", "finetune"),
        worker_id: str | None = None,
        once: bool = False,
        backend: str = "transformers",
        processes: int = 1,
    ) -> None:
        if backend not in WORKER_BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; choose one of {WORKER_BACKENDS}")
        self.settings = settings
        self.backend = backend
        self.backends = claimable_backends(backend)
        self.engine = make_engine(settings.database_url)
        self.sessionmaker = session_factory(self.engine)
        self.device = compute.select_device(device)
        self.runners = _job_runners()
        self.kinds = tuple(k for k in kinds if k in self.runners)
        self.worker_id = worker_id or default_worker_id()
        self.once = once
        self.processes = processes  # the most a fine-tune job may train in (claim takes no more)
        self.stop = threading.Event()
        self.models = ModelCache(settings, self.device)
        self.current: ClaimedJob | None = None
        self._signals = 0
        self._wakeup: tuple[socket.socket, socket.socket] | None = None

    def install_signal_handlers(self) -> None:
        """SIGTERM/SIGINT begin a graceful stop with a hard deadline; a second signal forces it.

        Signals are acted on by a thread of their own, woken through ``signal.set_wakeup_fd``,
        not by a Python handler: Python runs handlers only in the main thread between bytecodes,
        and the main thread may sit in one long native call (a model load, a CUDA kernel) for
        longer than the grace period, or never notice a signal that another thread received.
        Must be called from the main thread.
        """
        receiver, sender = socket.socketpair()
        sender.setblocking(False)
        for signum in (signal.SIGTERM, signal.SIGINT):
            # The C-level handler writes the signal number to the wakeup fd from any thread;
            # the Python-level one has nothing left to do.
            signal.signal(signum, lambda _signum, _frame: None)
        signal.set_wakeup_fd(sender.fileno(), warn_on_full_buffer=False)
        self._wakeup = (receiver, sender)  # kept open for the life of the process
        threading.Thread(
            target=self._take_signals, args=(receiver,), name="signals", daemon=True
        ).start()

    def _take_signals(self, receiver: socket.socket) -> None:
        while data := receiver.recv(64):
            for signum in data:
                if signum in (signal.SIGTERM, signal.SIGINT):
                    self.on_signal(signum)

    def on_signal(self, signum: int) -> None:
        """First signal: stop claiming, release at the next batch boundary, arm the deadline."""
        self._signals += 1
        if self._signals > 1:
            self.force_exit(f"signal {signum} received again")
            return
        grace = self.settings.shutdown_grace_seconds
        log.info(
            "worker %s: signal %d, finishing the current batch and releasing (at most %g s)",
            self.worker_id,
            signum,
            grace,
        )
        self.stop.set()
        deadline = threading.Timer(
            grace, self.force_exit, args=(f"still busy {grace:g} s after the stop signal",)
        )
        deadline.daemon = True
        deadline.start()

    def force_exit(self, reason: str) -> None:
        """Give the current job back and deregister (bounded in time), then exit 0 at once.

        The release is guarded like every queue write: if the main thread released or finished
        the job meanwhile, or another worker holds it, this changes nothing.
        """
        job = self.current
        log.warning(
            "worker %s: %s; releasing %s and exiting",
            self.worker_id,
            reason,
            f"{job.kind} {job.id}" if job else "nothing",
        )

        def give_back() -> None:
            try:
                if job is not None:
                    release(self.engine, job)
                deregister_worker(self.engine, self.worker_id)
            except Exception:  # the lease will expire and another worker will rescue the job
                log.exception("worker %s: could not release on forced exit", self.worker_id)

        helper = threading.Thread(target=give_back, name="force-release", daemon=True)
        helper.start()
        helper.join(FORCE_EXIT_DATABASE_SECONDS)
        logging.shutdown()
        os._exit(0)

    def run(self) -> int:
        """The claim loop; returns the process exit code."""
        threads = compute.configure_threads()
        # A served-model worker runs no fine-tuning: the weights are not here.
        kinds = self.kinds if self.backend != "openai" else ("evaluation",)
        self.kinds = tuple(k for k in kinds if k in self.kinds)
        try:
            devices, dtype, version = engine_description(self.backend, self.settings, self.device)
        except ImportError as exc:
            raise CannotStart(
                engine_missing(self.backend, str(exc)) or f"its engine cannot load: {exc}"
            ) from None
        log.info(
            "worker %s: backend %s (%s) on %s (%d threads), kinds %s",
            self.worker_id,
            self.backend,
            version,
            devices,
            threads,
            ",".join(self.kinds),
        )
        with self.sessionmaker() as session:
            versions.sync_builtins(session)
            session.commit()
        register_worker(
            self.engine,
            worker_id=self.worker_id,
            device=devices,
            kinds=self.kinds,
            backend=self.backend,
            dtype=dtype,
            engine_version=version,
            processes=self.processes,
        )
        last_beat = 0.0
        retry = self.settings.poll_seconds
        try:
            while not self.stop.is_set():
                try:
                    job = claim(
                        self.engine,
                        worker_id=self.worker_id,
                        kinds=self.kinds,
                        lease_seconds=self.settings.lease_seconds,
                        backends=self.backends,
                        processes=self.processes,
                    )
                    beat_due = time.monotonic() - last_beat > self.settings.heartbeat_seconds
                    if job is None and beat_due:
                        worker_heartbeat(self.engine, self.worker_id)
                        last_beat = time.monotonic()
                except DBAPIError as exc:  # database restarting, failover, a deadlock victim
                    log.warning(
                        "worker %s: database error while idle (%s); retrying in %.1f s",
                        self.worker_id,
                        type(exc.orig or exc).__name__,
                        retry,
                    )
                    self.stop.wait(retry)
                    retry = min(MAX_DATABASE_RETRY_SECONDS, retry * 2)
                    continue
                retry = self.settings.poll_seconds
                if job is None:
                    if self.once:
                        break
                    self.stop.wait(self.settings.poll_seconds)
                    continue
                self.run_job(job)
        finally:
            deregister_worker(self.engine, self.worker_id)
            self.engine.dispose()
            for kept in self.models.engines.values():  # a started vLLM engine and its process
                kept.close()
        return 0

    def run_job(self, job: ClaimedJob) -> None:
        """Run one claimed job with a heartbeat thread; map every outcome to a queue transition."""
        ctx = JobContext(self.engine, self.sessionmaker, self.settings, job, stop=self.stop)
        self.current = job
        beating = threading.Event()
        beat = threading.Thread(target=self._heartbeat, args=(ctx, beating), daemon=True)
        beat.start()
        log.info("%s %s: attempt %d", job.kind, job.id, job.attempt)
        try:
            self.runners[job.kind](ctx, self.models)
            log.info("%s %s: succeeded", job.kind, job.id)
        except Interrupted:
            released = release(self.engine, job)
            log.info(
                "%s %s: released to the queue (%s)",
                job.kind,
                job.id,
                "ok" if released else "already gone",
            )
        except LeaseLost as exc:
            log.warning("%s %s: stopped: %s", job.kind, job.id, exc)
            try:
                abandon(self.engine, job)
            except Exception:  # the next claim marks the worker busy or idle again anyway
                log.exception("%s %s: could not record the stop", job.kind, job.id)
        except PERMANENT_ERRORS as exc:
            detail = exc.detail if isinstance(exc, Problem) else str(exc)
            if isinstance(exc, (re.error, regex.error)):
                detail = f"a regular expression in a check cannot be compiled: {exc}"
            status = fail(self.engine, job, detail[:2000], retryable=False)
            log.warning("%s %s: %s: %s", job.kind, job.id, status, detail)
            self._record_failure(job, status, detail)
        except OperationalError as exc:
            # The database went away (a restart, a failover): not the job's fault, so it goes
            # back to the queue without costing an attempt, once the database answers again.
            log.warning(
                "%s %s: database error (%s); releasing it once the database is back",
                job.kind,
                job.id,
                type(exc.orig or exc).__name__,
            )
            self._release_when_possible(job)
        except Exception as exc:  # the job failed; the worker lives on
            log.exception("%s %s: error", job.kind, job.id)
            message = f"{type(exc).__name__}: {exc}"
            status = fail(self.engine, job, message[:2000], retryable=True)
            log.warning("%s %s: now %s", job.kind, job.id, status)
            self._record_failure(job, status, message[:2000])
        finally:
            self.current = None
            beating.set()
            beat.join(timeout=5)

    def _release_when_possible(self, job: ClaimedJob) -> None:
        """Give ``job`` back (attempt refunded), retrying while the database is unreachable."""
        delay = self.settings.poll_seconds
        deadline = time.monotonic() + max(self.settings.lease_seconds, 1.0)
        while True:
            try:
                release(self.engine, job)
                return
            except DBAPIError:
                if time.monotonic() > deadline or self.stop.is_set():
                    log.warning("%s %s: could not release; its lease will expire", job.kind, job.id)
                    return
                self.stop.wait(delay)
                delay = min(MAX_DATABASE_RETRY_SECONDS, delay * 2)

    def watch_parent(self, parent_pid: int) -> None:
        """Stop (gracefully, as on SIGTERM) when ``parent_pid`` dies, however it dies.

        Linux delivers SIGTERM on the parent's death (``PR_SET_PDEATHSIG``); a thread also
        polls the parent pid, which covers other systems and a parent that died before this ran.
        """
        if sys.platform.startswith("linux"):
            try:
                libc = ctypes.CDLL(None, use_errno=True)
                libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
            except (OSError, AttributeError):  # pragma: no cover - the poll below still runs
                log.warning("worker %s: prctl unavailable; polling the parent", self.worker_id)

        def poll() -> None:
            while os.getppid() == parent_pid:
                time.sleep(PARENT_POLL_SECONDS)
            log.warning("worker %s: its serve process (%d) is gone", self.worker_id, parent_pid)
            if not self.stop.is_set():  # PR_SET_PDEATHSIG may have started the stop already
                self.on_signal(signal.SIGTERM)

        threading.Thread(target=poll, name="parent-watch", daemon=True).start()

    def _record_failure(self, job: ClaimedJob, status: str, error: str) -> None:
        """A fine-tune job's event log says why an attempt failed, like it says everything else."""
        if job.kind != "finetune" or status not in ("failed", "queued"):
            return
        final = status == "failed"
        try:
            with self.sessionmaker() as session, session.begin():
                session.add(
                    FinetuneEvent(
                        job_id=job.id,
                        level="error" if final else "warning",
                        message=f"failed: {error}"
                        if final
                        else f"attempt failed, will retry: {error}",
                        data={"attempt": job.attempt, "status": status},
                    )
                )
        except Exception:  # the job's error field holds it anyway
            log.exception("%s %s: could not record the failure event", job.kind, job.id)

    def _heartbeat(self, ctx: JobContext, done: threading.Event) -> None:
        """Renew the lease every ``heartbeat_seconds``; in between, look every second whether
        the job is still ours (a cancel), so a running job stops within a second or two, even
        one waiting on a slow served model (its requests ask ``check_stop`` as they wait)."""
        beat = self.settings.heartbeat_seconds
        last = time.monotonic()
        while not done.wait(min(beat, CANCEL_POLL_SECONDS)):
            try:
                if time.monotonic() - last >= beat:
                    heartbeat(self.engine, ctx.job, self.settings.lease_seconds)
                    last = time.monotonic()
                elif not still_held(self.engine, ctx.job):
                    raise LeaseLost(f"{ctx.job.kind} {ctx.job.id} was cancelled or taken over")
            except LeaseLost:
                ctx.lease_lost.set()
                return
            except Exception:  # a database hiccup: the next beat retries
                log.exception("heartbeat failed")


def main(
    settings: Settings,
    *,
    device: str,
    kinds: tuple[str, ...],
    worker_id: str | None,
    once: bool,
    backend: str = "transformers",
    processes: int = 1,
) -> int:
    """Entry point of ``forgetguard worker``, which applied the process settings first
    (:func:`workers.engine.process.configure_process`)."""
    cap_memory(settings.worker_max_memory_bytes)
    worker = Worker(
        settings,
        device=device,
        kinds=kinds,
        worker_id=worker_id,
        once=once,
        backend=backend,
        processes=processes,
    )
    worker.install_signal_handlers()
    parent = os.environ.get(PARENT_PID_ENV, "")
    if parent.isdigit():
        worker.watch_parent(int(parent))
    try:
        return worker.run()
    except CannotStart as exc:
        # One line, last on stderr: what `forgetguard serve` shows as the reason.
        log.error("worker cannot start: %s", exc)
        return CANNOT_START_EXIT
