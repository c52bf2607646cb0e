"""Fine-tune job requests: the schema, the lesson's presets as data, the learning-rate
rule of thumb, and training-record validation. Pure and torch-free: the API imports it.

The two presets are the lesson's two ``TrainingArguments`` verbatim; every field the lesson
leaves out takes the ``TrainingArguments`` default, so ``risky`` really is what a user of
``TrainingArguments(num_train_epochs=10, learning_rate=5e-5, per_device_train_batch_size=1,
warmup_ratio=0.0)`` gets.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import random
from collections.abc import Iterable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_serializer, model_validator

from app.core.clientfiles import ReadBudget, check_regular, read_client_file
from app.core.config import MAX_PROCESSES, Settings
from app.core.errors import Problem
from app.core.paths import resolve_under
from app.core.quantization import QUANTIZED_BACKENDS, Quantization
from app.core.schemas import (
    GenerationSettings,
    JobTimestamps,
    PathStr,
    Progress,
    Status,
    SuiteRef,
    iso_utc,
)
from app.suites.kinds import SuiteDefinition
from app.suites.rules import CompareOptions, CompareRules

Method = Literal["lora", "qlora", "full"]
PresetName = Literal["safe", "risky"]
SchedulerName = Literal["linear", "cosine", "constant", "constant_with_warmup"]
PromptFormat = Literal["chat", "plain"]

# --------------------------------------------------------------------------- presets (data)

# transformers.TrainingArguments defaults for every field a preset does not set.
TRAINING_ARGUMENTS_DEFAULTS: dict[str, Any] = {
    "learning_rate": 5e-5,
    "num_train_epochs": 3.0,
    "per_device_train_batch_size": 8,
    "gradient_accumulation_steps": 1,
    "warmup_ratio": 0.0,
    "lr_scheduler_type": "linear",
    "weight_decay": 0.0,
    "max_grad_norm": 1.0,
    "seed": 42,
    "max_steps": None,
}
# Fields TrainingArguments does not have (SFT's max_seq_length, our checkpoint cadence).
FORGETGUARD_DEFAULTS: dict[str, Any] = {"max_seq_length": 512, "checkpoint_every_steps": 10}

# The lesson's ``safe_args`` and ``risky_args``. ``learning_rate`` may depend on the method:
# the lesson's safe 2e-5 is a full fine-tuning rate; LoRA's safe rate is its 2e-4, which is
# also the top of its QLoRA range.
PRESETS: dict[str, dict[str, Any]] = {
    "safe": {
        "num_train_epochs": 3.0,
        "learning_rate": {"full": 2e-5, "lora": 2e-4, "qlora": 2e-4},
        "per_device_train_batch_size": 4,
        "gradient_accumulation_steps": 4,
        "warmup_ratio": 0.05,
        "lr_scheduler_type": "cosine",
        "weight_decay": 0.01,
    },
    "risky": {
        "num_train_epochs": 10.0,
        "learning_rate": 5e-5,
        "per_device_train_batch_size": 1,
        "warmup_ratio": 0.0,
    },
}

# The lesson's "rule of thumb for learning rates" (inclusive ranges).
LR_RULE_OF_THUMB: dict[str, tuple[float, float]] = {
    "full": (1e-5, 2e-5),
    "lora": (1e-4, 3e-4),
    "qlora": (1e-4, 2e-4),
}
METHOD_WORDS = {"full": "full fine-tuning", "lora": "LoRA", "qlora": "QLoRA"}
# Methods that train LoRA adapters on a frozen base (``full`` trains every weight).
ADAPTER_METHODS = frozenset({"lora", "qlora"})
# How a method loads its frozen base, for training and for every evaluation of its adapter
# (absent: as stored). QLoRA: 4-bit NormalFloat through bitsandbytes.
BASE_QUANTIZATION: dict[str, Quantization] = {"qlora": "nf4"}

MAX_RECORDS = 200_000
# Checkpoint evaluations one job may ask for, however it asks: ``evaluation.checkpoints`` up
# to this, and ``evaluation.every_steps`` only when total steps / every_steps stays within it.
MAX_CHECKPOINT_EVALUATIONS = 100
MAX_RECORD_CHARS = 200_000
ROLES = ("system", "user", "assistant")


class _Request(BaseModel):
    # Unknown keys are errors everywhere: a typo ("learnig_rate") must not silently train
    # with the default.
    model_config = ConfigDict(extra="forbid", strict=True)


class Hyperparameters(_Request):
    """Overrides of the preset, by ``TrainingArguments`` name; ``None`` keeps the preset's value."""

    learning_rate: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    num_train_epochs: Annotated[float, Field(gt=0.0, le=10_000)] | None = None
    per_device_train_batch_size: Annotated[int, Field(ge=1, le=4096)] | None = None
    gradient_accumulation_steps: Annotated[int, Field(ge=1, le=4096)] | None = None
    warmup_ratio: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    lr_scheduler_type: SchedulerName | None = None
    weight_decay: Annotated[float, Field(ge=0.0, le=100.0)] | None = None
    max_grad_norm: Annotated[float, Field(ge=0.0)] | None = None
    seed: Annotated[int, Field(ge=0, le=2**32 - 1)] | None = None
    max_steps: Annotated[int, Field(ge=1, le=10_000_000)] | None = None
    max_seq_length: Annotated[int, Field(ge=8, le=131_072)] | None = None
    checkpoint_every_steps: Annotated[int, Field(ge=1, le=10_000_000)] | None = None


