"""The domain evaluation: what the job learned, on records it never trained on.

``evaluation.domain.holdout`` sets aside a seeded fraction of the job's dataset before any
training data is prepared; the held-out completions are scored (NLL per token, as training
scores them) on the base before training and on the result after. ``evaluation.domain.suites``
are the user's own domain suites, run as the job's ``domain before`` / ``domain after``
evaluations. Everything is kept in the job directory or the database, so a resumed attempt
redoes none of it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from app.comparison import learned as verdicts
from app.comparison import service as comparison
from app.core.tables import FinetuneJob
from app.finetune.schemas import (
    DomainEvaluationSpec,
    dataset_changed_detail,
    holdout_split,
    load_path_records,
    records_sha256,
)
from app.stats.kl import TOPK
from workers.context import UserError
from workers.engine.loading import ModelCache
from workers.finetune.artifacts import DATASET_SPLIT, DOMAIN_TRAIN, HELD_OUT
from workers.finetune.data import encode_records, pad_id, read_records_state, write_jsonl
from workers.finetune.holdout import CompletionScore, completion_nll
from workers.finetune.stages.evaluation import evaluate, job_settings
from workers.finetune.statefile import read_state, write_json

if TYPE_CHECKING:
    from workers.finetune.stages.context import StageRun


# Top-k next tokens kept per held-out completion position, for KL to base on the domain
# prompts; only the first records', so a large held-out set stays a small file.
KL_TOPK: dict[str, Any] = {"topk": TOPK, "topk_examples": 256}


def held_out_summary(scores: list[CompletionScore]) -> dict[str, Any]:
    """:func:`app.comparison.learned.nll_summary` of :func:`completion_nll`'s scores."""
    return verdicts.nll_summary([(s.nll_sum, s.tokens) for s in scores], [s.topk for s in scores])


def domain_spec(run: StageRun) -> DomainEvaluationSpec | None:
    spec = run.request.evaluation
    return spec.domain if spec is not None and spec.domain else None


def _dataset(run: StageRun) -> list[dict[str, Any]]:
    """The job's dataset as it is now: the inline records, or the file read again."""
    dataset = run.request.dataset
    if dataset.examples is not None:
        return list(dataset.examples)
    return load_path_records(run.settings, str(dataset.path))


def dataset_identity(
    records: list[dict[str, Any]], held: list[dict[str, Any]], spec: DomainEvaluationSpec | None
) -> dict[str, Any]:
    """What the job's dataset was when it was first split: counts and content hashes."""
    identity: dict[str, Any] = {"records": len(records), "sha256": records_sha256(records)}
    if spec is not None and spec.holdout is not None:
        identity.update(
            held_out=len(held),
            held_out_sha256=records_sha256(held),
            holdout=spec.holdout,
            seed=spec.seed,
        )
    return identity


def domain_records(run: StageRun) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """``(train, held_out)``: the job's dataset split once (snapshotted), never trained on.

    The split belongs to the job: the first split stores the records (``domain-train.jsonl``,
    ``heldout.jsonl``) and the dataset's hash (``dataset.json``). A later attempt reuses them;
    when they are gone or torn it splits again only if the file still holds the same records.
    An interpolation sweep (``from_job``) uses the split of the job it sweeps.
    """
    if run.request.from_job is not None:
        return _source_split(run)
    spec = domain_spec(run)
    holdout = spec.holdout if spec is not None else None
    train_path, held_path = run.job_dir / DOMAIN_TRAIN, run.job_dir / HELD_OUT
    meta_path = run.job_dir / DATASET_SPLIT
    stored = read_state(meta_path)
    if holdout is not None:
        train_kept, held_kept = read_records_state(train_path), read_records_state(held_path)
        if train_kept is not None and held_kept is not None:
            return train_kept, held_kept
    records = _dataset(run)
    if stored is not None and stored.get("sha256") != records_sha256(records):
        raise UserError(dataset_changed_detail(run.job_id, run.request.dataset.path))
    held: list[dict[str, Any]] = []
    train = records
    if spec is not None and holdout is not None:
        train, held = holdout_split(records, holdout, spec.seed)
        write_jsonl(held_path, held)
        write_jsonl(train_path, train)
    if stored is None:
        write_json(meta_path, dataset_identity(records, held, spec))
    if spec is not None and held and stored is None:
        run.event(
            f"domain: held out {len(held)} of {len(records)} records (seed {spec.seed}); "
            "they are never trained on",
            data={"held_out": len(held), "records": len(records), "seed": spec.seed},
        )
    return train, held


