"""Suite versions in the database: register (content-addressed), resolve, sync built-ins."""

from __future__ import annotations

import difflib
import hashlib
import json
from pathlib import Path
from typing import Any

from pydantic import TypeAdapter
from sqlalchemy import false, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.core.errors import Problem
from app.core.tables import SQL_INT_MAX, Suite
from app.suites.benchmarks.sources import BENCHMARKS
from app.suites.kinds import SuiteDefinition
from forgetguard.suites import GROUPS

DATA_DIR = Path(__file__).resolve().parent / "data"
SUITE_ADAPTER: TypeAdapter[Any] = TypeAdapter(SuiteDefinition)


def content_hash(definition: dict[str, Any]) -> str:
    """sha256 of the canonical JSON of everything that changes scores (not the description)."""
    content = {k: v for k, v in definition.items() if k not in ("name", "description")}
    canonical = json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return "sha256:" + hashlib.sha256(canonical.encode()).hexdigest()


def builtin_names() -> frozenset[str]:
    """Names of the suites shipped with forgetguard; no client suite may take one."""
    return frozenset(str(raw["name"]) for raw in builtin_definitions())


# Where suites that forgetguard makes itself come from: shipped files, pulled benchmarks, and
# suites derived from a reference's options (``app.suites.references``).
OWN_SOURCES = ("builtin", "benchmark", "derived")


def reserved_names() -> frozenset[str]:
    """Names no client suite may take: the built-ins, the pullable benchmarks, the groups."""
    return builtin_names() | frozenset(BENCHMARKS) | frozenset(GROUPS)


def refuse_reserved(session: Session, name: str, *, status: int = 422) -> None:
    """Refuse a client suite named like one of forgetguard's, which would become its newest
    version.

    Every later reference to the name, the default suites and the gate would then run the
    client's suite. The one rule for every way a suite arrives (``POST /suites``, inline in an
    evaluation or a fine-tune job's evaluation); ``register`` applies it itself.
    """
    reserved = name in reserved_names() or (
        session.execute(
            select(Suite.id).where(Suite.name == name, Suite.source.in_(OWN_SOURCES)).limit(1)
        ).first()
        is not None
    )
    if reserved:
        raise Problem(
            status,
            "Reserved suite name",
            f"{name!r} is the name of one of forgetguard's suites, benchmarks or groups; "
            "give your suite another name",
            errors=[{"loc": ["body", "name"], "msg": f"{name!r} is reserved"}],
        )


def register(
    session: Session, suite: Any, *, source: str = "uploaded", reserved_status: int = 422
) -> tuple[Suite, bool]:
    """Store ``suite`` (a validated suite model); same content returns the existing version.

    A client suite (any ``source`` but ``"builtin"``) named like a built-in is refused with
    ``reserved_status``. Returns ``(row, created)``. Commits nothing: the caller owns the
    transaction.
    """
    if source not in OWN_SOURCES:
        refuse_reserved(session, suite.name, status=reserved_status)
    definition = suite.model_dump(mode="json")
    digest = content_hash(definition)
    for _ in range(3):  # a concurrent upload of the same name may take our version number
        existing = session.execute(
            select(Suite)
            .where(Suite.name == suite.name, Suite.content_hash == digest)
            .order_by(Suite.version.desc())
            .limit(1)
        ).scalar_one_or_none()
        if existing is not None:
            return existing, False
        latest = session.execute(
            select(func.max(Suite.version)).where(Suite.name == suite.name)
        ).scalar_one()
        row = Suite(
            name=suite.name,
            version=(latest or 0) + 1,
            kind=suite.kind,
            content_hash=digest,
            description=suite.description,
            source=source,
            item_count=len(suite.items),
            definition=definition,
        )
        try:
            with session.begin_nested():
                session.add(row)
            return row, True
        except IntegrityError:
            continue
    raise Problem(409, "Conflict", f"suite {suite.name!r} is being updated concurrently; retry")


def resolve(session: Session, ref: str) -> Suite:
    """``"name"`` (latest version) or ``"name@version"`` → the suite row, or a 404 problem."""
    name, _, version = ref.partition("@")
    query = select(Suite).where(Suite.name == name)
    if version:
        if not version.isdigit():
            raise Problem(
                422, "Invalid suite reference", f"suite version in {ref!r} must be an integer"
            )
        # A version beyond the column's range cannot exist (and PostgreSQL would refuse it).
        number = int(version)
        query = query.where(Suite.version == number if number <= SQL_INT_MAX else false())
    row = session.execute(query.order_by(Suite.version.desc()).limit(1)).scalar_one_or_none()
    if row is None:
        what = f"suite {name!r} version {version}" if version else f"suite {name!r}"
        known = session.execute(select(Suite.name).distinct()).scalars().all()
        close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
        hint = (
            f"did you mean {close[0]!r}?"
            if close and close[0] != name
            else "GET /suites lists them"
        )
        raise Problem(404, "Suite not found", f"{what} does not exist; {hint}")
    return row


def builtin_definitions() -> list[dict[str, Any]]:
    """The suites shipped in ``app/suites/data``, as raw JSON."""
    return [json.loads(path.read_text()) for path in sorted(DATA_DIR.glob("*.json"))]


def sync_builtins(session: Session) -> None:
    """Register every built-in suite (idempotent: unchanged files add nothing)."""
    for raw in builtin_definitions():
        register(session, SUITE_ADAPTER.validate_python(raw), source="builtin")
