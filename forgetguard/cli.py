"""The client's commands: ``gate``, ``evaluate``, ``compare``, ``finetune`` and ``status``.

They are thin over :class:`forgetguard.Client` and share the gate's exit codes: **0** ok (or
pass), **1** forgetting detected, **2** error, with one line on stderr saying why. The
client-only install (``pip install ./client``) runs them as ``forgetguard``; the server's
``forgetguard`` command (``app.cli``) registers the same functions beside ``serve`` and
``worker``. The comparison rules' options are generated from the rule book
(:class:`forgetguard.rules.CompareRules`): a rule added there is an option here.
"""

from __future__ import annotations

import functools
import inspect
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from enum import Enum, StrEnum
from pathlib import Path
from types import NoneType, UnionType
from typing import Annotated, Any, Literal, TypeVar, Union, get_args, get_origin

import typer
from pydantic import ValidationError

from forgetguard import rules as rule_book
from forgetguard.client import (
    DEFAULT_URL,
    Client,
    Comparison,
    Evaluation,
    FinetuneJob,
    ForgetguardError,
)
from forgetguard.text import one_line

# `forgetguard serve` writes the URL it serves here (relative to where it runs, like var/ for
# the database), so commands run beside it follow `--port` without FORGETGUARD_URL.
SERVER_URL_FILE = Path("var/server-url")
EXIT_OK, EXIT_FAIL, EXIT_ERROR = 0, 1, 2
EXIT_CODES = "Exit 0 ok (or pass), 1 forgetting detected, 2 error (one line on stderr says why)."

app = typer.Typer(
    help="forgetguard client: did fine-tuning make your model forget? " + EXIT_CODES,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)

ServerOpt = Annotated[
    str | None,
    typer.Option(
        envvar="FORGETGUARD_URL",
        help="API base URL. Default: the URL a `forgetguard serve` started in this directory "
        "wrote to var/server-url, else http://127.0.0.1:8000.",
        show_default=False,
    ),
]
SuitesOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--suite",
        help="Suite name, name@version or suite JSON file; repeatable, or comma-separated. "
        "Default: the server's (general-qa, forgetting-checklist).",
    ),
]
JsonOpt = Annotated[
    bool, typer.Option("--json", help="Print the server's answer as JSON on stdout.")
]


def server_url(explicit: str | None) -> str:
    """--server or $FORGETGUARD_URL, else the URL a local ``serve`` wrote, else the default."""
    if explicit:
        return explicit
    try:
        written = SERVER_URL_FILE.read_text(encoding="utf-8").strip()
    except OSError:
        written = ""
    return written or DEFAULT_URL


class PromptFormat(StrEnum):
    """How prompts are rendered."""

    chat = "chat"
    plain = "plain"


# --------------------------------------------------------------------------- the rule book


def _rule_parameter(name: str, field: Any) -> inspect.Parameter:
    """One ``--option`` for one rule of the rule book: its type, default and description."""
    annotation = field.annotation
    optional = get_origin(annotation) in (Union, UnionType) and NoneType in get_args(annotation)
    kind: Any = (
        next(a for a in get_args(annotation) if a is not NoneType) if optional else annotation
    )
    default = field.default
    if get_origin(kind) is Literal:  # choices: an enum, which every typer version shows
        values = [str(v) for v in get_args(kind)]
        choices: Any = StrEnum  # a functional-API enum, named after its rule
        kind = choices(f"{name}_choices", {v: v for v in values})
        default = None if default is None else kind(default)
    option = typer.Option(
        f"--{name.replace('_', '-')}",
        help=field.description,
        show_default=default is not None,
    )
    hint: Any = Annotated[(kind | None) if optional else kind, option]
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=hint, default=default)


_Result = TypeVar("_Result")


def with_rule_options(command: Callable[..., _Result]) -> Callable[..., _Result]:
    """Give ``command`` one option per rule of the rule book, in place of its ``rules``
    parameter; it receives them validated, as one ``CompareRules``."""
    rule_book_model = rule_book.CompareRules
    names = list(rule_book_model.model_fields)
    own = inspect.signature(command, eval_str=True).parameters.values()
    parameters: list[inspect.Parameter] = []
    for parameter in own:
        if parameter.name == "rules":
            parameters += [_rule_parameter(n, f) for n, f in rule_book_model.model_fields.items()]
        else:
            parameters.append(parameter.replace(kind=inspect.Parameter.KEYWORD_ONLY))

    @functools.wraps(command)
    def with_rules(**values: Any) -> _Result:
        given = {n: values.pop(n) for n in names}
        given = {n: v.value if isinstance(v, Enum) else v for n, v in given.items()}
        try:
            rules = rule_book_model(**given)
        except ValidationError as exc:
            first = exc.errors()[0]
            option = "--" + str(first["loc"][0]).replace("_", "-") if first["loc"] else "a rule"
            raise _fail(f"{option}: {first['msg']}") from None
        return command(rules=rules, **values)

    with_rules.__signature__ = inspect.Signature(parameters)  # type: ignore[attr-defined]
    return with_rules


