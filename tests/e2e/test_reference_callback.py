"""ForgetGuardCallback on the real reference model: a peft LoRA run in a ``Trainer`` records
general accuracy at step 0 and during training, with the same numbers an evaluation job gives."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

from forgetguard.callback import ForgetGuardCallback
from tests.forgetguard.test_callback import _Fixed

pytestmark = [pytest.mark.reference, pytest.mark.slow]

DRUG = [
    "Aspirin is a nonsteroidal anti-inflammatory drug used to reduce pain and fever.",
    "Metformin lowers blood sugar in type 2 diabetes by reducing liver glucose output.",
    "Ibuprofen relieves pain and inflammation; take it with food to protect the stomach.",
    "Amoxicillin is a penicillin antibiotic used for bacterial infections.",
]


def test_lora_training_on_the_reference_model_is_watched(
    reference_model_dir: Path, tmp_path: Path
) -> None:
    tokenizer = AutoTokenizer.from_pretrained(reference_model_dir)
    base = AutoModelForCausalLM.from_pretrained(reference_model_dir, dtype=torch.float32)
    model = get_peft_model(
        base, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])
    )
    guard = ForgetGuardCallback(every_steps=3, suites=["general-qa"], max_items=8)
    args = TrainingArguments(
        output_dir=str(tmp_path / "out"),
        max_steps=6,
        per_device_train_batch_size=2,
        learning_rate=2e-4,
        save_strategy="no",
        report_to=[],
        logging_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
    )
    Trainer(
        model=model,
        args=args,
        train_dataset=_Fixed(tokenizer, DRUG, width=32),
        processing_class=tokenizer,
        callbacks=[guard],
    ).train()
    assert [p["step"] for p in guard.curve] == [0, 3, 6]
    # The real model answers several of the sampled general questions (one or two a category) …
    assert guard.curve[0]["general"]["accuracy"] >= 0.5
    # … and a gentle LoRA run of six steps keeps them: the guard would not have stopped it.
    assert all(abs(p["drop"]) <= 0.25 for p in guard.curve)
    assert guard.stopped_at is None