class ResolvedHyperparameters(BaseModel):
    """Every training setting, concrete: the preset with the request's overrides applied."""

    model_config = ConfigDict(frozen=True)

    learning_rate: float
    num_train_epochs: float
    per_device_train_batch_size: int
    gradient_accumulation_steps: int
    warmup_ratio: float
    lr_scheduler_type: SchedulerName
    weight_decay: float
    max_grad_norm: float
    seed: int
    max_steps: int | None
    max_seq_length: int
    checkpoint_every_steps: int


def resolve_hyperparameters(
    method: str, preset: str, overrides: Hyperparameters | None = None
) -> ResolvedHyperparameters:
    """TrainingArguments defaults, then the preset, then the explicit overrides."""
    values = {**TRAINING_ARGUMENTS_DEFAULTS, **FORGETGUARD_DEFAULTS}
    for key, value in PRESETS[preset].items():
        values[key] = value[method] if isinstance(value, dict) else value
    if overrides is not None:
        values.update(overrides.model_dump(exclude_none=True))
    return ResolvedHyperparameters(**values)


def learning_rate_warnings(method: str, learning_rate: float) -> list[str]:
    """A warning when the rate is outside the lesson's rule of thumb for the method."""
    low, high = LR_RULE_OF_THUMB[method]
    words = METHOD_WORDS[method]
    if learning_rate > high:
        return [
            f"learning_rate {learning_rate:g} is above the lesson's rule of thumb for {words} "
            f"({low:g} to {high:g}): large steps overwrite what the model already knew "
            "(catastrophic forgetting risk)"
        ]
    if learning_rate < low:
        return [
            f"learning_rate {learning_rate:g} is below the lesson's rule of thumb for {words} "
            f"({low:g} to {high:g}): the model may barely learn the new data"
        ]
    return []


# --------------------------------------------------------------------------- records


def record_format(record: Any) -> str:
    """``text``, ``prompt_completion`` or ``messages`` (TRL's formats); ValueError otherwise."""
    if not isinstance(record, dict):
        raise ValueError(f"a record must be a JSON object, got {type(record).__name__}")
    keys = set(record)
    if "messages" in keys:
        if keys & {"text", "prompt", "completion"}:
            raise ValueError(
                "a record has 'messages' and also 'text'/'prompt'/'completion'; use one format"
            )
        _check_messages(record["messages"], "messages", need_assistant=True)
        return "messages"
    if "prompt" in keys or "completion" in keys:
        if "text" in keys:
            raise ValueError("a record has 'text' and also 'prompt'/'completion'; use one format")
        if not {"prompt", "completion"} <= keys:
            missing = "completion" if "prompt" in keys else "prompt"
            raise ValueError(f"a prompt-completion record lacks {missing!r}")
        prompt, completion = record["prompt"], record["completion"]
        if isinstance(prompt, str) and isinstance(completion, str):
            _check_text(prompt, "prompt", allow_empty=True)
            _check_text(completion, "completion")
        elif isinstance(prompt, list) and isinstance(completion, list):
            # TRL's conversational prompt-completion: message lists, loss on the completion's turns.
            _check_messages(prompt, "prompt", need_assistant=False)
            _check_messages(completion, "completion", need_assistant=True)
        else:
            raise ValueError(
                "'prompt' and 'completion' must both be strings or both be message lists"
            )
        return "prompt_completion"
    if "text" in keys:
        _check_text(record["text"], "text")
        return "text"
    shown = sorted(keys)[:6]
    raise ValueError(
        f"a record needs 'text', 'prompt' + 'completion', or 'messages'; got keys {shown}"
    )


