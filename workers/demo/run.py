"""``forgetguard demo``: the lesson's mitigations, measured on a real model.

Runs in-process on the same code paths as the service: a throwaway SQLite database, fine-tune
jobs submitted exactly as ``POST /finetune-jobs`` would (``app.finetune.service.create``), and a
worker (``workers.main.Worker``) that runs them. The first job's "before" evaluation is the base
row; every later job reuses it from the evaluation cache.

Rows: the base model; full fine-tuning with the lesson's ``risky`` preset; full fine-tuning
aggressive enough to forget; the same with replay; the same with EWC; LoRA with the ``safe``
preset; and the aggressive fine-tune interpolated halfway back to the base (WiSE-FT,
α = 0.5). Columns: general-qa accuracy per category, checklist score, NLL/token on general
text (the drift signal that moves before accuracy does), NLL/token on held-out drug answers
(what the fine-tune learned: records set aside by ``evaluation.domain.holdout``, never
trained on), and KL(base ‖ candidate) per token on general text (drift that needs no labels).

The aggressive fine-tune is also evaluated at evenly spaced checkpoints during training
(``evaluation.checkpoints``): its forgetting curve beside its learning curve
(:func:`format_curve`).
"""

from __future__ import annotations

import json
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from app.core.config import Settings
from app.core.database import make_engine, session_factory, upgrade
from app.core.tables import Evaluation, FinetuneJob
from app.jobs.status import JobStatus

DATA_DIR = Path(__file__).resolve().parents[2] / "app"
DRUG_QA = DATA_DIR / "datasets" / "drug-qa.jsonl"
SUITES_DIR = DATA_DIR / "suites" / "data"


@dataclass(frozen=True)
class DemoSizes:
    """How big the demo is: sized to finish in under 25 minutes on 2 CPU cores."""

    drug_examples: int = 20  # trained on
    domain_holdout: int = 6  # more drug records, held out: the domain column
    qa_per_category: int = 9  # x 7 categories of general-qa
    texts: int = 16  # general-text passages for NLL/token
    max_new_tokens: int = 32
    aggressive_lr: float = 1e-3
    aggressive_batch_size: int = 4
    # Replay and the Fisher use general-qa items outside the evaluated subset, answered by the
    # base model itself (its own behaviour is what should be kept, not terse suite answers).
    replay_fraction: float = 0.5
    ewc_importance: float = 1e6
    fisher_samples: int = 32
    general_answer_tokens: int = 32
    # Checkpoint evaluations of the aggressive fine-tune, evenly spaced (the last step too).
    curve_checkpoints: int = 5


QUICK = DemoSizes(
    drug_examples=6,
    domain_holdout=2,
    qa_per_category=2,
    texts=3,
    max_new_tokens=8,
    fisher_samples=4,
    curve_checkpoints=2,
)
INTERPOLATION_ALPHA = 0.5


@dataclass
class DemoRow:
    name: str
    job_id: str | None
    status: str
    qa: dict[str, Any] | None
    checklist: float | None
    nll_per_token: float | None
    verdict: str | None = None
    reasons: list[str] = field(default_factory=list)
    train_seconds: float | None = None
    error: str | None = None
    domain_nll: float | None = None  # NLL/token on the held-out drug answers
    kl_per_token: float | None = None  # KL(base ‖ this run) per token on general text
    # Checkpoint evaluations (GET /finetune-jobs/{id}/checkpoints rows), when the run had them.
    curve: list[dict[str, Any]] = field(default_factory=list)


def _load_json(name: str) -> dict[str, Any]:
    return dict(json.loads((SUITES_DIR / f"{name}.json").read_text(encoding="utf-8")))


