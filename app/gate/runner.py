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
from forgetguard.client import Client, ProblemError
from forgetguard.client import Unreachable as ClientUnreachable

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
MAX_FLIPS_SHOWN = 10
# The noise-floor rerun decodes the base at this batch size (another composition than the
# engine's default), or at the second one when the base already ran at the first.
NOISE_FLOOR_BATCH_SIZES = (3, 5)
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
    max_kl: float | None = None
    mode: str = "threshold"
    alpha: float = 0.05
    category_rule: str = "point"
    finetune_job: str | None = None
    noise_floor: bool = False
    prompt_format: str | None = None
    max_new_tokens: int | None = None
    # Engine of both evaluations ("transformers" or "vllm"); None: the server's default.
    backend: str | None = None
    cache: bool = True
    timeout: float = 3600.0
    poll_seconds: float = 1.0
    junit: Path | None = None
    markdown: Path | None = None
    api_key: str | None = None
    mlflow: str | None = None


# --------------------------------------------------------------------------- HTTP


class Api:
    """The gate's view of the server: the Python client, its refusals turned into GateError."""

    def __init__(
        self, client: httpx.Client, server: str, *, sleep: Callable[[float], None]
    ) -> None:
        self.server = server
        self.fg = Client(server, http=client, retries=RETRIES, sleep=sleep)

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        """Send with the client's retries (POSTs carry an Idempotency-Key); decoded JSON."""
        try:
            return self.fg.request(method, path, **kwargs)
        except ClientUnreachable as exc:
            raise Unreachable(str(exc)) from None
        except ProblemError as exc:
            # Only the auth layer's refusals (they carry WWW-Authenticate) are about the key; a
            # 403 for a path outside the allowed roots is not, and says so in its own detail.
            if exc.status == 401 or (exc.status == 403 and "www-authenticate" in exc.headers):
                raise GateError(
                    f"the server refused the request ({exc.status}): {exc.detail}; "
                    "set FORGETGUARD_API_KEY to a key with the right scope"
                ) from None
            raise GateError(f"{method} {path} failed ({exc.status}): {exc.detail}") from None

    def get(self, path: str, **kwargs: Any) -> dict[str, Any]:
        """GET and decode JSON."""
        return dict(self.request("GET", path, **kwargs))

    def post(self, path: str, body: Mapping[str, Any], key: str) -> dict[str, Any]:
        """POST JSON with an Idempotency-Key."""
        return dict(self.request("POST", path, json=body, headers={"Idempotency-Key": key}))


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
        "model": {
            "path": model,
            "adapter_path": adapter,
            **({"backend": options.backend} if options.backend else {}),
        },
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
    for name in ("before → after", "drop", "forgotten", "learned", "McNemar p", "Holm p"):
        table.add_column(name, justify="right")
    for cat, s in (stats.get("by_category") or {}).items():
        table.add_row(
            cat,
            f"{s['accuracy_before']:.3f} → {s['accuracy_after']:.3f}",
            f"{s['drop']:+.3f}",
            str(s["forgotten"]),
            str(s["learned"]),
            _p(s["mcnemar_p_value"]),
            _p(s.get("p_value_holm")),
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
            "",
        )
    console.print(table)
    if stats:
        low, high = stats["drop_ci95"]
        console.print(
            f"{stats['confidence']:.0%} CI of the drop: [{low:+.3f}, {high:+.3f}] "
            f"over {stats['n_pairs']} paired items; minimum detectable drop "
            f"{_num(stats.get('min_detectable_drop'))}"
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
                f"{d['nll_per_token_after']:.3f} ({d['relative_change']:+.1%})" + _kl_text(d)
            )
    if comparison.get("note"):
        console.print(f"note: {comparison['note']}")
    noise = comparison.get("noise_floor")
    if noise:
        console.print(
            f"noise floor: {noise['churn']} of {noise['items']} items flip between two runs of "
            f"the unchanged base ({noise['evaluation']})"
        )
    for warning in comparison.get("warnings") or []:
        console.print(f"warning: {warning['message']}", markup=False)
    for finding in _findings(comparison, gates=False):
        console.print(f"reported, not gated: {finding['message']}", markup=False)
    colour = "green" if comparison["verdict"] == "pass" else "red"
    console.print(f"verdict: [bold {colour}]{comparison['verdict'].upper()}[/bold {colour}]")
    for reason in comparison["reasons"]:
        console.print(f"  - {reason}", markup=False)