# --------------------------------------------------------------------------- helpers


def _fail(message: str) -> typer.Exit:
    """Print one line on stderr; the caller raises the returned exit (status 2)."""
    typer.echo(f"error: {one_line(message, 2000)}", err=True)
    return typer.Exit(EXIT_ERROR)


@contextmanager
def _errors_exit_2() -> Iterator[None]:
    """Whatever goes wrong is one line on stderr and exit 2: exit 1 means forgetting only."""
    try:
        yield
    except typer.Exit:
        raise
    except ForgetguardError as exc:
        raise _fail(str(exc)) from None
    except Exception as exc:  # a bug: still not exit 1, which would read as forgetting
        raise _fail(f"unexpected {exc.__class__.__name__}: {exc}") from None


def _client(server: str | None, timeout: float) -> Client:
    """A client to the server, with ``timeout`` seconds for everything the command does."""
    return Client(server_url(server), deadline=time.monotonic() + timeout)


def _print_json(data: Any) -> None:
    typer.echo(json.dumps(data, ensure_ascii=False, indent=1))


def _say(line: str) -> None:
    typer.echo(line, err=True)


Job = Evaluation | FinetuneJob


def _wait(fg: Client, job_id: str, *, role: str, timeout: float, progress_every: float) -> Job:
    """The job once finished (failed ones too), its progress shown on stderr."""
    from rich.console import Console

    from forgetguard.gate.progress import WaitDisplay

    with WaitDisplay(Console(stderr=True), {role: job_id}, every=progress_every) as display:
        (job,) = fg.wait(
            job_id, timeout=timeout, on_progress=display.update, raise_on_failure=False
        )
    return job


def _job_exit(job: Job) -> int:
    """0 for a live or succeeded job, 1 when its comparison says forgetting, 2 when it failed
    (saying why on stderr)."""
    from forgetguard.status import UNSUCCESSFUL

    if job.status in UNSUCCESSFUL:
        _say(f"{one_line(job.id, 80)} {job.status}: {one_line(job.error or 'no reason given')}")
        return EXIT_ERROR
    comparison = getattr(job, "comparison", None)
    if comparison:
        from forgetguard.gate.reports import summary_line

        where = f"/finetune-jobs/{job.id}"
        verdict = Client._view(Comparison, comparison, "GET", where).model_dump(mode="json")
        _say(summary_line(verdict).replace("forgetguard gate", one_line(job.id, 80), 1))
        return EXIT_OK if verdict["verdict"] == "pass" else EXIT_FAIL
    return EXIT_OK


WaitOpt = Annotated[bool, typer.Option(help="Wait until the job finished.")]
TimeoutOpt = Annotated[
    float, typer.Option(help="Seconds the whole command may take (requests, reads and waits).")
]
ProgressOpt = Annotated[
    float,
    typer.Option(
        help="Without a terminal, print a progress line per job at least this often (seconds)."
    ),
]


# --------------------------------------------------------------------------- commands