def _check_text(value: Any, field: str, *, allow_empty: bool = False) -> None:
    if not isinstance(value, str):
        raise ValueError(f"'{field}' must be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise ValueError(f"'{field}' is empty")
    if len(value) > MAX_RECORD_CHARS:
        raise ValueError(f"'{field}' is longer than {MAX_RECORD_CHARS} characters")


def _check_messages(messages: Any, field: str, *, need_assistant: bool) -> None:
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"'{field}' must be a non-empty list of messages")
    for index, message in enumerate(messages):
        where = f"{field}[{index}]"
        if (
            not isinstance(message, dict)
            or set(message) - {"role", "content"}
            or "role" not in message
        ):
            raise ValueError(f"{where} must be an object with 'role' and 'content'")
        if message["role"] not in ROLES:
            raise ValueError(f"{where}.role must be one of {list(ROLES)}, got {message['role']!r}")
        _check_text(
            message.get("content"), f"{where}.content", allow_empty=message["role"] != "assistant"
        )
    if need_assistant and not any(m["role"] == "assistant" for m in messages):
        raise ValueError(f"'{field}' has no assistant message: there is nothing to train on")


def records_sha256(records: Sequence[dict[str, Any]]) -> str:
    """A content hash of records (cache keys, resume checks, a job's dataset)."""
    digest = hashlib.sha256()
    for record in records:
        digest.update(json.dumps(record, sort_keys=True, ensure_ascii=False).encode())
        digest.update(b"\n")
    return digest.hexdigest()


def validate_records(records: Sequence[Any], *, where: str) -> dict[str, int]:
    """Check every record; return counts per format. ValueError names the bad record."""
    counts: dict[str, int] = {}
    for index, record in enumerate(records):
        try:
            kind = record_format(record)
        except ValueError as exc:
            raise ValueError(f"{where}[{index}] (record {index + 1}): {exc}") from None
        counts[kind] = counts.get(kind, 0) + 1
    return counts


def read_jsonl(
    path: Path,
    *,
    shown: str,
    max_bytes: int,
    what: str = "dataset",
    budget: ReadBudget | None = None,
) -> list[dict[str, Any]]:
    """Parse a JSONL file of records (blank lines skipped), naming the line of any bad record.

    Every failure is a 422 Problem that names the file as the client gave it (``shown``), never
    the resolved path: the API checks a file at submission and the worker again before training.
    """
    try:
        return _read_jsonl(
            path, shown=shown, max_bytes=max_bytes, what=what, budget=budget or ReadBudget()
        )
    except UnicodeDecodeError:
        raise Problem(
            422, "Invalid training record", f"{what} {shown!r} is not UTF-8 text; JSONL is expected"
        ) from None
    except RecursionError:
        raise Problem(
            422, "Invalid training record", f"{what} {shown!r} holds JSON nested too deeply"
        ) from None
    except OSError as exc:
        # strerror only: str(exc) would name the resolved path.
        raise Problem(
            422,
            "Unreadable dataset",
            f"{what} {shown!r} cannot be read: {exc.strerror or 'I/O error'}",
        ) from None


