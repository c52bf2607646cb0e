"""``forgetguard gate``: a CI step that fails when a candidate model forgot what its base knew.

Submits the evaluations it needs through :class:`forgetguard.Client` (cache-aware: the server
answers a repeated evaluation from its cache, and every POST carries the client's
``Idempotency-Key``, derived from the inputs and the CI run, so a retried step never queues
twice), waits with ``Client.wait`` (a bar on a terminal, a line every ``progress_every``
seconds without one), asks ``Client.compare`` for the verdict under the rule book's rules,
prints a compact table, writes JUnit XML and Markdown reports, and exits

- **0** pass, **1** forgetting detected, **2** error (server unreachable or answering what a
  forgetguard server does not, evaluation failed, runs not comparable, timeout),

always with one line on stderr saying why. ``--timeout`` bounds the whole run, reads included.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TextIO

import httpx
from rich.console import Console

from forgetguard.client import (
    Client,
    Comparison,
    ForgetguardError,
    JobFailed,
    Timeout,
    WaitTimeout,
)
from forgetguard.gate.options import (
    GateError,
    GateOptions,
    compare_params,
    evaluation_body,
    noise_floor_body,
    suite_names,
)
from forgetguard.gate.progress import WaitDisplay
from forgetguard.gate.reports import (
    error_junit_xml,
    error_markdown,
    junit_xml,
    markdown_report,
    render_table,
    summary_line,
)
from forgetguard.text import one_line

EXIT_PASS, EXIT_FAIL, EXIT_ERROR = 0, 1, 2
RETRIES = 3


@contextmanager
def _as_gate_errors(options: GateOptions, ids: Mapping[str, str] | None = None) -> Iterator[None]:
    """The client's errors as the gate's one-line reasons (exit 2)."""
    roles = {job_id: role for role, job_id in (ids or {}).items()}
    try:
        yield
    except JobFailed as exc:
        job = exc.job
        reason = one_line(job.error or "no reason given")
        if job.id.startswith("ft_"):
            raise GateError(f"fine-tune job {job.id} {job.status}: {reason}") from None
        role = roles.get(job.id, "an")
        raise GateError(f"{role} evaluation {job.id} {job.status}: {reason}") from None
    except WaitTimeout as exc:
        shown = ", ".join(
            f"{j.id} {j.status} {j.progress.done}/{j.progress.total}" for j in exc.pending
        )
        what = (
            "fine-tune job" if any(j.id.startswith("ft_") for j in exc.pending) else "evaluations"
        )
        raise GateError(
            f"timed out after {options.timeout:g} s waiting for {what} ({shown})"
        ) from None
    except Timeout as exc:
        raise GateError(f"timed out after {options.timeout:g} s: {exc}") from None
    except ForgetguardError as exc:  # ProblemError, Unreachable, MalformedResponse
        raise GateError(str(exc)) from None


class _Gate:
    """One run of the gate: its options, client and consoles."""

    def __init__(self, options: GateOptions, fg: Client, err: Console) -> None:
        self.options = options
        self.fg = fg
        self.err = err

    def wait(self, ids: Mapping[str, str], *, bars: bool = True) -> None:
        with (
            WaitDisplay(self.err, ids, every=self.options.progress_every, bars=bars) as display,
            _as_gate_errors(self.options, ids),
        ):
            self.fg.wait(
                *dict.fromkeys(ids.values()),
                timeout=self.options.timeout,
                poll_seconds=self.options.poll_seconds,
                on_progress=display.update,
            )

    def post_evaluation(self, role: str, body: dict[str, Any]) -> str:
        with _as_gate_errors(self.options):
            evaluation = self.fg.submit_evaluation(body)
        how = (
            "cached from " + one_line(evaluation.cached_from, 80)
            if evaluation.cached_from
            else str(evaluation.status)
        )
        self.say(f"{role}: evaluation {one_line(evaluation.id, 80)} ({how})")
        return evaluation.id

    def say(self, line: str) -> None:
        self.err.print(line, markup=False, highlight=False, soft_wrap=True)

    def submit_models(self, base: str, candidate: str, adapter: str | None) -> dict[str, str]:
        sides = {
            "before": evaluation_body(self.options, base, None, "gate: base"),
            "after": evaluation_body(self.options, candidate, adapter, "gate: candidate"),
        }
        return {role: self.post_evaluation(role, body) for role, body in sides.items()}

    def from_finetune_job(self, job_id: str) -> dict[str, str]:
        """The job's own before/after evaluations, or new ones when ``--suite`` asks for others."""
        self.wait({"fine-tune job": job_id}, bars=False)
        with _as_gate_errors(self.options):
            job = self.fg.finetune_job(job_id)
        before, after = job.before_evaluation_id, job.after_evaluation_id
        if before and after:
            with _as_gate_errors(self.options):
                have = {s.name for s in self.fg.evaluation(before).suites}
            wanted = suite_names(self.options)
            files = any(Path(s).expanduser().is_file() for s in self.options.suites)
            if not files and set(wanted) <= have:
                self.say(f"gating the stored evaluations of {job_id}")
                return {"before": before, "after": after}
        output = job.output_path
        if not output:
            raise GateError(f"fine-tune job {job_id} has no output to evaluate")
        base = job.base_model.get("path")
        if not isinstance(base, str) or not base:
            raise GateError(f"fine-tune job {job_id} does not say which base model it tuned")
        self.say(f"evaluating {job_id}'s output {one_line(output, 300)} on the requested suites")
        # A full fine-tune's output is a model folder; every other method's an adapter on the
        # base (a QLoRA adapter's folder says the server loads that base in NF4).
        if job.method is not None and job.method != "full":
            return self.submit_models(base, base, output)
        return self.submit_models(base, output, None)

    def submit(self) -> dict[str, str]:
        options = self.options
        given = [
            name
            for name, value in (
                ("--before/--after", options.before or options.after),
                (
                    "--base-model/--candidate/--adapter",
                    options.base_model or options.candidate or options.adapter,
                ),
                ("--finetune-job", options.finetune_job),
            )
            if value
        ]
        if len(given) > 1:
            raise GateError(
                "give one of --before/--after, --base-model, --finetune-job; "
                f"got {', '.join(given)}"
            )
        if options.finetune_job:
            return self.from_finetune_job(options.finetune_job)
        if options.before or options.after:
            if not (options.before and options.after):
                raise GateError("--before and --after go together")
            return {"before": options.before, "after": options.after}
        if not options.base_model:
            raise GateError(
                "nothing to compare: give --before/--after ids, --finetune-job ID, or "
                "--base-model with --candidate and/or --adapter"
            )
        if not (options.candidate or options.adapter):
            raise GateError("--base-model needs --candidate PATH and/or --adapter PATH")
        return self.submit_models(
            options.base_model, options.candidate or options.base_model, options.adapter
        )

    def run(self) -> Comparison:
        with _as_gate_errors(self.options):
            self.fg.health()
        ids = self.submit()
        self.wait(ids)
        if self.options.noise_floor:
            with _as_gate_errors(self.options):
                base = self.fg.evaluation(ids["before"])
            rerun = self.post_evaluation("noise floor", noise_floor_body(base.model_dump()))
            self.wait({"noise floor": rerun})
            ids = {**ids, "noise_floor": rerun}
        params = compare_params(self.options, ids)
        with _as_gate_errors(self.options):
            return self.fg.compare(params.pop("before"), params.pop("after"), **params)


