"""What the service will load: safetensors only, no remote code, adapters as data,
and the worker checking everything again right before it loads."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import pytest

from app.core.config import Settings
from app.core.errors import Problem
from app.core.modelcheck import check_adapter_dir, check_model_dir

REPO = Path(__file__).resolve().parents[2]


def model_copy(tiny_model_dir: Path, dest: Path) -> Path:
    """A copy of the tiny model (config, tokenizer, safetensors) at ``dest``."""
    shutil.copytree(tiny_model_dir, dest)
    return dest


def pickle_only_dir(dest: Path) -> Path:
    dest.mkdir(parents=True)
    (dest / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (dest / "pytorch_model.bin").write_bytes(b"\x80\x04pickle that would run code")
    return dest


def refused(check: Any, directory: Path) -> Problem:
    with pytest.raises(Problem) as caught:
        check(directory, str(directory))
    return caught.value


# --- directory checks (no torch) ---------------------------------------------------------------


def test_the_tiny_model_passes(tiny_model_dir: Path) -> None:
    check_model_dir(tiny_model_dir, "tiny")


def test_pickle_only_weights_are_refused_with_how_to_convert(tmp_path: Path) -> None:
    problem = refused(check_model_dir, pickle_only_dir(tmp_path / "m"))
    assert problem.status == 422 and problem.title == "Pickle weights refused"
    assert "pytorch_model.bin" in problem.detail
    assert "save_pretrained(dir, safe_serialization=True)" in problem.detail


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".ckpt", ".pkl"])
def test_other_pickle_formats_are_refused_too(tmp_path: Path, suffix: str) -> None:
    directory = pickle_only_dir(tmp_path / "m")
    (directory / "pytorch_model.bin").rename(directory / f"weights{suffix}")
    assert refused(check_model_dir, directory).title == "Pickle weights refused"


def test_no_weights_at_all_is_422(tmp_path: Path) -> None:
    directory = pickle_only_dir(tmp_path / "m")
    (directory / "pytorch_model.bin").unlink()
    assert refused(check_model_dir, directory).title == "No weights found"


@pytest.mark.parametrize("config_file", ["config.json", "tokenizer_config.json"])
def test_auto_map_is_refused(tiny_model_dir: Path, tmp_path: Path, config_file: str) -> None:
    directory = model_copy(tiny_model_dir, tmp_path / "m")
    config = json.loads((directory / config_file).read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    (directory / config_file).write_text(json.dumps(config))
    (directory / "modeling_evil.py").write_text("import os; os.system('echo pwned')\n")
    problem = refused(check_model_dir, directory)
    assert problem.status == 422 and problem.title == "Remote code refused"
    assert config_file in problem.detail


def test_nested_auto_map_is_refused(tiny_model_dir: Path, tmp_path: Path) -> None:
    directory = model_copy(tiny_model_dir, tmp_path / "m")
    config = json.loads((directory / "config.json").read_text())
    config["text_config"] = {"auto_map": {"AutoConfig": "configuration_evil.EvilConfig"}}
    (directory / "config.json").write_text(json.dumps(config))
    assert refused(check_model_dir, directory).title == "Remote code refused"


def test_unparseable_config_is_422(tiny_model_dir: Path, tmp_path: Path) -> None:
    directory = model_copy(tiny_model_dir, tmp_path / "m")
    (directory / "config.json").write_text("{not json")
    assert refused(check_model_dir, directory).title == "Unreadable model config"


def test_adapter_with_pickle_or_auto_map_is_refused(tmp_path: Path) -> None:
    adapter = tmp_path / "a"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    (adapter / "adapter_model.bin").write_bytes(b"pickle")
    problem = refused(check_adapter_dir, adapter)
    assert problem.title == "Pickle weights refused" and "PeftModel" in problem.detail
    (adapter / "adapter_model.safetensors").write_bytes(b"")
    (adapter / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "auto_map": {"AutoModel": "x.Y"}})
    )
    assert refused(check_adapter_dir, adapter).title == "Remote code refused"


def test_not_an_adapter_is_422(tiny_model_dir: Path) -> None:
    assert refused(check_adapter_dir, tiny_model_dir).title == "Adapter not found"


def test_no_code_anywhere_sets_trust_remote_code() -> None:
    offenders = []
    for path in [*REPO.glob("app/**/*.py"), *REPO.glob("workers/**/*.py")]:
        # Anything but a literal False (True, or a variable that could be True) is refused.
        if re.search(r"trust_remote_code\s*=\s*(?!False\b)\w", path.read_text()):
            offenders.append(str(path.relative_to(REPO)))
    assert offenders == []


# --- the worker's loader (torch) -----------------------------------------------------------


def test_loader_asks_for_safetensors_and_no_remote_code(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch

    from workers.engine import loading as models

    seen: dict[str, Any] = {}
    real = models.AutoModelForCausalLM.from_pretrained

    def spy(*args: Any, **kwargs: Any) -> Any:
        seen.update(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(models.AutoModelForCausalLM, "from_pretrained", spy)
    models.load_model(tiny_model_dir, torch.device("cpu"))
    assert seen["use_safetensors"] is True
    assert seen["trust_remote_code"] is False
    assert seen["local_files_only"] is True


def test_adapter_base_model_name_is_ignored(tiny_model_dir: Path, tmp_path: Path) -> None:
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import LlamaForCausalLM

    from workers.engine.loading import ModelCache

    adapter = tmp_path / "models" / "adapter"
    base = LlamaForCausalLM.from_pretrained(tiny_model_dir)
    lora = get_peft_model(base, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    lora.save_pretrained(adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    # A hub name (or a path outside the roots): following it would download or escape.
    config["base_model_name_or_path"] = "evil-org/model-with-remote-code"
    (adapter / "adapter_config.json").write_text(json.dumps(config))

    settings = Settings(
        model_roots=[tiny_model_dir.parent, tmp_path / "models"], cache_dir=tmp_path / "cache"
    )
    loaded = ModelCache(settings, torch.device("cpu")).get(str(tiny_model_dir), str(adapter))
    assert isinstance(loaded.model, PeftModel)
    assert loaded.model.get_base_model().config.vocab_size == base.config.vocab_size
    assert loaded.model_dir == tiny_model_dir.resolve()


@pytest.mark.parametrize("swap", ["symlink-outside", "auto_map", "pickle-only"])
def test_worker_rechecks_the_model_right_before_loading(
    client: Any,
    settings: Settings,
    tiny_model_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    swap: str,
) -> None:
    """Valid at submission, changed before the worker runs: the worker refuses, loads nothing."""
    from app.core.tables import Evaluation
    from workers.engine import loading as models
    from workers.main import Worker

    target = model_copy(tiny_model_dir, tmp_path / "models" / "m")
    response = client.post(
        "/evaluations",
        json={"model": {"path": str(target)}, "suites": ["forgetting-checklist"], "cache": False},
    )
    assert response.status_code == 202, response.text
    evaluation_id = response.json()["id"]

    shutil.rmtree(target)
    if swap == "symlink-outside":
        outside = model_copy(tiny_model_dir, tmp_path / "outside")
        target.symlink_to(outside, target_is_directory=True)
        expected = "outside the allowed roots"
    elif swap == "auto_map":
        model_copy(tiny_model_dir, target)
        config = json.loads((target / "config.json").read_text())
        (target / "config.json").write_text(json.dumps({**config, "auto_map": {"A": "b.C"}}))
        expected = "auto_map"
    else:
        pickle_only_dir(target)
        expected = "pickle weights"

    def must_not_load(*_args: Any, **_kwargs: Any) -> Any:
        raise AssertionError("the worker loaded a model it should have refused")

    monkeypatch.setattr(models, "load_model", must_not_load)
    monkeypatch.setattr(models, "load_tokenizer", must_not_load)
    Worker(settings, device="cpu", kinds=("evaluation",), once=True).run()

    with client.app.state.sessionmaker() as session:
        row = session.get(Evaluation, evaluation_id)
        assert row is not None
        assert row.status == "failed", (row.status, row.error)
        assert expected in (row.error or "")
        assert row.attempts == 1  # a refusal is final: retrying will not make it loadable


# --- cost decided before work: parameters from the config and the weights (issue 16) ----------


def _with_config(tiny_model_dir: Path, dest: Path, **changes: Any) -> Path:
    model = model_copy(tiny_model_dir, dest)
    config = json.loads((model / "config.json").read_text())
    config.update(changes)
    (model / "config.json").write_text(json.dumps(config))
    return model


def test_parameters_are_counted_from_headers_and_config(tiny_model_dir: Path) -> None:
    from app.core.modelcheck import config_params, safetensors_params

    stored = safetensors_params(tiny_model_dir, "tiny")
    described = config_params(json.loads((tiny_model_dir / "config.json").read_text()))
    assert stored > 0 and described is not None
    assert abs(described - stored) / stored < 0.05


def test_a_config_with_more_layers_than_its_weights_is_refused(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    from app.core.modelcheck import check_model_size

    model = _with_config(tiny_model_dir, tmp_path / "m", num_hidden_layers=50_000)
    with pytest.raises(Problem) as caught:
        check_model_size(model, "m", max_params=0)
    assert caught.value.status == 422 and "weights hold" in caught.value.detail


def test_the_parameter_budget_is_enforced(
    settings: Settings, tiny_model_dir: Path, tmp_path: Path
) -> None:
    from app.core.modelcheck import resolve_model

    small = settings.model_copy(update={"max_model_params": 1000})
    with pytest.raises(Problem) as caught:
        resolve_model(small, str(tiny_model_dir), None)
    assert caught.value.status == 422 and "FORGETGUARD_MAX_MODEL_PARAMS" in caught.value.detail
    resolve_model(settings, str(tiny_model_dir), None)  # the default budget takes it


def test_a_safetensors_header_that_lies_is_refused(tiny_model_dir: Path, tmp_path: Path) -> None:
    from app.core.modelcheck import safetensors_params

    model = model_copy(tiny_model_dir, tmp_path / "m")
    (model / "model.safetensors").write_bytes((2**40).to_bytes(8, "little") + b"{}")
    with pytest.raises(Problem) as caught:
        safetensors_params(model, "m")
    assert caught.value.status == 422


def test_a_worker_memory_cap_turns_a_runaway_allocation_into_memory_error() -> None:
    import subprocess
    import sys

    code = (
        "from workers.main import cap_memory\n"
        "cap_memory(2 * 1024**3)\n"
        "try:\n    bytearray(4 * 1024**3)\nexcept MemoryError:\n    print('refused')\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120
    )
    assert out.stdout.strip() == "refused", out.stderr[-500:]


def test_fine_tune_outputs_in_the_artifacts_dir_are_readable_as_models(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    from app.core.modelcheck import resolve_model

    settings = Settings(
        model_roots=[tmp_path / "models"],
        artifacts_dir=tmp_path / "artifacts",
        data_roots=[tmp_path / "data"],
    )
    output = model_copy(tiny_model_dir, tmp_path / "artifacts" / "ft_1" / "model")
    model_dir, _ = resolve_model(settings, str(output), None)
    assert model_dir == output.resolve()
    # Read roots are not data roots: a client cannot name the artifacts dir as a dataset.
    from app.finetune.schemas import load_path_records

    (output / "train.jsonl").write_text('{"text": "x"}\n')
    with pytest.raises(Problem) as caught:
        load_path_records(settings, str(output / "train.jsonl"))
    assert caught.value.status == 403
    outside = model_copy(tiny_model_dir, tmp_path / "elsewhere")
    with pytest.raises(Problem) as caught:
        resolve_model(settings, str(outside), None)
    assert caught.value.status == 403
