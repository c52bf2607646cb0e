"""``/suites``: built-in and uploaded test suites, content-addressed versions."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Body, Query, Response
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.core.errors import Problem
from app.core.schemas import Page, SuitePublic, SuiteSummary
from app.core.tables import SQL_INT_MAX, Suite
from app.suites import versions
from app.suites.kinds import SuiteDefinition
from app.web.deps import SessionDep, SettingsDep
from app.web.idempotency import IdempotencyDep, answer

router = APIRouter(prefix="/suites", tags=["suites"])


def summary(row: Suite) -> SuiteSummary:
    return SuiteSummary(
        name=row.name,
        version=row.version,
        kind=row.kind,
        content_hash=row.content_hash,
        description=row.description,
        source=row.source,
        item_count=row.item_count,
        created_at=row.created_at,
    )


def detail(row: Suite) -> SuitePublic:
    """A suite version with its definition (the ``items`` list lives in ``definition``)."""
    return SuitePublic(**dict(summary(row)), definition=row.definition)


@router.get("", response_model=Page[SuiteSummary])
def list_suites(
    session: SessionDep,
    settings: SettingsDep,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
    cursor: Annotated[str | None, Query(max_length=200)] = None,
) -> Page[SuiteSummary]:
    """The latest version of every suite, by name."""
    latest = (
        select(Suite.name, func.max(Suite.version).label("version")).group_by(Suite.name).subquery()
    )
    query = select(Suite).join(
        latest, (Suite.name == latest.c.name) & (Suite.version == latest.c.version)
    )
    if cursor:
        query = query.where(Suite.name > cursor)
    rows = list(session.execute(query.order_by(Suite.name).limit(limit + 1)).scalars())
    has_more = len(rows) > limit
    rows = rows[:limit]
    return Page(
        data=[summary(r) for r in rows],
        next_cursor=rows[-1].name if has_more else None,
        has_more=has_more,
    )


@router.get("/{name}", response_model=SuitePublic)
def get_suite(
    name: str,
    session: SessionDep,
    version: Annotated[int | None, Query(ge=1, le=SQL_INT_MAX)] = None,
) -> SuitePublic:
    """One suite with its items (latest version unless ``?version=``)."""
    row = versions.resolve(session, f"{name}@{version}" if version else name)
    return detail(row)


@router.post(
    "",
    status_code=201,
    response_model=SuitePublic,
    responses={200: {"model": SuitePublic, "description": "same content: existing version"}},
)
def create_suite(
    suite: Annotated[SuiteDefinition, Body()],
    session: SessionDep,
    response: Response,
    idem: IdempotencyDep,
) -> SuitePublic:
    """Upload a suite: same content → the same version (200), new content → version + 1 (201)."""
    # 409 here (the name exists as a resource); inline suites get 422 from the same rule.
    versions.refuse_reserved(session, suite.name, status=409)
    outcome: dict[str, bool] = {}

    def create() -> str:
        row, outcome["created"] = versions.register(session, suite, reserved_status=409)
        session.flush()
        return str(row.id)

    suite_id, first = idem.create_once(session, create)
    if not first:
        return _replay(session, response, suite_id)
    row = session.get(Suite, int(suite_id))
    assert row is not None
    response.status_code = 201 if outcome["created"] else 200
    response.headers["Location"] = f"/suites/{row.name}?version={row.version}"
    return detail(row)


def _replay(session: Session, response: Response, suite_id: str) -> SuitePublic:
    """The suite an earlier request with the same Idempotency-Key stored (200)."""
    row = session.get(Suite, int(suite_id))
    if row is None:
        raise Problem(404, "Suite not found", f"suite {suite_id} no longer exists")
    answer(response, created=False, location=f"/suites/{row.name}?version={row.version}")
    return detail(row)
