"""Training records → tokens and labels: loss only where the format says (TRL's formats)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from workers.engine.base import Prompt
from workers.engine.loading import load_tokenizer
from workers.engine.transformers_backend import encode_prompt
from workers.finetune.data import (
    IGNORE_INDEX,
    collate,
    effective_format,
    encode_record,
    encode_records,
)


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path) -> Any:
    return load_tokenizer(tiny_model_dir)


def _trained_text(tokenizer: Any, record: dict, fmt: str) -> str:
    example = encode_record(tokenizer, record, fmt)
    return str(
        tokenizer.decode(
            [
                t
                for t, label in zip(example.input_ids, example.labels, strict=True)
                if label != IGNORE_INDEX
            ]
        )
    )


def test_prompt_completion_in_chat_trains_on_the_completion_only(tokenizer: Any) -> None:
    record = {"prompt": "What is aspirin?", "completion": "Aspirin is an NSAID."}
    example = encode_record(tokenizer, record, "chat")
    prompt = encode_prompt(tokenizer, Prompt(record["prompt"], chat=True))
    # The untrained part is exactly what an evaluation feeds the model in chat format ...
    assert example.input_ids[: len(prompt)] == prompt
    assert all(label == IGNORE_INDEX for label in example.labels[: len(prompt)])
    # ... and the trained part is the answer and the end-of-turn token.
    trained = _trained_text(tokenizer, record, "chat")
    assert trained.startswith("Aspirin is an NSAID.") and "<|im_end|>" in trained
    assert "What is aspirin" not in trained


def test_prompt_completion_in_plain_format_joins_with_a_space_and_ends_with_eos(
    tokenizer: Any,
) -> None:
    record = {"prompt": "Question: What is aspirin?\nAnswer:", "completion": "An NSAID."}
    example = encode_record(tokenizer, record, "plain")
    assert example.input_ids[-1] == tokenizer.eos_token_id
    assert _trained_text(tokenizer, record, "plain") == " An NSAID.<|im_end|>"
    assert tokenizer.decode(example.input_ids).startswith(
        "Question: What is aspirin?\nAnswer: An NSAID."
    )


def test_text_records_train_on_every_token(tokenizer: Any) -> None:
    example = encode_record(tokenizer, {"text": "The river runs through the old town."}, "chat")
    assert example.labels == example.input_ids
    assert example.input_ids[-1] == tokenizer.eos_token_id


def test_messages_train_on_assistant_turns_only(tokenizer: Any) -> None:
    record = {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Capital of France?"},
            {"role": "assistant", "content": "Paris."},
            {"role": "user", "content": "And of Italy?"},
            {"role": "assistant", "content": "Rome."},
        ]
    }
    trained = _trained_text(tokenizer, record, "chat")
    assert "Paris." in trained and "Rome." in trained
    for untrained in ("Be brief", "Capital of France", "And of Italy", "system", "user"):
        assert untrained not in trained
    example = encode_record(tokenizer, record, "chat")
    rendered = tokenizer.apply_chat_template(record["messages"], tokenize=False)
    assert tokenizer.decode(example.input_ids) == rendered


def test_conversational_prompt_completion_trains_on_the_completion_turns(tokenizer: Any) -> None:
    record = {
        "prompt": [{"role": "user", "content": "Capital of Spain?"}],
        "completion": [{"role": "assistant", "content": "Madrid."}],
    }
    trained = _trained_text(tokenizer, record, "chat")
    assert trained.startswith("Madrid.") and "Spain" not in trained


def test_messages_need_a_chat_format(tokenizer: Any) -> None:
    record = {
        "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    }
    with pytest.raises(ValueError, match="chat"):
        encode_record(tokenizer, record, "plain")


def test_truncation_keeps_the_start_and_drops_examples_with_nothing_left(tokenizer: Any) -> None:
    records = [
        {"text": "The quick brown fox jumps over the lazy dog. " * 10},
        {"prompt": "Please answer the question in one short sentence. " * 10, "completion": "Yes."},
    ]
    examples, stats = encode_records(tokenizer, records, "chat", max_seq_length=16)
    assert stats.truncated == 2 and stats.dropped == 1  # the prompt alone fills 16 tokens
    assert len(examples) == 1 and len(examples[0].input_ids) == 16


def test_collate_pads_right_and_masks_padding(tokenizer: Any) -> None:
    short = encode_record(tokenizer, {"text": "Ice"}, "chat")
    long = encode_record(tokenizer, {"text": "The mountain was covered with snow."}, "chat")
    batch = collate([short, long], pad_id=tokenizer.pad_token_id)
    n = len(short.input_ids)
    assert batch["input_ids"].shape == (2, len(long.input_ids))
    assert batch["attention_mask"][0, :n].all() and not batch["attention_mask"][0, n:].any()
    assert (batch["labels"][0, n:] == IGNORE_INDEX).all()


def test_default_format_is_chat_with_a_template(tokenizer: Any) -> None:
    assert effective_format(tokenizer, None) == "chat"
    assert effective_format(tokenizer, "plain") == "plain"