def _source_split(run: StageRun) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """A sweep's split: the swept job's own, never the dataset file re-split as it is now."""
    source = str(run.request.from_job)
    spec = domain_spec(run)
    if spec is None or spec.holdout is None:
        return [], []  # a sweep trains on nothing; without a held-out split it needs no records
    source_dir = run.settings.artifacts_dir / source
    train = read_records_state(source_dir / DOMAIN_TRAIN)
    held = read_records_state(source_dir / HELD_OUT)
    stored = read_state(source_dir / DATASET_SPLIT) or {}
    if train is not None and held is not None:
        if stored.get("held_out_sha256") in (None, records_sha256(held)):
            return train, held
    # The stored split is gone: the file may be split again only if it is still that dataset.
    expected = stored.get("sha256") or _recorded_sha256(run, source)
    if expected is None:
        raise UserError(
            f"the held-out split of fine-tune job {source} is gone and the job recorded no "
            "hash of its dataset: splitting the file again could hold out records it was "
            "trained on; run a new fine-tune job instead"
        )
    records = _dataset(run)
    if records_sha256(records) != expected:
        raise UserError(dataset_changed_detail(source, run.request.dataset.path))
    return holdout_split(records, spec.holdout, spec.seed)


def _recorded_sha256(run: StageRun, job_id: str) -> str | None:
    """The dataset hash a finished job keeps in its metrics (``metrics.dataset.sha256``)."""
    with run.ctx.sessionmaker() as session:
        row = session.get(FinetuneJob, job_id)
        metrics = (row.metrics or {}) if row is not None else {}
    value = (metrics.get("dataset") or {}).get("sha256")
    return str(value) if value else None


def held_out_nll(
    run: StageRun, which: str, model: Any, tokenizer: Any, fmt: str
) -> dict[str, Any] | None:
    """NLL per token on the held-out completions (stored in the job dir; computed once)."""
    spec = domain_spec(run)
    if spec is None or spec.holdout is None:
        return None
    path = run.job_dir / f"domain-{which.replace(' ', '-')}.json"
    stored = read_state(path)
    if stored is not None:
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
    phase = f"domain: held-out NLL ({which})"
    run.stage(phase, total=len(examples), unit="examples")
    summary = held_out_summary(completion_nll(model, examples, pad_id(tokenizer), **KL_TOPK))
    write_json(path, summary)
    run.event(
        f"domain: held-out NLL/token {which}: {summary['nll_per_token']:.4f} "
        f"({summary['records']} records, {summary['tokens']} tokens)",
        data={k: v for k, v in summary.items() if k not in ("per_record", "topk")}
        | {"which": which},
        progress=run.progress(phase, unit="examples", done=len(examples), store="no"),
    )
    return summary


def evaluate_domain(
    run: StageRun,
    which: str,
    model_path: str,
    adapter_path: str | None,
    fmt: str,
    *,
    answers: dict[str, Any] | None = None,
) -> tuple[dict[str, Any] | None, str | None]:
    """Held-out NLL and the domain suites' evaluation of one model (``before`` or ``after``;
    ``answers`` as for ``evaluate``)."""
    spec = domain_spec(run)
    if spec is None:
        return None, None
    held = None
    if spec.holdout is not None:
        held = read_state(run.job_dir / f"domain-{which}.json")
        if held is None:
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
            run,
            f"domain {which}",
            model_path,
            adapter_path,
            suites=[str(s) for s in spec.suites],
            answers=answers,
        )
    return held, suite_id


def with_domain(
    run: StageRun,
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
                options=run.request.compare_options(),
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
