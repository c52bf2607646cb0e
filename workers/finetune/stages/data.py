"""The training data of a fine-tune job: domain records mixed with replay, snapshotted."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from app.finetune.schemas import GeneralData, load_path_records
from app.suites import versions
from workers.context import UserError
from workers.engine import transformers_backend as engine
from workers.engine.base import Prompt
from workers.finetune.artifacts import DATASET_SPLIT, TRAIN_SNAPSHOT, TRAIN_SNAPSHOT_META
from workers.finetune.data import read_records_state, records_sha256, write_jsonl
from workers.finetune.replay import (
    SELF_PROMPTS,
    cached_completions,
    completion_cache_key,
    create_replay_dataset,
    evaluation_texts,
    exclude_evaluated,
    suite_records,
)
from workers.finetune.stages.domain import domain_records
from workers.finetune.statefile import read_state, write_json

if TYPE_CHECKING:
    from workers.finetune.stages.context import StageRun

# A pending general record: a prompt the base model still has to answer.
PENDING = "_answer_with_base_model"


def training_records(
    run: StageRun, tokenizer: Any, base_fp: str, fmt: str, eval_definitions: list[dict[str, Any]]
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Domain records mixed with replay; snapshotted on the first attempt, reused after."""
    snapshot, meta_path = run.job_dir / TRAIN_SNAPSHOT, run.job_dir / TRAIN_SNAPSHOT_META
    stored = read_state(meta_path)
    if stored is not None:
        kept = read_records_state(snapshot)
        if kept is not None and stored.get("sha256") == records_sha256(kept):
            return kept, stored
    request = run.request
    domain, held_out = domain_records(run)
    records = domain
    meta: dict[str, Any] = {"domain": len(domain), "replay": 0}
    dataset = read_state(run.job_dir / DATASET_SPLIT)
    if dataset is not None:
        meta["dataset"] = dataset
    if held_out:
        meta["held_out"] = len(held_out)
    if request.replay is not None:
        run.stage("preparing replay data")
        general = general_items(run, request.replay, "replay", eval_definitions)
        mixed = create_replay_dataset(domain, general, request.replay.fraction, request.replay.seed)
        records = answer_pending(run, mixed, request.replay, tokenizer, base_fp, fmt)
        replayed = len(records) - len(domain)
        meta.update(
            {
                "replay": replayed,
                "replay_pool": len(general),
                "replay_source": source_name(request.replay),
            }
        )
        run.event(
            f"replay: {replayed} general examples mixed into {len(domain)} domain examples",
            data=meta,
        )
    run.job_dir.mkdir(parents=True, exist_ok=True)
    write_jsonl(snapshot, records)
    meta["sha256"] = records_sha256(records)
    write_json(meta_path, meta)
    return records, meta


def general_items(
    run: StageRun, spec: GeneralData, purpose: str, eval_definitions: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """General records (or pending prompts) from a suite, ``self``, inline records or a file."""
    if spec.examples is not None:
        records: list[dict[str, Any]] = list(spec.examples)
        prompts: list[str] = []
    elif spec.path is not None:
        records, prompts = (
            load_path_records(run.settings, spec.path, what=f"{purpose} data"),
            [],
        )
    elif spec.source == "self":
        records, prompts = [], list(SELF_PROMPTS)
    else:
        with run.ctx.sessionmaker() as session:
            definition = versions.resolve(session, str(spec.source)).definition
        records, prompts = suite_records(definition)
    if spec.completions == "base_model" or spec.source == "self":
        # The base model answers every string prompt itself; other records stay as given.
        prompts += [r["prompt"] for r in records if isinstance(r.get("prompt"), str)]
        records = [r for r in records if not isinstance(r.get("prompt"), str)]
    items = records + [{"prompt": p, PENDING: True} for p in prompts]
    evaluated = evaluation_texts(eval_definitions)
    kept, excluded = exclude_evaluated(items, evaluated)
    source = source_name(spec)
    if excluded > 0:
        run.event(
            f"{purpose}: left out {excluded} {source} items that the evaluation suites score",
            data={"excluded": excluded, "kept": len(kept)},
        )
    elif excluded < 0:
        effect = (
            "training on them inflates the after-evaluation"
            if purpose == "replay"
            else "a Fisher from them protects exactly what is measured"
        )
        run.warn(
            f"{purpose} source {source} consists only of items the evaluation suites score "
            f"({-excluded} items); {effect}. Use a disjoint source (e.g. 'self') for an "
            "unbiased measurement"
        )
    if not kept:
        raise UserError(f"{purpose} source {source} holds no usable records")
    return kept


def answer_pending(
    run: StageRun,
    items: list[dict[str, Any]],
    spec: GeneralData,
    tokenizer: Any,
    base_fp: str,
    fmt: str,
) -> list[dict[str, Any]]:
    """Fill in the base model's own answers to pending prompts (cached per model, prompts)."""
    pending = [i for i, r in enumerate(items) if r.get(PENDING)]
    if not pending:
        return items
    prompts = [str(items[i]["prompt"]) for i in pending]
    key = completion_cache_key(base_fp, prompts, fmt, spec.max_new_tokens)

    def generate() -> list[str]:
        phase = "base model answering general prompts"
        run.stage(phase, total=len(prompts), unit="prompts")
        loaded = run.models.get(run.request.base_model.path, None)
        backend = engine.TransformersBackend(loaded.model, loaded.tokenizer)

        def progress(index: int, _text: str) -> None:
            run.ctx.check_stop()
            run.progress(phase, unit="prompts", add=1)

        texts = backend.generate(
            [Prompt(p, fmt == "chat") for p in prompts],
            max_new_tokens=spec.max_new_tokens,
            on_result=progress,
        )
        return [t.strip() for t in texts]

    answers, hit = cached_completions(run.settings.cache_dir, key, generate)
    if hit:
        run.event(
            f"base-model answers for {len(prompts)} general prompts from cache",
            data={"key": key},
        )
    out = list(items)
    for index, answer in zip(pending, answers, strict=True):
        out[index] = {"prompt": items[index]["prompt"], "completion": answer}
    empty = [i for i in pending if not out[i]["completion"]]
    if empty:
        run.warn(f"the base model answered {len(empty)} general prompts with nothing; left out")
        out = [r for i, r in enumerate(out) if i not in set(empty)]
    return out


def source_name(spec: GeneralData) -> str:
    if spec.examples is not None:
        return "inline examples"
    if spec.path is not None:
        return f"file {spec.path!r}"
    return f"{spec.source!r}"