def demo_suites(sizes: DemoSizes) -> list[Any]:
    """A general-qa subset across every category, the full checklist, a general-text subset."""
    qa = _load_json("general-qa")
    per_category: dict[str, int] = {}
    items = []
    for item in qa["items"]:
        category = item.get("category", "general")
        if per_category.get(category, 0) < sizes.qa_per_category:
            per_category[category] = per_category.get(category, 0) + 1
            items.append(item)
    text = _load_json("general-text")
    return [
        {
            "name": "demo-general-qa",
            "kind": "qa",
            "prompt_template": qa["prompt_template"],
            "description": f"general-qa, first {sizes.qa_per_category} items of each category",
            "items": items,
        },
        "forgetting-checklist",
        {
            "name": "demo-general-text",
            "kind": "perplexity",
            "description": f"general-text, first {sizes.texts} passages",
            "items": text["items"][: sizes.texts],
        },
    ]


def drug_examples(n: int) -> list[dict[str, Any]]:
    """The first ``n`` records of the built-in drug Q&A dataset."""
    lines = DRUG_QA.read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()][:n]


def demo_runs(sizes: DemoSizes) -> list[tuple[str, dict[str, Any]]]:
    """(row name, request fields) for every fine-tune of the table."""
    aggressive = {
        "learning_rate": sizes.aggressive_lr,
        "per_device_train_batch_size": sizes.aggressive_batch_size,
    }
    lr = f"{sizes.aggressive_lr:g}"
    return [
        ("full FT, lesson's risky preset", {"method": "full", "preset": "risky"}),
        (
            f"full FT, lr {lr}",
            {
                "method": "full",
                "preset": "risky",
                "hyperparameters": aggressive,
                "evaluation": {"checkpoints": sizes.curve_checkpoints},
            },
        ),
        (
            f"full FT, lr {lr} + replay",
            {
                "method": "full",
                "preset": "risky",
                "hyperparameters": aggressive,
                "replay": {
                    "source": "general-qa",
                    "fraction": sizes.replay_fraction,
                    "completions": "base_model",
                    "max_new_tokens": sizes.general_answer_tokens,
                },
            },
        ),
        (
            f"full FT, lr {lr} + EWC",
            {
                "method": "full",
                "preset": "risky",
                "hyperparameters": aggressive,
                "ewc": {
                    "source": "general-qa",
                    "importance": sizes.ewc_importance,
                    "fisher_samples": sizes.fisher_samples,
                    "completions": "base_model",
                    "max_new_tokens": sizes.general_answer_tokens,
                },
            },
        ),
        ("LoRA, safe preset", {"method": "lora", "preset": "safe"}),
        (
            f"full FT, lr {lr}, interpolated α {INTERPOLATION_ALPHA:g}",
            {
                "method": "full",
                "preset": "risky",
                "hyperparameters": aggressive,
                "interpolation": {"alphas": [INTERPOLATION_ALPHA]},
            },
        ),
    ]


def _row(name: str, job: FinetuneJob | None, results: dict[str, Any] | None) -> DemoRow:
    results = results or {}
    qa = results.get("demo-general-qa")
    checklist = results.get("forgetting-checklist")
    text = results.get("demo-general-text")
    comparison = (job.comparison if job is not None else None) or {}
    metrics = (job.metrics if job is not None else None) or {}
    domain = comparison.get("domain") or {}
    drift = comparison.get("drift") or {}
    return DemoRow(
        name=name,
        job_id=job.id if job is not None else None,
        status=job.status if job is not None else JobStatus.SUCCEEDED,
        qa=qa,
        checklist=checklist.get("score") if checklist else None,
        nll_per_token=text.get("nll_per_token") if text else None,
        verdict=comparison.get("verdict"),
        reasons=list(comparison.get("reasons") or []),
        train_seconds=metrics.get("train_seconds"),
        error=job.error if job is not None else None,
        domain_nll=(domain.get("after") or {}).get("nll_per_token"),
        kl_per_token=drift.get("kl_per_token"),
    )


