"""Sharded evaluations: one evaluation split into shard jobs that any workers claim.

The evaluation the user asked for (the parent) is never claimed itself. Each of its N shards
is an ordinary evaluation job (its own lease, attempts, backoff and resume) with the parent's
model, suites, prompt format and generation settings, that scores one slice of the items and
stores the rows under the parent's id. The slices are fixed by the items' places alone (every
N-th block of ``BLOCK`` items of the evaluation, suites in order), so they are disjoint, cover
every item, and do not depend on which worker runs what. The shard that finishes last computes
the parent's results from all the stored rows, with the code an unsharded run uses
(``app.jobs`` owns the status moves: ``queue.succeed_shard``, ``lifecycle.succeed_sharded``).

No torch here: the API imports this module.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from sqlalchemy import ColumnElement, and_, false, or_, select
from sqlalchemy.orm import Session

from app.core.schemas import Progress, ShardPublic, ShardsPublic
from app.core.tables import Evaluation, EvaluationItem, new_id
from app.jobs.status import JobStatus

# What a shard records about the engine that must be the same on every shard for their
# answers to be one run's: another engine, version, dtype or kind of device (CPU or CUDA
# kernels) computes other numbers. Which GPU of a kind, or whether the base was already
# loaded, does not.
ENGINE_FIELDS = ("backend", "dtype", "version", "weights_hashed", "device kind")


# Items are dealt to shards in blocks of this many consecutive items of a suite: the items a
# scoring driver puts in one pass (``workers.evaluation.scoring.CHUNK`` is this). A shard's
# passes then hold exactly the items of an unsharded run's passes, so its batches and their
# padding are the same, and so are its log-likelihoods (dealt item by item instead, the
# multiple-choice log-likelihoods of the tiny test model differed in their last digits).
BLOCK = 32


def blocks(size: int) -> int:
    """How many blocks a suite of ``size`` items has (the last may be short)."""
    return -(-size // BLOCK)


def positions(sizes: Sequence[int], *, index: int, count: int) -> list[list[int]]:
    """The item positions shard ``index`` of ``count`` scores in each suite (``sizes``: the
    evaluation's suites' item counts, in order): every ``count``-th block of the evaluation,
    counted across its suites, so each shard gets a like share of every suite whatever the
    suites' sizes and costs. The shards' slices are disjoint and cover every item."""
    found: list[list[int]] = []
    first = 0  # the evaluation-wide number of the suite's first block
    for size in sizes:
        found.append([p for p in range(size) if (first + p // BLOCK) % count == index])
        first += blocks(size)
    return found


def dealt(shard: Evaluation) -> list[list[int]]:
    """The item positions ``shard`` scores in each of its evaluation's suites."""
    sizes = [int(suite["items"]) for suite in shard.suites]
    return positions(sizes, index=int(shard.shard_index or 0), count=int(shard.shard_count or 1))


def slice_rows(shard: Evaluation) -> ColumnElement[bool]:
    """Which of its evaluation's item rows ``shard`` wrote: its slice (rows are stored under
    the evaluation's id, whichever shard wrote them)."""
    return or_(
        false(),
        *(
            and_(EvaluationItem.suite == suite["name"], EvaluationItem.position.in_(places))
            for suite, places in zip(shard.suites, dealt(shard), strict=True)
            if places
        ),
    )


def slice_size(sizes: Sequence[int], *, index: int, count: int) -> int:
    """How many items shard ``index`` of ``count`` scores."""
    return sum(map(len, positions(sizes, index=index, count=count)))


def max_shards(sizes: Sequence[int]) -> int:
    """The most shards an evaluation of suites of ``sizes`` items can have: one block each."""
    return sum(blocks(size) for size in sizes)


