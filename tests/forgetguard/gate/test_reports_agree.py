"""JUnit, Markdown and the dashboard tell the same story as the verdict: pass, fail and error.

A ``<failure>``, a "Why it fails" line or a reason in the dashboard's banner appears exactly
where the verdict failed; what is only reported goes to ``<system-out>`` and "Reported, not
gated" sections.
"""

from __future__ import annotations

import html
import re
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest

from tests.forgetguard.gate.test_run import failures, finish, gate, submit

pytestmark = pytest.mark.one_db


def _junit(tmp_path: Path) -> ET.Element:
    return ET.parse(tmp_path / "junit.xml").getroot()


def rendered(markdown: str) -> str:
    """What a Markdown line shows: backslash escapes and HTML entities undone."""
    return html.unescape(re.sub(r"\\(.)", r"\1", markdown))


def _markdown_section(markdown: str, title: str) -> list[str]:
    """The bullet lines under a bold ``title`` in the gate's Markdown report, as they show."""
    match = re.search(rf"\*\*{re.escape(title)}\*\*\n\n((?:- .*\n)+)", markdown)
    return [rendered(line[2:]) for line in match.group(1).splitlines()] if match else []


def _dashboard_list(page: str, css_class: str) -> list[str]:
    match = re.search(rf'<ul class="{css_class}[^"]*">(.*?)</ul>', page, re.S)
    if not match:
        return []
    return [html.unescape(li) for li in re.findall(r"<li>(.*?)</li>", match.group(1), re.S)]


def test_a_pass_with_reported_drops_is_green_everywhere(
    client: Any, tiny_model_dir: Path, tmp_path: Path
) -> None:
    before, after = submit(client, tiny_model_dir), submit(client, tiny_model_dir)
    finish(client, before)
    # Overall drop 0.1 (not above the threshold): a pass; science drops 0.2 and the low-severity
    # check breaks, both reported only.
    finish(client, after, wrong={"q10", "q11"}, failing_checks={"short"})
    code, _, err = gate(client, tmp_path, before=before, after=after)
    comparison = client.get("/compare", params={"before": before, "after": after}).json()
    assert code == 0 and comparison["verdict"] == "pass" and comparison["reasons"] == [], err
    reported = [f["message"] for f in comparison["findings"] if not f["gates"]]
    assert len(reported) == 2 and reported[0].startswith("category 'science' dropped 0.200")

    root = _junit(tmp_path)
    assert root.get("failures") == "0" and failures(tmp_path / "junit.xml") == {}
    outputs = "\n".join(c.findtext("system-out", "") for c in root.iter("testcase"))
    for message in reported:
        assert f"reported, not gated: {message}" in outputs

    markdown = (tmp_path / "gate.md").read_text()
    assert markdown.startswith("## forgetguard gate: ✅ PASS")
    assert _markdown_section(markdown, "Why it fails") == []
    assert _markdown_section(markdown, "Reported, not gated") == reported

    page = client.get("/ui/compare", params={"before": before, "after": after}).text
    assert "✓ PASS" in page and "✗ FAIL" not in page
    assert _dashboard_list(page, "reasons") == []
    assert _dashboard_list(page, "reported") == reported


def test_a_fail_marks_exactly_the_verdicts_reasons_everywhere(
    client: Any, tiny_model_dir: Path, tmp_path: Path
) -> None:
    before, after = submit(client, tiny_model_dir), submit(client, tiny_model_dir)
    finish(client, before)
    finish(client, after, wrong={f"q{i}" for i in range(10, 20)}, failing_checks={"lists"})
    code, _, _ = gate(client, tmp_path, before=before, after=after, max_category_drop=0.3)
    comparison = client.get(
        "/compare", params={"before": before, "after": after, "max_category_drop": 0.3}
    ).json()
    reasons = comparison["reasons"]
    assert code == 1 and comparison["verdict"] == "fail" and len(reasons) == 3

    failed = failures(tmp_path / "junit.xml")
    assert sorted(failed.values()) == sorted(reasons)
    assert _junit(tmp_path).get("failures") == str(len(reasons))

    markdown = (tmp_path / "gate.md").read_text()
    assert markdown.startswith("## forgetguard gate: ❌ FAIL")
    assert _markdown_section(markdown, "Why it fails") == reasons

    page = client.get(
        "/ui/compare", params={"before": before, "after": after, "max_category_drop": 0.3}
    ).text
    assert "✗ FAIL" in page and "✓ PASS" not in page
    assert _dashboard_list(page, "reasons") == reasons


def test_an_error_is_neither_pass_nor_fail_anywhere(
    client: Any, tiny_model_dir: Path, tmp_path: Path
) -> None:
    before, after = submit(client, tiny_model_dir), submit(client, tiny_model_dir)
    finish(client, before)
    finish(client, after, status="failed", error="CUDA out of memory")
    code, _, _ = gate(client, tmp_path, before=before, after=after)
    assert code == 2
    root = _junit(tmp_path)
    assert root.get("errors") == "1" and root.get("failures") == "0"
    assert failures(tmp_path / "junit.xml") == {}
    markdown = (tmp_path / "gate.md").read_text()
    assert markdown.startswith("## forgetguard gate: ⚠️ ERROR")
    assert "PASS" not in markdown and "FAIL" not in markdown

    response = client.get("/ui/compare", params={"before": before, "after": after})
    assert response.status_code == 409
    assert "✓ PASS" not in response.text and "✗ FAIL" not in response.text
