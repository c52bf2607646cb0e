"""The gate's reports of one ``/compare`` answer: the console table and the stderr line, JUnit XML
and Markdown (pure: a comparison in, text out).

They follow the verdict: a ``<failure>`` or a "Why it fails" line exactly where the verdict
failed; what is reported but does not gate goes to ``<system-out>`` and "Reported, not gated".
Everything the server sent is shown through :mod:`forgetguard.text`: one line, control
characters escaped, cut to a bound, and escaped for Markdown and XML.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from forgetguard.text import markdown as md
from forgetguard.text import one_line, xml_text

MAX_FLIPS_SHOWN = 10
# How much of a forgotten item's question and answers the Markdown shows.
FLIP_TEXT_LIMIT = 200
# How much of a reason, finding or warning a report shows.
MESSAGE_LIMIT = 1000


def _p(value: float | None) -> str:
    if value is None:
        return "–"
    return f"{value:.2e}" if 0 < value < 1e-3 else f"{value:.3f}"


def _num(value: float | None) -> str:
    return "none up to 1.0" if value is None else f"{value:.3f}"


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


# --------------------------------------------------------------------------- console


def summary_line(comparison: Mapping[str, Any]) -> str:
    """One line on stderr: the verdict and why, in the server's words (its ``headline``)."""
    headline = comparison.get("headline")
    if headline:
        return f"forgetguard gate: {one_line(headline, MESSAGE_LIMIT)}"
    # A server from before headlines: the verdict and its reasons, or what it kept.
    verdict = str(comparison["verdict"]).upper()
    if comparison["reasons"]:
        reasons = "; ".join(one_line(r, MESSAGE_LIMIT) for r in comparison["reasons"])
        return f"forgetguard gate: {verdict}: {reasons}"
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


def _say(console: Console, line: str) -> None:
    console.print(line, markup=False, highlight=False)


