"""The comparison rule book (``forgetguard.rules.CompareRules``) is the one place the rules live.

Each rule's default is written once, in the rule book; and a rule added to the rule book reaches
``GET /compare``'s query parameters, a fine-tune job's ``evaluation`` block and the dashboard
without being written anywhere else.
"""

from __future__ import annotations

import ast
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from app.core.config import Settings
from forgetguard.rules import CompareRules
from tests.conftest import settings_env

REPO = Path(__file__).resolve().parent.parent
SCANNED = ("app", "workers", "forgetguard")
BOOK = "forgetguard/rules.py"
# Files allowed to restate a rule's default (none: the gate's options are generated from the
# book). The test below fails once a file here no longer restates one, so the list only shrinks.
NOT_YET_FROM_THE_BOOK: set[str] = set()

RULES: dict[str, Any] = {name: field.default for name, field in CompareRules.model_fields.items()}

Hit = tuple[str, int, str, Any, str]


def _literal(node: ast.AST | None) -> tuple[bool, Any]:
    if isinstance(node, ast.Constant):
        return True, node.value
    if (
        isinstance(node, ast.UnaryOp)
        and isinstance(node.op, ast.USub)
        and isinstance(node.operand, ast.Constant)
    ):
        return True, -node.operand.value
    return False, None


def _a_default_of(name: Any, value: Any) -> bool:
    """Whether ``value`` written as a default for ``name`` restates (or contradicts) a rule's
    default: any number for a numeric rule, the same word for a rule that is a choice."""
    if name not in RULES or value is None or isinstance(value, bool):
        return False
    default = RULES[name]
    if isinstance(default, str):
        return bool(value == default)
    return isinstance(value, int | float)


def _get_key(node: ast.AST) -> Any:
    """``"name"`` of a ``x.get("name", …)`` call, else None."""
    if (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == "get"
        and node.args
        and isinstance(node.args[0], ast.Constant)
    ):
        return node.args[0].value
    return None


def defaults_in_source(source: str, path: str) -> list[Hit]:
    """Where Python source writes a rule's default: argument and field defaults, assignments,
    ``.get(name, default)``, ``.get(name) or default``, and a keyword or dict entry that
    spells out the rule book's own default."""
    hits: list[Hit] = []

    def hit(name: Any, node: ast.AST, value: Any, how: str, *, exact: bool = False) -> None:
        if exact and (name not in RULES or value != RULES[name] or isinstance(value, bool)):
            return
        if exact or _a_default_of(name, value):
            hits.append((path, getattr(node, "lineno", 0), name, value, how))

    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            args = node.args
            positional = args.posonlyargs + args.args
            # Defaults belong to the last arguments; the first ones have none.
            pairs = list(
                zip(positional[len(positional) - len(args.defaults) :], args.defaults, strict=True)
            )
            pairs += [
                (a, d)
                for a, d in zip(args.kwonlyargs, args.kw_defaults, strict=True)
                if d is not None
            ]
            for arg, default in pairs:
                ok, value = _literal(default)
                if ok:
                    hit(arg.arg, default, value, "argument default")
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            ok, value = _literal(node.value)
            if ok:
                hit(node.target.id, node, value, "field default")
            elif isinstance(node.value, ast.Call):
                for kw in node.value.keywords:
                    ok, value = _literal(kw.value)
                    if kw.arg == "default" and ok:
                        hit(node.target.id, node, value, "field default")
        elif isinstance(node, ast.Assign):
            ok, value = _literal(node.value)
            if ok:
                for target in node.targets:
                    if isinstance(target, ast.Name):
                        hit(target.id, node, value, "assignment")
        elif isinstance(node, ast.Call):
            for kw in node.keywords:
                ok, value = _literal(kw.value)
                if ok:
                    hit(kw.arg, kw.value, value, "keyword", exact=True)
            ok, value = _literal(node.args[1] if len(node.args) == 2 else None)
            if ok and _get_key(node) is not None:
                hit(_get_key(node), node, value, ".get default")
        elif isinstance(node, ast.Dict):
            for key, item in zip(node.keys, node.values, strict=True):
                ok, value = _literal(item)
                if ok and isinstance(key, ast.Constant):
                    hit(key.value, item, value, "dict entry", exact=True)
        elif isinstance(node, ast.BoolOp) and isinstance(node.op, ast.Or):
            name = _get_key(node.values[0])
            for fallback in node.values[1:]:
                ok, value = _literal(fallback)
                if ok and name is not None:
                    hit(name, fallback, value, "'or' fallback")
    return hits


