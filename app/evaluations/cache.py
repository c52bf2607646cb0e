"""The evaluation cache: an evaluation already run on the same inputs answers a new one at once.

Two evaluations are interchangeable when the model fingerprint (weights, adapter, tokenizer
files, chat template), the exact suite contents, the effective prompt format and the
generation settings are equal. ``cache_key`` hashes exactly those; the API sets it at
submission and the worker sets it again when it fingerprints the model it loaded, so a run
queued with ``"cache": false`` still becomes a source for later ones.

The same holds suite by suite: each entry of an evaluation's suite snapshot gets the key of
that suite alone (``suite_keys``), and an evaluation that shares only some suites with an
earlier run of the same model copies those suites' item rows (``reuse_suite``) and runs the
rest: a fine-tune whose base was evaluated on a subset of its suites runs only the others.

No torch here: the API imports this module.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from sqlalchemy import insert, literal, select
from sqlalchemy.orm import Session

from app.core.clientfiles import ReadBudget, read_client_file
from app.core.tables import Evaluation, EvaluationItem
from app.jobs.status import JobStatus
from app.suites.kinds import KINDS

# Where transformers looks for a chat template, besides tokenizer_config.json's "chat_template".
CHAT_TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json")
CHAT_TEMPLATE_DIR = "additional_chat_templates"


def has_chat_template(model_dir: Path, budget: ReadBudget | None = None) -> bool:
    """Whether ``AutoTokenizer.from_pretrained(model_dir).chat_template`` would be set.

    Read from the files transformers reads, without importing it: ``chat_template.jinja``,
    ``chat_template.json``, ``additional_chat_templates/*.jinja`` or the ``chat_template``
    key of ``tokenizer_config.json`` (read as a client's file: ``budget``).
    """
    for name in CHAT_TEMPLATE_FILES:
        path = model_dir / name
        if path.is_file() and path.stat().st_size > 0:
            return True
    extra = model_dir / CHAT_TEMPLATE_DIR
    if extra.is_dir() and any(extra.glob("*.jinja")):
        return True
    config = model_dir / "tokenizer_config.json"
    if config.is_file():
        try:
            raw = read_client_file(config, "tokenizer_config.json", budget or ReadBudget())
            data = json.loads(raw.decode("utf-8"))
        except (ValueError, RecursionError):
            return False
        return isinstance(data, dict) and bool(data.get("chat_template"))
    return False


def effective_prompt_format(
    requested: str | None, model_dir: Path, budget: ReadBudget | None = None
) -> str:
    """The prompt format a worker uses: the requested one, else chat iff there is a template."""
    if requested is not None:
        return requested
    return "chat" if has_chat_template(model_dir, budget) else "plain"


def cache_key(
    *,
    fingerprint: str,
    suites: Sequence[Mapping[str, Any]],
    prompt_format: str,
    generation: Mapping[str, Any],
    backend: str = "transformers",
) -> str:
    """``sha256:…`` of everything that determines an evaluation's results.

    ``suites`` is an evaluation's suite snapshot; only names and content hashes count (the
    order they were listed in does not change any result). Another engine computes other
    numbers, so ``backend`` counts too (left out for the default, so keys stored before
    backends existed still match). So does what a suite's kind records per item beyond its
    first version (``SuiteKind.records_version``): a run that stored less is no source.
    """
    content: dict[str, Any] = {
        "fingerprint": fingerprint,
        "suites": sorted([s["name"], s["content_hash"]] for s in suites),
        "prompt_format": prompt_format,
        "generation": dict(generation),
    }
    if backend != "transformers":
        content["backend"] = backend
    records = {
        kind: KINDS[kind].records_version
        for kind in sorted({str(s.get("kind")) for s in suites})
        if kind in KINDS and KINDS[kind].records_version > 1
    }
    if records:
        content["records"] = records
    canonical = json.dumps(content, sort_keys=True, separators=(",", ":"))
    return "sha256:" + hashlib.sha256(canonical.encode()).hexdigest()


def find_source(session: Session, key: str) -> Evaluation | None:
    """The newest succeeded evaluation that ran (itself, not as a copy) with ``key``."""
    return session.execute(
        select(Evaluation)
        .where(
            Evaluation.cache_key == key,
            Evaluation.status == JobStatus.SUCCEEDED,
            Evaluation.cached_from.is_(None),
        )
        .order_by(Evaluation.finished_at.desc(), Evaluation.id)
        .limit(1)
    ).scalar_one_or_none()


# How many of a model's newest runs are searched for a suite to reuse.
SUITE_SOURCE_SCAN = 200


def suite_keys(*, suites: Sequence[Mapping[str, Any]], **inputs: Any) -> dict[str, str]:
    """Each suite's own cache key: its name -> :func:`cache_key` of that suite alone, with the
    same other ``inputs`` (fingerprint, prompt format, generation, backend)."""
    return {str(s["name"]): cache_key(suites=[s], **inputs) for s in suites}


def find_suite_source(
    session: Session, *, fingerprint: str, key: str, exclude: str
) -> Evaluation | None:
    """The newest succeeded run (itself, not a copy) of this model with a suite keyed ``key``."""
    candidates = session.scalars(
        select(Evaluation)
        .where(
            Evaluation.model_fingerprint == fingerprint,
            Evaluation.status == JobStatus.SUCCEEDED,
            Evaluation.cached_from.is_(None),
            Evaluation.id != exclude,
        )
        .order_by(Evaluation.finished_at.desc(), Evaluation.id)
        .limit(SUITE_SOURCE_SCAN)
    )
    for row in candidates:
        if any(s.get("cache_key") == key for s in row.suites):
            return row
    return None


def reuse_suite(session: Session, *, source_id: str, target_id: str, suite: str) -> int:
    """Copy ``source_id``'s item rows of ``suite`` into ``target_id``; returns how many."""
    table = EvaluationItem.__table__
    columns = [c.name for c in table.columns if c.name not in ("id", "evaluation_id")]
    rows = select(literal(target_id), *(table.c[c] for c in columns)).where(
        table.c.evaluation_id == source_id, table.c.suite == suite
    )
    copied = session.execute(insert(EvaluationItem).from_select(["evaluation_id", *columns], rows))
    return int(copied.rowcount)  # type: ignore[attr-defined]
