"""``/ui``: server-rendered pages over the same database the API reads.

Evaluations list (live progress), one evaluation, the before/after compare, one fine-tune job.
Errors raised while building a page (unknown id 404, incomparable runs 409, bad query 422)
become an HTML error page with the problem's title and detail and the same status code.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Coroutine
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, Response
from fastapi.routing import APIRoute
from fastapi.staticfiles import StaticFiles
from jinja2 import Environment, FileSystemLoader, StrictUndefined
from sqlalchemy import func, select
from sqlalchemy.orm import Session
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.comparison import service as comparison
from app.comparison.verdict import verdict_words
from app.core.errors import Problem
from app.core.formatting import number, percent
from app.core.pagination import newest_first, page
from app.core.tables import Evaluation, EvaluationItem, FinetuneEvent, FinetuneJob
from app.evaluations import service as evaluations
from app.finetune import service as finetune
from app.jobs.status import LIVE, JobStatus
from app.suites.kinds import KINDS
from app.suites.registry import Display
from app.suites.rules import CompareOptions, rules_from_query
from app.ui import views
from app.web.deps import SessionDep
from forgetguard.text import duration

HERE = Path(__file__).resolve().parent
STATIC_DIR = HERE / "static"
STATUSES = tuple(s.value for s in JobStatus)
REFRESH_SECONDS = 3
ITEMS_PER_PAGE = 100
FLIPS_SHOWN = 50
EVENTS_SHOWN = 200
CURVE_EVENTS = 20_000

# Defence in depth behind autoescape: no inline script or style can run on these pages.
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}


def _pvalue(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if value < 1e-4:
        return "< 0.0001"
    return f"{value:.4f}" if value < 0.01 else f"{value:.3f}"


def _when(value: datetime | None) -> str:
    return "—" if value is None else value.strftime("%Y-%m-%d %H:%M:%S UTC")


def _duration(start: datetime | None, end: datetime | None) -> str:
    if start is None or end is None:
        return "—"
    return duration((end - start).total_seconds())


def make_environment() -> Environment:
    """The template environment: package templates, autoescape always on, strict undefined."""
    env = Environment(
        loader=FileSystemLoader(HERE / "templates"),
        autoescape=True,  # every template, whatever its extension
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(pct=percent, num=number, pvalue=_pvalue, when=_when)
    env.globals.update(
        duration=_duration, seconds=duration, LIVE=LIVE, REFRESH_SECONDS=REFRESH_SECONDS
    )
    return env


ENV = make_environment()


def render(
    template: str, status_code: int = 200, headers: dict[str, str] | None = None, **context: Any
) -> HTMLResponse:
    """Render a template to an HTML response carrying the security headers."""
    html = ENV.get_template(template).render(**context)
    return HTMLResponse(
        html, status_code=status_code, headers={**SECURITY_HEADERS, **(headers or {})}
    )


def error_page(
    status: int, title: str, detail: str, headers: dict[str, str] | None = None
) -> HTMLResponse:
    """A friendly HTML page with the problem's title and detail, at the problem's status code."""
    return render(
        "error.html", status_code=status, headers=headers, status=status, title=title, detail=detail
    )


class HTMLErrorRoute(APIRoute):
    """A route whose problems (and validation / HTTP errors) render as HTML, not problem+json."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def html_errors(request: Request) -> Response:
            try:
                return await handler(request)
            except Problem as exc:
                return error_page(exc.status, exc.title, exc.detail, exc.headers)
            except RequestValidationError as exc:
                first: dict[str, Any] = next(iter(exc.errors()), {})
                where = ".".join(str(p) for p in first.get("loc", ()) if p not in ("query", "path"))
                return error_page(
                    422, "Invalid request", f"{where}: {first.get('msg', 'invalid value')}"
                )
            except StarletteHTTPException as exc:
                detail = exc.detail if isinstance(exc.detail, str) else "request refused"
                return error_page(
                    exc.status_code, "Request refused", detail, getattr(exc, "headers", None)
                )

        return html_errors


router = APIRouter(prefix="/ui", include_in_schema=False, route_class=HTMLErrorRoute)


def _status_filter(status: str | None) -> str | None:
    if status in (None, ""):
        return None
    if status not in STATUSES:
        raise Problem(
            422,
            "Invalid status filter",
            f"status must be one of {', '.join(STATUSES)}; got {status!r}",
        )
    return status


