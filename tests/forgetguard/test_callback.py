"""ForgetGuardCallback in a real ``transformers.Trainer`` on the tiny model: the forgetting
curve is recorded during training, and the guard stops a run that forgets."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import (
    AutoTokenizer,
    LlamaForCausalLM,
    Trainer,
    TrainingArguments,
)

from forgetguard.callback import ForgetGuardCallback, builtin_suite
from tests.tiny_model import QA_PAIRS, build_tiny_model, qa_texts, teach_tiny_model

SUITE = {
    "name": "tiny-general",
    "kind": "qa",
    "items": [
        {"id": f"q{i}", "question": q, "answers": [a.split()[0]], "category": "facts"}
        for i, (q, a) in enumerate(QA_PAIRS)
    ],
}
# Narrow "domain" text that overwrites what the model knew when trained hard on it.
DOMAIN = [f"Aspirin dose {n} milligrams twice daily with food and water." for n in range(8)]


@pytest.fixture(scope="module")
def taught(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = build_tiny_model(tmp_path_factory.mktemp("cb") / "tiny")
    return teach_tiny_model(path, qa_texts(), steps=120)


class _Fixed(torch.utils.data.Dataset[dict[str, torch.Tensor]]):
    def __init__(self, tokenizer: Any, texts: list[str], width: int = 24) -> None:
        self.rows = []
        for text in texts:
            ids = tokenizer(text, add_special_tokens=False)["input_ids"][: width - 1]
            ids = ids + [tokenizer.eos_token_id]
            pad = width - len(ids)
            self.rows.append(
                {
                    "input_ids": torch.tensor(ids + [tokenizer.pad_token_id] * pad),
                    "attention_mask": torch.tensor([1] * len(ids) + [0] * pad),
                    "labels": torch.tensor(ids + [-100] * pad),
                }
            )

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.rows[index]


def _train(taught: Path, tmp_path: Path, callback: ForgetGuardCallback, lr: float) -> Trainer:
    tokenizer = AutoTokenizer.from_pretrained(taught)
    model = LlamaForCausalLM.from_pretrained(taught, dtype=torch.float32)
    args = TrainingArguments(
        output_dir=str(tmp_path / "out"),
        max_steps=20,
        per_device_train_batch_size=4,
        learning_rate=lr,
        lr_scheduler_type="constant",
        save_strategy="no",
        report_to=[],
        logging_strategy="no",
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=_Fixed(tokenizer, DOMAIN),
        processing_class=tokenizer,
        callbacks=[callback],
    )
    trainer.train()
    return trainer


def test_callback_records_the_forgetting_curve_during_training(
    taught: Path, tmp_path: Path
) -> None:
    guard = ForgetGuardCallback(every_steps=5, suites=[SUITE], prompt_format="plain")
    trainer = _train(taught, tmp_path, guard, lr=5e-3)
    steps = [point["step"] for point in guard.curve]
    assert steps == [0, 5, 10, 15, 20]
    assert trainer.state.global_step == 20 and guard.stopped_at is None
    base = guard.curve[0]["general"]["accuracy"]
    assert base >= 0.75, "the taught model answers its own facts before training"
    # Hard training on the narrow text makes it forget: the curve shows it.
    assert guard.curve[-1]["general"]["accuracy"] < base
    assert guard.curve[-1]["drop"] == pytest.approx(base - guard.curve[-1]["general"]["accuracy"])


def test_guard_stops_training_when_general_accuracy_falls(taught: Path, tmp_path: Path) -> None:
    guard = ForgetGuardCallback(every_steps=5, suites=[SUITE], prompt_format="plain", max_drop=0.1)
    trainer = _train(taught, tmp_path, guard, lr=5e-3)
    assert guard.stopped_at is not None and guard.stopped_at < 20
    assert trainer.state.global_step == guard.stopped_at
    assert "max_drop 0.1" in (guard.stop_reason or "")
    assert guard.curve[-1]["drop"] > 0.1


def test_builtin_suites_are_read_from_the_package_and_trimmed() -> None:
    guard = ForgetGuardCallback(suites=["general-qa"], max_items=5)
    assert guard.suites[0]["kind"] == "qa" and len(guard.suites[0]["items"]) == 5
    assert len(builtin_suite("general-qa")["items"]) >= 200
    with pytest.raises(ValueError, match="no built-in suite"):
        builtin_suite("no-such-suite")