def load_path_records(
    settings: Settings, raw: str, *, what: str = "dataset"
) -> list[dict[str, Any]]:
    """Records of a client-named JSONL file under the data roots (403 outside them, else 422).

    The API calls it at submission and the worker again right before training: the file may
    have changed in between.
    """
    path = resolve_under(
        raw, settings.resolved_data_roots, what=what, env_var="FORGETGUARD_DATA_ROOTS"
    )
    return read_jsonl(
        path,
        shown=raw,
        what=what,
        max_bytes=settings.max_dataset_bytes,
        budget=settings.read_budget(),
    )


def _read_jsonl(
    path: Path, *, shown: str, max_bytes: int, what: str, budget: ReadBudget
) -> list[dict[str, Any]]:
    if not path.exists() or path.is_dir():
        raise Problem(422, f"{what.capitalize()} not found", f"{what} path {shown!r} is not a file")
    size = check_regular(path, f"{what} {shown!r}").st_size
    if size > max_bytes:
        raise Problem(
            422,
            "Dataset too large",
            f"{what} {shown!r} is {size} bytes; the limit is {max_bytes} "
            "(FORGETGUARD_MAX_DATASET_BYTES)",
        )
    records: list[dict[str, Any]] = []
    # A client's file: a regular one, within the budget, read before the deadline.
    raw = read_client_file(
        path,
        f"{what} {shown!r}",
        budget,
        max_bytes=max_bytes,
        setting="FORGETGUARD_MAX_DATASET_BYTES",
    )
    with io.TextIOWrapper(io.BytesIO(raw), encoding="utf-8") as fh:
        for number, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise Problem(
                    422,
                    "Invalid training record",
                    f"{what} {shown} line {number}: not valid JSON ({exc.msg})",
                ) from None
            try:
                record_format(record)
            except ValueError as exc:
                raise Problem(
                    422, "Invalid training record", f"{what} {shown} line {number}: {exc}"
                ) from None
            records.append(record)
            if len(records) > MAX_RECORDS:
                raise Problem(
                    422, "Dataset too large", f"{what} {shown} has more than {MAX_RECORDS} records"
                )
    if not records:
        raise Problem(422, "Empty dataset", f"{what} {shown} holds no records")
    return records


# --------------------------------------------------------------------------- request


class BaseModelRef(_Request):
    path: PathStr


class DatasetSpec(_Request):
    """Training data: inline ``examples`` or a JSONL ``path`` under an allowed data root."""

    examples: list[dict[str, Any]] | None = Field(None, min_length=1, max_length=MAX_RECORDS)
    path: PathStr | None = None
    # How prompt/completion and messages records are rendered; default: the tokenizer's chat
    # template when it has one (the same default as evaluations), else plain concatenation.
    prompt_format: PromptFormat | None = None

    @model_validator(mode="after")
    def _one_source(self) -> DatasetSpec:
        if (self.examples is None) == (self.path is None):
            raise ValueError(
                "give exactly one of 'examples' (inline records) or 'path' (a JSONL file)"
            )
        if self.examples is not None:
            validate_records(self.examples, where="examples")
        return self


class GeneralData(_Request):
    """General (non-domain) data for replay or the Fisher: a suite, ``self``, records or a file."""

    source: SuiteRef | None = None
    examples: list[dict[str, Any]] | None = Field(None, min_length=1, max_length=MAX_RECORDS)
    path: PathStr | None = None
    # "dataset": a qa suite's first accepted answer is the completion. "base_model": the base
    # model answers the prompts itself (greedy; generated once per model and cached), which
    # rehearses the model's own behaviour instead of teaching it terse suite answers.
    completions: Literal["dataset", "base_model"] = "dataset"
    max_new_tokens: Annotated[int, Field(ge=1, le=1024)] = 128

    @model_validator(mode="after")
    def _one_source(self) -> GeneralData:
        given = [name for name in ("source", "examples", "path") if getattr(self, name) is not None]
        if not given:
            self.source = self._default_source()
        elif len(given) > 1:
            raise ValueError(f"give one of 'source', 'examples' or 'path', not {given}")
        if self.examples is not None:
            validate_records(self.examples, where="examples")
        return self

    def _default_source(self) -> str:
        return "general-qa"


class ReplaySpec(GeneralData):
    """The lesson's ``create_replay_dataset``: ``int(len(domain) * fraction)`` general records."""

    fraction: Annotated[float, Field(gt=0.0, le=100.0)] = 0.1
    seed: Annotated[int, Field(ge=0, le=2**32 - 1)] = 42

    def _default_source(self) -> str:
        return "self"


