"""``forgetguard gate``: a CI step that fails when a candidate model forgot what its base knew.

Submits the evaluations it needs (cache-aware: the server answers a repeated evaluation from
its cache, and every POST carries an ``Idempotency-Key`` derived from the inputs, so a retried
step never queues twice), waits with a progress bar on stderr, asks ``GET /compare`` for the
verdict, prints a compact table, writes JUnit XML and Markdown reports, and exits

- **0** pass, **1** forgetting detected, **2** error (server unreachable, evaluation failed,
  runs not comparable, timeout),

always with one line on stderr saying why.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

import httpx
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from app.jobs.status import FINISHED, JobStatus

EXIT_PASS, EXIT_FAIL, EXIT_ERROR = 0, 1, 2
DEFAULT_SERVER = "http://127.0.0.1:8000"
# Environment variables that identify one CI pipeline run across retries of its steps.
RUN_ID_VARS = (
    "FORGETGUARD_RUN_ID",
    "GITHUB_RUN_ID",
    "CI_PIPELINE_ID",
    "BUILD_TAG",
    "CIRCLE_WORKFLOW_ID",
    "BUILDKITE_BUILD_ID",
)
RETRIES = 3
RETRY_STATUSES = (502, 503, 504)
MAX_FLIPS_SHOWN = 10
# Scopes idempotency keys to this process when nothing else identifies the request's context.
_PROCESS_NONCE = secrets.token_hex(8)


class GateError(Exception):
    """Something other than the model's quality stopped the gate (exit 2)."""


class Unreachable(GateError):
    """The server did not answer (after retries)."""


@dataclass
class GateOptions:
    """Everything ``forgetguard gate`` was asked to do."""

    server: str = DEFAULT_SERVER
    before: str | None = None
    after: str | None = None
    base_model: str | None = None
    candidate: str | None = None
    adapter: str | None = None
    suites: list[str] = field(default_factory=list)
    threshold: float = 0.10
    max_category_drop: float | None = None
    max_nll_increase: float | None = None
    mode: str = "threshold"
    alpha: float = 0.05
    prompt_format: str | None = None
    max_new_tokens: int | None = None
    cache: bool = True
    timeout: float = 3600.0
    poll_seconds: float = 1.0
    junit: Path | None = None
    markdown: Path | None = None
    api_key: str | None = None


# --------------------------------------------------------------------------- HTTP


def _detail(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:200] or response.reason_phrase
    if isinstance(body, dict):
        return str(body.get("detail") or body.get("title") or body)
    return str(body)[:200]


class Api:
    """A thin client: retries transport errors and 502/503/504, turns problems into GateError."""

    def __init__(
        self, client: httpx.Client, server: str, *, sleep: Callable[[float], None]
    ) -> None:
        self.client = client
        self.server = server
        self.sleep = sleep

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """Send with retries; POSTs are safe to retry because they carry an Idempotency-Key."""
        for attempt in range(RETRIES + 1):
            try:
                response = self.client.request(method, path, **kwargs)
            except httpx.TransportError as exc:
                if attempt == RETRIES:
                    raise Unreachable(
                        f"cannot reach the forgetguard server at {self.server}: "
                        f"{exc.__class__.__name__}: {exc or 'no response'}"
                    ) from None
            else:
                if response.status_code not in RETRY_STATUSES or attempt == RETRIES:
                    return self._checked(response, method, path)
            self.sleep(0.25 * 2**attempt)
        raise AssertionError("unreachable")  # pragma: no cover

    def _checked(self, response: httpx.Response, method: str, path: str) -> httpx.Response:
        if response.status_code in (401, 403):
            raise GateError(
                f"the server refused the request ({response.status_code}): {_detail(response)}; "
                "set FORGETGUARD_API_KEY to a key with the right scope"
            )
        if response.status_code >= 400:
            raise GateError(f"{method} {path} failed ({response.status_code}): {_detail(response)}")
        return response

    def get(self, path: str, **kwargs: Any) -> dict[str, Any]:
        """GET and decode JSON."""
        return dict(self.request("GET", path, **kwargs).json())

    def post(self, path: str, body: Mapping[str, Any], key: str) -> dict[str, Any]:
        """POST JSON with an Idempotency-Key."""
        response = self.request("POST", path, json=body, headers={"Idempotency-Key": key})
        return dict(response.json())


# --------------------------------------------------------------------------- inputs


