"""Keyset pagination, newest first: ``?limit=`` and an opaque ``?cursor=``."""

from __future__ import annotations

import base64
from collections.abc import Callable
from datetime import datetime
from typing import Annotated, Any, TypeVar

from fastapi import Query
from pydantic import AfterValidator
from sqlalchemy import Select, and_, or_
from sqlalchemy.orm import Session

from app.core.errors import Problem
from app.core.schemas import Page
from app.core.storable import text_problem
from app.core.tables import SQL_INT_MAX

T = TypeVar("T")
R = TypeVar("R")

# Query parameters shared by the newest-first listings.
Limit = Annotated[int, Query(ge=1, le=500)]
Cursor = Annotated[str | None, Query(max_length=200)]


def _fits_the_schema(value: str | None) -> str | None:
    # The keys these cursors continue after are Integer columns (or, for items, an ordinal
    # below 2^31 by construction): 32-bit on PostgreSQL. A larger cursor is not one this API
    # returned, and PostgreSQL would refuse to compare it (integer out of range).
    if value is not None and int(value) > SQL_INT_MAX:
        raise ValueError(f"cursor is not one this API returned (above {SQL_INT_MAX})")
    return value


# The cursor of an oldest-first listing keyed by an integer (items, events): decimal digits,
# at most SQL_INT_MAX (10 digits; leading zeros allowed up to the length bound).
SeqCursor = Annotated[
    str | None, Query(max_length=19, pattern="^[0-9]+$"), AfterValidator(_fits_the_schema)
]
StatusFilter = Annotated[str | None, Query(pattern="^(queued|running|succeeded|failed|cancelled)$")]


def encode_cursor(created_at: datetime, row_id: str) -> str:
    raw = f"{created_at.isoformat()}|{row_id}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        stamp, row_id = base64.urlsafe_b64decode(padded).decode().split("|", 1)
        if text_problem(row_id) or len(row_id) > 100:
            raise ValueError(row_id)
        return datetime.fromisoformat(stamp), row_id
    except (ValueError, UnicodeDecodeError):
        raise Problem(422, "Invalid cursor", "cursor is not one this API returned") from None


def newest_first(query: Select[Any], model: Any, cursor: str | None, limit: int) -> Select[Any]:
    """Order by (created_at, id) descending, continue after ``cursor``, fetch one extra row."""
    if cursor:
        stamp, row_id = decode_cursor(cursor)
        query = query.where(
            or_(model.created_at < stamp, and_(model.created_at == stamp, model.id < row_id))
        )
    return query.order_by(model.created_at.desc(), model.id.desc()).limit(limit + 1)


def page(rows: list[Any], limit: int) -> tuple[list[Any], str | None]:
    """Trim the extra row and say where the next page starts."""
    if len(rows) > limit:
        rows = rows[:limit]
        return rows, encode_cursor(rows[-1].created_at, rows[-1].id)
    return rows, None


def newest_page(
    session: Session,
    query: Select[Any],
    model: Any,
    cursor: str | None,
    limit: int,
    public: Callable[[Any], T],
) -> Page[T]:
    """One newest-first page of ``query``'s ``model`` rows, each as ``public(row)``."""
    rows = list(session.execute(newest_first(query, model, cursor, limit)).scalars())
    rows, next_cursor = page(rows, limit)
    return Page(
        data=[public(r) for r in rows], next_cursor=next_cursor, has_more=next_cursor is not None
    )


def ascending_after(
    query: Select[Any], key: Any, cursor: str | None, limit: int, *then: Any
) -> Select[Any]:
    """Order by the integer ``key`` ascending (ties by ``then``), continue after ``cursor`` (the
    last page's last ``key``), fetch one extra row; :func:`trim` then says whether there is more."""
    if cursor:
        query = query.where(key > int(cursor))
    return query.order_by(key, *then).limit(limit + 1)


def trim(rows: list[R], limit: int) -> tuple[list[R], bool]:
    """Drop the extra row; whether there was one."""
    return rows[:limit], len(rows) > limit
