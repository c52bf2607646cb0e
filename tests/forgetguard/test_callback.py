"""ForgetGuardCallback in a real ``transformers.Trainer`` on the tiny model: the forgetting
curve is recorded during training, and the guard stops a run that forgets."""

from __future__ import annotations

import shutil
from collections import Counter
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

from app.core.config import Settings
from forgetguard import Client
from forgetguard.callback import ForgetGuardCallback, builtin_suite
from forgetguard.rules import CompareRules
from tests.conftest import start_worker
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
    # A guard that accepts no drop at all, but is not asked to stop: it only records.
    guard = ForgetGuardCallback(
        every_steps=5, suites=[SUITE], prompt_format="plain", rules=CompareRules(max_drop=0.0)
    )
    trainer = _train(taught, tmp_path, guard, lr=5e-3)
    steps = [point["step"] for point in guard.curve]
    assert steps == [0, 5, 10, 15, 20]
    assert trainer.state.global_step == 20 and guard.stopped_at is None
    base = guard.curve[0]["general"]["accuracy"]
    assert base >= 0.75, "the taught model answers its own facts before training"
    # Hard training on the narrow text makes it forget: the curve shows it.
    assert guard.curve[-1]["general"]["accuracy"] < base
    assert guard.curve[-1]["drop"] == pytest.approx(base - guard.curve[-1]["general"]["accuracy"])
    # Each later point carries the comparison's verdict and the guard's reading of it.
    last = guard.curve[-1]
    assert last["verdict"] in ("pass", "fail") and "verdict" not in guard.curve[0]
    assert last["guard"]["max_drop"] == 0.0 and last["guard"]["acceptable"] is False
    assert last["guard"]["drop"] == pytest.approx(last["drop"], abs=5e-4)


def test_guard_stops_training_when_general_accuracy_falls(taught: Path, tmp_path: Path) -> None:
    guard = ForgetGuardCallback(every_steps=5, suites=[SUITE], prompt_format="plain", max_drop=0.1)
    trainer = _train(taught, tmp_path, guard, lr=5e-3)
    assert guard.stopped_at is not None and guard.stopped_at < 20
    assert trainer.state.global_step == guard.stopped_at
    assert "max_drop 0.1" in (guard.stop_reason or "")
    assert guard.curve[-1]["drop"] > 0.1


def test_guard_stops_on_a_failing_verdict_even_within_max_drop(
    taught: Path, tmp_path: Path
) -> None:
    # Any drop fails the verdict (threshold 0), while max_drop alone would accept every drop:
    # the guard needs both, as a fine-tune job's does.
    rules = CompareRules(threshold=0.0, max_drop=1.0)
    guard = ForgetGuardCallback(
        every_steps=5, suites=[SUITE], prompt_format="plain", rules=rules, stop=True
    )
    trainer = _train(taught, tmp_path, guard, lr=5e-3)
    assert guard.stopped_at is not None and trainer.state.global_step == guard.stopped_at
    stopped = guard.curve[-1]
    assert stopped["verdict"] == "fail" and stopped["drop"] <= 1.0
    assert stopped["guard"] == {
        "max_drop": 1.0,
        "drop": stopped["guard"]["drop"],
        "acceptable": False,
    }
    assert "more than the threshold 0.0" in (guard.stop_reason or "")
    # Every earlier point passed the guard (else training would have stopped there).
    assert all(p["guard"]["acceptable"] for p in guard.curve[1:-1])


