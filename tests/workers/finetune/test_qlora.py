"""QLoRA on the tiny model, on the CPU: LoRA adapters on a frozen 4-bit NF4 base (bitsandbytes).

Training keeps the base's bytes through checkpoint evaluations, the adapter is exported with
what its base is, the after-evaluation runs that same NF4 base with it (fingerprint ``+nf4``),
and a worker without bitsandbytes refuses the job once, saying so.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from app.core.config import Settings
from app.core.fingerprint import fingerprint
from app.core.quantization import BASE_QUANTIZATION_FILE
from app.core.tables import Evaluation
from app.finetune.schemas import FinetuneJobCreate
from tests.samples import CAPITAL_QUESTION, MEDICINE_RECORDS
from tests.workers.finetune.jobs import post_job
from workers.context import UserError
from workers.engine import quantization as quantized
from workers.engine.loading import ModelCache, load_model, load_tokenizer
from workers.finetune.artifacts import base_checksum, save_output
from workers.finetune.data import collate, encode_records
from workers.finetune.training import Trainer, assert_base_frozen, prepare_model

CPU = torch.device("cpu")
QA = {"name": "tiny-general", "kind": "qa", "items": [CAPITAL_QUESTION]}

pytestmark = pytest.mark.usefixtures("one_thread")


def _request(model_dir: Path, **hp: Any) -> FinetuneJobCreate:
    return FinetuneJobCreate.model_validate(
        {
            "base_model": {"path": str(model_dir)},
            "dataset": {"examples": MEDICINE_RECORDS},
            "method": "qlora",
            "preset": "risky",
            "hyperparameters": hp,
        }
    )


def _four_bit_layers(model: torch.nn.Module) -> int:
    from bitsandbytes.nn import Linear4bit

    return sum(isinstance(m, Linear4bit) for m in model.modules())


def test_qlora_trains_adapters_on_a_frozen_nf4_base_and_exports_them(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    tokenizer = load_tokenizer(tiny_model_dir)
    examples, _ = encode_records(tokenizer, MEDICINE_RECORDS, "chat", 512)
    # Every step on the whole dataset: the loss of successive steps is comparable.
    request = _request(
        tiny_model_dir, max_steps=8, learning_rate=5e-3, per_device_train_batch_size=len(examples)
    )
    model = prepare_model(tiny_model_dir, CPU, request, seed=0)
    assert _four_bit_layers(model) > 0
    assert_base_frozen(model)
    before = base_checksum(model)
    batch = collate(examples[:2], tokenizer.pad_token_id)
    at_evaluation: dict[str, torch.Tensor] = {}

    def evaluate(step: int) -> None:
        # A checkpoint evaluation: eval mode, no gradients. On an AVX512-BF16 CPU that is where
        # bitsandbytes would repack the 4-bit weights, and training would stop learning after.
        at_evaluation.update({n: p.detach().clone() for n, p in trainer.params})
        model.eval()
        with torch.no_grad():
            model(**batch)

    trainer = Trainer(
        model,
        examples,
        request.resolved(),
        pad_id=tokenizer.pad_token_id,
        checkpoint_dir=tmp_path / "checkpoints",
        evaluate_steps=(2, 4),
        on_evaluate=evaluate,
    )
    trainer.train()
    losses = [p["loss"] for p in trainer.loss_curve]
    assert len(losses) == 8 and all(math.isfinite(v) for v in losses)
    assert all(b < a for a, b in zip(losses, losses[1:], strict=False)), losses
    # Every adapter weight still learned after the last evaluation (step 4).
    assert not [n for n, p in trainer.params if torch.equal(p, at_evaluation[n])]
    assert_base_frozen(model)
    assert base_checksum(model) == before

    out = tmp_path / "adapter"
    save_output(model, tokenizer, request, tiny_model_dir, out)
    assert (out / "adapter_model.safetensors").is_file()
    assert json.loads((out / BASE_QUANTIZATION_FILE).read_text()) == {"quantization": "nf4"}
    fp = fingerprint(tiny_model_dir, out)
    assert fp.endswith("+nf4") and fp.removesuffix("+nf4") != fingerprint(tiny_model_dir)

    # What an evaluation loads for base + adapter: the same NF4 base, the same answers.
    settings = Settings(model_roots=[tiny_model_dir.parent, tmp_path], cache_dir=tmp_path / "c")
    loaded = ModelCache(settings, CPU).get(str(tiny_model_dir), str(out))
    assert loaded.fingerprint == fp and _four_bit_layers(loaded.model) > 0
    model.eval()
    with torch.no_grad():
        assert torch.allclose(model(**batch).logits, loaded.model(**batch).logits, atol=1e-5)


def qlora_job(model: Path, preset: str | None = None, **hyperparameters: Any) -> dict[str, Any]:
    """A QLoRA job on the medicine records, evaluated on ``QA`` before and after."""
    body: dict[str, Any] = {
        "base_model": {"path": str(model)},
        "dataset": {"examples": MEDICINE_RECORDS},
        "method": "qlora",
        "hyperparameters": hyperparameters,
        "evaluation": {"suites": [QA], "generation": {"max_new_tokens": 4}},
    }
    if preset is not None:
        body["preset"] = preset
    return body


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_qlora_job_evaluates_its_adapter_on_the_nf4_base(
    client: Any, settings: Settings, tiny_model_dir: Path
) -> None:
    from workers.main import Worker

    job_id = post_job(
        client, qlora_job(tiny_model_dir, preset="risky", max_steps=4, learning_rate=2e-4)
    )
    assert Worker(settings, device="cpu", once=True, worker_id="inproc").run() == 0
    data = client.get(f"/finetune-jobs/{job_id}").json()
    assert data["status"] == "succeeded", data["error"]
    assert data["method"] == "qlora" and data["lora"]["r"] == 16
    metrics = data["metrics"]
    assert metrics["quantization"] == "nf4"
    assert metrics["base_weights"]["unchanged"] is True
    assert metrics["global_step"] == 4 and math.isfinite(metrics["final_loss"])
    output = Path(data["output_path"])
    assert output.name == "adapter" and (output / "adapter_model.safetensors").is_file()
    assert (output / BASE_QUANTIZATION_FILE).is_file()
    assert data["comparison"]["verdict"] in ("pass", "fail")
    with client.app.state.sessionmaker() as session:
        before = session.get(Evaluation, data["before_evaluation_id"])
        after = session.get(Evaluation, data["after_evaluation_id"])
        assert before is not None and after is not None
        assert (after.model_path, after.adapter_path) == (str(tiny_model_dir), str(output))
        assert before.model_fingerprint is not None and after.model_fingerprint is not None
        assert not before.model_fingerprint.endswith("+nf4")
        assert after.model_fingerprint.endswith("+nf4")


def test_without_bitsandbytes_the_refusal_names_what_is_missing(
    monkeypatch: pytest.MonkeyPatch, tiny_model_dir: Path
) -> None:
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as if it were not installed
    reason = quantized.unavailable("nf4", CPU)
    assert reason is not None and "bitsandbytes" in reason and "[worker,qlora]" in reason
    with pytest.raises(UserError, match="bitsandbytes"):
        load_model(tiny_model_dir, CPU, quantization="nf4")


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_worker_without_bitsandbytes_fails_a_qlora_job_once_saying_why(
    client: Any, settings: Settings, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from workers.main import Worker

    job_id = post_job(client, qlora_job(tiny_model_dir, max_steps=2))
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    assert Worker(settings, device="cpu", once=True, worker_id="inproc").run() == 0
    data = client.get(f"/finetune-jobs/{job_id}").json()
    assert data["status"] == "failed" and data["attempts"] == 1  # a user error: not retried
    assert "bitsandbytes" in data["error"] and "qlora" in data["error"]
    assert data["before_evaluation_id"] is None  # refused before any work