def render_table(comparison: Mapping[str, Any], console: Console) -> None:
    """The compact console report: per category before → after, flips, p-value, verdict."""
    stats = comparison.get("statistics") or {}
    table = Table(
        title=Text(
            f"forgetguard gate: {one_line(comparison['before'], 80)} → "
            f"{one_line(comparison['after'], 80)}"
        ),
        title_justify="left",
    )
    table.add_column("category")
    for name in ("before → after", "drop", "forgotten", "learned", "McNemar p", "Holm p"):
        table.add_column(name, justify="right")
    for cat, s in (stats.get("by_category") or {}).items():
        table.add_row(
            Text(one_line(cat, 80)),
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
        _say(
            console,
            f"{stats['confidence']:.0%} CI of the drop: [{low:+.3f}, {high:+.3f}] "
            f"over {stats['n_pairs']} paired items; minimum detectable drop "
            f"{_num(stats.get('min_detectable_drop'))}",
        )
    checklist = comparison.get("checklist")
    if checklist:
        failing = ", ".join(
            f"{one_line(f['test'], 200)} ({one_line(f['severity'], 20)})"
            for f in checklist["newly_failing"]
        )
        _say(
            console,
            f"checklist {checklist['score_before']:.2f} → {checklist['score_after']:.2f}"
            + (f"; newly failing: {failing}" if failing else ""),
        )
    drift = comparison.get("drift")
    if drift:
        for name, d in drift["suites"].items():
            _say(
                console,
                f"NLL/token on {one_line(name, 100)}: {d['nll_per_token_before']:.3f} → "
                f"{d['nll_per_token_after']:.3f} ({d['relative_change']:+.1%})" + _kl_text(d),
            )
    if comparison.get("note"):
        _say(console, f"note: {one_line(comparison['note'], MESSAGE_LIMIT)}")
    noise = comparison.get("noise_floor")
    if noise:
        _say(
            console,
            f"noise floor: {noise['churn']} of {noise['items']} items flip between two runs of "
            f"the unchanged base ({one_line(noise['evaluation'], 80)})",
        )
    for warning in comparison.get("warnings") or []:
        _say(console, f"warning: {one_line(warning['message'], MESSAGE_LIMIT)}")
    for finding in _findings(comparison, gates=False):
        _say(console, f"reported, not gated: {one_line(finding['message'], MESSAGE_LIMIT)}")
    colour = "green" if comparison["verdict"] == "pass" else "red"
    verdict = escape(str(comparison["verdict"]).upper())
    console.print(f"verdict: [bold {colour}]{verdict}[/bold {colour}]", highlight=False)
    for reason in comparison["reasons"]:
        _say(console, f"  - {one_line(reason, MESSAGE_LIMIT)}")


# --------------------------------------------------------------------------- JUnit


def _testsuites(
    cases: Sequence[ET.Element], *, failures: int, errors: int, elapsed: float
) -> tuple[ET.Element, ET.Element]:
    counts = {"tests": str(len(cases)), "failures": str(failures), "errors": str(errors)}
    time = f"{elapsed:.1f}"
    suites = ET.Element("testsuites", {"name": "forgetguard gate", **counts, "time": time})
    suite = ET.SubElement(
        suites,
        "testsuite",
        {
            "name": "forgetguard",
            **counts,
            "skipped": "0",
            "time": time,
            "timestamp": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S"),
        },
    )
    return suites, suite


def _xml(suites: ET.Element) -> bytes:
    ET.indent(suites)
    return bytes(ET.tostring(suites, encoding="utf-8", xml_declaration=True)) + b"\n"


def junit_xml(comparison: Mapping[str, Any], elapsed: float) -> bytes:
    """JUnit XML: one testcase per category, checklist item and drift suite.

    A ``<failure>`` is written exactly where the verdict failed (one per reason); what is
    reported but does not gate goes to the testcase's ``<system-out>``, and warnings to the
    suite's properties and ``<system-out>``, so CI shows red only under a red gate. A property
    with no value (no McNemar test, no noise floor) is left out.
    """
    stats = comparison.get("statistics") or {}
    failing = _keyed(_findings(comparison, gates=True))
    reported = _keyed(_findings(comparison, gates=False))
    cases: list[ET.Element] = []
    placed: set[tuple[str, str]] = set()

    def case(classname: str, name: str, key: tuple[str, str], kind: str, output: str) -> None:
        placed.add(key)
        element = ET.Element(
            "testcase", classname=one_line(classname, 300), name=one_line(name, 300), time="0"
        )
        if key in failing:
            message = "; ".join(one_line(m, MESSAGE_LIMIT) for m in failing[key])
            ET.SubElement(element, "failure", message=message, type=kind).text = message
        lines = [output] + [
            f"reported, not gated: {one_line(m, MESSAGE_LIMIT)}" for m in reported.get(key, [])
        ]
        ET.SubElement(element, "system-out").text = xml_text("\n".join(lines))
        cases.append(element)

    if stats:
        low, high = stats["drop_ci95"]
        case(
            "forgetguard.accuracy",
            "overall",
            ("accuracy", "overall"),
            "forgetting",
            f"{stats['accuracy_before']:.3f} -> {stats['accuracy_after']:.3f}, "
            f"p={_p(stats['mcnemar_p_value'])}, CI {[low, high]}, "
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
            f"{before} -> {after} (severity {one_line(item['severity'], 20)})",
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
    suites, suite = _testsuites(cases, failures=failures, errors=0, elapsed=elapsed)
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
        if value is not None:
            ET.SubElement(properties, "property", name=name, value=one_line(value, 300))
    warnings = [one_line(w["message"], MESSAGE_LIMIT) for w in comparison.get("warnings") or []]
    for message in warnings:
        ET.SubElement(properties, "property", name="warning", value=message)
    suite.extend(cases)
    if warnings:
        ET.SubElement(suite, "system-out").text = "\n".join(warnings)
    return _xml(suites)


def error_junit_xml(message: str, elapsed: float) -> bytes:
    """JUnit XML for a gate that could not decide: one testcase with an ``<error>``."""
    case = ET.Element("testcase", classname="forgetguard.gate", name="gate", time="0")
    text = one_line(message, MESSAGE_LIMIT)
    ET.SubElement(case, "error", message=text, type="gate_error").text = text
    suites, suite = _testsuites([case], failures=0, errors=1, elapsed=elapsed)
    suite.attrib.pop("timestamp")
    suite.append(case)
    return _xml(suites)


# --------------------------------------------------------------------------- Markdown


def _code(value: Any, limit: int = 200) -> str:
    # <code> rather than backticks: inside a code span a backslash escape would show literally.
    return f"<code>{md(value, limit)}</code>"


def markdown_report(comparison: Mapping[str, Any]) -> str:
    """A GitHub-flavoured Markdown summary (also appended to ``$GITHUB_STEP_SUMMARY``)."""
    stats = comparison.get("statistics") or {}
    passed = comparison["verdict"] == "pass"
    lines = [
        f"## forgetguard gate: {'✅ PASS' if passed else '❌ FAIL'}",
        "",
        f"before {_code(comparison['before'])} → after {_code(comparison['after'])} · "
        f"threshold {md(comparison['threshold'])} · mode {md(comparison['mode'])}",
        "",
    ]
    if comparison.get("headline"):
        lines += [f"**{md(comparison['headline'], MESSAGE_LIMIT)}**", ""]
    if comparison.get("note"):
        lines += [f"> {md(comparison['note'], MESSAGE_LIMIT)}", ""]
    if stats:
        lines += [
            "| category | before | after | drop | forgotten | learned | McNemar p | Holm p |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        rows = [(md(cat, 80), s) for cat, s in (stats.get("by_category") or {}).items()]
        for cat, s in [*rows, ("**overall**", stats)]:
            lines.append(
                f"| {cat} | {s['accuracy_before']:.3f} | {s['accuracy_after']:.3f} "
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
                f"- newly failing ({gated}): {md(fail['test'], 200)} ({md(fail['severity'], 20)})"
                f" — {_code(fail['response_after'], FLIP_TEXT_LIMIT)}"
            )
        lines.append("")
    for name, d in ((comparison.get("drift") or {}).get("suites") or {}).items():
        lines.append(
            f"**NLL/token** on {md(name, 100)}: {d['nll_per_token_before']:.3f} → "
            f"{d['nll_per_token_after']:.3f} ({d['relative_change']:+.1%})" + _kl_text(d)
        )
    if comparison.get("drift"):
        lines.append("")
    if comparison["reasons"]:
        lines += ["**Why it fails**", ""]
        lines += [f"- {md(r, MESSAGE_LIMIT)}" for r in comparison["reasons"]]
        lines.append("")
    reported = _findings(comparison, gates=False)
    if reported:
        lines += ["**Reported, not gated**", ""]
        lines += [f"- {md(f['message'], MESSAGE_LIMIT)}" for f in reported]
        lines.append("")
    noise = comparison.get("noise_floor")
    if noise:
        lines += [
            f"**Noise floor**: {noise['churn']} of {noise['items']} items flip between two runs "
            f"of the unchanged base (evaluation {_code(noise['evaluation'], 80)})",
            "",
        ]
    warnings = comparison.get("warnings") or []
    if warnings:
        lines += ["**Warnings**", ""]
        lines += [f"- ⚠️ {md(w['message'], MESSAGE_LIMIT)}" for w in warnings]
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
                f"| {md(flip['item_id'], 100)} | {md(flip['question'], FLIP_TEXT_LIMIT)} "
                f"| {md(flip['response_before'], FLIP_TEXT_LIMIT)} "
                f"| {md(flip['response_after'], FLIP_TEXT_LIMIT)} |"
            )
        if len(forgotten) > MAX_FLIPS_SHOWN:
            lines.append(f"| … | {len(forgotten) - MAX_FLIPS_SHOWN} more | | |")
        lines += ["", "</details>", ""]
    return "\n".join(lines) + "\n"


def error_markdown(message: str) -> str:
    """The Markdown of a gate that could not decide."""
    return f"## forgetguard gate: ⚠️ ERROR\n\n{md(message, MESSAGE_LIMIT)}\n"