class EWCSpec(GeneralData):
    """Elastic weight consolidation: diagonal Fisher, penalty ``importance · Σ F (θ − θ*)²``."""

    importance: Annotated[float, Field(gt=0.0, le=1e15)] = 5000.0
    fisher_samples: Annotated[int, Field(ge=1, le=100_000)] = 256


class LoraSpec(_Request):
    """peft ``LoraConfig`` fields; defaults are the lesson's (r 16, alpha 32, q/v, dropout 0.1)."""

    r: Annotated[int, Field(ge=1, le=4096)] = 16
    lora_alpha: Annotated[float, Field(gt=0.0, le=1e6)] = 32
    target_modules: (
        Literal["all-linear"]
        | list[Annotated[str, Field(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9_.]+$")]]
    ) = Field(default_factory=lambda: ["q_proj", "v_proj"])
    lora_dropout: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.1
    use_rslora: bool = False

    @model_validator(mode="after")
    def _targets(self) -> LoraSpec:
        if isinstance(self.target_modules, list) and not self.target_modules:
            raise ValueError("target_modules must name at least one module, or be 'all-linear'")
        return self


# A dataset this large gets a held-out domain split by default (``evaluation.domain``).
DOMAIN_DEFAULT_MIN_RECORDS = 20
DOMAIN_DEFAULT_HOLDOUT = 0.2


class DomainEvaluationSpec(_Request):
    """What the job learned: a held-out split of its own dataset and/or the user's domain suites.

    ``holdout`` sets aside that fraction of the dataset (seeded, never trained on) and scores
    NLL per token on its completions, as training does. ``suites`` are the user's own domain
    suites (accuracy for ``qa`` and ``multiple_choice``). ``min_gain`` is how much counts as
    learning: a relative fall of the held-out NLL per token, or an accuracy gain, of at least
    that much.
    """

    holdout: Annotated[float, Field(gt=0.0, lt=1.0)] | None = None
    seed: Annotated[int, Field(ge=0, le=2**32 - 1)] = 42
    suites: list[SuiteRef | SuiteDefinition] = Field(default_factory=list, max_length=20)
    min_gain: Annotated[float, Field(ge=0.0, le=1.0)] = 0.05

    @model_validator(mode="after")
    def _something(self) -> DomainEvaluationSpec:
        if self.holdout is None and not self.suites:
            raise ValueError("give 'holdout' (a fraction of the dataset), 'suites', or both")
        return self


def holdout_count(n_records: int, fraction: float) -> int:
    """How many of ``n_records`` a held-out ``fraction`` sets aside (at least one)."""
    return max(1, round(n_records * fraction))


def holdout_split(
    records: Sequence[dict[str, Any]], fraction: float, seed: int
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """``(train, held_out)``: a seeded shuffle of the indexes; each keeps the dataset's order."""
    k = holdout_count(len(records), fraction)
    indexes = list(range(len(records)))
    random.Random(seed).shuffle(indexes)
    held = set(indexes[:k])
    return (
        [r for i, r in enumerate(records) if i not in held],
        [r for i, r in enumerate(records) if i in held],
    )


def dataset_changed_detail(job_id: str, path: str | None) -> str:
    """Why a job's dataset can no longer be used: the file changed after the job split it."""
    return (
        f"the dataset {path!r} changed after fine-tune job {job_id} was trained on it: its "
        "records no longer match the ones the job split into training and held-out records, "
        "so a held-out evaluation now could score records it was trained on. Restore the "
        "file, or run a new fine-tune job on the new data"
    )


class FinetuneEvaluationSpec(_Request, CompareRules):
    """What the job evaluates before and after training, and how the comparison decides.

    The rules (``threshold``, ``mode``, ``alpha``, ``max_drop`` …) are the rule book's,
    ``forgetguard.rules.CompareRules``, with its defaults.
    """

    # The rule book is frozen; a request is completed at submission (pinned suites, domain).
    model_config = ConfigDict(extra="forbid", strict=True, frozen=False)

    suites: list[SuiteRef | SuiteDefinition] = Field(
        default_factory=lambda: ["general-qa", "forgetting-checklist"],  # type: ignore[arg-type]
        min_length=1,
        max_length=20,
    )
    prompt_format: PromptFormat | None = None
    generation: GenerationSettings = Field(default_factory=GenerationSettings)
    # The engine both evaluations run on (a served endpoint cannot evaluate the new weights).
    backend: Literal["transformers", "vllm"] = "transformers"
    # Reuse a finished evaluation of the same base model, suites and settings as "before".
    cache: bool = True
    # What the job learned. Default: a 20 % held-out split when the dataset has at least 20
    # records (set at submission); ``false`` turns it off.
    domain: DomainEvaluationSpec | Literal[False] | None = None
    # Evaluate the weights during training (general suites, domain split, verdict against the
    # base) every N optimizer steps, or at N evenly spaced steps; the last step is always one.
    every_steps: Annotated[int, Field(ge=1, le=1_000_000)] | None = None
    checkpoints: Annotated[int, Field(ge=1, le=MAX_CHECKPOINT_EVALUATIONS)] | None = None

    @model_validator(mode="after")
    def _one_cadence(self) -> FinetuneEvaluationSpec:
        if self.every_steps is not None and self.checkpoints is not None:
            raise ValueError("give 'every_steps' or 'checkpoints', not both")
        return self


class GuardSpec(_Request):
    """Which checkpoint to ship when training forgets.

    A checkpoint passes when the verdict against the base passes and the general accuracy
    dropped by at most ``max_drop`` (the rule book's, ``evaluation.max_drop``, unless given
    here). ``stop`` ends training at the first checkpoint that does not pass; ``keep_best``
    trains to the end. Both ship the final weights when they pass, else the passing checkpoint
    with the largest domain gain; when none passes, nothing is shipped.
    """

    max_drop: Annotated[
        float | None,
        Field(
            ge=0.0,
            le=1.0,
            description="Overrides the job's rule book max_drop (evaluation.max_drop) for the "
            "guard; null: that one.",
        ),
    ] = None
    action: Literal["stop", "keep_best"] = "keep_best"


class InterpolationSpec(_Request):
    """WiSE-FT: evaluate weights between the base (α 0) and the fine-tune (α 1); ship one.

    LoRA: the adapter's update scaled by α. Full: ``(1 − α)·base + α·tuned``. ``largest``
    picks the largest α that passes the gate; ``best_domain`` the passing α with the largest
    domain gain.
    """

    alphas: list[Annotated[float, Field(gt=0.0, le=1.0)]] = Field(
        default_factory=lambda: [0.25, 0.5, 0.75, 1.0], min_length=1, max_length=20
    )
    pick: Literal["largest", "best_domain"] = "largest"

    @model_validator(mode="after")
    def _distinct(self) -> InterpolationSpec:
        self.alphas = sorted(set(self.alphas))
        return self


Strategy = Literal["ddp", "fsdp", "deepspeed"]


class ResourcesSpec(_Request):
    """How many processes train the job, and how they share the work.

    ``processes`` 1 (the default) trains in the worker's own process, as always. More launch a
    ``torchrun`` process group on a worker that holds at least that many (``--processes`` on
    CPU, ``--devices`` on CUDA). ``per_device_train_batch_size`` is per process, as in the HF
    ``Trainer``: the global batch is ``per_device_train_batch_size × gradient_accumulation_steps
    × processes``. ``ddp`` replicates the model on every process; ``fsdp`` shards parameters,
    gradients and optimizer state across them (FSDP2); ``deepspeed`` runs DeepSpeed ZeRO-2,
    which partitions the gradients and optimizer state (the worker's ``deepspeed`` extra).
    """

    processes: Annotated[int, Field(ge=1, le=MAX_PROCESSES)] = 1
    strategy: Strategy = "ddp"


class FinetuneJobCreate(_Request):
    """``POST /finetune-jobs`` body."""

    base_model: BaseModelRef
    dataset: DatasetSpec
    method: Method = "lora"
    preset: PresetName = "safe"
    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters)
    lora: LoraSpec | None = None
    replay: ReplaySpec | None = None
    ewc: EWCSpec | None = None
    evaluation: FinetuneEvaluationSpec | None = Field(default_factory=FinetuneEvaluationSpec)
    guard: GuardSpec | None = None
    interpolation: InterpolationSpec | None = None
    # Set by POST /finetune-jobs/{id}/interpolations: reuse that job's training, only sweep.
    from_job: Annotated[str, Field(max_length=40, pattern=r"^ft_[0-9a-f]+$")] | None = None
    label: Annotated[str, Field(max_length=200)] | None = None
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)

    @model_validator(mode="after")
    def _method_settings(self) -> FinetuneJobCreate:
        if not self.adapter and self.lora is not None:
            raise ValueError(
                f"'lora' settings were given but method is {self.method!r}; drop them or use "
                f"method {' or '.join(repr(m) for m in sorted(ADAPTER_METHODS))}"
            )
        if self.adapter and self.lora is None:
            self.lora = LoraSpec()
        if (
            self.quantization is not None
            and self.evaluation is not None
            and self.evaluation.backend not in QUANTIZED_BACKENDS
        ):
            raise ValueError(
                f"method {self.method!r} trains on a {self.quantization} base, and evaluation "
                f"backend {self.evaluation.backend!r} cannot load that base with its adapter "
                "the way training used it; use evaluation.backend "
                f"{' or '.join(repr(b) for b in QUANTIZED_BACKENDS)}"
            )
        if self.guard is not None and (
            self.evaluation is None
            or (self.evaluation.every_steps is None and self.evaluation.checkpoints is None)
        ):
            raise ValueError(
                "'guard' chooses among checkpoint evaluations: set evaluation.every_steps "
                "or evaluation.checkpoints"
            )
        if self.interpolation is not None and self.evaluation is None:
            raise ValueError("'interpolation' chooses by evaluation: it needs 'evaluation'")
        return self

    @property
    def adapter(self) -> bool:
        """Whether the method trains LoRA adapters on a frozen base (its output: an adapter)."""
        return self.method in ADAPTER_METHODS

    @property
    def quantization(self) -> Quantization | None:
        """How the frozen base is loaded for training and evaluation (None: as stored)."""
        return BASE_QUANTIZATION.get(self.method)

    def compare_options(self) -> CompareOptions:
        """The job's rules for every comparison it makes; a guard's ``max_drop`` overrides."""
        assert self.evaluation is not None, "a job without evaluation compares nothing"
        options = CompareOptions.of(self.evaluation)
        if self.guard is not None and self.guard.max_drop is not None:
            options = options.model_copy(update={"max_drop": self.guard.max_drop})
        return options

    def resolved(self) -> ResolvedHyperparameters:
        """The preset with this request's overrides applied."""
        return resolve_hyperparameters(self.method, self.preset, self.hyperparameters)

    def warnings(self, n_records: int) -> list[str]:
        """Warnings known at submission: the learning-rate rule of thumb, an empty replay."""
        out = learning_rate_warnings(self.method, self.resolved().learning_rate)
        if self.replay is not None and int(n_records * self.replay.fraction) == 0:
            out.append(
                f"replay adds no examples: int({n_records} × {self.replay.fraction:g}) = 0 "
                "(the lesson's arithmetic rounds down); raise replay.fraction"
            )
        return out


# --------------------------------------------------------------------------- responses


class FinetuneJobPublic(JobTimestamps):
    """The API view of a fine-tune job."""

    id: str
    status: Status
    label: str | None
    progress: Progress
    base_model: dict[str, Any]
    method: str
    preset: str
    hyperparameters: dict[str, Any]
    lora: dict[str, Any] | None
    replay: dict[str, Any] | None
    ewc: dict[str, Any] | None
    dataset: dict[str, Any]
    evaluation: dict[str, Any] | None
    before_evaluation_id: str | None
    after_evaluation_id: str | None
    comparison: dict[str, Any] | None
    output_path: str | None
    warnings: list[str]
    trainable_parameters: dict[str, Any] | None
    metrics: dict[str, Any] | None
    guard: dict[str, Any] | None = None
    # Which optimizer step's weights the output holds (None: no guard, the final step), and why.
    shipped_step: int | None = None
    shipped_reason: str | None = None
    interpolation: dict[str, Any] | None = None
    chosen_alpha: float | None = None
    # The processes it trains in and how.
    resources: ResourcesSpec
    attempts: int
    error: str | None


class FinetuneCheckpointPublic(BaseModel):
    """One evaluated step: general and domain figures, drift, the verdict against the base."""

    step: int
    general: dict[str, Any] | None
    domain: dict[str, Any] | None
    drift: dict[str, Any] | None
    verdict: dict[str, Any] | None
    created_at: datetime

    @field_serializer("created_at")
    def _z(self, value: datetime) -> str | None:
        return iso_utc(value)


def planned_total_steps(n_examples: int, hp: ResolvedHyperparameters, processes: int = 1) -> int:
    """Optimizer steps of a training on ``n_examples`` (HF ``Trainer`` arithmetic); each
    micro-batch is ``per_device_train_batch_size`` examples on each of ``processes``."""
    micro = math.ceil(n_examples / (hp.per_device_train_batch_size * processes))
    per_epoch = math.ceil(micro / hp.gradient_accumulation_steps)
    return hp.max_steps or max(1, math.ceil(hp.num_train_epochs * per_epoch))


def evaluation_count(total_steps: int, every_steps: int | None, checkpoints: int | None) -> int:
    """How many steps :func:`evaluation_steps` evaluates, without listing them."""
    if every_steps is not None:
        return total_steps // every_steps + (1 if total_steps % every_steps else 0)
    if checkpoints is not None:
        return len(evaluation_steps(total_steps, None, checkpoints))
    return 0


def evaluation_budget_problem(
    total_steps: int, every_steps: int | None, checkpoints: int | None, *, exact: bool
) -> Problem | None:
    """A 422 when a cadence derives more than :data:`MAX_CHECKPOINT_EVALUATIONS` evaluations."""
    count = evaluation_count(total_steps, every_steps, checkpoints)
    if count <= MAX_CHECKPOINT_EVALUATIONS:
        return None
    steps = f"{total_steps} total steps" if exact else f"about {total_steps} total steps"
    detail = (
        f"evaluation.every_steps {every_steps} with {steps} (hyperparameters.max_steps, or "
        f"the dataset's records × num_train_epochs / batch size) derives {count} checkpoint "
        f"evaluations; at most {MAX_CHECKPOINT_EVALUATIONS} are allowed, as for "
        "evaluation.checkpoints. Raise every_steps or use evaluation.checkpoints"
    )
    return Problem(
        422,
        "Too many checkpoint evaluations",
        detail,
        errors=[
            {"loc": ["body", "evaluation", "every_steps"], "msg": detail},
            {"loc": ["body", "hyperparameters", "max_steps"], "msg": detail},
        ],
    )


def evaluation_steps(
    total_steps: int, every_steps: int | None, checkpoints: int | None
) -> list[int]:
    """The optimizer steps evaluated during training; the last step is always among them."""
    if every_steps is not None:
        steps = set(range(every_steps, total_steps + 1, every_steps))
    elif checkpoints is not None:
        steps = {max(1, round(total_steps * (i + 1) / checkpoints)) for i in range(checkpoints)}
    else:
        return []
    return sorted(steps | {total_steps})


class FinetuneEventPublic(BaseModel):
    id: str
    created_at: datetime
    level: str
    message: str
    data: dict[str, Any] | None

    @field_serializer("created_at")
    def _z(self, value: datetime) -> str | None:
        return iso_utc(value)


def summarize_source(spec: dict[str, Any] | None) -> dict[str, Any] | None:
    """A replay/ewc/dataset spec without its inline records (which may be megabytes)."""
    if spec is None:
        return None
    out = {k: v for k, v in spec.items() if k != "examples"}
    if spec.get("examples") is not None:
        out["examples"] = len(spec["examples"])
    return out


def suite_refs(snapshot: Iterable[dict[str, Any]]) -> list[str]:
    """Pinned ``name@version`` references, so before and after run the very same suite versions."""
    return [f"{s['name']}@{s['version']}" for s in snapshot]
