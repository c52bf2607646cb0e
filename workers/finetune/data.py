"""Training records → token ids and labels (TRL's three formats).

- ``{"text"}``: the text plus EOS; every token is trained on.
- ``{"prompt", "completion"}``: loss on the completion only. With a chat template (the
  default when the tokenizer has one) the pair becomes a user turn and an assistant turn, so
  training matches how evaluations ask (``prompt_format: chat``); in plain format the two are
  joined as given (one space when neither side has whitespace at the seam) and EOS follows.
- ``{"messages"}``: the chat template; loss on the assistant turns only.

Chat records are rendered turn by turn and each piece is tokenized separately, exactly as an
evaluation tokenizes the rendered prompt and then generates after it: the trained tokens are
the ones the model would produce at inference, not a re-merged tokenization of the whole string.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from app.finetune.schemas import record_format
from app.finetune.schemas import records_sha256 as records_sha256  # the API hashes alike
from workers.finetune.statefile import write_atomic

IGNORE_INDEX = -100


@dataclass(frozen=True)
class Example:
    """One tokenized training sequence; ``labels`` is ``IGNORE_INDEX`` where no loss is taken."""

    input_ids: list[int]
    labels: list[int]

    @property
    def trained_tokens(self) -> int:
        return sum(1 for label in self.labels[1:] if label != IGNORE_INDEX)


@dataclass
class EncodeStats:
    records: int = 0
    truncated: int = 0
    dropped: int = 0  # nothing left to train on after truncation


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def effective_format(tokenizer: Any, requested: str | None) -> str:
    """``chat`` when requested or by default with a chat template; ``plain`` otherwise."""
    if requested == "chat" and not has_chat_template(tokenizer):
        raise ValueError("prompt_format 'chat' needs a chat template; this tokenizer has none")
    return requested or ("chat" if has_chat_template(tokenizer) else "plain")


def _render(tokenizer: Any, messages: list[dict[str, str]], *, generation_prompt: bool) -> str:
    return str(
        tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation_prompt
        )
    )


def chat_segments(
    tokenizer: Any, messages: list[dict[str, str]], trained: Sequence[bool]
) -> list[tuple[str, bool]]:
    """Split a rendered conversation into (text, trained) pieces; trained = an assistant turn."""
    segments: list[tuple[str, bool]] = []
    done = ""
    for index, message in enumerate(messages):
        if not (trained[index] and message["role"] == "assistant"):
            continue
        head = _render(tokenizer, messages[:index], generation_prompt=True) if index else ""
        full = _render(tokenizer, messages[: index + 1], generation_prompt=False)
        if not (head.startswith(done) and full.startswith(head)):
            raise ValueError(
                "the chat template does not render this conversation turn by turn (a later "
                "render does not extend the earlier one), so assistant turns cannot be located"
            )
        segments += [(head[len(done) :], False), (full[len(head) :], True)]
        done = full
    whole = _render(tokenizer, messages, generation_prompt=False)
    if not whole.startswith(done):
        raise ValueError("the chat template does not render this conversation turn by turn")
    segments.append((whole[len(done) :], False))
    return [(text, trained) for text, trained in segments if text]


@dataclass(frozen=True)
class Rendering:
    """A record as (text, trained) pieces, tokenized one by one."""

    segments: list[tuple[str, bool]]
    # Raw text starts with the tokenizer's own special tokens (BOS for Llama-style tokenizers),
    # as evaluation prompts in plain format and perplexity texts do; a chat template carries
    # its special tokens itself, and ends assistant turns with its own end-of-turn token.
    special_tokens: bool
    eos: bool


def render_record(tokenizer: Any, record: dict[str, Any], prompt_format: str) -> Rendering:
    """How one record is trained on, in ``prompt_format`` (``chat`` or ``plain``)."""
    kind = record_format(record)
    if kind == "text":
        return Rendering([(str(record["text"]), True)], special_tokens=True, eos=True)
    if kind == "messages":
        if prompt_format != "chat":
            raise ValueError(
                "'messages' records need the chat format (a tokenizer with a chat template)"
            )
        messages = record["messages"]
        return Rendering(chat_segments(tokenizer, messages, [True] * len(messages)), False, False)
    prompt, completion = record["prompt"], record["completion"]
    if isinstance(prompt, list):  # conversational prompt-completion
        if prompt_format != "chat":
            raise ValueError("conversational prompt-completion records need the chat format")
        trained = [False] * len(prompt) + [True] * len(completion)
        return Rendering(chat_segments(tokenizer, [*prompt, *completion], trained), False, False)
    if prompt_format == "chat":
        messages = [
            {"role": "user", "content": prompt},
            {"role": "assistant", "content": completion},
        ]
        return Rendering(chat_segments(tokenizer, messages, [False, True]), False, False)
    seam = " " if prompt and not prompt[-1].isspace() and not completion[0].isspace() else ""
    return Rendering([(prompt, False), (seam + completion, True)], special_tokens=True, eos=True)


def encode_record(tokenizer: Any, record: dict[str, Any], prompt_format: str) -> Example:
    """Token ids and labels of one record (untruncated)."""
    rendering = render_record(tokenizer, record, prompt_format)
    ids: list[int] = []
    labels: list[int] = []
    for position, (text, trained) in enumerate(rendering.segments):
        special = rendering.special_tokens and position == 0
        piece = list(tokenizer(text, add_special_tokens=special).input_ids)
        ids += piece
        labels += piece if trained else [IGNORE_INDEX] * len(piece)
    if rendering.eos and tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
        labels.append(int(tokenizer.eos_token_id))
    return Example(ids, labels)


def encode_records(
    tokenizer: Any, records: Sequence[dict[str, Any]], prompt_format: str, max_seq_length: int
) -> tuple[list[Example], EncodeStats]:
    """Encode and right-truncate to ``max_seq_length``; drop records left with nothing to train."""
    stats = EncodeStats(records=len(records))
    examples = []
    for record in records:
        example = encode_record(tokenizer, record, prompt_format)
        if len(example.input_ids) > max_seq_length:
            stats.truncated += 1
            example = Example(example.input_ids[:max_seq_length], example.labels[:max_seq_length])
        if example.trained_tokens == 0:
            stats.dropped += 1
            continue
        examples.append(example)
    return examples, stats


def collate(examples: Sequence[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` tensors."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        ids[row, :n] = torch.tensor(example.input_ids)
        mask[row, :n] = 1
        labels[row, :n] = torch.tensor(example.labels)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def write_jsonl(path: Path, records: Sequence[dict[str, Any]]) -> None:
    """Write records atomically (:func:`workers.finetune.statefile.write_atomic`)."""
    write_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def read_records(path: Path) -> list[dict[str, Any]]:
    """Records this service wrote itself (a training-data snapshot, a cache file)."""
    with path.open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def read_records_state(path: Path) -> list[dict[str, Any]] | None:
    """:func:`read_records`, or ``None`` when the file is missing, torn or holds no records
    (its stage then redoes it)."""
    try:
        records = read_records(path)
    except FileNotFoundError:
        return None
    except (OSError, ValueError, RecursionError):
        records = []
    if not records or not all(isinstance(r, dict) for r in records):
        path.unlink(missing_ok=True)
        return None
    return records


def pad_id(tokenizer: Any) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return int(pad if pad is not None else 0)
