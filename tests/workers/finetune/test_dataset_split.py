"""The domain split belongs to the job: stored with it on its first split, reused by every
later attempt and by an interpolation sweep, and never silently re-made from a dataset file
that changed (the held-out records would then include records the job trained on)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from app.core.config import Settings
from app.finetune.schemas import FinetuneJobCreate, records_sha256
from workers.context import UserError
from workers.finetune.artifacts import DATASET_SPLIT, DOMAIN_TRAIN, HELD_OUT
from workers.finetune.data import read_records
from workers.finetune.stages.domain import domain_records
from workers.finetune.statefile import read_state

RECORDS = [
    {"prompt": f"What is drug {i}?", "completion": f"Drug {i} treats pain."} for i in range(30)
]


def _write(path: Path, records: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")


def _run(settings: Settings, job_id: str, dataset: Path, from_job: str | None = None) -> Any:
    request = FinetuneJobCreate.model_validate(
        {
            "base_model": {"path": "m"},
            "dataset": {"path": str(dataset)},
            "evaluation": {"suites": ["general-qa"], "domain": {"holdout": 0.2, "seed": 7}},
            "from_job": from_job,
        }
    )
    return SimpleNamespace(
        request=request,
        settings=settings,
        job_id=job_id,
        job_dir=settings.artifacts_dir / job_id,
        event=lambda *a, **k: None,
    )


@pytest.fixture
def dataset(settings: Settings) -> Path:
    path = settings.data_roots[0] / "drugs.jsonl"
    _write(path, RECORDS)
    return path


def test_the_first_split_is_stored_with_its_hashes_and_reused(
    settings: Settings, dataset: Path
) -> None:
    run = _run(settings, "ft_01", dataset)
    train, held = domain_records(run)
    assert (
        len(held) == 6
        and len(train) == 24
        and not {json.dumps(r) for r in held} & {json.dumps(r) for r in train}
    )
    stored = read_state(run.job_dir / DATASET_SPLIT)
    assert stored == {
        "records": 30,
        "sha256": records_sha256(RECORDS),
        "held_out": 6,
        "held_out_sha256": records_sha256(held),
        "holdout": 0.2,
        "seed": 7,
    }
    _write(dataset, RECORDS[::-1])  # the file changes: the job keeps its split
    assert domain_records(run) == (train, held)


def test_a_torn_split_is_made_again_only_from_the_same_records(
    settings: Settings, dataset: Path
) -> None:
    run = _run(settings, "ft_02", dataset)
    split = domain_records(run)
    (run.job_dir / HELD_OUT).write_text('{"prompt": "What', encoding="utf-8")  # torn
    assert domain_records(run) == split  # the same file: the same split again
    (run.job_dir / HELD_OUT).write_text("", encoding="utf-8")
    _write(dataset, RECORDS[::-1])
    with pytest.raises(UserError, match="changed after fine-tune job ft_02 was trained on it"):
        domain_records(run)


def test_a_sweep_uses_the_trained_jobs_split_not_the_file_as_it_is_now(
    settings: Settings, dataset: Path
) -> None:
    trained = _run(settings, "ft_03", dataset)
    train, held = domain_records(trained)
    _write(dataset, RECORDS[::-1])  # changed after training
    sweep = _run(settings, "ft_04", dataset, from_job="ft_03")
    assert domain_records(sweep) == (train, held)
    assert not (sweep.job_dir / HELD_OUT).exists()


def test_a_sweep_whose_trained_split_is_gone_refuses_a_changed_file(
    settings: Settings, dataset: Path
) -> None:
    trained = _run(settings, "ft_05", dataset)
    train, held = domain_records(trained)
    for name in (DOMAIN_TRAIN, HELD_OUT):
        (trained.job_dir / name).unlink()
    sweep = _run(settings, "ft_06", dataset, from_job="ft_05")
    assert domain_records(sweep) == (train, held)  # the same records: split alike
    _write(dataset, [*RECORDS[:-1], {"prompt": "New?", "completion": "A new record."}])
    with pytest.raises(UserError) as caught:
        domain_records(sweep)
    message = str(caught.value)
    assert "changed after fine-tune job ft_05" in message and str(dataset) in message
    # A stored split that does not match its recorded hash is not trusted either.
    (trained.job_dir / HELD_OUT).write_text(
        "".join(json.dumps(r) + "\n" for r in train[:6]), encoding="utf-8"
    )
    (trained.job_dir / DOMAIN_TRAIN).write_text(
        "".join(json.dumps(r) + "\n" for r in held + train[6:]), encoding="utf-8"
    )
    with pytest.raises(UserError, match="changed after fine-tune job ft_05"):
        domain_records(sweep)
    assert read_records(trained.job_dir / HELD_OUT) == train[:6]
