"""The domain evaluation: what the job learned, on records it never trained on.

``evaluation.domain.holdout`` sets aside a seeded fraction of the job's dataset before any
training data is prepared; the held-out completions are scored (NLL per token, as training
scores them) on the base before training and on the result after. ``evaluation.domain.suites``
are the user's own domain suites, run as the job's ``domain before`` / ``domain after``
evaluations. Everything is kept in the job directory or the database, so a resumed attempt
redoes none of it.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from app.comparison import domain as verdicts
from app.comparison import service as comparison
from app.comparison.kl import TOPK
from app.comparison.verdict import CompareOptions
from app.finetune.schemas import DomainEvaluationSpec, holdout_split, load_path_records
from workers.engine.loading import ModelCache
from workers.finetune.artifacts import DOMAIN_TRAIN, HELD_OUT
from workers.finetune.data import encode_records, pad_id, read_records, write_jsonl
from workers.finetune.domain import CompletionScore, completion_nll
from workers.finetune.stages.evaluation import evaluate, job_settings

if TYPE_CHECKING:
    from workers.finetune.job import FinetuneRun


# Top-k next tokens kept per held-out completion position, for KL to base on the domain
# prompts; only the first records', so a large held-out set stays a small file.
KL_TOPK: dict[str, Any] = {"topk": TOPK, "topk_examples": 256}


def held_out_summary(scores: list[CompletionScore]) -> dict[str, Any]:
    """:func:`app.comparison.domain.nll_summary` of :func:`completion_nll`'s scores."""
    return verdicts.nll_summary([(s.nll_sum, s.tokens) for s in scores], [s.topk for s in scores])


def domain_spec(run: FinetuneRun) -> DomainEvaluationSpec | None:
    spec = run.request.evaluation
    return spec.domain if spec is not None and spec.domain else None


def domain_records(run: FinetuneRun) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """``(train, held_out)``: the job's dataset split once (snapshotted), never trained on."""
    request = run.request
    spec = domain_spec(run)
    if spec is None or spec.holdout is None:
        records = (
            list(request.dataset.examples)
            if request.dataset.examples is not None
            else load_path_records(run.settings, str(request.dataset.path))
        )
        return records, []
    train_path, held_path = run.job_dir / DOMAIN_TRAIN, run.job_dir / HELD_OUT
    if train_path.is_file() and held_path.is_file():
        return read_records(train_path), read_records(held_path)
    records = (
        list(request.dataset.examples)
        if request.dataset.examples is not None
        else load_path_records(run.settings, str(request.dataset.path))
    )
    train, held = holdout_split(records, spec.holdout, spec.seed)
    run.job_dir.mkdir(parents=True, exist_ok=True)
    write_jsonl(held_path, held)
    write_jsonl(train_path, train)
    run.event(
        f"domain: held out {len(held)} of {len(records)} records (seed {spec.seed}); "
        "they are never trained on",
        data={"held_out": len(held), "records": len(records), "seed": spec.seed},
    )
    return train, held


def held_out_nll(
    run: FinetuneRun, which: str, model: Any, tokenizer: Any, fmt: str
) -> dict[str, Any] | None:
    """NLL per token on the held-out completions (stored in the job dir; computed once)."""
    spec = domain_spec(run)
    if spec is None or spec.holdout is None:
        return None
    path = run.job_dir / f"domain-{which.replace(' ', '-')}.json"
    if path.is_file():
        stored: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
        return stored
    _, held = domain_records(run)
    try:
        examples, _ = encode_records(tokenizer, held, fmt, run.hp.max_seq_length)
    except ValueError as exc:
        run.warn(f"domain: the held-out records cannot be encoded ({exc}); no domain NLL")
        return None
    if not examples:
        run.warn("domain: no held-out record has tokens to score; no domain NLL")
        return None
    run.stage(f"domain: held-out NLL ({which})", total=len(examples))
    summary = held_out_summary(completion_nll(model, examples, pad_id(tokenizer), **KL_TOPK))
    path.write_text(json.dumps(summary), encoding="utf-8")
    run.event(
        f"domain: held-out NLL/token {which}: {summary['nll_per_token']:.4f} "
        f"({summary['records']} records, {summary['tokens']} tokens)",
        data={k: v for k, v in summary.items() if k not in ("per_record", "topk")}
        | {"which": which},
    )
    return summary


def evaluate_domain(
    run: FinetuneRun, which: str, model_path: str, adapter_path: str | None, fmt: str
) -> tuple[dict[str, Any] | None, str | None]:
    """Held-out NLL and the domain suites' evaluation of one model (``before`` or ``after``)."""
    spec = domain_spec(run)
    if spec is None:
        return None, None
    held = None
    if spec.holdout is not None:
        path = run.job_dir / f"domain-{which}.json"
        if path.is_file():
            held = held_out_nll(run, which, None, None, fmt)
        else:
            models = (
                run.models
                if which == "before"
                else ModelCache(job_settings(run.settings), run.device)
            )
            loaded = models.get(model_path, adapter_path)
            held = held_out_nll(run, which, loaded.model, loaded.tokenizer, fmt)
    suite_id = None
    if spec.suites:
        suite_id = evaluate(
            run, f"domain {which}", model_path, adapter_path, suites=[str(s) for s in spec.suites]
        )
    return held, suite_id


def with_domain(
    run: FinetuneRun,
    body: dict[str, Any],
    held_out: tuple[dict[str, Any] | None, dict[str, Any] | None],
    suite_ids: tuple[str | None, str | None],
) -> dict[str, Any]:
    """The comparison body with its ``domain`` block and the ``outcome`` of the trade-off."""
    spec = domain_spec(run)
    if spec is None:
        return body
    pair = held_out if held_out[0] is not None and held_out[1] is not None else None
    suites = None
    if suite_ids[0] is not None and suite_ids[1] is not None:
        with run.ctx.sessionmaker() as session:
            suites = comparison.compare(
                session=session,
                before_id=suite_ids[0],
                after_id=suite_ids[1],
                options=CompareOptions(),
            )
    block = verdicts.domain_block(
        held_out=pair,  # type: ignore[arg-type]
        suites=suites,
        min_gain=spec.min_gain,
    )
    block["held_out_records"] = len(domain_records(run)[1])
    if suite_ids[0] is not None:
        block["before_evaluation_id"], block["after_evaluation_id"] = suite_ids
    name = verdicts.outcome(learned=block["learned"], passed=body.get("verdict") == "pass")
    return {
        **body,
        "domain": block,
        "outcome": name,
        "outcome_summary": verdicts.outcome_line(name, block),
    }