def test_max_items_is_a_seeded_sample_of_every_category_and_is_reported() -> None:
    suite = builtin_suite("general-qa")
    categories = {item["category"] for item in suite["items"]}
    guard = ForgetGuardCallback(suites=["general-qa"], max_items=40)
    sampled = guard.suites[0]
    assert len(sampled["items"]) == 40
    assert {item["category"] for item in sampled["items"]} == categories
    # Each category keeps its share: 40 of 252 in 7 categories of 36 is 5 or 6 each.
    shares = Counter(item["category"] for item in sampled["items"])
    assert set(shares.values()) <= {5, 6}
    # The sample is reported and reproducible; another seed draws another one.
    assert guard.sample == {sampled["name"]: [item["id"] for item in sampled["items"]]}
    again = ForgetGuardCallback(suites=["general-qa"], max_items=40)
    assert again.sample == guard.sample
    other = ForgetGuardCallback(suites=["general-qa"], max_items=40, seed=1)
    assert other.sample != guard.sample
    # Kept in the suite's order, so a report reads like the suite.
    order = {item["id"]: i for i, item in enumerate(suite["items"])}
    ids = guard.sample[sampled["name"]]
    assert ids == sorted(ids, key=order.__getitem__)


def test_max_drop_and_threshold_keywords_set_the_rule_book_and_ask_to_stop() -> None:
    assert ForgetGuardCallback(max_items=1).stop is False
    guard = ForgetGuardCallback(max_items=1, max_drop=0.1, threshold=0.2)
    assert guard.stop is True and guard.rules == CompareRules(max_drop=0.1, threshold=0.2)
    mixed = ForgetGuardCallback(max_items=1, rules=CompareRules(alpha=0.01), max_drop=0.1)
    assert mixed.rules == CompareRules(alpha=0.01, max_drop=0.1)
    assert ForgetGuardCallback(max_items=1, max_drop=0.1, stop=False).stop is False


def test_builtin_suites_are_read_from_the_package_and_trimmed() -> None:
    guard = ForgetGuardCallback(suites=["general-qa"], max_items=5)
    assert guard.suites[0]["kind"] == "qa" and len(guard.suites[0]["items"]) == 5
    assert len(builtin_suite("general-qa")["items"]) >= 200
    with pytest.raises(ValueError, match="no built-in suite"):
        builtin_suite("no-such-suite")


@pytest.mark.slow
def test_on_a_server_the_guard_reads_compare_under_the_rule_book(
    taught: Path, tmp_path: Path, settings: Settings, client: Any
) -> None:
    # The base and the saved checkpoints lie under the server's model roots.
    base = tmp_path / "models" / "taught"
    shutil.copytree(taught, base)
    worker = start_worker(settings, log=tmp_path / "worker.log")
    try:
        rules = CompareRules(threshold=0.0, max_drop=1.0)
        guard = ForgetGuardCallback(
            suites=[SUITE],
            prompt_format="plain",
            max_new_tokens=8,
            client=Client("http://testserver", http=client),
            base_model=str(base),
            rules=rules,
            stop=True,
        )
        tokenizer = AutoTokenizer.from_pretrained(base)
        args = TrainingArguments(
            output_dir=str(tmp_path / "models" / "out"),
            max_steps=20,
            per_device_train_batch_size=4,
            learning_rate=5e-3,
            lr_scheduler_type="constant",
            save_strategy="steps",
            save_steps=5,
            report_to=[],
            logging_strategy="no",
            use_cpu=True,
            seed=0,
            disable_tqdm=True,
        )
        Trainer(
            model=LlamaForCausalLM.from_pretrained(base, dtype=torch.float32),
            args=args,
            train_dataset=_Fixed(tokenizer, DOMAIN),
            processing_class=tokenizer,
            callbacks=[guard],
        ).train()
    finally:
        worker.terminate()
        worker.wait(60)
    assert guard.curve[0]["step"] == 0 and guard.stopped_at is not None
    stopped = guard.curve[-1]
    comparison = stopped["results"]["_comparison"]
    # The server compared under these rules and reported the guard's reading of its verdict.
    assert comparison["threshold"] == 0.0 and comparison["verdict"] == "fail"
    assert comparison["guard"] == {
        "max_drop": 1.0,
        "drop": comparison["accuracy_drop"],
        "acceptable": False,
    }
    assert stopped["guard"] == comparison["guard"]