def _sweep_row(name: str, job: FinetuneJob) -> DemoRow | None:
    """The interpolated row from the job's sweep when the gate made it ship another α.

    The sweep evaluated α exactly as a checkpoint is evaluated (general accuracy, checklist,
    NLL, KL to base, held-out NLL, verdict); what it does not keep (accuracy per category)
    stays empty.
    """
    sweep = (job.metrics or {}).get("interpolation") or {}
    if sweep.get("chosen_alpha") == INTERPOLATION_ALPHA:
        return None  # shipped: its after-evaluation and comparison are the row
    figures = next(
        (r for r in sweep.get("results", []) if r.get("alpha") == INTERPOLATION_ALPHA), None
    )
    if figures is None:
        return None
    general = figures.get("general") or {}
    nll = general.get("nll_per_token") or {}
    verdict = figures.get("verdict") or {}
    return DemoRow(
        name=name,
        job_id=job.id,
        status=job.status,
        qa={"overall_accuracy": general.get("accuracy"), "by_category": {}},
        checklist=general.get("checklist_score"),
        nll_per_token=nll.get("demo-general-text"),
        verdict=verdict.get("verdict"),
        reasons=list(verdict.get("reasons") or []),
        domain_nll=((figures.get("domain") or {}).get("after") or {}).get("nll_per_token"),
        kl_per_token=general.get("kl_per_token"),
    )


def run_demo(
    model_path: Path,
    *,
    workdir: Path,
    device: str = "auto",
    sizes: DemoSizes = DemoSizes(),
    echo: Callable[[str], None] = print,
    keep: bool = False,
    runs: list[tuple[str, dict[str, Any]]] | None = None,
) -> list[DemoRow]:
    """Run every job of the demo (or ``runs``) in-process; return the rows, base first."""
    from app.finetune import service as finetune_jobs
    from app.finetune.schemas import FinetuneJobCreate
    from app.suites import versions
    from workers.main import Worker

    workdir.mkdir(parents=True, exist_ok=True)
    run_dir = Path(tempfile.mkdtemp(prefix="run-", dir=workdir))
    model_dir = model_path.resolve()
    url = f"sqlite:///{run_dir / 'demo.db'}"
    upgrade(url)
    settings = Settings(
        database_url=url,
        model_roots=[model_dir.parent],
        data_roots=[run_dir / "data"],
        artifacts_dir=run_dir / "artifacts",
        cache_dir=workdir / "cache",
        lease_seconds=120,
        heartbeat_seconds=10,
        poll_seconds=0.2,
    )
    engine = make_engine(url)
    sessions = session_factory(engine)
    records = sizes.drug_examples + sizes.domain_holdout
    common: dict[str, Any] = {
        # As given: a relative path stays relative in what the dashboard and API show.
        "base_model": {"path": str(model_path)},
        "dataset": {"examples": drug_examples(records)},
        "evaluation": {
            "suites": demo_suites(sizes),
            "generation": {"max_new_tokens": sizes.max_new_tokens},
            # The same seeded split for every run: each trains on ``drug_examples`` records.
            "domain": (
                {"holdout": sizes.domain_holdout / records, "seed": 42}
                if sizes.domain_holdout
                else False
            ),
        },
    }
    runs = runs if runs is not None else demo_runs(sizes)
    job_ids: list[str] = []
    with sessions() as session:
        versions.sync_builtins(session)
        session.commit()
        for name, fields in runs:
            body = {**common, "label": name, **fields}
            body["evaluation"] = {**common["evaluation"], **fields.get("evaluation", {})}
            body["hyperparameters"] = {
                "checkpoint_every_steps": 100_000,
                **fields.get("hyperparameters", {}),
            }
            job = finetune_jobs.create(
                session=session, settings=settings, body=FinetuneJobCreate.model_validate(body)
            )
            session.commit()
            job_ids.append(job.id)
            time.sleep(0.002)  # distinct created_at: the worker takes jobs in submission order

    worker = Worker(settings, device=device, once=True)
    thread = threading.Thread(target=worker.run, name="demo-worker", daemon=True)
    started = time.monotonic()
    thread.start()
    last = ""
    try:
        while thread.is_alive():
            thread.join(timeout=5.0)
            with sessions() as session:
                rows = [session.get(FinetuneJob, j) for j in job_ids]
            running = next(
                (
                    (i, r)
                    for i, r in enumerate(rows)
                    if r is not None and r.status == JobStatus.RUNNING
                ),
                None,
            )
            if running is not None:
                index, row = running
                progress = row.progress
                line = f"[{index + 1}/{len(runs)}] {runs[index][0]}: {progress.get('stage')}"
                if progress.get("total"):
                    line += f" {progress.get('done')}/{progress.get('total')}"
                if line != last:
                    echo(f"{time.monotonic() - started:7.0f}s  {line}")
                    last = line
    except KeyboardInterrupt:
        worker.stop.set()
        thread.join()
        raise

    with sessions() as session:
        jobs = [session.get(FinetuneJob, j) for j in job_ids]
        first = jobs[0]
        base_results = None
        if first is not None and first.before_evaluation_id:
            before = session.get(Evaluation, first.before_evaluation_id)
            base_results = before.results if before is not None else None
        table = [_row("base", None, base_results)]
        base_domain = ((first.comparison or {}).get("domain") or {}) if first else {}
        table[0].domain_nll = (base_domain.get("before") or {}).get("nll_per_token")
        for (name, _), finished in zip(runs, jobs, strict=True):
            after = (
                session.get(Evaluation, finished.after_evaluation_id)
                if finished and finished.after_evaluation_id
                else None
            )
            swept = _sweep_row(name, finished) if finished is not None else None
            shown = swept or _row(name, finished, after.results if after is not None else None)
            if finished is not None:
                shown.curve = [
                    c.model_dump(exclude={"created_at"})
                    for c in finetune_jobs.checkpoints(session=session, job_id=finished.id)
                ]
            table.append(shown)
    engine.dispose()
    echo(f"{time.monotonic() - started:7.0f}s  done")
    if keep:
        echo(f"kept the run's database: {url}")
    else:
        shutil.rmtree(run_dir, ignore_errors=True)
    return table


