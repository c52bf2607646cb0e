"""``GET /metrics``: Prometheus exposition, computed from the database at scrape time."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, Response

from app.web.deps import SessionDep, SettingsDep
from app.web.metrics import render

router = APIRouter(tags=["metrics"])


@router.get("/metrics", response_class=Response)
def metrics(
    session: SessionDep, settings: SettingsDep, accept: Annotated[str | None, Header()] = None
) -> Response:
    """Queue depth, job durations, throughput, live workers, failures by reason.

    Prometheus text format (``text/plain; version=0.0.4``), or OpenMetrics when the scraper
    asks for it in ``Accept``.
    """
    body, content_type = render(session, lease_seconds=settings.lease_seconds, accept=accept)
    return Response(content=body, media_type=content_type)
