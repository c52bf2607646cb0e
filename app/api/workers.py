"""``GET /workers``: the worker processes that are alive now."""

from __future__ import annotations

from datetime import timedelta

from fastapi import APIRouter
from sqlalchemy import select

from app.core.schemas import Page, WorkerPublic
from app.core.tables import Worker
from app.jobs.queue import db_now
from app.web.deps import SessionDep, SettingsDep

router = APIRouter(prefix="/workers", tags=["workers"])


@router.get("", response_model=Page[WorkerPublic])
def list_workers(session: SessionDep, settings: SettingsDep) -> Page[WorkerPublic]:
    """Workers whose last heartbeat is within one lease period (by the database's clock), and
    slots of ``forgetguard serve`` whose worker cannot start (``failing`` or ``stopped``, with
    the reason in ``error``), which serve keeps current while it runs."""
    cutoff = db_now(session) - timedelta(seconds=settings.lease_seconds)
    rows = session.execute(
        select(Worker).where(Worker.heartbeat_at >= cutoff).order_by(Worker.started_at)
    ).scalars()
    data = [
        WorkerPublic(
            id=w.id,
            host=w.host,
            pid=w.pid,
            device=w.device,
            kinds=list(w.kinds),
            backend=w.backend,
            dtype=w.dtype,
            engine_version=w.engine_version,
            processes=w.processes,
            status=w.status,
            current_job={"kind": w.current_job_kind or "", "id": w.current_job_id}
            if w.current_job_id
            else None,
            started_at=w.started_at,
            last_heartbeat=w.heartbeat_at,
            error=w.error,
        )
        for w in rows
    ]
    return Page(data=data, next_cursor=None, has_more=False)