def _display(result: Any) -> Display | None:
    """How the dashboard shows a stored result: its kind's display hints (None: unknown kind)."""
    name = result.get("kind") if isinstance(result, dict) else None
    kind = KINDS.get(name) if isinstance(name, str) else None
    return kind.display if kind is not None else None


def _headline_results(results: dict[str, Any] | None) -> list[tuple[str, str]]:
    """Short "suite: score" pairs for list rows."""
    return [
        (name, display.short(res))
        for name, res in (results or {}).items()
        if (display := _display(res)) is not None
    ]


@router.get("", response_class=HTMLResponse)
@router.get("/", response_class=HTMLResponse)
@router.get("/evaluations", response_class=HTMLResponse)
def home(
    session: SessionDep,
    status: str | None = None,
    cursor: str | None = None,
    cached: str | None = None,
) -> HTMLResponse:
    """Evaluations, newest first, with live progress; recent fine-tune jobs; a compare picker.

    Cache hits (copies of an earlier run's results) are hidden unless ``?cached=show``: a CI
    gate re-evaluating its base on every push would otherwise bury the real runs.
    """
    status = _status_filter(status)
    show_cached = cached == "show"
    query = select(Evaluation).where(Evaluation.shard_of.is_(None))  # shards: in their evaluation
    if status:
        query = query.where(Evaluation.status == status)
    hidden = 0
    if not show_cached:
        hidden = session.execute(
            query.where(Evaluation.cached_from.is_not(None))
            .with_only_columns(func.count())
            .order_by(None)
        ).scalar_one()
        query = query.where(Evaluation.cached_from.is_(None))
    rows = list(session.execute(newest_first(query, Evaluation, cursor, 50)).scalars())
    rows, next_cursor = page(rows, 50)
    jobs = list(
        session.execute(newest_first(select(FinetuneJob), FinetuneJob, None, 20)).scalars()
    )[:20]
    live = any(r.status in LIVE for r in rows) or any(j.status in LIVE for j in jobs)
    return render(
        "evaluations.html",
        evaluations=[{"row": r, "scores": _headline_results(r.results)} for r in rows],
        jobs=jobs,
        status=status,
        statuses=STATUSES,
        next_cursor=next_cursor,
        live=live,
        succeeded=_recent_succeeded(session),
        show_cached=show_cached,
        hidden_cached=hidden,
    )


@router.get("/finetune-jobs", response_class=HTMLResponse)
def finetune_jobs_page(
    session: SessionDep, status: str | None = None, cursor: str | None = None
) -> HTMLResponse:
    """Every fine-tune job, newest first, with live progress and verdicts."""
    status = _status_filter(status)
    query = select(FinetuneJob)
    if status:
        query = query.where(FinetuneJob.status == status)
    jobs = list(session.execute(newest_first(query, FinetuneJob, cursor, 50)).scalars())
    jobs, next_cursor = page(jobs, 50)
    return render(
        "finetune_jobs.html",
        jobs=jobs,
        status=status,
        statuses=STATUSES,
        next_cursor=next_cursor,
        live=any(j.status in LIVE for j in jobs),
    )


def _recent_succeeded(session: Session, limit: int = 100) -> list[Evaluation]:
    query = select(Evaluation).where(
        Evaluation.status == JobStatus.SUCCEEDED, Evaluation.shard_of.is_(None)
    )
    return list(session.execute(newest_first(query, Evaluation, None, limit)).scalars())[:limit]


def _item_source(evaluation: Evaluation) -> str:
    # A cache hit stores no rows of its own: its items are the original run's.
    return evaluation.cached_from or evaluation.id


