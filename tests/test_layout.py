"""The floor plan, checked on the source: who may import whom, and who may write a job's status.

- The import arrows point down: ``app/core`` < ``app/stats`` < ``app/suites`` <
  ``app/comparison`` < services < routes, UI and workers. ``app/core`` imports nothing above
  it (only the client package's job status names), ``app/stats`` only ``app/core``,
  ``app/suites`` only those two (and the client package's rule book); ``forgetguard/`` (the
  client package) imports nothing of ``app/`` or ``workers/``. ``KNOWN_UPWARD`` names the few
  arrows that still point up, each with why.
- No module under ``workers/`` or ``app/ui/`` imports ``app.api``: routes are a thin HTTP layer
  over the service functions that workers and the UI call directly.
- A job's status is written only in ``app/jobs``: outside it, no job status string is assigned
  to anything called ``status`` (an attribute, a variable, a dict key, a ``status=`` argument),
  and no job row's status is set at all (``row.status = …``, ``.values(status=…)``,
  ``Evaluation(status=…)``), whatever the value.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

from app.jobs.status import JobStatus

REPO = Path(__file__).resolve().parent.parent
STATUSES = frozenset(s.value for s in JobStatus)
JOB_TABLES = frozenset({"Evaluation", "FinetuneJob"})


def _modules(*roots: str) -> Iterator[tuple[str, Path]]:
    for root in roots:
        for path in sorted((REPO / root).rglob("*.py")):
            parts = path.relative_to(REPO).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            yield ".".join(parts), path


def _package(module: str, path: Path) -> str:
    return module if path.name == "__init__.py" else module.rpartition(".")[0]


def imported_modules(source: str, *, package: str) -> set[str]:
    """Every module ``source`` imports (relative imports resolved against ``package``)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*parent, base] if base else parent)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def _is_api(module: str) -> bool:
    return module == "app.api" or module.startswith("app.api.")