def _kl_text(suite: Mapping[str, Any]) -> str:
    """``, KL to base 0.123 nats/token`` when the comparison has it, else nothing."""
    kl = suite.get("kl_per_token")
    return "" if kl is None else f", KL to base {kl:.3f} nats/token"


def _findings(comparison: Mapping[str, Any], *, gates: bool) -> list[dict[str, Any]]:
    return [f for f in comparison.get("findings") or [] if bool(f["gates"]) == gates]


def _keyed(findings: Sequence[Mapping[str, Any]]) -> dict[tuple[str, str], list[str]]:
    keyed: dict[tuple[str, str], list[str]] = {}
    for f in findings:
        keyed.setdefault((f["rule"], f["subject"]), []).append(f["message"])
    return keyed


def junit_xml(comparison: Mapping[str, Any], options: GateOptions, elapsed: float) -> bytes:
    """JUnit XML: one testcase per category, checklist item and drift suite.

    A ``<failure>`` is written exactly where the verdict failed (one per reason); what is
    reported but does not gate goes to the testcase's ``<system-out>``, and warnings to the
    suite's properties and ``<system-out>``, so CI shows red only under a red gate.
    """
    stats = comparison.get("statistics") or {}
    failing = _keyed(_findings(comparison, gates=True))
    reported = _keyed(_findings(comparison, gates=False))
    cases: list[ET.Element] = []
    placed: set[tuple[str, str]] = set()

    def case(classname: str, name: str, key: tuple[str, str], kind: str, output: str) -> None:
        placed.add(key)
        element = ET.Element("testcase", classname=classname, name=name, time="0")
        if key in failing:
            message = "; ".join(failing[key])
            ET.SubElement(element, "failure", message=message, type=kind).text = message
        lines = [output] + [f"reported, not gated: {m}" for m in reported.get(key, [])]
        ET.SubElement(element, "system-out").text = "\n".join(lines)
        cases.append(element)

    if stats:
        case(
            "forgetguard.accuracy",
            "overall",
            ("accuracy", "overall"),
            "forgetting",
            f"{stats['accuracy_before']:.3f} -> {stats['accuracy_after']:.3f}, "
            f"p={_p(stats['mcnemar_p_value'])}, CI {stats['drop_ci95']}, "
            f"min detectable drop {_num(stats.get('min_detectable_drop'))}",
        )
    for cat, s in (stats.get("by_category") or {}).items():
        case(
            "forgetguard.category",
            cat,
            ("category", cat),
            "category_drop",
            f"{s['accuracy_before']:.3f} -> {s['accuracy_after']:.3f}, {s['forgotten']} "
            f"forgotten, {s['learned']} learned, p={_p(s['mcnemar_p_value'])}, "
            f"Holm-adjusted p={_p(s.get('p_value_holm'))}",
        )
    for item in (comparison.get("checklist") or {}).get("items", []):
        before = "pass" if item["passed_before"] else "fail"
        after = "pass" if item["passed_after"] else "fail"
        case(
            f"forgetguard.checklist.{item['suite']}",
            item["test"],
            ("checklist", f"{item['suite']}/{item['test']}"),
            f"checklist_{item['severity']}",
            f"{before} -> {after} (severity {item['severity']})",
        )
    for name, d in ((comparison.get("drift") or {}).get("suites") or {}).items():
        case(
            "forgetguard.drift",
            name,
            ("drift", name),
            "drift",
            f"{d['nll_per_token_before']:.3f} -> {d['nll_per_token_after']:.3f}" + _kl_text(d),
        )
    for key in failing:  # a gating finding with no row above still fails
        if key not in placed:
            case(f"forgetguard.{key[0]}", key[1], key, key[0], "")

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
    noise = comparison.get("noise_floor") or {}
    for name, value in (
        ("before", comparison["before"]),
        ("after", comparison["after"]),
        ("verdict", comparison["verdict"]),
        ("threshold", comparison["threshold"]),
        ("mode", comparison["mode"]),
        ("mcnemar_p_value", stats.get("mcnemar_p_value")),
        ("min_detectable_drop", stats.get("min_detectable_drop")),
        ("noise_floor_churn", noise.get("churn")),
    ):
        ET.SubElement(properties, "property", name=name, value=str(value))
    warnings = [w["message"] for w in comparison.get("warnings") or []]
    for message in warnings:
        ET.SubElement(properties, "property", name="warning", value=message)
    suite.extend(cases)
    if warnings:
        ET.SubElement(suite, "system-out").text = "\n".join(warnings)
    ET.indent(suites)
    return bytes(ET.tostring(suites, encoding="utf-8", xml_declaration=True)) + b"\n"