@router.get("/evaluations/{evaluation_id}", response_class=HTMLResponse)
def evaluation_page(
    evaluation_id: str,
    session: SessionDep,
    passed: str | None = None,
    suite: str | None = None,
    category: str | None = None,
    cursor: str | None = None,
) -> HTMLResponse:
    """Per-category accuracy bars, checklist results with severities, a filterable item table."""
    evaluation = evaluations.get(session=session, evaluation_id=evaluation_id)
    source = _item_source(evaluation)
    # The API's vocabulary (?passed=false), so a filtered page's URL reads like the API call.
    if passed not in (None, "", "true", "false"):
        raise Problem(422, "Invalid filter", f"passed must be 'true' or 'false'; got {passed!r}")
    if cursor and not cursor.isdigit():
        raise Problem(422, "Invalid cursor", "cursor is not one this page produced")

    kinds = {s["name"]: s["kind"] for s in evaluation.suites}
    displays = {name: KINDS[kind].display for name, kind in kinds.items() if kind in KINDS}
    results = evaluation.results or {}
    cards, charts = [], []
    for name, res in results.items():
        display = _display(res)
        if display is None:
            continue
        cards.append(
            {
                "suite": name,
                "kind": res["kind"],
                "title": display.title,
                "value": display.headline(res),
                "detail": display.detail(res),
            }
        )
        if display.category_chart and res.get("by_category"):
            charts.append(
                {
                    "suite": name,
                    "result": res,
                    "chart": views.accuracy_chart(
                        res["by_category"], f"Accuracy by category on {name}"
                    ),
                }
            )
    checklist_suites = [name for name, d in displays.items() if d.severity_table]
    checklist_rows: list[EvaluationItem] = []
    if checklist_suites:
        checklist_rows = views.sort_by_severity(
            session.execute(
                select(EvaluationItem)
                .where(
                    EvaluationItem.evaluation_id == source,
                    EvaluationItem.suite.in_(checklist_suites),
                )
                .order_by(EvaluationItem.suite, EvaluationItem.position)
            ).scalars()
        )

    I = EvaluationItem  # noqa: E741, N806
    # The same rows, order and cursor as GET /evaluations/{id}/items (suite order).
    item_page = evaluations.list_items(
        session=session,
        evaluation_id=evaluation.id,
        passed=None if not passed else passed == "true",
        suite=suite or None,
        category=category or None,
        limit=ITEMS_PER_PAGE,
        cursor=cursor or None,
    )
    items = item_page.data
    next_cursor = item_page.next_cursor
    categories = sorted(
        c
        for c in session.execute(
            select(I.category).where(I.evaluation_id == source).distinct()
        ).scalars()
        if c
    )

    return render(
        "evaluation.html",
        ev=evaluation,
        results=results,
        cards=cards,
        item_scores={name: d.item_score for name, d in displays.items() if d.item_score},
        charts=charts,
        checklist_rows=checklist_rows,
        items=items,
        kinds=kinds,
        categories=categories,
        filters={"passed": passed or "", "suite": suite or "", "category": category or ""},
        next_cursor=next_cursor,
        live=evaluation.status in LIVE,
        succeeded=[e for e in _recent_succeeded(session) if e.id != evaluation.id],
    )


@router.get("/compare", response_class=HTMLResponse)
def compare_page(
    request: Request,
    session: SessionDep,
    before: str | None = None,
    after: str | None = None,
    flips: str | None = None,
    suites: str | None = None,
) -> HTMLResponse:
    """Verdict banner, grouped before/after bars, statistics, changed answers, NLL drift."""
    # The rule book's rules, as /compare reads them (an empty form field keeps the default).
    rules = rules_from_query(request.query_params)
    if not before or not after:
        return render(
            "compare_pick.html",
            succeeded=_recent_succeeded(session),
            before=before or "",
            after=after or "",
            rules=rules,
        )
    options = CompareOptions.of(rules, suites=comparison.parse_suite_names(suites))
    # The same comparison elsewhere (all flips, the JSON) keeps every rule that was set.
    query = urlencode(
        {
            "before": before,
            "after": after,
            **rules.changed(),
            **({"suites": suites} if suites else {}),
        }
    )
    body = comparison.compare(session=session, before_id=before, after_id=after, options=options)
    before_ev = evaluations.get(session=session, evaluation_id=before)
    after_ev = evaluations.get(session=session, evaluation_id=after)
    rows = views.category_rows(body, before_ev.results, after_ev.results)
    order = [r["category"] for r in rows]
    forgotten = views.sort_flips(body["flips"]["forgotten"], order)
    learned = views.sort_flips(body["flips"]["learned"], order)
    show_all = flips == "all"
    drift = views.drift_rows(body.get("drift"))
    # Kinds whose comparison the template has no section for show theirs as cards.
    kind_cards = [
        card
        for kind in KINDS.values()
        if kind.display.compare_cards is not None
        for card in kind.display.compare_cards(body)
    ]
    for suite in drift:
        suite["texts_shown"] = _drift_texts(
            session, after_ev, suite["suite"], suite["largest_increases"]
        )
    return render(
        "compare.html",
        body=body,
        before_ev=before_ev,
        after_ev=after_ev,
        rows=rows,
        fell=[r for r in rows if r["fell"]],
        chart=views.compare_category_chart(rows, options.threshold) if rows else None,
        forgotten=forgotten if show_all else forgotten[:FLIPS_SHOWN],
        forgotten_total=len(forgotten),
        learned=learned if show_all else learned[:FLIPS_SHOWN],
        learned_total=len(learned),
        show_all=show_all,
        flips_shown=FLIPS_SHOWN,
        drift=drift,
        drift_chart=views.drift_chart(drift),
        kind_cards=kind_cards,
        options=options,
        query=query,
    )


