"""State files of a fine-tune job survive a full disk: written atomically through one helper,
read defensively (an unreadable state restarts its stage), and a checkpoint or output that
cannot be saved leaves no partial folder and says the disk is full.

The full disk is a small tmpfs mounted in the test where the machine allows it (root in a
container that may mount); elsewhere ``ENOSPC`` is simulated at the writes themselves.
"""

from __future__ import annotations

import builtins
import errno
import os
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from app.finetune.schemas import FinetuneJobCreate
from tests.samples import MEDICINE_RECORDS
from tests.workers.finetune.disk import fill, tmpfs
from workers.finetune import statefile
from workers.finetune.artifacts import TRAINING_DONE, save_output
from workers.finetune.job import training_done
from workers.finetune.statefile import DiskFull, read_state, write_atomic, write_json
from workers.progress import Tracker

pytestmark = pytest.mark.usefixtures("one_thread")

CPU = torch.device("cpu")


class SmallDisk:
    """A folder on a device with almost no space: a 256 KiB tmpfs, or a simulated one."""

    def __init__(self, folder: Path, mounted: bool, monkeypatch: pytest.MonkeyPatch) -> None:
        self.folder, self.mounted, self.monkeypatch = folder, mounted, monkeypatch

    def fill(self) -> None:
        """Use up the space: fill the tmpfs; else make every write below the folder ENOSPC
        (os.write, file objects, and so torch.save and transformers' JSON files)."""
        if self.mounted:
            fill(self.folder)
            return
        folder = str(self.folder)
        real_write, real_open, real_builtin_open = os.write, Path.open, builtins.open

        def no_space() -> None:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def write(fd: int, data: Any) -> int:
            if folder in os.readlink(f"/proc/self/fd/{fd}"):
                no_space()
            return real_write(fd, data)

        def path_open(path: Path, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
            if "w" in mode and folder in str(path):
                no_space()
            return real_open(path, mode, *args, **kwargs)

        def builtin_open(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
            if "w" in mode and folder in str(file):
                no_space()
            return real_builtin_open(file, mode, *args, **kwargs)

        self.monkeypatch.setattr(statefile.os, "write", write)
        self.monkeypatch.setattr(Path, "open", path_open)
        self.monkeypatch.setattr(builtins, "open", builtin_open)


@pytest.fixture(params=["tmpfs", "simulated"])
def small_disk(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[SmallDisk]:
    """A small tmpfs mounted for the test where the machine allows it (else, and in the
    ``simulated`` run, ENOSPC raised at the writes)."""
    folder = tmp_path / "small"
    folder.mkdir()
    if request.param == "simulated":
        yield SmallDisk(folder, False, monkeypatch)
        return
    with tmpfs(folder) as mounted:
        yield SmallDisk(folder, mounted, monkeypatch)


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name != "filler")


# -- the one writer


def test_a_full_disk_keeps_the_old_state_and_says_the_disk_is_full(
    small_disk: SmallDisk,
) -> None:
    full_disk = small_disk.folder
    path = full_disk / "interpolation.json"
    write_json(path, {"results": [{"alpha": 0.5}]})  # while there was room
    small_disk.fill()
    with pytest.raises(DiskFull, match="the disk is full: interpolation.json"):
        write_json(path, {"results": [{"alpha": 0.5}, {"alpha": 1.0, "x": "y" * 600_000}]})
    assert read_state(path) == {"results": [{"alpha": 0.5}]}  # never empty, never torn
    assert _leftovers(full_disk) == ["interpolation.json"]  # no temporary file left behind


def test_writes_replace_whole_files(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "state.json"
    write_json(path, {"a": 1})
    write_atomic(path, '{"a": 2}')
    assert read_state(path) == {"a": 2}
    assert sorted(p.name for p in path.parent.iterdir()) == ["state.json"]


@pytest.mark.parametrize("content", [b"", b'{"results": [{"al', b"\xff\xfe", b"[1, 2]", b"null"])
def test_an_unreadable_state_is_none_and_removed(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "state.json"
    path.write_bytes(content)
    assert read_state(path) is None
    assert read_state(tmp_path / "missing.json") is None


def test_the_worker_writes_its_json_state_only_through_the_helper() -> None:
    """No module of the fine-tune worker writes a file in place (grep-level guard)."""
    root = Path(__file__).resolve().parents[3] / "workers" / "finetune"
    offenders = [
        f"{path.relative_to(root)}:{number}"
        for path in sorted(root.rglob("*.py"))
        if path.name != "statefile.py"
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if ".write_text(" in line or ".write_bytes(" in line or "json.dump(" in line
    ]
    assert offenders == []


# -- stages restart instead of failing


def test_an_empty_training_record_means_the_training_stage_runs_again(tmp_path: Path) -> None:
    done = tmp_path / TRAINING_DONE
    done.write_text("", encoding="utf-8")
    assert training_done(done) is None
    write_json(done, {"foreign": True})
    assert training_done(done) is None
    write_json(done, {"output_path": "x", "trainable_parameters": {}, "metrics": {}})
    outcome = training_done(done)
    assert outcome is not None and outcome.output_path == "x"


def test_a_torn_sweep_state_restarts_the_sweep(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from workers.finetune.artifacts import TrainingOutcome
    from workers.finetune.stages import interpolation

    class Weights:
        def __init__(self, *_: Any) -> None:
            self.model = None

        def set(self, alpha: float) -> None:
            self.alpha = alpha

    class Evaluator:
        items = 2

        def __init__(self, *_: Any) -> None:
            pass

        def measure(self, step: int) -> tuple[dict[str, Any], dict[str, Any]]:
            figures = {"general": {"accuracy": 1.0}, "domain": None, "verdict": {"verdict": "pass"}}
            return figures, {}

    monkeypatch.setattr(interpolation, "_Weights", Weights)
    monkeypatch.setattr(interpolation, "CheckpointEvaluator", Evaluator)
    events: list[str] = []
    run = SimpleNamespace(
        request=SimpleNamespace(interpolation=SimpleNamespace(alphas=[0.5, 1.0], pick="largest")),
        job_dir=tmp_path,
        stage=lambda *a, **k: None,
        event=lambda message, **k: events.append(message),
        tracker=Tracker([]),
    )
    (tmp_path / interpolation.RESULTS).write_text("", encoding="utf-8")  # an old torn write
    outcome = TrainingOutcome(str(tmp_path / "adapter"), trainable_parameters={}, metrics={})
    _, state = interpolation.interpolate(run, tmp_path, None, "plain", [], outcome)  # type: ignore[arg-type]
    assert [r["alpha"] for r in state["results"]] == [0.5, 1.0] and state["chosen_alpha"] == 1.0
    assert read_state(tmp_path / interpolation.RESULTS) == state


def test_a_torn_data_snapshot_is_prepared_again(tmp_path: Path) -> None:
    from workers.finetune.stages.data import training_records

    request = FinetuneJobCreate.model_validate(
        {
            "base_model": {"path": "m"},
            "dataset": {"examples": MEDICINE_RECORDS[:4]},
            "evaluation": None,
        }
    )
    run = SimpleNamespace(request=request, job_dir=tmp_path, event=lambda *a, **k: None)
    records, meta = training_records(run, None, "fp", "plain", [])  # type: ignore[arg-type]
    assert meta["dataset"]["records"] == 4 and len(records) == 4
    (tmp_path / "train.json").write_text('{"dom', encoding="utf-8")
    (tmp_path / "train.jsonl").write_text("", encoding="utf-8")
    again, meta_again = training_records(run, None, "fp", "plain", [])  # type: ignore[arg-type]
    assert again == records and meta_again == meta


# -- checkpoints and outputs on a full disk


def _trainer(model_dir: Path, checkpoint_dir: Path) -> Any:
    from workers.engine.loading import load_tokenizer
    from workers.finetune.data import encode_records
    from workers.finetune.training import Trainer, prepare_model

    request = FinetuneJobCreate.model_validate(
        {
            "base_model": {"path": str(model_dir)},
            "dataset": {"examples": MEDICINE_RECORDS[:4], "prompt_format": "plain"},
            "hyperparameters": {"max_steps": 1},
        }
    )
    tokenizer = load_tokenizer(model_dir)
    examples, _ = encode_records(tokenizer, MEDICINE_RECORDS[:4], "plain", 64)
    model = prepare_model(model_dir, CPU, request, seed=0)
    trainer = Trainer(model, examples, request.resolved(), pad_id=0, checkpoint_dir=checkpoint_dir)
    return trainer, model, tokenizer, request


def test_a_checkpoint_that_does_not_fit_leaves_no_folder_and_says_the_disk_is_full(
    tiny_model_dir: Path, small_disk: SmallDisk
) -> None:
    full_disk = small_disk.folder
    trainer, model, tokenizer, request = _trainer(tiny_model_dir, full_disk / "checkpoints")
    small_disk.fill()
    with pytest.raises(DiskFull, match="the disk is full: the checkpoint of step 0"):
        trainer.save_checkpoint()
    folder = full_disk / "checkpoints"
    assert not folder.exists() or list(folder.iterdir()) == []  # no partial checkpoint
    with pytest.raises(DiskFull, match="the disk is full: the output 'adapter'"):
        save_output(model, tokenizer, request, tiny_model_dir, full_disk / "adapter")
    assert set(_leftovers(full_disk)) <= {"checkpoints"}  # no partial output either


def test_a_torn_checkpoint_state_trains_from_the_start(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    trainer, *_ = _trainer(tiny_model_dir, tmp_path / "checkpoints")
    saved = trainer.save_checkpoint()
    (saved / "state.json").write_text("", encoding="utf-8")
    again, *_ = _trainer(tiny_model_dir, tmp_path / "checkpoints")
    assert again.restore() is None and not saved.exists()