def _num(value: float | None) -> str:
    return "none up to 1.0" if value is None else f"{value:.3f}"


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
            "| category | before | after | drop | forgotten | learned | McNemar p | Holm p |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        rows = list((stats.get("by_category") or {}).items()) + [("**overall**", stats)]
        for cat, s in rows:
            lines.append(
                f"| {_cell(cat)} | {s['accuracy_before']:.3f} | {s['accuracy_after']:.3f} "
                f"| {s['drop']:+.3f} | {s['forgotten']} | {s['learned']} "
                f"| {_p(s['mcnemar_p_value'])} | {_p(s.get('p_value_holm'))} |"
            )
        low, high = stats["drop_ci95"]
        lines += [
            "",
            f"{stats['confidence']:.0%} paired-bootstrap CI of the drop: "
            f"[{low:+.3f}, {high:+.3f}] over {stats['n_pairs']} items; minimum detectable "
            f"drop {_num(stats.get('min_detectable_drop'))}",
            "",
        ]
    checklist = comparison.get("checklist")
    if checklist:
        lines.append(
            f"**Checklist** {checklist['score_before']:.2f} → {checklist['score_after']:.2f}"
        )
        for fail in checklist["newly_failing"]:
            gated = "fails the gate" if fail["severity"] == "critical" else "reported"
            lines.append(
                f"- newly failing ({gated}): {_cell(fail['test'])} ({fail['severity']}) — "
                f"`{_cell(fail['response_after'], 60)}`"
            )
        lines.append("")
    for name, d in ((comparison.get("drift") or {}).get("suites") or {}).items():
        lines.append(
            f"**NLL/token** on {name}: {d['nll_per_token_before']:.3f} → "
            f"{d['nll_per_token_after']:.3f} ({d['relative_change']:+.1%})" + _kl_text(d)
        )
    if comparison.get("drift"):
        lines.append("")
    if comparison["reasons"]:
        lines += ["**Why it fails**", ""] + [f"- {_cell(r, 300)}" for r in comparison["reasons"]]
        lines.append("")
    reported = _findings(comparison, gates=False)
    if reported:
        lines += ["**Reported, not gated**", ""]
        lines += [f"- {_cell(f['message'], 300)}" for f in reported]
        lines.append("")
    noise = comparison.get("noise_floor")
    if noise:
        lines += [
            f"**Noise floor**: {noise['churn']} of {noise['items']} items flip between two runs "
            f"of the unchanged base (evaluation `{noise['evaluation']}`)",
            "",
        ]
    warnings = comparison.get("warnings") or []
    if warnings:
        lines += ["**Warnings**", ""] + [f"- ⚠️ {_cell(w['message'], 300)}" for w in warnings]
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


def _post_evaluation(api: Api, role: str, body: dict[str, Any], console: Console) -> str:
    evaluation = api.post("/evaluations", body, idempotency_key(body))
    how = (
        "cached from " + evaluation["cached_from"]
        if evaluation.get("cached_from")
        else (evaluation["status"])
    )
    console.print(f"{role}: evaluation {evaluation['id']} ({how})")
    return str(evaluation["id"])


def _submit_models(
    api: Api,
    options: GateOptions,
    console: Console,
    base: str,
    candidate: str,
    adapter: str | None,
) -> dict[str, str]:
    sides = {
        "before": evaluation_body(options, base, None, "gate: base"),
        "after": evaluation_body(options, candidate, adapter, "gate: candidate"),
    }
    return {role: _post_evaluation(api, role, body, console) for role, body in sides.items()}


def suite_names(options: GateOptions) -> list[str]:
    """The ``--suite`` values that are names (``name@version`` counts as ``name``)."""
    return [s.split("@")[0] for s in options.suites if not Path(s).expanduser().is_file()]


