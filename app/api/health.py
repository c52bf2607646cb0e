"""Liveness and readiness."""

from __future__ import annotations

from fastapi import APIRouter
from sqlalchemy import text

from app.core.errors import Problem
from app.core.schemas import Health
from app.web.deps import SessionDep

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Health)
def healthz(session: SessionDep) -> Health:
    """``{"status": "ok", "database": "ok"}`` when the database answers."""
    try:
        session.execute(text("SELECT 1"))
    except Exception:
        raise Problem(503, "Database unavailable", "the database did not answer") from None
    return Health(status="ok", database="ok")