FORM_VALUE = re.compile(r'name="(?P<name>\w+)"[^>]*?\bvalue="(?P<value>[^"{]+)"')


def defaults_in_template(text: str, path: str) -> list[Hit]:
    """A form field named after a rule with a value written into the template."""
    return [
        (path, text.count("\n", 0, m.start()) + 1, m["name"], m["value"], "form value")
        for m in FORM_VALUE.finditer(text)
        if m["name"] in RULES
    ]


def _all_defaults() -> list[Hit]:
    hits: list[Hit] = []
    for root in SCANNED:
        for path in sorted((REPO / root).rglob("*")):
            rel = str(path.relative_to(REPO))
            if path.suffix == ".py":
                hits += defaults_in_source(path.read_text(encoding="utf-8"), rel)
            elif path.suffix == ".html":
                hits += defaults_in_template(path.read_text(encoding="utf-8"), rel)
    return hits


def test_the_scan_finds_every_way_a_default_is_restated() -> None:
    source = """
def compare(before, after, threshold=0.10, *, mode="threshold", alpha: float = 0.01): ...
class Options:
    max_kl: float = 0.5
    category_rule: str = Field(default="point")
max_drop = 0.05
options = Options(threshold=0.10, mode="noninferiority")
body = {"alpha": 0.05, "threshold": 0.2}
x = body.get("threshold", 0.1)
y = float(body.get("max_drop") or 0.05)
open("f", mode="w")
"""
    found = {(line, name, how) for _, line, name, _, how in defaults_in_source(source, "x.py")}
    assert found == {
        (2, "threshold", "argument default"),
        (2, "mode", "argument default"),
        (2, "alpha", "argument default"),
        (4, "max_kl", "field default"),
        (5, "category_rule", "field default"),
        (6, "max_drop", "assignment"),
        (7, "threshold", "keyword"),  # the book's own default, spelled out again
        (8, "alpha", "dict entry"),
        (9, "threshold", ".get default"),
        (10, "max_drop", "'or' fallback"),
    }
    page = (
        '<input name="threshold" type="number" value="0.10">'
        '<input name="threshold" value="{{ x }}">'
    )
    assert [h[2:4] for h in defaults_in_template(page, "p.html")] == [("threshold", "0.10")]


def test_each_rule_default_is_written_once_in_the_rule_book() -> None:
    hits = _all_defaults()
    in_book = [h for h in hits if h[0] == BOOK]
    assert sorted(h[2] for h in in_book) == sorted(
        name for name, default in RULES.items() if default is not None
    ), "each rule with a default declares it once in the rule book"
    pending = {h[0] for h in hits} & NOT_YET_FROM_THE_BOOK
    elsewhere = [h for h in hits if h[0] != BOOK and h[0] not in NOT_YET_FROM_THE_BOOK]
    assert not elsewhere, "rule defaults written outside forgetguard/rules.py:\n" + "\n".join(
        f"  {path}:{line}: {name} = {value!r} ({how})" for path, line, name, value, how in elsewhere
    )
    assert pending == NOT_YET_FROM_THE_BOOK, (
        f"{sorted(NOT_YET_FROM_THE_BOOK - pending)} no longer restate a rule's default: "
        "remove them from NOT_YET_FROM_THE_BOOK"
    )