def _drift_texts(
    session: Session, evaluation: Evaluation, suite: str, increases: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """The largest NLL increases with the text each was measured on."""
    ids = [t["item_id"] for t in increases]
    if not ids:
        return []
    found = session.execute(
        select(EvaluationItem.item_id, EvaluationItem.prompt).where(
            EvaluationItem.evaluation_id == _item_source(evaluation),
            EvaluationItem.suite == suite,
            EvaluationItem.item_id.in_(ids),
        )
    )
    texts = {row.item_id: row.prompt for row in found}
    return [{**t, "text": texts.get(t["item_id"], "")} for t in increases]


@router.get("/finetune-jobs/{job_id}", response_class=HTMLResponse)
def finetune_job_page(job_id: str, session: SessionDep) -> HTMLResponse:
    """Loss and learning-rate curves, warnings, events, and links to the before/after compare."""
    job = session.get(FinetuneJob, job_id)
    if job is None:
        raise Problem(404, "Fine-tune job not found", f"fine-tune job {job_id!r} does not exist")
    curve_data = session.execute(
        select(FinetuneEvent.data)
        .where(FinetuneEvent.job_id == job_id)
        .order_by(FinetuneEvent.id)
        .limit(CURVE_EVENTS)
    ).scalars()
    curves = views.training_curves(curve_data)
    events = list(
        session.execute(
            select(FinetuneEvent)
            .where(FinetuneEvent.job_id == job_id)
            .order_by(FinetuneEvent.id.desc())
            .limit(EVENTS_SHOWN)
        ).scalars()
    )
    notable = list(
        session.execute(
            select(FinetuneEvent)
            .where(FinetuneEvent.job_id == job_id, FinetuneEvent.level.in_(("warning", "error")))
            .order_by(FinetuneEvent.id)
        ).scalars()
    )
    request = job.request or {}
    warnings = [views.warning_text(w) for w in (job.warnings or [])]
    checkpoints = finetune.checkpoints(session=session, job_id=job_id)
    forgetting, learning = views.checkpoint_curves(checkpoints)
    return render(
        "finetune_job.html",
        checkpoints=checkpoints,
        forgetting_chart=views.forgetting_chart(forgetting) if checkpoints else None,
        learning_chart=views.learning_chart(learning) if checkpoints else None,
        shipped=(job.metrics or {}).get("shipped"),
        job=job,
        request_=request,
        method=request.get("method", "—"),
        # The values the job trains with (preset + overrides), not only what was overridden.
        hyperparameters=finetune.hyperparameters(job).model_dump(),
        options={k: request.get(k) for k in ("preset", "lora", "replay", "ewc") if request.get(k)},
        warnings=warnings,
        # A warning the job also logged as an event is listed once.
        notable=[e for e in notable if e.message not in warnings],
        events=events,
        loss_chart=views.loss_chart(curves),
        lr_chart=views.lr_chart(curves),
        has_curves=bool(curves["loss"] or curves["learning_rate"]),
        # A comparison stored before headlines existed gets its words from the same function.
        comparison=job.comparison and {**verdict_words(job.comparison), **job.comparison},
        live=job.status in LIVE,
    )


@router.get("/{path:path}", response_class=HTMLResponse)
def not_found(path: str) -> HTMLResponse:
    """Any other ``/ui/…`` path: an HTML 404 rather than the API's problem+json."""
    raise Problem(404, "Page not found", f"there is no dashboard page at /ui/{path}")


def install(app: FastAPI) -> None:
    """Mount the static files and the pages on ``app`` (static first: the 404 route catches all)."""
    app.mount("/ui/static", StaticFiles(directory=STATIC_DIR), name="ui-static")
    app.include_router(router)
