"""Liveness and readiness."""

from __future__ import annotations

from fastapi import APIRouter
from sqlalchemy import text

from app.api.deps import SessionDep
from app.errors import Problem
from app.schemas import Health

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Health)
def healthz(session: SessionDep) -> Health:
    """``{"status": "ok", "database": "ok"}`` when the database answers."""
    try:
        session.execute(text("SELECT 1"))
    except Exception:
        raise Problem(503, "Database unavailable", "the database did not answer") from None
    return Health(status="ok", database="ok")