# Run in a fresh interpreter on a copy of the sources whose rule book has one more rule.
PROBE = r"""
import json, sys
from pathlib import Path
import app, forgetguard.rules
from forgetguard.rules import CompareRules
assert Path(app.__file__).resolve().is_relative_to(Path.cwd().resolve()), app.__file__
assert "dummy_rule" in CompareRules.model_fields
from fastapi.testclient import TestClient
from app.core.config import Settings
from app.finetune.schemas import FinetuneJobCreate
from app.main import create_app

out = {}
with TestClient(create_app(Settings())) as client:
    spec = client.get("/openapi.json").json()
    out["compare_query"] = [p["name"] for p in spec["paths"]["/compare"]["get"]["parameters"]]
    out["evaluation_schema"] = list(
        spec["components"]["schemas"]["FinetuneEvaluationSpec"]["properties"]
    )
    bad = client.get("/compare", params={"before": "ev_a", "after": "ev_b", "dummy_rule": 2})
    out["api_bad"] = [bad.status_code, bad.json()]
    ui_bad = client.get("/ui/compare", params={"dummy_rule": 2})
    ui_good = client.get("/ui/compare", params={"dummy_rule": 0.5})
    out["ui"] = [ui_bad.status_code, ui_bad.text, ui_good.status_code]
job = {
    "base_model": {"path": "m"},
    "dataset": {"examples": [{"prompt": "a", "completion": "b"}]},
    "evaluation": {"dummy_rule": 0.5},
}
out["job_options"] = FinetuneJobCreate.model_validate(job).compare_options().model_dump()
print(json.dumps(out))
"""

DUMMY = """    dummy_rule: Annotated[
        float | None,
        Field(ge=0.0, le=1.0, description="A rule the rule book test adds."),
    ] = None

"""


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_rule_added_to_the_book_reaches_the_api_the_job_schema_and_the_dashboard(
    settings: Settings, tmp_path: Path
) -> None:
    copy = tmp_path / "src"
    for root in SCANNED:
        shutil.copytree(REPO / root, copy / root, ignore=shutil.ignore_patterns("__pycache__"))
    book = copy / BOOK
    text = book.read_text(encoding="utf-8")
    # The new rule goes where a rule is written: a field of CompareRules, before its methods.
    at = text.index("\n    def ", text.index("class CompareRules(")) + 1
    book.write_text(text[:at] + DUMMY + text[at:], encoding="utf-8")

    run = subprocess.run(
        [sys.executable, "-c", PROBE],
        cwd=copy,
        env=settings_env(settings),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])

    assert "dummy_rule" in out["compare_query"]
    assert set(RULES) <= set(out["compare_query"])
    assert "dummy_rule" in out["evaluation_schema"]
    status, problem = out["api_bad"]
    assert status == 422 and problem["errors"][0]["loc"] == ["query", "dummy_rule"]
    ui_status, ui_text, ui_good = out["ui"]
    assert ui_status == 422 and "dummy_rule must be less than or equal to 1" in ui_text
    assert ui_good == 200
    assert out["job_options"]["dummy_rule"] == 0.5


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_the_rule_book_s_defaults_are_what_the_api_documents(client: Any) -> None:
    params = {
        p["name"]: p
        for p in client.get("/openapi.json").json()["paths"]["/compare"]["get"]["parameters"]
    }
    for name, default in RULES.items():
        assert params[name]["schema"].get("default") == default, name
        assert params[name]["description"] == CompareRules.model_fields[name].description


def test_the_docs_list_the_rules_as_the_book_has_them() -> None:
    text = (REPO / "docs" / "verdict.md").read_text(encoding="utf-8")
    section = text.split("\n## The rules\n", 1)[1].split("\n## ", 1)[0]
    listed = dict(re.findall(r"^\| `(\w+)` \| (.+?) \|$", section, re.MULTILINE))
    assert listed == {
        name: "none" if default is None else f"`{default}`" for name, default in RULES.items()
    }
