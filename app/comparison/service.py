"""Compare two stored evaluations: load their items, refuse what is not comparable, build the
comparison. Routes, the UI and fine-tune workers all call ``compare``."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.comparison.verdict import (
    ADAPTER_NO_EFFECT,
    adapter_changed_nothing,
    build,
    comparability_problems,
    engine_differences,
)
from app.core.errors import Problem
from app.core.storable import Unstorable, check_value
from app.core.tables import Evaluation, EvaluationItem
from app.evaluations import service as evaluations
from app.jobs.status import JobStatus
from app.suites.kinds import KINDS
from app.suites.registry import Row
from app.suites.rules import CompareOptions


def _run(row: Evaluation, suites: tuple[str, ...] | None = None) -> dict[str, Any]:
    return {
        "id": row.id,
        "source": row.cached_from or row.id,
        "suites": row.suites if suites is None else [s for s in row.suites if s["name"] in suites],
        "prompt_format": row.prompt_format,
        "generation": row.generation,
        "engine": {"backend": row.backend, **(row.engine or {})},
    }


LIGHT = (
    EvaluationItem.suite,
    EvaluationItem.item_id,
    EvaluationItem.passed,
    EvaluationItem.score,
    EvaluationItem.category,
    EvaluationItem.severity,
)
HEAVY = (
    EvaluationItem.suite,
    EvaluationItem.item_id,
    EvaluationItem.response,
    EvaluationItem.details,
    EvaluationItem.prompt,
)
CHUNK = 500


def _source(evaluation: Evaluation) -> str:
    return evaluation.cached_from or evaluation.id


def load_pair(
    session: Session,
    before: Evaluation,
    after: Evaluation,
    suites: tuple[str, ...] | None = None,
) -> tuple[list[Row], list[Row]]:
    """Item rows of two finished evaluations (a cached one's are its source's).

    Two passes keep a 10,000-item comparison fast: outcomes of every item first, then texts and
    details only where the comparison shows them — items whose outcome changed, and every row
    of suites whose kind's comparison reads them all (``compare_needs_text``: checklist,
    perplexity). ``suites``: only these suites' rows.
    """
    kinds = {s["name"]: s["kind"] for s in before.suites}
    every_row = {
        name for name, kind in kinds.items() if kind in KINDS and KINDS[kind].compare_needs_text
    }
    light = {}
    for run in (before, after):
        query = select(*LIGHT).where(EvaluationItem.evaluation_id == _source(run))
        if suites is not None:
            query = query.where(EvaluationItem.suite.in_(suites))
        light[run.id] = (
            session.connection()
            .execute(query.order_by(EvaluationItem.suite, EvaluationItem.position))
            .all()
        )
    after_passed = {(suite, item_id): passed for suite, item_id, passed, *_ in light[after.id]}
    wanted: dict[str, set[str]] = {}
    for suite, item_id, passed, *_ in light[before.id]:
        if suite in every_row or passed != after_passed.get((suite, item_id)):
            wanted.setdefault(suite, set()).add(item_id)

    rows = []
    for run in (before, after):
        heavy: dict[tuple[str, str], Any] = {}
        for suite, ids in wanted.items():
            ordered = sorted(ids)
            for start in range(0, len(ordered), CHUNK):
                for h in session.connection().execute(
                    select(*HEAVY).where(
                        EvaluationItem.evaluation_id == _source(run),
                        EvaluationItem.suite == suite,
                        EvaluationItem.item_id.in_(ordered[start : start + CHUNK]),
                    )
                ):
                    heavy[(h.suite, h.item_id)] = h
        out = []
        for suite, item_id, passed, score, category, severity in light[run.id]:
            texts = heavy.get((suite, item_id))
            out.append(
                Row(
                    item_id,
                    passed,
                    score,
                    category,
                    severity,
                    texts[2] if texts else None,
                    texts[3] if texts else None,
                    suite,
                    kinds.get(suite, ""),
                    texts[4] if texts else "",
                )
            )
        rows.append(out)
    return rows[0], rows[1]


def parse_suite_names(raw: str | None) -> tuple[str, ...] | None:
    """``suites=a,b`` as a tuple of names (``name@version`` counts as ``name``); None: all."""
    if raw is None:
        return None
    names = tuple(dict.fromkeys(p.strip().split("@")[0] for p in raw.split(",") if p.strip()))
    if not names:
        raise Problem(422, "Invalid parameter", "suites must name at least one suite")
    return names


def _finished(session: Session, evaluation_id: str) -> Evaluation:
    row = evaluations.get(session=session, evaluation_id=evaluation_id)
    if row.status != JobStatus.SUCCEEDED:
        raise Problem(
            409,
            "Evaluation not finished",
            f"evaluation {row.id} is {row.status}; only succeeded evaluations can be compared",
            evaluation=row.id,
            evaluation_status=row.status,
        )
    return row


def compare(
    *, session: Session, before_id: str, after_id: str, options: CompareOptions
) -> dict[str, Any]:
    """Load, check comparability (409 naming what differs) and compare two evaluations.

    ``options.suites`` restricts the comparison to suites both runs share;
    ``options.noise_floor`` names a second run of the base whose churn is reported.
    """
    before = _finished(session, before_id)
    after = _finished(session, after_id)
    suites = options.suites
    problems = comparability_problems(_run(before), _run(after), suites)
    engines = engine_differences(_run(before), _run(after))
    if engines and not options.allow_backend_mismatch:
        problems += [
            f"{d} (different engines compute different numbers; pass "
            "allow_backend_mismatch=true to compare anyway)"
            for d in engines
        ]
    if problems:
        raise Problem(409, "Evaluations not comparable", "; ".join(problems), differences=problems)
    before_rows, after_rows = load_pair(session, before, after, suites)
    noise_rows = None
    if options.noise_floor is not None:
        rerun = _finished(session, options.noise_floor)
        # The rerun must ask the same questions the same way; only its batching may differ.
        rerun_problems = comparability_problems(_run(before, suites), _run(rerun, suites))
        if rerun.model_fingerprint != before.model_fingerprint:
            rerun_problems.append("the noise-floor run evaluated another model than the base")
        if _source(rerun) == _source(before):
            rerun_problems.append(
                "it shares the base's results (a cached copy); submit it with cache: false"
            )
        if rerun_problems:
            raise Problem(
                409,
                "Noise-floor run not comparable",
                f"noise_floor {rerun.id} is not a rerun of the base {before.id}: "
                + "; ".join(rerun_problems),
                differences=rerun_problems,
            )
        _, rerun_rows = load_pair(session, before, rerun, suites)
        noise_rows = (rerun.id, rerun_rows)
    body = build(
        _run(before, suites), _run(after, suites), before_rows, after_rows, options, noise_rows
    )
    warnings: list[str] = [
        f"compared across engines: {d}; part of any difference may be the engine's" for d in engines
    ]
    if _is_adapter_of(before, after) and adapter_changed_nothing(
        _outputs(session, before, suites), _outputs(session, after, suites)
    ):
        warnings.append(ADAPTER_NO_EFFECT)
    if warnings:
        body.setdefault("warnings", []).extend(warnings)
    try:
        check_value(body, "comparison")
    except Unstorable as exc:
        # Rows stored before workers refused non-finite numbers (a served model's NaN): no
        # verdict can rest on them, and JSON cannot carry them.
        raise Problem(
            409,
            "Evaluation holds non-finite numbers",
            f"comparing {before.id} with {after.id}: {exc} (a value stored before such values "
            "were refused); evaluate the model again",
        ) from None
    return body


def _is_adapter_of(base: Evaluation, candidate: Evaluation) -> bool:
    """The candidate is the base model plus an adapter, the base run has none."""
    return (
        candidate.adapter_path is not None
        and base.adapter_path is None
        and base.model_path == candidate.model_path
        and base.id != candidate.id
    )


def _outputs(
    session: Session, run: Evaluation, suites: tuple[str, ...] | None
) -> list[tuple[str, str, str | None, float | None]]:
    """Every item's ``(suite, item_id, response, score)`` (of ``suites`` only, when given)."""
    query = select(
        EvaluationItem.suite,
        EvaluationItem.item_id,
        EvaluationItem.response,
        EvaluationItem.score,
    ).where(EvaluationItem.evaluation_id == _source(run))
    if suites is not None:
        query = query.where(EvaluationItem.suite.in_(suites))
    return [(r[0], r[1], r[2], r[3]) for r in session.connection().execute(query)]