def wait_for_job(
    api: Api,
    job_id: str,
    *,
    timeout: float,
    poll_seconds: float,
    console: Console,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> dict[str, Any]:
    """Poll a fine-tune job until it finished; GateError if it failed or time ran out."""
    deadline = clock() + timeout
    shown = None
    while True:
        job = api.get(f"/finetune-jobs/{job_id}")
        stage = (job.get("progress") or {}).get("stage", "")
        line = f"fine-tune job {job_id}: {job['status']}" + (f" ({stage})" if stage else "")
        if line != shown:
            console.print(line)
            shown = line
        if job["status"] == JobStatus.SUCCEEDED:
            return job
        if job["status"] in (JobStatus.FAILED, JobStatus.CANCELLED):
            reason = job.get("error") or "no reason given"
            raise GateError(f"fine-tune job {job_id} {job['status']}: {reason}")
        if clock() >= deadline:
            raise GateError(f"timed out after {timeout:g} s waiting for fine-tune job {job_id}")
        sleep(poll_seconds)


def _from_finetune_job(api: Api, options: GateOptions, console: Console) -> dict[str, str]:
    """The job's own before/after evaluations, or new ones when ``--suite`` asks for others."""
    assert options.finetune_job is not None
    job = wait_for_job(
        api,
        options.finetune_job,
        timeout=options.timeout,
        poll_seconds=options.poll_seconds,
        console=console,
    )
    before, after = job.get("before_evaluation_id"), job.get("after_evaluation_id")
    if before and after:
        have = {s["name"] for s in api.get(f"/evaluations/{before}")["suites"]}
        wanted = suite_names(options)
        if len(wanted) == len(options.suites) and set(wanted) <= have:
            console.print(f"gating the stored evaluations of {options.finetune_job}")
            return {"before": before, "after": after}
    output = job.get("output_path")
    if not output:
        raise GateError(f"fine-tune job {options.finetune_job} has no output to evaluate")
    base = job["base_model"]["path"]
    console.print(f"evaluating {options.finetune_job}'s output {output} on the requested suites")
    if job.get("method") == "lora":
        return _submit_models(api, options, console, base, base, output)
    return _submit_models(api, options, console, base, output, None)


def _submit(api: Api, options: GateOptions, console: Console) -> dict[str, str]:
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
            f"give one of --before/--after, --base-model, --finetune-job; got {', '.join(given)}"
        )
    if options.finetune_job:
        return _from_finetune_job(api, options, console)
    if options.before or options.after:
        if not (options.before and options.after):
            raise GateError("--before and --after go together")
        return {"before": options.before, "after": options.after}
    if not options.base_model:
        raise GateError(
            "nothing to compare: give --before/--after ids, --finetune-job ID, or --base-model "
            "with --candidate and/or --adapter"
        )
    if not (options.candidate or options.adapter):
        raise GateError("--base-model needs --candidate PATH and/or --adapter PATH")
    return _submit_models(
        api,
        options,
        console,
        options.base_model,
        options.candidate or options.base_model,
        options.adapter,
    )


def noise_floor_body(base: Mapping[str, Any]) -> dict[str, Any]:
    """A rerun of the base evaluation with another batch composition, never from the cache."""
    generation = dict(base.get("generation") or {})
    first, second = NOISE_FLOOR_BATCH_SIZES
    generation["batch_size"] = second if generation.get("batch_size") == first else first
    return {
        "model": {"path": base["model"]["path"], "adapter_path": base["model"]["adapter_path"]},
        "suites": [f"{s['name']}@{s['version']}" for s in base["suites"]],
        "prompt_format": base.get("prompt_format"),
        "generation": generation,
        "label": f"gate: noise floor of {base['id']}",
        "cache": False,
    }


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


def _log_to_mlflow(comparison: Mapping[str, Any], uri: str, console: Console) -> None:
    from forgetguard.tracking import log_comparison

    try:
        run_id = log_comparison(uri, comparison, markdown_report(comparison))
    except Exception as exc:  # the tracking server's own errors: any type, all exit 2
        raise GateError(f"cannot log to MLflow at {uri}: {exc.__class__.__name__}: {exc}") from None
    console.print(f"logged to MLflow at {uri}: run {run_id}", soft_wrap=True, markup=False)


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
    if options.max_kl is not None:
        params["max_kl"] = options.max_kl
    if options.category_rule != "point":
        params["category_rule"] = options.category_rule
    names = suite_names(options)
    # With ids given, --suite picks the suites to compare among those both runs have.
    if names and (options.before or options.finetune_job):
        params["suites"] = ",".join(names)
    if ids.get("noise_floor"):
        params["noise_floor"] = ids["noise_floor"]
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
        if options.noise_floor:
            base = api.get(f"/evaluations/{ids['before']}")
            rerun = _post_evaluation(api, "noise floor", noise_floor_body(base), err)
            wait_for_evaluations(
                api,
                {"noise floor": rerun},
                timeout=options.timeout,
                poll_seconds=options.poll_seconds,
                console=err,
                sleep=sleep,
            )
            ids = {**ids, "noise_floor": rerun}
        comparison = api.get("/compare", params=compare_params(options, ids))
        render_table(comparison, out)
        _write_reports(comparison, options, time.monotonic() - started)
        if options.mlflow:
            _log_to_mlflow(comparison, options.mlflow, err)
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