def new_shards(parent: Evaluation, count: int) -> list[Evaluation]:
    """The shard jobs of ``parent`` (not yet added): each runs with the parent's settings.

    A shard never takes the cache and has no cache key of its own: it answers part of the
    parent, so it must neither wait for an identical run nor ever be one's source.
    """
    sizes = [int(suite["items"]) for suite in parent.suites]
    return [
        Evaluation(
            id=new_id("ev"),
            label=parent.label,
            model_path=parent.model_path,
            adapter_path=parent.adapter_path,
            backend=parent.backend,
            endpoint=parent.endpoint,
            model_fingerprint=parent.model_fingerprint,
            prompt_format=parent.prompt_format,
            generation=dict(parent.generation),
            suites=[dict(s) for s in parent.suites],
            cache_key=None,
            use_cache=False,
            progress={
                "done": 0,
                "total": slice_size(sizes, index=index, count=count),
                "stage": "queued",
            },
            max_attempts=parent.max_attempts,
            group_id=parent.group_id,
            shard_of=parent.id,
            shard_index=index,
            shard_count=count,
        )
        for index in range(count)
    ]


def shards_of(session: Session, parent_ids: Sequence[str]) -> dict[str, list[Evaluation]]:
    """The shard jobs of each of ``parent_ids``, in index order (one query)."""
    found: dict[str, list[Evaluation]] = {parent: [] for parent in parent_ids}
    if not found:
        return found
    rows = session.scalars(
        select(Evaluation)
        .where(Evaluation.shard_of.in_(list(found)))
        .order_by(Evaluation.shard_of, Evaluation.shard_index)
    )
    for row in rows:
        found[str(row.shard_of)].append(row)
    return found


def summary(shards: Sequence[Evaluation]) -> ShardsPublic:
    """The ``shards`` field of a sharded evaluation's view."""
    return ShardsPublic(
        total=len(shards),
        done=sum(1 for s in shards if s.status == JobStatus.SUCCEEDED),
        data=[
            ShardPublic(
                index=int(s.shard_index or 0),
                id=s.id,
                status=s.status,
                attempts=s.attempts,
                progress=Progress(**s.progress),
                worker_id=s.worker_id,
                error=s.error,
            )
            for s in shards
        ],
    )


def progress(parent: Evaluation, shards: Sequence[Evaluation]) -> dict[str, Any]:
    """A sharded evaluation's progress: the items its shards stored (the merge records them
    all once it succeeded), and while it runs, how many shards run and are done."""
    if parent.status == JobStatus.SUCCEEDED or not shards:
        return dict(parent.progress)
    done = sum(int(s.progress.get("done", 0)) for s in shards)
    stage = str(parent.progress.get("stage", "queued"))
    if parent.status == JobStatus.RUNNING:
        running = sum(1 for s in shards if s.status == JobStatus.RUNNING)
        finished = sum(1 for s in shards if s.status == JobStatus.SUCCEEDED)
        stage = f"{running} of {len(shards)} shards running, {finished} done"
    return {"done": done, "total": int(parent.progress["total"]), "stage": stage}


def disagreement(shards: Iterable[Evaluation]) -> str | None:
    """Why the shards' answers cannot be one run's (another model or engine ran some of
    them), or None when they agree."""
    seen: dict[str, tuple[Any, ...]] = {}
    for shard in shards:
        engine = dict(shard.engine or {})
        engine["device kind"] = str(engine.get("device") or "").split(":")[0]
        seen[f"shard {shard.shard_index}"] = (
            shard.model_fingerprint,
            shard.prompt_format,
            *(engine.get(name) for name in ENGINE_FIELDS),
        )
    if len(set(seen.values())) <= 1:
        return None
    described = "; ".join(
        f"{name}: fingerprint {values[0]}, prompt format {values[1]}, "
        + ", ".join(f"{f} {v}" for f, v in zip(ENGINE_FIELDS, values[2:], strict=True))
        for name, values in seen.items()
    )
    return (
        "the shards ran on different models or engines, so their answers are not one run: "
        + described
    )
