"""The fine-tune request: the lesson's presets as data, overrides, the LR rule of thumb, records."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from app.core.errors import Problem
from app.finetune.schemas import (
    FinetuneJobCreate,
    Hyperparameters,
    learning_rate_warnings,
    read_jsonl,
    record_format,
    resolve_hyperparameters,
)
from app.suites.rules import CompareOptions

COMPARED = (
    "learning_rate",
    "num_train_epochs",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "warmup_ratio",
    "weight_decay",
    "max_grad_norm",
    "seed",
)


def _request(**fields: object) -> FinetuneJobCreate:
    body = {
        "base_model": {"path": "models/x"},
        "dataset": {"examples": [{"text": "a b c"}]},
        **fields,
    }
    return FinetuneJobCreate.model_validate(body)


@pytest.mark.parametrize(
    ("preset", "lesson_args"),
    [
        # The lesson's two TrainingArguments, verbatim.
        (
            "risky",
            {
                "num_train_epochs": 10,
                "learning_rate": 5e-5,
                "per_device_train_batch_size": 1,
                "warmup_ratio": 0.0,
            },
        ),
        (
            "safe",
            {
                "num_train_epochs": 3,
                "learning_rate": 2e-5,
                "per_device_train_batch_size": 4,
                "gradient_accumulation_steps": 4,
                "warmup_ratio": 0.05,
                "lr_scheduler_type": "cosine",
                "weight_decay": 0.01,
            },
        ),
    ],
)
def test_presets_equal_the_lessons_training_arguments(
    preset: str, lesson_args: dict, tmp_path: Path
) -> None:
    from transformers import TrainingArguments

    # transformers 5 folded warmup_ratio into warmup_steps (a float below 1 is a ratio).
    kwargs = {("warmup_steps" if k == "warmup_ratio" else k): v for k, v in lesson_args.items()}
    args = TrainingArguments(output_dir=str(tmp_path), **kwargs)
    ours = resolve_hyperparameters("full", preset)
    for name in COMPARED:
        theirs = args.warmup_steps if name == "warmup_ratio" else getattr(args, name)
        assert getattr(ours, name) == pytest.approx(theirs), name
    assert ours.lr_scheduler_type == str(args.lr_scheduler_type.value)
    assert ours.max_steps is None and args.max_steps == -1


def test_safe_preset_uses_the_lora_rate_for_lora() -> None:
    assert resolve_hyperparameters("lora", "safe").learning_rate == 2e-4
    assert resolve_hyperparameters("full", "safe").learning_rate == 2e-5
    assert resolve_hyperparameters("lora", "risky").learning_rate == 5e-5


def test_explicit_hyperparameters_override_the_preset_field_by_field() -> None:
    overrides = Hyperparameters(learning_rate=1e-3, lr_scheduler_type="constant", seed=7)
    hp = resolve_hyperparameters("full", "safe", overrides)
    assert (hp.learning_rate, hp.lr_scheduler_type, hp.seed) == (1e-3, "constant", 7)
    # Everything not overridden is still the safe preset.
    assert (
        hp.num_train_epochs,
        hp.per_device_train_batch_size,
        hp.gradient_accumulation_steps,
        hp.warmup_ratio,
        hp.weight_decay,
    ) == (3, 4, 4, 0.05, 0.01)


@pytest.mark.parametrize(
    ("method", "lr", "direction"),
    [
        ("full", 5e-5, "above"),
        ("full", 1e-3, "above"),
        ("full", 5e-6, "below"),
        ("lora", 1e-3, "above"),
        ("lora", 5e-5, "below"),
        ("qlora", 2.5e-4, "above"),
    ],
)
def test_learning_rate_outside_the_rule_of_thumb_warns(
    method: str, lr: float, direction: str
) -> None:
    warnings = learning_rate_warnings(method, lr)
    assert len(warnings) == 1 and direction in warnings[0]


@pytest.mark.parametrize(
    ("method", "lr"),
    [
        ("full", 1e-5),
        ("full", 2e-5),
        ("lora", 1e-4),
        ("lora", 2e-4),
        ("lora", 3e-4),
        ("qlora", 2e-4),
    ],
)
def test_learning_rate_inside_the_rule_of_thumb_does_not_warn(method: str, lr: float) -> None:
    assert learning_rate_warnings(method, lr) == []


def test_the_risky_preset_warns_and_safe_does_not() -> None:
    assert _request(method="full", preset="risky").warnings(20)
    assert _request(method="full", preset="safe").warnings(20) == []
    assert _request(method="lora", preset="safe").warnings(20) == []


def test_qlora_is_lora_on_an_nf4_base_with_its_own_rule_of_thumb() -> None:
    request = _request(method="qlora")
    assert request.adapter and request.quantization == "nf4"
    assert request.lora is not None and request.lora.r == 16  # the lesson's LoRA defaults
    assert request.resolved().learning_rate == 2e-4  # safe: the top of QLoRA's 1e-4 to 2e-4
    assert request.warnings(20) == []
    [warning] = _request(method="qlora", hyperparameters={"learning_rate": 3e-4}).warnings(20)
    assert "above the lesson's rule of thumb for QLoRA (0.0001 to 0.0002)" in warning
    assert _request(method="lora").quantization is None
    assert not _request(method="full").adapter


def test_qlora_evaluated_on_vllm_is_refused() -> None:
    with pytest.raises(ValidationError, match="backend 'vllm' cannot load that base"):
        _request(method="qlora", evaluation={"backend": "vllm"})
    assert _request(method="lora", evaluation={"backend": "vllm"}).evaluation is not None
    assert _request(method="qlora", evaluation=None).evaluation is None
    with pytest.raises(ValidationError, match="'lora' or 'qlora'"):
        _request(method="full", lora={"r": 8})


def test_replay_that_rounds_down_to_nothing_warns() -> None:
    request = _request(method="lora", replay={"source": "self", "fraction": 0.1})
    assert any("replay adds no examples" in w for w in request.warnings(5))
    assert not any("replay" in w for w in request.warnings(10))


@pytest.mark.parametrize(
    "fields",
    [
        {"hyperparameters": {"learnig_rate": 1e-4}},
        {"hyperparameters": {"learning_rate": 0}},
        {"hyperparameters": {"learning_rate": -1e-4}},
        {"hyperparameters": {"num_train_epochs": 0}},
        {"hyperparameters": {"per_device_train_batch_size": 0}},
        {"hyperparameters": {"lr_scheduler_type": "exponential"}},
        {"lora": {"r": 0}},
        {"lora": {"rank": 8}},
        {"method": "full", "lora": {"r": 8}},
        {"dataset": {"examples": []}},
        {"dataset": {"examples": [{"text": "x"}], "path": "x.jsonl"}},
        {"replay": {"source": "self", "path": "x.jsonl"}},
        {"ewc": {"importance": 0}},
        {"surprise": True},
        {"evaluation": {"category_rule": "loose"}},
        {"evaluation": {"alpha": 0.5}},
        {"evaluation": {"max_drop": 1.5}},
        {"evaluation": {"max_kl": -1}},
        {"evaluation": {"every_steps": 2}, "guard": {"max_drop": -0.1}},
    ],
)
def test_impossible_or_unknown_settings_are_rejected(fields: dict) -> None:
    with pytest.raises(ValidationError):
        _request(**fields)


def test_the_evaluation_block_takes_every_rule_and_the_guard_overrides_max_drop() -> None:
    rules = {"alpha": 0.01, "category_rule": "significant", "max_drop": 0.1, "max_kl": 0.2}
    evaluation = {**rules, "every_steps": 2}
    options = _request(evaluation=evaluation, guard={"action": "stop"}).compare_options()
    assert {name: getattr(options, name) for name in rules} == rules
    # The guard's own max_drop, when given, is the one the job applies.
    given = _request(evaluation=evaluation, guard={"max_drop": 0.2}).compare_options()
    assert given.max_drop == 0.2 and given.alpha == 0.01
    # Without either, the rule book's defaults.
    assert _request().compare_options() == CompareOptions()


def test_lora_defaults_are_the_lessons_config() -> None:
    lora = _request(method="lora").lora
    assert lora is not None
    assert (lora.r, lora.lora_alpha, lora.target_modules, lora.lora_dropout) == (
        16,
        32,
        ["q_proj", "v_proj"],
        0.1,
    )
    assert (
        _request(method="lora", lora={"target_modules": "all-linear"}).lora.target_modules
        == "all-linear"
    )  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("record", "kind"),
    [
        ({"text": "hello"}, "text"),
        ({"prompt": "Q?", "completion": "A."}, "prompt_completion"),
        (
            {
                "prompt": [{"role": "user", "content": "Q?"}],
                "completion": [{"role": "assistant", "content": "A."}],
            },
            "prompt_completion",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": "Q?"},
                    {"role": "assistant", "content": "A."},
                ]
            },
            "messages",
        ),
    ],
)
def test_record_formats(record: dict, kind: str) -> None:
    assert record_format(record) == kind


@pytest.mark.parametrize(
    ("record", "says"),
    [
        ({"prompt": "Q?"}, "'completion'"),
        ({"question": "Q?", "answer": "A"}, "needs 'text'"),
        ({"text": ""}, "empty"),
        ({"messages": [{"role": "user", "content": "Q?"}]}, "no assistant message"),
        ({"messages": [{"role": "robot", "content": "Q?"}]}, "role"),
        ({"text": "a", "prompt": "b", "completion": "c"}, "one format"),
        ("just a string", "JSON object"),
    ],
)
def test_bad_records_say_what_is_wrong(record: object, says: str) -> None:
    with pytest.raises(ValueError, match=".*") as info:
        record_format(record)
    assert says in str(info.value)


def test_a_bad_inline_record_is_named_by_its_index() -> None:
    with pytest.raises(ValidationError) as info:
        _request(
            dataset={"examples": [{"text": "ok"}, {"text": "ok"}, {"prompt": "no completion"}]}
        )
    assert "examples[2] (record 3)" in str(info.value)


def test_a_bad_jsonl_line_is_named_by_its_line_number(tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps({"text": "ok"}) + "\n\n" + json.dumps({"prompt": "only"}) + "\n")
    with pytest.raises(Problem) as info:
        read_jsonl(path, shown="data.jsonl", max_bytes=1 << 20)
    assert info.value.status == 422 and "line 3" in info.value.detail
    path.write_text('{"text": "ok"}\n{not json\n')
    with pytest.raises(Problem, match="line 2"):
        read_jsonl(path, shown="data.jsonl", max_bytes=1 << 20)
    path.write_text("\n")
    with pytest.raises(Problem, match="no records"):
        read_jsonl(path, shown="data.jsonl", max_bytes=1 << 20)


def test_the_worker_rereads_a_dataset_with_the_same_limits(tmp_path: Path) -> None:
    """The file may change between submission and training: size and encoding are re-checked."""
    from app.core.config import Settings
    from app.finetune.schemas import load_path_records

    settings = Settings(data_roots=[tmp_path], max_dataset_bytes=100)
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps({"text": "ok"}) + "\n")
    assert load_path_records(settings, str(path)) == [{"text": "ok"}]
    path.write_text(json.dumps({"text": "x" * 200}) + "\n")
    with pytest.raises(Problem, match="the limit is 100") as info:
        load_path_records(settings, str(path))
    assert info.value.status == 422
    path.write_bytes(b'{"text": "caf\xe9"}\n')  # Latin-1, not UTF-8
    with pytest.raises(Problem, match="not UTF-8"):
        load_path_records(settings, str(path))
    path.write_text("[" * 100_000 + "\n")
    with pytest.raises(Problem) as info:
        read_jsonl(path, shown="deep.jsonl", max_bytes=1 << 20)
    assert info.value.status == 422 and str(tmp_path) not in info.value.detail


def test_holdout_split_is_seeded_disjoint_and_keeps_order() -> None:
    from app.finetune.schemas import holdout_count, holdout_split

    records = [{"text": f"record {i}"} for i in range(30)]
    train, held = holdout_split(records, 0.2, 42)
    assert len(held) == holdout_count(30, 0.2) == 6 and len(train) == 24
    assert {r["text"] for r in train}.isdisjoint(r["text"] for r in held)
    assert train == [r for r in records if r in train]  # the dataset's order
    assert holdout_split(records, 0.2, 42) == (train, held)  # seeded
    assert holdout_split(records, 0.2, 7)[1] != held
    assert holdout_count(3, 0.01) == 1  # at least one record


def test_evaluation_steps_always_end_at_the_last_step() -> None:
    from app.finetune.schemas import evaluation_steps

    assert evaluation_steps(12, 4, None) == [4, 8, 12]
    assert evaluation_steps(10, 4, None) == [4, 8, 10]
    assert evaluation_steps(10, None, 3) == [3, 7, 10]
    assert evaluation_steps(2, None, 5) == [1, 2]
    assert evaluation_steps(10, None, None) == []
