"""Loading models the safe way, and keeping the last one loaded across jobs.

Only safetensors, never ``trust_remote_code``, never the hub; a directory is checked again
here, right before loading, because the file system may have changed since submission.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from app.core.config import Settings
from app.core.fingerprint import fingerprint
from app.core.modelcheck import resolve_model
from app.core.quantization import Quantization, adapter_quantization
from workers.context import UserError
from workers.engine.transformers_backend import select_dtype

log = logging.getLogger("forgetguard.worker")


# What a broken model directory raises while loading (unreadable or truncated weights, a bad
# tokenizer file, a config transformers cannot use): retrying cannot fix any of them. Memory
# errors (MemoryError, CUDA out of memory, a RuntimeError) are not here: another try, on
# another worker, may have the memory.
_LOAD_ERRORS: tuple[type[BaseException], ...] = (OSError, ValueError, KeyError, TypeError)
try:
    from safetensors import SafetensorError

    _LOAD_ERRORS += (SafetensorError,)
except ImportError:  # pragma: no cover
    pass


def _unloadable(what: str, directory: Path, exc: BaseException) -> UserError:
    # The message may quote the resolved directory; show the file names only.
    message = str(exc).replace(str(directory), "<dir>")[:500]
    return UserError(f"the {what} cannot be loaded ({type(exc).__name__}: {message})")


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    fingerprint: str
    model_dir: Path
    adapter_dir: Path | None
    device: torch.device


def load_tokenizer(model_dir: Path) -> Any:
    """The model's tokenizer, local files only, with a pad token for batching."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            model_dir, trust_remote_code=False, local_files_only=True
        )
    except _LOAD_ERRORS as exc:
        raise _unloadable("tokenizer", model_dir, exc) from exc
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(
    model_dir: Path,
    device: torch.device,
    *,
    dtype: torch.dtype | None = None,
    quantization: Quantization | None = None,
) -> Any:
    """A causal LM from safetensors only, on ``device``, in eval mode; with ``quantization``
    its linear layers in 4 bits (bitsandbytes; a UserError when this worker cannot)."""
    dtype = dtype or select_dtype(device)
    extra: dict[str, Any] = {}
    if quantization is not None:
        from workers.engine import quantization as quantized

        extra = quantized.load_kwargs(quantization, device, dtype)
    try:
        model: Any = AutoModelForCausalLM.from_pretrained(
            model_dir,
            dtype=dtype,
            use_safetensors=True,
            trust_remote_code=False,
            local_files_only=True,
            **extra,
        )
    except _LOAD_ERRORS as exc:
        raise _unloadable("model", model_dir, exc) from exc
    if quantization is not None:
        quantized.keep_canonical_layout(model)
        return model.eval()  # placed by device_map: a 4-bit model is not moved with .to()
    return model.to(device).eval()


def attach_adapter(model: Any, adapter_dir: Path) -> Any:
    """Apply a peft adapter; its config is read as data (its base model name is ignored)."""
    from peft import PeftModel

    try:
        return PeftModel.from_pretrained(model, adapter_dir, is_trainable=False).eval()
    except _LOAD_ERRORS as exc:
        raise _unloadable("adapter", adapter_dir, exc) from exc


class ModelCache:
    """Keeps the most recently used model, so consecutive jobs on one model load it once.

    ``engines`` holds what other backends keep across jobs (a started vLLM engine, under
    its backend's name); anything there with a ``close()`` is closed by :meth:`clear` on a
    GPU, where training needs the memory.
    """

    def __init__(self, settings: Settings, device: torch.device) -> None:
        self.settings = settings
        self.device = device
        self._current: LoadedModel | None = None
        self.engines: dict[str, Any] = {}

    def get(self, model_path: str, adapter_path: str | None) -> LoadedModel:
        """Load (or reuse) the model named by a job, after checking it again."""
        budget = self.settings.read_budget()
        model_dir, adapter_dir = resolve_model(self.settings, model_path, adapter_path, budget)
        fp = fingerprint(model_dir, adapter_dir, cache_dir=self.settings.cache_dir, budget=budget)
        if self._current is not None and self._current.fingerprint == fp:
            return self._current
        self.clear()
        log.info(
            "loading %s%s on %s",
            model_path,
            f" + {adapter_path}" if adapter_path else "",
            self.device,
        )
        tokenizer = load_tokenizer(model_dir)
        # A QLoRA adapter runs on the 4-bit base it was trained on (its fingerprint says +nf4).
        model = load_model(
            model_dir, self.device, quantization=adapter_quantization(adapter_dir, budget)
        )
        if adapter_dir is not None:
            model = attach_adapter(model, adapter_dir)
        self._current = LoadedModel(model, tokenizer, fp, model_dir, adapter_dir, self.device)
        return self._current

    def clear(self) -> None:
        """Drop the cached model (before training, or when switching models)."""
        self._current = None
        if self.device.type == "cuda":
            for engine in self.engines.values():
                close = getattr(engine, "close", None)
                if close is not None:
                    close()
            torch.cuda.empty_cache()