@with_rule_options
def gate(
    before: Annotated[str | None, typer.Option(help="Id of the 'before' evaluation.")] = None,
    after: Annotated[str | None, typer.Option(help="Id of the 'after' evaluation.")] = None,
    base_model: Annotated[str | None, typer.Option(help="Base model path ('before').")] = None,
    candidate: Annotated[str | None, typer.Option(help="Candidate model path ('after').")] = None,
    adapter: Annotated[
        str | None,
        typer.Option(help="peft adapter of the candidate (on --candidate, else on --base-model)."),
    ] = None,
    suite: SuitesOpt = None,
    rules: rule_book.CompareRules | None = None,
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
    timeout: Annotated[
        float,
        typer.Option(help="Seconds the whole gate may take: every request, read and wait."),
    ] = 3600.0,
    progress_every: ProgressOpt = 30.0,
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
    from forgetguard.gate import GateOptions, parse_suites, run_gate

    assert rules is not None  # with_rule_options passes them
    options = GateOptions(
        server=server_url(server),
        before=before,
        after=after,
        base_model=base_model,
        candidate=candidate,
        adapter=adapter,
        suites=parse_suites(suite),
        rules=rules,
        finetune_job=finetune_job,
        noise_floor=noise_floor,
        prompt_format=prompt_format.value if prompt_format else None,
        max_new_tokens=max_new_tokens,
        backend=backend,
        cache=cache,
        timeout=timeout,
        progress_every=progress_every,
        junit=junit,
        markdown=markdown,
        api_key=os.environ.get("FORGETGUARD_API_KEY") or None,
        mlflow=mlflow,
    )
    raise typer.Exit(run_gate(options))


def evaluate(
    model: Annotated[
        str, typer.Argument(metavar="MODEL", help="Model path, as the server resolves it.")
    ],
    adapter: Annotated[str | None, typer.Option(help="peft adapter applied to the model.")] = None,
    suite: SuitesOpt = None,
    prompt_format: Annotated[
        PromptFormat | None,
        typer.Option(help="Default: chat when the tokenizer has a chat template, else plain."),
    ] = None,
    max_new_tokens: Annotated[int | None, typer.Option(help="Generation length.")] = None,
    backend: Annotated[
        str | None, typer.Option(help="Engine: transformers or vllm (server default).")
    ] = None,
    label: Annotated[str | None, typer.Option(help="A label to find the run by.")] = None,
    cache: Annotated[
        bool, typer.Option(help="Answer from a finished evaluation of identical inputs.")
    ] = True,
    wait: WaitOpt = False,
    timeout: TimeoutOpt = 3600.0,
    progress_every: ProgressOpt = 30.0,
    as_json: JsonOpt = False,
    server: ServerOpt = None,
) -> None:
    """Queue an evaluation (POST /evaluations) and print its id; --wait for its results.

    Exit 0 queued or succeeded, 2 failed, cancelled or any error.
    """
    from forgetguard.gate import evaluation_body, parse_suites
    from forgetguard.gate.options import GateError, GateOptions

    options = GateOptions(
        suites=parse_suites(suite),
        prompt_format=prompt_format.value if prompt_format else None,
        max_new_tokens=max_new_tokens,
        backend=backend,
        cache=cache,
    )
    with _errors_exit_2():
        try:
            body = evaluation_body(options, model, adapter, label or "")
        except GateError as exc:
            raise _fail(str(exc)) from None
        if label is None:
            body.pop("label")
        with _client(server, timeout) as fg:
            queued = fg.submit_evaluation(body)
            how = f"cached from {queued.cached_from}" if queued.cached_from else str(queued.status)
            _say(f"evaluation {queued.id} ({one_line(how, 100)})")
            job: Job = queued
            if wait:
                job = _wait(
                    fg, job.id, role="evaluation", timeout=timeout, progress_every=progress_every
                )
    with _errors_exit_2():
        code = _job_exit(job)
    if as_json:
        _print_json(job.model_dump(mode="json"))
    else:
        typer.echo(job.id)
    raise typer.Exit(code)


@with_rule_options
def compare(
    before: Annotated[str, typer.Argument(metavar="BEFORE", help="Id of the 'before' evaluation.")],
    after: Annotated[str, typer.Argument(metavar="AFTER", help="Id of the 'after' evaluation.")],
    suite: Annotated[
        list[str] | None,
        typer.Option(help="Compare only these suites (both runs must have them); repeatable."),
    ] = None,
    rules: rule_book.CompareRules | None = None,
    as_json: JsonOpt = False,
    timeout: TimeoutOpt = 300.0,
    server: ServerOpt = None,
) -> None:
    """Compare two finished evaluations (GET /compare) under the rules; prints the table.

    Exit 0 pass, 1 forgetting detected, 2 error (unfinished or not comparable runs included).
    """
    from rich.console import Console

    from forgetguard.gate import parse_suites
    from forgetguard.gate.reports import render_table, summary_line

    names = parse_suites(suite)
    with _errors_exit_2(), _client(server, timeout) as fg:
        answer = fg.compare(before, after, rules=rules, suites=names or None)
        comparison = answer.model_dump(mode="json")
        if as_json:
            _print_json(comparison)
        else:
            render_table(comparison, Console(highlight=False))
        _say(summary_line(comparison).replace("forgetguard gate", "forgetguard compare", 1))
    raise typer.Exit(EXIT_OK if answer.passed else EXIT_FAIL)


def _read_json(path: Path) -> Any:
    try:
        text = sys.stdin.read() if str(path) == "-" else path.read_text(encoding="utf-8")
    except OSError as exc:
        raise _fail(f"cannot read {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise _fail(f"{path} is not UTF-8 text") from None
    try:
        return json.loads(text)
    except ValueError as exc:
        raise _fail(f"{path} is not valid JSON: {exc}") from None


def finetune(
    request: Annotated[
        Path | None,
        typer.Argument(
            metavar="REQUEST",
            help="A JSON file with the whole request body (SPEC §5); - reads stdin.",
        ),
    ] = None,
    base_model: Annotated[str | None, typer.Option(help="Base model path.")] = None,
    dataset: Annotated[
        str | None, typer.Option(help="Training data: a JSONL path under a data root.")
    ] = None,
    method: Annotated[str | None, typer.Option(help="lora (default), qlora or full.")] = None,
    preset: Annotated[str | None, typer.Option(help="safe (default) or risky.")] = None,
    suite: SuitesOpt = None,
    wait: WaitOpt = False,
    timeout: TimeoutOpt = 24 * 3600.0,
    progress_every: ProgressOpt = 30.0,
    as_json: JsonOpt = False,
    server: ServerOpt = None,
) -> None:
    """Queue a fine-tune job (POST /finetune-jobs) and print its id; --wait for its verdict.

    The options fill in (or override) the request file's fields. Exit 0 queued, or succeeded
    with a passing comparison; 1 its comparison detected forgetting; 2 failed or any error.
    """
    from forgetguard.gate import parse_suites

    body: dict[str, Any] = {}
    if request is not None:
        loaded = _read_json(request)
        if not isinstance(loaded, dict):
            raise _fail(f"{request} must hold one JSON object (the request body)")
        body = loaded
    if base_model:
        body["base_model"] = {"path": base_model}
    if dataset:
        body["dataset"] = {"path": dataset}
    for key, value in (("method", method), ("preset", preset)):
        if value:
            body[key] = value
    if names := parse_suites(suite):
        body["evaluation"] = {**(body.get("evaluation") or {}), "suites": names}
    missing = [f"--{k.replace('_', '-')}" for k in ("base_model", "dataset") if k not in body]
    if missing:
        raise _fail(f"the request needs {' and '.join(missing)} (or a request file with them)")
    with _errors_exit_2(), _client(server, timeout) as fg:
        queued = fg.finetune(body)
        _say(f"fine-tune job {queued.id} ({queued.status})")
        for warning in queued.warnings:
            _say(f"warning: {one_line(warning)}")
        job: Job = queued
        if wait:
            job = _wait(
                fg, job.id, role="fine-tune job", timeout=timeout, progress_every=progress_every
            )
    with _errors_exit_2():
        code = _job_exit(job)
    if as_json:
        _print_json(job.model_dump(mode="json"))
    else:
        typer.echo(job.id)
    raise typer.Exit(code)


def status(
    job_id: Annotated[
        str, typer.Argument(metavar="ID", help="An evaluation (ev_…) or fine-tune job (ft_…).")
    ],
    wait: WaitOpt = False,
    timeout: TimeoutOpt = 3600.0,
    progress_every: ProgressOpt = 30.0,
    as_json: JsonOpt = False,
    server: ServerOpt = None,
) -> None:
    """Show an evaluation's or a fine-tune job's status and progress; --wait until it finished.

    Exit 0 queued, running or succeeded (with a passing comparison, for a fine-tune job);
    1 the job's comparison detected forgetting; 2 failed, cancelled or any error.
    """
    from forgetguard.gate.progress import counts, describe

    with _errors_exit_2(), _client(server, timeout) as fg:
        job = fg.get(job_id)
        if wait:
            job = _wait(fg, job.id, role="job", timeout=timeout, progress_every=progress_every)
    with _errors_exit_2():
        code = _job_exit(job)
    if as_json:
        _print_json(job.model_dump(mode="json"))
    else:
        typer.echo(describe("", job) + counts(job))
    raise typer.Exit(code)


COMMANDS: dict[str, Callable[..., None]] = {
    "gate": gate,
    "evaluate": evaluate,
    "compare": compare,
    "finetune": finetune,
    "status": status,
}


def register(target: typer.Typer) -> None:
    """Add the client's commands to ``target`` (this app, or the server's ``forgetguard``)."""
    for name, command in COMMANDS.items():
        target.command(name)(command)


register(app)


def plain_help_without_terminal(target: typer.Typer) -> None:
    """Without a terminal (a CI log, a pipe), help is click's plain text: rich's panels would be
    cut at 80 columns, and an option's name cut is an option the reader cannot find."""
    if sys.stdout.isatty():
        return
    target.rich_markup_mode = None
    for group in target.registered_groups:
        if group.typer_instance is not None:
            plain_help_without_terminal(group.typer_instance)


def main() -> None:
    """Console-script entry point of the client-only install."""
    plain_help_without_terminal(app)
    app()


if __name__ == "__main__":
    main()
