"""The ``forgetguard`` command: serve, worker, db, models, suites, gate."""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from app.core.config import get_settings

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
app.add_typer(suites_app, name="suites")
datasets_app = typer.Typer(help="Example datasets shipped with forgetguard.", no_args_is_help=True)
app.add_typer(datasets_app, name="datasets")

ServerOpt = Annotated[
    str | None,
    typer.Option(
        envvar="FORGETGUARD_URL",
        help="API base URL. Default: the URL a `forgetguard serve` started in this directory "
        "wrote to var/server-url, else http://127.0.0.1:8000.",
        show_default=False,
    ),
]
DEFAULT_URL = "http://127.0.0.1:8000"
# `forgetguard serve` writes the URL it serves here (relative to where it runs, like var/ for
# the database), so CLI commands run beside it follow `--port` without FORGETGUARD_URL.
SERVER_URL_FILE = Path("var/server-url")
DATASETS_DIR = Path(__file__).resolve().parent / "datasets"


def server_url(explicit: str | None) -> str:
    """--server or $FORGETGUARD_URL, else the URL a local ``serve`` wrote, else the default."""
    if explicit:
        return explicit
    try:
        written = SERVER_URL_FILE.read_text(encoding="utf-8").strip()
    except OSError:
        written = ""
    return written or DEFAULT_URL


def fail(message: str) -> typer.Exit:
    """Print one line on stderr; the caller raises the returned exit (status 2)."""
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(2)


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
        with console.status("pulling") as status:

            def step(message: str) -> None:
                status.update(message)
                console.log(message)

            path = pull(name, models_dir, force=force, step=step)
    except PullError as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None
    typer.echo(str(path))


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
) -> None:
    """Run a worker: claims queued jobs and runs them on one device."""
    backend = backend or "transformers"  # an empty FORGETGUARD_WORKER_BACKEND
    if backend not in ("transformers", "vllm", "openai"):
        typer.echo(f"unknown backend {backend!r}: choose transformers, vllm or openai", err=True)
        raise typer.Exit(2)
    from workers.engine.process import configure_process

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
        )
    )


# Set by `serve` for the workers it starts: the pid they must not outlive.
PARENT_PID_ENV = "FORGETGUARD_PARENT_PID"


class _Supervisor:
    """Keeps N worker subprocesses running beside the API; stops them on exit."""

    def __init__(
        self, count: int, device: str, grace: float, backend: str = "transformers"
    ) -> None:
        self.count, self.device, self.grace, self.backend = count, device, grace, backend
        self.procs: list[subprocess.Popen[bytes] | None] = [None] * count
        self.stopping = threading.Event()

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
            f"{os.uname().nodename}-w{index}-{os.getpid()}",
        ]
        # The worker watches this process and stops when it dies, however it dies (SIGKILL
        # included), so a restarted serve never runs beside an orphaned worker.
        env = {**os.environ, PARENT_PID_ENV: str(os.getpid())}
        return subprocess.Popen(cmd, env=env)

    def start(self) -> None:
        for i in range(self.count):
            self.procs[i] = self._spawn(i)
        threading.Thread(target=self._watch, daemon=True).start()

    def _watch(self) -> None:
        while not self.stopping.wait(2.0):
            for i, proc in enumerate(self.procs):
                if proc is not None and proc.poll() is not None and not self.stopping.is_set():
                    logging.getLogger("forgetguard").warning(
                        "worker %d exited with %s; restarting", i, proc.returncode
                    )
                    self.procs[i] = self._spawn(i)

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
    supervisor = _Supervisor(workers, device, settings.shutdown_grace_seconds, backend)
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


