"""Loading models the safe way, and keeping the last one loaded across jobs.

Only safetensors, never ``trust_remote_code``, never the hub; a directory is checked again
here, right before loading, because the file system may have changed since submission.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
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
    # Whether the base was already loaded (only the adapter switched, or nothing at all).
    base_reused: bool = False


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


def attach_adapter(model: Any, adapter_dir: Path, name: str = "default") -> Any:
    """Apply a peft adapter; its config is read as data (its base model name is ignored)."""
    from peft import PeftModel

    try:
        return PeftModel.from_pretrained(
            model, adapter_dir, adapter_name=name, is_trainable=False
        ).eval()
    except _LOAD_ERRORS as exc:
        raise _unloadable("adapter", adapter_dir, exc) from exc


def _adapter_name(adapter_fingerprint: str) -> str:
    # peft keeps adapters in ModuleDicts: a name without dots, unique per adapter content.
    return "fg_" + adapter_fingerprint.removeprefix("sha256:")[:16]


def switch_adapter(model: Any, adapter_dir: Path, name: str) -> Any:
    """``model`` (a PeftModel over the loaded base) answering through ``adapter_dir`` only.

    peft's adapter switching: the new adapter is loaded beside the current one and made the
    active one, then the old one is deleted, so the base stays loaded and one adapter at a
    time is held. Only the active adapter computes, so the answers are those of
    ``PeftModel.from_pretrained(base, adapter_dir)``. An adapter of another peft type than
    the loaded one cannot sit beside it: it gets the base back first (:func:`detach_adapters`).
    """
    from peft import PeftConfig

    try:
        wanted = PeftConfig.from_pretrained(str(adapter_dir)).peft_type
    except _LOAD_ERRORS as exc:
        raise _unloadable("adapter", adapter_dir, exc) from exc
    if wanted != model.peft_type:
        base = detach_adapters(model)
        if base is None:
            return None
        return attach_adapter(base, adapter_dir, name)
    old = [n for n in model.peft_config if n != name]
    try:
        if name not in model.peft_config:
            model.load_adapter(adapter_dir, adapter_name=name, is_trainable=False)
        model.set_adapter(name, inference_mode=True)
    except _LOAD_ERRORS as exc:
        raise _unloadable("adapter", adapter_dir, exc) from exc
    for previous in old:
        model.delete_adapter(previous)
    return model.eval()


def detach_adapters(model: Any) -> Any | None:
    """The base model under a PeftModel with every adapter removed, unmerged (its weights as
    loaded), or None when peft cannot remove this kind of adapter (then reload the base)."""
    if model.active_peft_config.is_prompt_learning:
        return model.get_base_model()  # prompt learning never touches the base's modules
    try:
        base = model.unload()
    except (AttributeError, ValueError, NotImplementedError):
        return None
    # As loaded: peft froze the base's parameters when it wrapped them.
    for parameter in base.parameters():
        parameter.requires_grad_(True)
    return base.eval()


class ModelCache:
    """Keeps the most recently used base model, so consecutive jobs on one base load it once.

    Jobs with different adapters on the same base (a request's ``adapters``, checkpoints of
    one fine-tune) switch adapters on the loaded base instead of loading it again
    (:func:`switch_adapter`); a job without an adapter gets the base back unmerged.
    ``base_loads`` counts the bases this process loaded, each logged as ``loaded base …``.

    ``engines`` holds what other backends keep across jobs (a started vLLM engine, under
    its backend's name); anything there with a ``close()`` is closed by :meth:`clear` on a
    GPU, where training needs the memory.
    """

    def __init__(self, settings: Settings, device: torch.device) -> None:
        self.settings = settings
        self.device = device
        self._current: LoadedModel | None = None
        self._base_fingerprint: str | None = None
        self.base_loads = 0
        self.engines: dict[str, Any] = {}

    def get(self, model_path: str, adapter_path: str | None) -> LoadedModel:
        """Load (or reuse) the model named by a job, after checking it again."""
        budget = self.settings.read_budget()
        model_dir, adapter_dir = resolve_model(self.settings, model_path, adapter_path, budget)
        cache_dir = self.settings.cache_dir
        base_fp = fingerprint(model_dir, None, cache_dir=cache_dir, budget=budget)
        fp = (
            base_fp
            if adapter_dir is None
            else fingerprint(model_dir, adapter_dir, cache_dir=cache_dir, budget=budget)
        )
        # A 4-bit base is another loaded model than the same weights unquantized.
        quantization = adapter_quantization(adapter_dir, budget)
        base_key = base_fp if quantization is None else f"{base_fp}+{quantization}"
        current = self._current
        if current is not None and self._base_fingerprint == base_key:
            if current.fingerprint != fp:
                current = self._switch(current, fp, adapter_dir, adapter_path)
            if current is not None:
                self._current = replace(
                    current, fingerprint=fp, adapter_dir=adapter_dir, base_reused=True
                )
                return self._current
        self.clear()
        log.info("loading base %s on %s", model_path, self.device)
        tokenizer = load_tokenizer(model_dir)
        # A QLoRA adapter runs on the 4-bit base it was trained on (its fingerprint says +nf4).
        model = load_model(model_dir, self.device, quantization=quantization)
        self.base_loads += 1
        log.info("loaded base %s (base loads in this worker: %d)", model_path, self.base_loads)
        self._base_fingerprint = base_key
        if adapter_dir is not None:
            log.info("attaching adapter %s", adapter_path)
            model = attach_adapter(model, adapter_dir, _adapter_name(fp))
        self._current = LoadedModel(model, tokenizer, fp, model_dir, adapter_dir, self.device)
        return self._current

    def _switch(
        self, current: LoadedModel, fp: str, adapter_dir: Path | None, adapter_path: str | None
    ) -> LoadedModel | None:
        """The loaded base with ``adapter_dir`` (None: none) instead of the current adapter;
        None when it must be loaded again. A failed switch drops the base (it may be half
        changed), and the error fails the job as a load error would."""
        from peft import PeftModel

        model = current.model
        log.info(
            "base kept loaded; %s",
            f"switching to adapter {adapter_path}" if adapter_path else "adapters removed",
        )
        try:
            if adapter_dir is None:
                model = detach_adapters(model)
            elif isinstance(model, PeftModel):
                model = switch_adapter(model, adapter_dir, _adapter_name(fp))
            else:
                model = attach_adapter(model, adapter_dir, _adapter_name(fp))
        except BaseException:
            self.clear()
            raise
        if model is None:
            return None
        return replace(current, model=model)

    def clear(self) -> None:
        """Drop the cached model (before training, or when switching models)."""
        self._current = None
        self._base_fingerprint = None
        if self.device.type == "cuda":
            for engine in self.engines.values():
                close = getattr(engine, "close", None)
                if close is not None:
                    close()
            torch.cuda.empty_cache()