def _write_reports(comparison: Mapping[str, Any], options: GateOptions, elapsed: float) -> None:
    try:
        if options.junit:
            options.junit.parent.mkdir(parents=True, exist_ok=True)
            options.junit.write_bytes(junit_xml(comparison, elapsed))
        markdown = markdown_report(comparison)
        if options.markdown:
            options.markdown.parent.mkdir(parents=True, exist_ok=True)
            options.markdown.write_text(markdown, encoding="utf-8")
        if summary := os.environ.get("GITHUB_STEP_SUMMARY"):
            with open(summary, "a", encoding="utf-8") as fh:
                fh.write(markdown)
    except OSError as exc:
        raise GateError(f"cannot write a report: {exc}") from None


def _log_to_mlflow(comparison: Mapping[str, Any], uri: str, console: Console) -> None:
    from forgetguard.tracking import log_comparison

    try:
        run_id = log_comparison(uri, comparison, markdown_report(comparison))
    except Exception as exc:  # the tracking server's own errors: any type, all exit 2
        raise GateError(
            f"cannot log to MLflow at {uri}: {exc.__class__.__name__}: {one_line(exc)}"
        ) from None
    console.print(f"logged to MLflow at {uri}: run {run_id}", soft_wrap=True, markup=False)


def _write_error_reports(message: str, options: GateOptions, elapsed: float) -> None:
    # Best effort: the error line on stderr matters more than a report we cannot write.
    markdown = error_markdown(message)
    summary = os.environ.get("GITHUB_STEP_SUMMARY")
    targets: list[tuple[Path | None, str, bool]] = [
        (options.junit, error_junit_xml(message, elapsed).decode(), False),
        (options.markdown, markdown, False),
        (Path(summary) if summary else None, markdown, True),
    ]
    for target, content, append in targets:
        if target is None:
            continue
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            with target.open("a" if append else "w", encoding="utf-8") as fh:
                fh.write(content)
        except OSError:
            pass


def run_gate(
    options: GateOptions,
    *,
    client: httpx.Client | None = None,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> int:
    """Run the gate; returns the exit code (0 pass, 1 forgetting, 2 error).

    ``client`` is the HTTP connection to use (tests pass an in-process one); by default one
    to ``options.server`` with ``options.api_key``.
    """
    started = time.monotonic()
    err = Console(file=stderr or sys.stderr, highlight=False)
    out = Console(
        file=stdout or sys.stdout,
        highlight=False,
        width=None if (stdout or sys.stdout).isatty() else 120,
    )
    fg: Client | None = None
    try:
        fg = Client(
            options.server,
            api_key=options.api_key or "",
            http=client,
            retries=RETRIES,
            sleep=sleep,
            deadline=started + options.timeout,
        )
        comparison = _Gate(options, fg, err).run().model_dump(mode="json")
        render_table(comparison, out)
        _write_reports(comparison, options, time.monotonic() - started)
        if options.mlflow:
            _log_to_mlflow(comparison, options.mlflow, err)
    except Exception as exc:  # a bug too is exit 2: exit 1 means forgetting, nothing else
        message = one_line(
            exc if isinstance(exc, GateError) else f"unexpected {exc.__class__.__name__}: {exc}",
            2000,
        )
        _write_error_reports(message, options, time.monotonic() - started)
        err.print(f"forgetguard gate: ERROR: {message}", soft_wrap=True, markup=False)
        return EXIT_ERROR
    finally:
        if fg is not None:
            fg.close()
    err.print(summary_line(comparison), soft_wrap=True, markup=False)
    return EXIT_PASS if comparison["verdict"] == "pass" else EXIT_FAIL