def _fmt(value: float | None, digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def format_table(rows: list[DemoRow]) -> str:
    """A Markdown table: accuracy per category, checklist, NLL/token, domain NLL, KL, verdict."""
    categories: list[str] = []
    for row in rows:
        for category in (row.qa or {}).get("by_category", {}):
            if category not in categories:
                categories.append(category)
    header = [
        "run",
        "general-qa",
        *categories,
        "checklist",
        "NLL/token",
        "drug NLL/token (held out)",
        "KL to base",
        "verdict",
    ]
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join(["---"] + ["---:"] * (len(header) - 2) + [":---"]) + "|",
    ]
    for row in rows:
        by_category = (row.qa or {}).get("by_category", {})
        cells = [
            row.name,
            _fmt((row.qa or {}).get("overall_accuracy")),
            *[_fmt(by_category.get(c, {}).get("accuracy")) for c in categories],
            _fmt(row.checklist),
            _fmt(row.nll_per_token),
            _fmt(row.domain_nll),
            _fmt(row.kl_per_token, 3),
            row.verdict or ("(base)" if row.job_id is None else row.status),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_curve(row: DemoRow) -> str:
    """A Markdown table of one run's checkpoint evaluations: forgetting beside learning."""
    lines = [
        "| step | general-qa | checklist | NLL/token | drug NLL/token (held out) | "
        "KL to base | drug KL to base | verdict | outcome |",
        "|---:|---:|---:|---:|---:|---:|---:|:---|:---|",
    ]
    for point in row.curve:
        general = point.get("general") or {}
        domain = point.get("domain") or {}
        verdict = point.get("verdict") or {}
        nll = general.get("nll_per_token") or {}
        cells = [
            str(point["step"]) + (" (base)" if point["step"] == 0 else ""),
            _fmt(general.get("accuracy")),
            _fmt(general.get("checklist_score")),
            _fmt(next(iter(nll.values()), None)),
            _fmt((domain.get("after") or {}).get("nll_per_token")),
            _fmt(general.get("kl_per_token"), 3),
            _fmt(domain.get("kl_per_token"), 3),
            str(verdict.get("verdict") or "–"),
            str(verdict.get("outcome") or "–"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