@suites_app.command("import")
def suites_import(
    file: Annotated[
        Path, typer.Argument(help="A suite JSON file (with name, kind, items), or JSONL items.")
    ],
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
    """Upload a suite: a suite JSON file as `suites export --json` writes it, or JSONL items."""
    suite, items = _read_suite_file(file)
    body: dict[str, Any] = dict(suite or {})
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


class GateMode(StrEnum):
    """How ``gate`` decides."""

    threshold = "threshold"
    noninferiority = "noninferiority"


class CategoryRule(StrEnum):
    """How ``gate`` judges a category that dropped more than ``--max-category-drop``."""

    point = "point"
    significant = "significant"


class PromptFormat(StrEnum):
    """How prompts are rendered."""

    chat = "chat"
    plain = "plain"


@app.command()
def gate(
    before: Annotated[str | None, typer.Option(help="Id of the 'before' evaluation.")] = None,
    after: Annotated[str | None, typer.Option(help="Id of the 'after' evaluation.")] = None,
    base_model: Annotated[str | None, typer.Option(help="Base model path ('before').")] = None,
    candidate: Annotated[str | None, typer.Option(help="Candidate model path ('after').")] = None,
    adapter: Annotated[
        str | None,
        typer.Option(help="peft adapter of the candidate (on --candidate, else on --base-model)."),
    ] = None,
    suite: Annotated[
        list[str] | None,
        typer.Option(
            help="Suite name, name@version or suite JSON file; repeatable. "
            "Default: the server's (general-qa, forgetting-checklist)."
        ),
    ] = None,
    threshold: Annotated[float, typer.Option(help="Largest accepted accuracy drop.")] = 0.10,
    max_category_drop: Annotated[
        float | None, typer.Option(help="Also fail when a category drops more than this.")
    ] = None,
    max_nll_increase: Annotated[
        float | None,
        typer.Option(help="Also fail when NLL/token on a perplexity suite rises more (0.1 = 10%)."),
    ] = None,
    max_kl: Annotated[
        float | None,
        typer.Option(
            help="Also fail when mean KL(base ‖ candidate) per token on a perplexity suite "
            "exceeds this (nats)."
        ),
    ] = None,
    mode: Annotated[
        GateMode,
        typer.Option(
            help="noninferiority: fail unless the CI's upper bound of the drop < threshold.",
        ),
    ] = GateMode.threshold,
    alpha: Annotated[float, typer.Option(help="1 - confidence of the CI.")] = 0.05,
    category_rule: Annotated[
        CategoryRule,
        typer.Option(
            help="point: a category fails on its drop; significant: only when the drop is "
            "significant after Holm adjustment across categories.",
        ),
    ] = CategoryRule.point,
    finetune_job: Annotated[
        str | None,
        typer.Option(
            help="Gate a fine-tune job (waits for it): its stored evaluations, or its output "
            "evaluated anew when --suite names suites it did not run.",
        ),
    ] = None,
    noise_floor: Annotated[
        bool,
        typer.Option(
            help="Rerun the base with another batch composition and report the churn "
            "(items that flip with no change).",
        ),
    ] = False,
    prompt_format: Annotated[
        PromptFormat | None,
        typer.Option(help="Default: chat when the tokenizer has a chat template, else plain."),
    ] = None,
    max_new_tokens: Annotated[int | None, typer.Option(help="Generation length.")] = None,
    backend: Annotated[
        str | None,
        typer.Option(help="Engine of both evaluations: transformers or vllm (server default)."),
    ] = None,
    cache: Annotated[
        bool, typer.Option(help="Reuse finished evaluations of identical inputs.")
    ] = True,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for evaluations.")] = 3600.0,
    junit: Annotated[Path | None, typer.Option(help="Write a JUnit XML report.")] = None,
    markdown: Annotated[Path | None, typer.Option(help="Write a Markdown report.")] = None,
    mlflow: Annotated[
        str | None,
        typer.Option(
            help="Also log the comparison to this MLflow tracking URI (needs the mlflow extra)."
        ),
    ] = None,
    server: ServerOpt = None,
) -> None:
    """CI gate: compare a candidate with its base; exit 0 pass, 1 forgetting, 2 error.

    The API key is read from $FORGETGUARD_API_KEY; the server from --server or $FORGETGUARD_URL.
    """
    from app.gate.runner import GateOptions, parse_suites, run_gate

    options = GateOptions(
        server=server_url(server),
        before=before,
        after=after,
        base_model=base_model,
        candidate=candidate,
        adapter=adapter,
        suites=parse_suites(suite),
        threshold=threshold,
        max_category_drop=max_category_drop,
        max_nll_increase=max_nll_increase,
        max_kl=max_kl,
        mode=mode.value,
        alpha=alpha,
        category_rule=category_rule.value,
        finetune_job=finetune_job,
        noise_floor=noise_floor,
        prompt_format=prompt_format.value if prompt_format else None,
        max_new_tokens=max_new_tokens,
        backend=backend,
        cache=cache,
        timeout=timeout,
        junit=junit,
        markdown=markdown,
        api_key=os.environ.get("FORGETGUARD_API_KEY") or None,
        mlflow=mlflow,
    )
    raise typer.Exit(run_gate(options))


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