def _under(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


# What each layer may import of this repository (anything outside it is free): the arrows.
MAY_IMPORT: dict[str, tuple[str, ...]] = {
    # The job status names are the client package's (it imports nothing of ours).
    "app.core": ("app.core", "forgetguard.status"),
    "app.stats": ("app.core", "app.stats"),
    "app.suites": ("app.core", "app.stats", "app.suites", "forgetguard"),
    "forgetguard": ("forgetguard",),
}
# Comparison sits above suites and below the routes, the UI and the workers.
MAY_NOT_IMPORT: dict[str, tuple[str, ...]] = {
    "app.comparison": (
        "app.api",
        "app.ui",
        "app.web",
        "app.finetune",
        "workers",
        "forgetguard.gate",
        "forgetguard.cli",
    ),
}
OURS = ("app", "workers", "forgetguard")
# Arrows that still point up, (importer, imported): each is a known debt, not a licence.
KNOWN_UPWARD: dict[tuple[str, str], str] = {
    ("app.core.config", "app.web.auth"): "API keys are parsed where they are checked",
    ("app.core.schemas", "app.suites.kinds"): "the API's request schemas embed suite definitions",
    ("forgetguard.callback", "workers.evaluation.inprocess"): (
        "the callback's in-process path, imported only when used (the worker extra)"
    ),
}


def arrow_violations(module: str, imported: set[str]) -> list[str]:
    """The imports of ``module`` that point up the floor plan: ``imported`` for each."""
    found = set()
    for layer, allowed in MAY_IMPORT.items():
        if _under(module, layer):
            found |= {
                name
                for name in imported
                if any(_under(name, top) for top in OURS)
                and not any(_under(name, a) for a in allowed)
            }
    for layer, forbidden in MAY_NOT_IMPORT.items():
        if _under(module, layer):
            found |= {n for n in imported if any(_under(n, f) for f in forbidden)}
    # ``from a.b import c`` names both ``a.b`` and ``a.b.c``: report the module once.
    return sorted(n for n in found if n.rpartition(".")[0] not in found)


def _status_literal(node: ast.AST | None) -> str | None:
    """The job status string ``node`` may evaluate to, if it is (or chooses between) literals."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in STATUSES:
        return node.value
    if isinstance(node, ast.IfExp):
        return _status_literal(node.body) or _status_literal(node.orelse)
    if isinstance(node, ast.BoolOp):
        return next(filter(None, map(_status_literal, node.values)), None)
    return None


def _names_status(target: ast.AST) -> bool:
    if isinstance(target, ast.Attribute):
        return target.attr == "status"
    if isinstance(target, ast.Name):
        return target.id == "status"
    if isinstance(target, ast.Subscript):
        key = target.slice
        return isinstance(key, ast.Constant) and key.value == "status"
    return False


def _callee(call: ast.Call) -> str:
    func = call.func
    return func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")


def _sets_job_status(call: ast.Call) -> bool:
    """``Evaluation(status=…)``, or ``….values(status=…)`` on a job table or an unnamed one."""
    callee = _callee(call)
    if callee in JOB_TABLES:
        return True
    if callee != "values":
        return False
    for node in ast.walk(call.func):  # the chain ``update(X).where(…)`` that ``values`` ends
        if isinstance(node, ast.Call) and _callee(node) == "update" and node.args:
            table = node.args[0]
            return (
                not isinstance(table, ast.Name) or table.id in JOB_TABLES or table.id[0].islower()
            )
    return True


def status_writes(source: str) -> list[str]:
    """Places in ``source`` that write a job status: ``line: what`` for each."""
    found: list[str] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Assign | ast.AnnAssign | ast.AugAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                if not _names_status(target):
                    continue
                if (literal := _status_literal(node.value)) is not None:
                    found.append(f"{node.lineno}: {ast.unparse(target)} = {literal!r}")
                elif isinstance(target, ast.Attribute) and not (
                    isinstance(target.value, ast.Name) and target.value.id == "self"
                ):
                    found.append(f"{node.lineno}: {ast.unparse(target)} assigned")
        elif isinstance(node, ast.Call):
            callee = _callee(node)
            for keyword in node.keywords:
                if keyword.arg != "status":
                    continue
                if (literal := _status_literal(keyword.value)) is not None:
                    found.append(f"{node.lineno}: {callee}(status={literal!r})")
                elif _sets_job_status(node):
                    found.append(f"{node.lineno}: {callee}(status=…)")
        elif isinstance(node, ast.Dict):
            for key, value in zip(node.keys, node.values, strict=True):
                is_status = isinstance(key, ast.Constant) and key.value == "status"
                if is_status and (literal := _status_literal(value)) is not None:
                    found.append(f"{node.lineno}: {{'status': {literal!r}}}")
    return found


# -- the checks themselves can fail


def test_a_worker_importing_a_route_is_found() -> None:
    assert _is_api("app.api.evaluations")
    for source, package in [
        ("from app.api.evaluations import create", "workers.demo"),
        ("import app.api.compare as compare", "workers"),
        ("from app.api import evaluations", "app.ui"),
        ("from ..api import evaluations", "app.ui"),
        ("from ..api.compare import router", "app.ui"),
    ]:
        assert any(map(_is_api, imported_modules(source, package=package))), source
    for source, package in [
        ("from app.evaluations import service", "app.ui"),
        ("from ..evaluations import service", "app.ui"),
        ("from app.apiary import x", "workers"),
    ]:
        assert not any(map(_is_api, imported_modules(source, package=package))), source


@pytest.mark.parametrize(
    ("module", "source"),
    [
        ("app.core.database", "from app.suites.kinds import KINDS"),
        ("app.core", "import workers.main"),
        ("app.core.tables", "from app.jobs.status import JobStatus"),
        ("app.core.schemas", "from forgetguard.cli import app"),
        ("app.stats.kl", "from app.suites.registry import Row"),
        ("app.stats.statistics", "from ..comparison import verdict"),
        ("app.suites.kinds.qa", "from app.comparison.verdict import build"),
        ("app.suites.registry", "from app.evaluations import service"),
        ("app.suites.kinds", "from workers.engine.base import Backend"),
        ("app.suites.schema", "from app.ui import views"),
        ("forgetguard.client", "from app.suites.rules import CompareOptions"),
        ("forgetguard.gate", "import workers.evaluation.scoring"),
        ("app.comparison.verdict", "from app.api.compare import router"),
    ],
)
def test_an_import_against_the_arrows_is_found(module: str, source: str) -> None:
    package = module.rpartition(".")[0]
    assert arrow_violations(module, imported_modules(source, package=package)), source


@pytest.mark.parametrize(
    ("module", "source"),
    [
        ("app.core.database", "from app.core.config import Settings"),
        ("app.core.tables", "from forgetguard.status import JobStatus"),
        ("app.stats.kl", "import numpy as np"),
        ("app.suites.kinds.qa", "from app.stats import statistics"),
        ("app.suites.rules", "from forgetguard.rules import CompareRules"),
        ("app.suites.kinds.qa", "from ..registry import Row"),
        ("app.comparison.verdict", "from app.suites.kinds import KINDS"),
        ("app.evaluations.service", "from app.comparison import verdict"),
        ("workers.evaluation.scoring", "from app.suites.registry import Request"),
        ("app.ui.routes", "from app.comparison import service"),
    ],
)
def test_an_import_along_the_arrows_is_allowed(module: str, source: str) -> None:
    package = module.rpartition(".")[0]
    assert arrow_violations(module, imported_modules(source, package=package)) == [], source


@pytest.mark.parametrize(
    "snippet",
    [
        'row.status = "succeeded"',
        'row.status: str = "cancelled"',
        'status = "queued"',
        'payload["status"] = "failed"',
        'session.execute(update(Evaluation).values(status="failed"))',
        'update(Evaluation).values({"status": "cancelled", "error": None})',
        'Evaluation(id="e", status="queued")',
        'FinetuneJob(id="f", status=JobStatus.QUEUED)',
        "row.status = JobStatus.RUNNING",
        "update(Evaluation).values(status=new_status)",
        "update(model).where(model.id == i).values(status=JobStatus.FAILED)",
        'publish(status="running" if busy else "queued")',
        'row.status = other or "failed"',
    ],
)
def test_a_status_write_outside_app_jobs_is_found(snippet: str) -> None:
    assert status_writes(snippet), snippet


@pytest.mark.parametrize(
    "snippet",
    [
        'if row.status == "queued": pass',
        'select(Evaluation).where(Evaluation.status.in_(("queued", "running")))',
        'Health(status="ok")',
        "EvaluationPublic(status=row.status)",
        'update(Worker).values(status="idle")',
        "update(Worker).where(Worker.id == w).values(status=state)",
        "self.status = status",
        'summary = {"verdict": "failed", "state": "running"}',
        'message = "queued"',
    ],
)
def test_reading_or_other_statuses_are_not_status_writes(snippet: str) -> None:
    assert status_writes(snippet) == [], snippet


# -- the tree keeps to the floor plan


def test_no_worker_or_ui_module_imports_a_route() -> None:
    offenders = [
        f"{path.relative_to(REPO)} imports {module}"
        for name, path in _modules("workers", "app/ui")
        for module in sorted(
            imported_modules(path.read_text(encoding="utf-8"), package=_package(name, path))
        )
        if _is_api(module)
    ]
    assert offenders == []


def _upward_imports() -> dict[tuple[str, str], str]:
    found = {}
    for name, path in _modules(*OURS):
        imported = imported_modules(path.read_text(encoding="utf-8"), package=_package(name, path))
        for module in arrow_violations(name, imported):
            found[(name, module)] = str(path.relative_to(REPO))
    return found


def test_imports_keep_to_the_arrows() -> None:
    upward = _upward_imports()
    offenders = [
        f"{path} imports {module}"
        for (name, module), path in upward.items()
        if (name, module) not in KNOWN_UPWARD
    ]
    assert offenders == []
    # A debt paid off leaves the list too, so the list never licenses a new arrow.
    assert sorted(set(KNOWN_UPWARD) - set(upward)) == []


def test_job_statuses_are_written_only_in_app_jobs() -> None:
    checked = 0
    offenders = []
    for name, path in _modules("app", "workers"):
        if name == "app.jobs" or name.startswith("app.jobs."):
            continue
        checked += 1
        offenders += [
            f"{path.relative_to(REPO)}:{where}"
            for where in status_writes(path.read_text(encoding="utf-8"))
        ]
    assert checked > 30 and offenders == []


def test_app_jobs_itself_writes_statuses() -> None:
    """The check looks at the right code: the queue's own writes are what it would flag."""
    writes = status_writes((REPO / "app/jobs/queue.py").read_text(encoding="utf-8"))
    assert any("values(status=…)" in w for w in writes)