def _suite_entry(value: str) -> str | dict[str, Any]:
    """A suite name (``name`` or ``name@version``), or an existing suite JSON file (inlined)."""
    path = Path(value).expanduser()
    if path.is_file():
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise GateError(f"cannot read suite file {value!r}: {exc.strerror}") from None
        except ValueError as exc:
            raise GateError(f"suite file {value!r} is not valid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise GateError(f"suite file {value!r} must hold one suite object")
        return data
    return value


def evaluation_body(
    options: GateOptions, model: str, adapter: str | None, label: str
) -> dict[str, Any]:
    """The POST /evaluations body for one side of the comparison."""
    body: dict[str, Any] = {
        "model": {"path": model, "adapter_path": adapter},
        "label": label,
        "cache": options.cache,
    }
    if options.suites:
        body["suites"] = [_suite_entry(s) for s in options.suites]
    if options.prompt_format:
        body["prompt_format"] = options.prompt_format
    if options.max_new_tokens is not None:
        body["generation"] = {"max_new_tokens": options.max_new_tokens}
    return body


def _local_signature(*paths: str | None) -> list[Any]:
    """Names, sizes and mtimes of the model files, when this machine can see them.

    Part of the idempotency key: a model retrained in place gets a new key (and the server's
    fingerprint cache decides whether to evaluate it again).
    """
    signature: list[Any] = []
    for raw in paths:
        if raw is None:
            continue
        directory = Path(raw).expanduser()
        if not directory.is_dir():
            continue
        for path in sorted(directory.iterdir()):
            if path.is_file():
                stat = path.stat()
                signature.append([raw, path.name, stat.st_size, stat.st_mtime_ns])
    return signature


def idempotency_key(body: Mapping[str, Any], *, environ: Mapping[str, str] | None = None) -> str:
    """A key derived from the request and its context, stable across retries of one CI step.

    It covers the body, the CI run (``GITHUB_RUN_ID``, ``CI_PIPELINE_ID``, …) and the model
    files' sizes and mtimes when they are visible here. With neither a CI run nor local files
    the key is scoped to this process, so a stale result is never replayed for changed weights.
    """
    env = os.environ if environ is None else environ
    run = next((f"{name}={env[name]}" for name in RUN_ID_VARS if env.get(name)), None)
    model = body.get("model") or {}
    files = _local_signature(model.get("path"), model.get("adapter_path"))
    if run is None and not files:
        run = f"process={_PROCESS_NONCE}"
    content = {"body": body, "run": run, "files": files}
    canonical = json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return "fg-gate-" + hashlib.sha256(canonical.encode()).hexdigest()[:48]


# --------------------------------------------------------------------------- waiting


def _describe(role: str, evaluation: Mapping[str, Any]) -> str:
    stage = (evaluation.get("progress") or {}).get("stage", "")
    status = evaluation["status"]
    if status == JobStatus.RUNNING and stage:
        status = f"running ({stage})"
    cached = " (cached)" if evaluation.get("cached_from") else ""
    return f"{role} {evaluation['id']}{cached}: {status}"


def wait_for_evaluations(
    api: Api,
    ids: Mapping[str, str],
    *,
    timeout: float,
    poll_seconds: float,
    console: Console,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> dict[str, dict[str, Any]]:
    """Poll until every evaluation finished; GateError if one failed or time ran out."""
    deadline = clock() + timeout
    latest: dict[str, dict[str, Any]] = {}
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console, transient=False) as progress:
        tasks = {role: progress.add_task(role, total=None) for role in ids}
        while True:
            for role, evaluation_id in ids.items():
                if latest.get(role, {}).get("status") in FINISHED:
                    continue
                try:
                    evaluation = api.get(f"/evaluations/{evaluation_id}")
                except Unreachable:
                    if role not in latest or clock() >= deadline:
                        raise
                    continue  # a server restart mid-wait: keep waiting until the deadline
                latest[role] = evaluation
                prog = evaluation.get("progress") or {}
                total = prog.get("total") or None
                done = prog.get("done", 0) if evaluation["status"] != JobStatus.SUCCEEDED else total
                progress.update(
                    tasks[role],
                    description=_describe(role, evaluation),
                    completed=done or 0,
                    total=total,
                )
            for role, evaluation in latest.items():
                if evaluation["status"] in (JobStatus.FAILED, JobStatus.CANCELLED):
                    reason = evaluation.get("error") or "no reason given"
                    raise GateError(
                        f"{role} evaluation {evaluation['id']} {evaluation['status']}: {reason}"
                    )
            if all(e["status"] == JobStatus.SUCCEEDED for e in latest.values()):
                return latest
            if clock() >= deadline:
                pending = [e for e in latest.values() if e["status"] != JobStatus.SUCCEEDED]
                shown = ", ".join(
                    f"{e['id']} {e['status']} {e['progress']['done']}/{e['progress']['total']}"
                    for e in pending
                )
                raise GateError(f"timed out after {timeout:g} s waiting for evaluations ({shown})")
            sleep(poll_seconds)


# --------------------------------------------------------------------------- reports


def _p(value: float | None) -> str:
    if value is None:
        return "–"
    return f"{value:.2e}" if 0 < value < 1e-3 else f"{value:.3f}"


def category_limit(options: GateOptions) -> float:
    """The drop above which a category is reported as failing."""
    return options.max_category_drop if options.max_category_drop is not None else options.threshold


def _flip_counts(comparison: Mapping[str, Any]) -> dict[str, dict[str, int]]:
    stats = comparison.get("statistics") or {}
    return {
        cat: {"forgotten": s["forgotten"], "learned": s["learned"]}
        for cat, s in (stats.get("by_category") or {}).items()
    }


def summary_line(comparison: Mapping[str, Any]) -> str:
    """One line on stderr: the verdict and why."""
    verdict = str(comparison["verdict"]).upper()
    if comparison["reasons"]:
        return f"forgetguard gate: {verdict}: " + "; ".join(comparison["reasons"])
    stats = comparison.get("statistics")
    parts = []
    if comparison.get("overall_accuracy_before") is not None:
        parts.append(
            f"accuracy {comparison['overall_accuracy_before']:.3f} → "
            f"{comparison['overall_accuracy_after']:.3f} "
            f"(drop {comparison['accuracy_drop']:.3f}, "
            f"threshold {comparison['threshold']})"
        )
    if stats:
        parts.append(
            f"McNemar p={_p(stats['mcnemar_p_value'])}, "
            f"{stats['forgotten']} forgotten / {stats['learned']} learned"
        )
    if comparison.get("same_run"):
        parts.append("same run compared with itself")
    return f"forgetguard gate: {verdict}: " + ("; ".join(parts) or "no regressions")


def render_table(comparison: Mapping[str, Any], console: Console) -> None:
    """The compact console report: per category before → after, flips, p-value, verdict."""
    stats = comparison.get("statistics") or {}
    table = Table(
        title=f"forgetguard gate: {comparison['before']} → {comparison['after']}",
        title_justify="left",
    )
    table.add_column("category")
    for name in ("before → after", "drop", "forgotten", "learned", "McNemar p"):
        table.add_column(name, justify="right")
    for cat, s in (stats.get("by_category") or {}).items():
        table.add_row(
            cat,
            f"{s['accuracy_before']:.3f} → {s['accuracy_after']:.3f}",
            f"{s['drop']:+.3f}",
            str(s["forgotten"]),
            str(s["learned"]),
            _p(s["mcnemar_p_value"]),
        )
    if stats:
        overall = f"{stats['accuracy_before']:.3f} → {stats['accuracy_after']:.3f}"
        table.add_row(
            "[bold]overall[/bold]",
            f"[bold]{overall}[/bold]",
            f"[bold]{stats['drop']:+.3f}[/bold]",
            str(stats["forgotten"]),
            str(stats["learned"]),
            f"[bold]{_p(stats['mcnemar_p_value'])}[/bold]",
        )
    console.print(table)
    if stats:
        low, high = stats["drop_ci95"]
        console.print(
            f"{stats['confidence']:.0%} CI of the drop: [{low:+.3f}, {high:+.3f}] "
            f"over {stats['n_pairs']} paired items"
        )
    checklist = comparison.get("checklist")
    if checklist:
        failing = ", ".join(f"{f['test']} ({f['severity']})" for f in checklist["newly_failing"])
        console.print(
            f"checklist {checklist['score_before']:.2f} → {checklist['score_after']:.2f}"
            + (f"; newly failing: {failing}" if failing else "")
        )
    drift = comparison.get("drift")
    if drift:
        for name, d in drift["suites"].items():
            console.print(
                f"NLL/token on {name}: {d['nll_per_token_before']:.3f} → "
                f"{d['nll_per_token_after']:.3f} ({d['relative_change']:+.1%})"
            )
    if comparison.get("note"):
        console.print(f"note: {comparison['note']}")
    colour = "green" if comparison["verdict"] == "pass" else "red"
    console.print(f"verdict: [bold {colour}]{comparison['verdict'].upper()}[/bold {colour}]")
    for reason in comparison["reasons"]:
        console.print(f"  - {reason}")


def junit_xml(comparison: Mapping[str, Any], options: GateOptions, elapsed: float) -> bytes:
    """JUnit XML: one testcase per category and per checklist item, failures only on regressions."""
    stats = comparison.get("statistics") or {}
    cases: list[ET.Element] = []

    def case(
        classname: str,
        name: str,
        failure: str | None,
        kind: str = "regression",
        output: str | None = None,
    ) -> None:
        element = ET.Element("testcase", classname=classname, name=name, time="0")
        if failure is not None:
            ET.SubElement(element, "failure", message=failure, type=kind).text = failure
        if output:
            ET.SubElement(element, "system-out").text = output
        cases.append(element)

    if stats:
        failing = [
            r
            for r in comparison["reasons"]
            if r.startswith(("accuracy dropped", "non-inferiority"))
        ]
        case(
            "forgetguard.accuracy",
            "overall",
            "; ".join(failing) or None,
            "forgetting",
            f"{stats['accuracy_before']:.3f} -> {stats['accuracy_after']:.3f}, "
            f"p={_p(stats['mcnemar_p_value'])}, CI {stats['drop_ci95']}",
        )
    limit = category_limit(options)
    gating = options.max_category_drop is not None
    for cat, s in (stats.get("by_category") or {}).items():
        failure = None
        if s["drop"] > limit:
            failure = (
                f"category {cat!r} dropped {s['drop']:.3f} "
                f"({s['accuracy_before']:.3f} -> {s['accuracy_after']:.3f}) > {limit}"
                + ("" if gating else " (reported; set --max-category-drop to gate on it)")
            )
        case(
            "forgetguard.category",
            cat,
            failure,
            "category_drop",
            f"{s['forgotten']} forgotten, {s['learned']} learned, p={_p(s['mcnemar_p_value'])}",
        )
    for item in (comparison.get("checklist") or {}).get("items", []):
        failure = None
        if item["passed_before"] and not item["passed_after"]:
            gate_note = (
                "fails the gate"
                if item["severity"] == "critical"
                else "reported, does not fail the gate"
            )
            failure = (
                f"check {item['test']!r} passed before and fails after "
                f"(severity {item['severity']}: {gate_note})"
            )
        before = "pass" if item["passed_before"] else "fail"
        after = "pass" if item["passed_after"] else "fail"
        case(
            f"forgetguard.checklist.{item['suite']}",
            item["test"],
            failure,
            f"checklist_{item['severity']}",
            f"{before} -> {after}",
        )
    for name, d in ((comparison.get("drift") or {}).get("suites") or {}).items():
        failure = None
        limit_nll = options.max_nll_increase
        if limit_nll is not None and d["relative_change"] > limit_nll:
            failure = f"NLL/token rose {d['relative_change']:.1%} (> {limit_nll:.0%})"
        case(
            "forgetguard.drift",
            name,
            failure,
            "drift",
            f"{d['nll_per_token_before']:.3f} -> {d['nll_per_token_after']:.3f}",
        )

    failures = sum(1 for c in cases if c.find("failure") is not None)
    suites = ET.Element(
        "testsuites",
        name="forgetguard gate",
        tests=str(len(cases)),
        failures=str(failures),
        errors="0",
        time=f"{elapsed:.1f}",
    )
    suite = ET.SubElement(
        suites,
        "testsuite",
        name="forgetguard",
        tests=str(len(cases)),
        failures=str(failures),
        errors="0",
        skipped="0",
        time=f"{elapsed:.1f}",
        timestamp=datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S"),
    )
    properties = ET.SubElement(suite, "properties")
    for name, value in (
        ("before", comparison["before"]),
        ("after", comparison["after"]),
        ("verdict", comparison["verdict"]),
        ("threshold", comparison["threshold"]),
        ("mode", comparison["mode"]),
        ("mcnemar_p_value", stats.get("mcnemar_p_value")),
    ):
        ET.SubElement(properties, "property", name=name, value=str(value))
    suite.extend(cases)
    ET.indent(suites)
    return bytes(ET.tostring(suites, encoding="utf-8", xml_declaration=True)) + b"\n"


def _cell(value: Any, limit: int = 80) -> str:
    text = " ".join(str(value if value is not None else "").split())
    if len(text) > limit:
        text = text[: limit - 1] + "…"
    return text.replace("|", "\\|")


def markdown_report(comparison: Mapping[str, Any]) -> str:
    """A GitHub-flavoured Markdown summary (also appended to ``$GITHUB_STEP_SUMMARY``)."""
    stats = comparison.get("statistics") or {}
    passed = comparison["verdict"] == "pass"
    lines = [
        f"## forgetguard gate: {'✅ PASS' if passed else '❌ FAIL'}",
        "",
        f"before `{comparison['before']}` → after `{comparison['after']}` · threshold "
        f"{comparison['threshold']} · mode {comparison['mode']}",
        "",
    ]
    if comparison.get("note"):
        lines += [f"> {comparison['note']}", ""]
    if stats:
        lines += [
            "| category | before | after | drop | forgotten | learned | McNemar p |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        rows = list((stats.get("by_category") or {}).items()) + [("**overall**", stats)]
        for cat, s in rows:
            lines.append(
                f"| {_cell(cat)} | {s['accuracy_before']:.3f} | {s['accuracy_after']:.3f} "
                f"| {s['drop']:+.3f} | {s['forgotten']} | {s['learned']} "
                f"| {_p(s['mcnemar_p_value'])} |"
            )
        low, high = stats["drop_ci95"]
        lines += [
            "",
            f"{stats['confidence']:.0%} paired-bootstrap CI of the drop: "
            f"[{low:+.3f}, {high:+.3f}] over {stats['n_pairs']} items",
            "",
        ]
    checklist = comparison.get("checklist")
    if checklist:
        lines.append(
            f"**Checklist** {checklist['score_before']:.2f} → {checklist['score_after']:.2f}"
        )
        for fail in checklist["newly_failing"]:
            lines.append(
                f"- newly failing: {_cell(fail['test'])} ({fail['severity']}) — "
                f"`{_cell(fail['response_after'], 60)}`"
            )
        lines.append("")
    for name, d in ((comparison.get("drift") or {}).get("suites") or {}).items():
        lines.append(
            f"**NLL/token** on {name}: {d['nll_per_token_before']:.3f} → "
            f"{d['nll_per_token_after']:.3f} ({d['relative_change']:+.1%})"
        )
    if comparison.get("drift"):
        lines.append("")
    if comparison["reasons"]:
        lines += ["**Why it fails**", ""] + [f"- {_cell(r, 300)}" for r in comparison["reasons"]]
        lines.append("")
    forgotten = comparison["flips"]["forgotten"]
    if forgotten:
        lines += [
            f"<details><summary>{len(forgotten)} forgotten items</summary>",
            "",
            "| item | question | before | after |",
            "|---|---|---|---|",
        ]
        for flip in forgotten[:MAX_FLIPS_SHOWN]:
            lines.append(
                f"| {_cell(flip['item_id'])} | {_cell(flip['question'], 60)} "
                f"| {_cell(flip['response_before'], 40)} "
                f"| {_cell(flip['response_after'], 40)} |"
            )
        if len(forgotten) > MAX_FLIPS_SHOWN:
            lines.append(f"| … | {len(forgotten) - MAX_FLIPS_SHOWN} more | | |")
        lines += ["", "</details>", ""]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- the gate


def _submit(api: Api, options: GateOptions, console: Console) -> dict[str, str]:
    if options.before or options.after:
        if not (options.before and options.after):
            raise GateError("--before and --after go together")
        if options.base_model or options.candidate or options.adapter:
            raise GateError("give either --before/--after or --base-model/--candidate, not both")
        return {"before": options.before, "after": options.after}
    if not options.base_model:
        raise GateError(
            "nothing to compare: give --before/--after ids, or --base-model with "
            "--candidate and/or --adapter"
        )
    if not (options.candidate or options.adapter):
        raise GateError("--base-model needs --candidate PATH and/or --adapter PATH")
    sides = {
        "before": evaluation_body(options, options.base_model, None, "gate: base"),
        "after": evaluation_body(
            options, options.candidate or options.base_model, options.adapter, "gate: candidate"
        ),
    }
    ids = {}
    for role, body in sides.items():
        evaluation = api.post("/evaluations", body, idempotency_key(body))
        how = (
            "cached from " + evaluation["cached_from"]
            if evaluation.get("cached_from")
            else (evaluation["status"])
        )
        console.print(f"{role}: evaluation {evaluation['id']} ({how})")
        ids[role] = evaluation["id"]
    return ids


def _write_reports(comparison: Mapping[str, Any], options: GateOptions, elapsed: float) -> None:
    try:
        if options.junit:
            options.junit.parent.mkdir(parents=True, exist_ok=True)
            options.junit.write_bytes(junit_xml(comparison, options, elapsed))
        markdown = markdown_report(comparison)
        if options.markdown:
            options.markdown.parent.mkdir(parents=True, exist_ok=True)
            options.markdown.write_text(markdown, encoding="utf-8")
        if summary := os.environ.get("GITHUB_STEP_SUMMARY"):
            with open(summary, "a", encoding="utf-8") as fh:
                fh.write(markdown)
    except OSError as exc:
        raise GateError(f"cannot write a report: {exc}") from None


def error_junit_xml(message: str, elapsed: float) -> bytes:
    """JUnit XML for a gate that could not decide: one testcase with an ``<error>``."""
    suites = ET.Element(
        "testsuites",
        name="forgetguard gate",
        tests="1",
        failures="0",
        errors="1",
        time=f"{elapsed:.1f}",
    )
    suite = ET.SubElement(
        suites,
        "testsuite",
        name="forgetguard",
        tests="1",
        failures="0",
        errors="1",
        skipped="0",
        time=f"{elapsed:.1f}",
    )
    case = ET.SubElement(suite, "testcase", classname="forgetguard.gate", name="gate", time="0")
    ET.SubElement(case, "error", message=message, type="gate_error").text = message
    ET.indent(suites)
    return bytes(ET.tostring(suites, encoding="utf-8", xml_declaration=True)) + b"\n"


def _write_error_reports(message: str, options: GateOptions, elapsed: float) -> None:
    # Best effort: the error line on stderr matters more than a report we cannot write.
    markdown = f"## forgetguard gate: ⚠️ ERROR\n\n{message}\n"
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


def compare_params(options: GateOptions, ids: Mapping[str, str]) -> dict[str, Any]:
    """Query parameters for ``GET /compare``."""
    params: dict[str, Any] = {
        "before": ids["before"],
        "after": ids["after"],
        "threshold": options.threshold,
        "mode": options.mode,
        "alpha": options.alpha,
    }
    if options.max_category_drop is not None:
        params["max_category_drop"] = options.max_category_drop
    if options.max_nll_increase is not None:
        params["max_nll_increase"] = options.max_nll_increase
    return params


def run_gate(
    options: GateOptions,
    *,
    client: httpx.Client | None = None,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> int:
    """Run the gate; returns the exit code (0 pass, 1 forgetting, 2 error)."""
    started = time.monotonic()
    err = Console(file=stderr or sys.stderr, highlight=False)
    out = Console(
        file=stdout or sys.stdout,
        highlight=False,
        width=None if (stdout or sys.stdout).isatty() else 120,
    )
    own_client = client is None
    if client is None:
        headers = {"Authorization": f"Bearer {options.api_key}"} if options.api_key else {}
        client = httpx.Client(
            base_url=options.server, headers=headers, timeout=httpx.Timeout(30.0, connect=5.0)
        )
    try:
        api = Api(client, options.server, sleep=sleep)
        api.get("/healthz")
        ids = _submit(api, options, err)
        wait_for_evaluations(
            api,
            ids,
            timeout=options.timeout,
            poll_seconds=options.poll_seconds,
            console=err,
            sleep=sleep,
        )
        comparison = api.get("/compare", params=compare_params(options, ids))
        render_table(comparison, out)
        _write_reports(comparison, options, time.monotonic() - started)
    except GateError as exc:
        _write_error_reports(str(exc), options, time.monotonic() - started)
        err.print(f"forgetguard gate: ERROR: {exc}", soft_wrap=True, markup=False)
        return EXIT_ERROR
    finally:
        if own_client:
            client.close()
    err.print(summary_line(comparison), soft_wrap=True, markup=False)
    return EXIT_PASS if comparison["verdict"] == "pass" else EXIT_FAIL


def parse_suites(values: Sequence[str] | None) -> list[str]:
    """``--suite`` values; each may also be comma-separated."""
    return [part.strip() for value in values or () for part in value.split(",") if part.strip()]
