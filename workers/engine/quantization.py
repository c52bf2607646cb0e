"""A base model loaded in 4 bits (QLoRA's NF4) through bitsandbytes, imported only when asked.

bitsandbytes is the ``qlora`` extra. A worker without it, or on a device it cannot run on,
refuses what needs it (a ``qlora`` fine-tune, an evaluation of a QLoRA adapter) with a
:class:`~workers.context.UserError` that says what is missing, before any other work: the job
fails once, with that reason, and is not retried.
"""

from __future__ import annotations

from typing import Any

import torch

from app.core.quantization import Quantization
from workers.context import UserError

# BitsAndBytesConfig per quantization: the QLoRA paper's NF4 with double quantization (the
# quantization constants quantized too); the compute dtype is the model's load dtype.
BNB_SETTINGS: dict[str, dict[str, Any]] = {
    "nf4": {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True},
}
INSTALL = "pip install -e '.[worker,qlora]' in the forgetguard checkout"


def _import_bitsandbytes() -> Any:
    from huggingface_hub import constants

    if not constants.HF_HUB_OFFLINE:
        # Importing bitsandbytes on a CPU with AVX512-BF16 fetches a kernel from the Hugging
        # Face hub (through ``kernels``) unless the hub is offline, and a worker downloads
        # nothing at run time. ``forgetguard worker`` sets HF_HUB_OFFLINE=1 before anything
        # loads (workers/engine/process.py); only a process started some other way gets here.
        raise ImportError(
            "bitsandbytes is imported only with HF_HUB_OFFLINE=1 (it would fetch a kernel from "
            "the Hugging Face hub); start workers with `forgetguard worker`"
        )
    import bitsandbytes

    return bitsandbytes


def unavailable(quantization: Quantization, device: torch.device) -> str | None:
    """Why this worker cannot load a base in ``quantization`` on ``device``; None when it can.

    Asked by running it: a small matrix is quantized and dequantized on the device, which
    fails when bitsandbytes is missing, has no kernels for the device, or cannot load them.
    """
    what = f"loading a base model in 4-bit {quantization.upper()} (method 'qlora')"
    try:
        bnb = _import_bitsandbytes()
    except Exception as exc:  # ImportError, or a native library that fails to load
        return (
            f"{what} needs bitsandbytes, which this worker cannot import "
            f"({type(exc).__name__}: {exc}); install the qlora extra on the worker "
            f"({INSTALL}), or use method 'lora'"
        )
    try:
        from bitsandbytes.functional import dequantize_4bit, quantize_4bit

        probe = torch.linspace(-1.0, 1.0, 64 * 64, device=device).reshape(64, 64)
        packed, state = quantize_4bit(probe, quant_type=quantization)
        error = (dequantize_4bit(packed, state) - probe).abs().max().item()
    except Exception as exc:
        return (
            f"{what} needs bitsandbytes to run on {device}, and bitsandbytes "
            f"{getattr(bnb, '__version__', '?')} cannot ({type(exc).__name__}: {exc}); "
            "use method 'lora' on this worker"
        )
    if not error < 0.2:  # NF4's 16 levels on [-1, 1] are at most ~0.15 apart (NaN fails too)
        return (
            f"{what}: bitsandbytes {getattr(bnb, '__version__', '?')} on {device} gives wrong "
            f"4-bit values (error {error:g}); use method 'lora' on this worker"
        )
    return None


def require(quantization: Quantization, device: torch.device) -> None:
    """Raise a UserError saying what is missing unless this worker can load ``quantization``."""
    reason = unavailable(quantization, device)
    if reason is not None:
        raise UserError(reason)


def load_kwargs(quantization: Quantization, device: torch.device, dtype: torch.dtype) -> Any:
    """``from_pretrained`` arguments that load the model in ``quantization`` onto ``device``."""
    from transformers import BitsAndBytesConfig

    require(quantization, device)
    config = BitsAndBytesConfig(**BNB_SETTINGS[quantization], bnb_4bit_compute_dtype=dtype)
    return {"quantization_config": config, "device_map": {"": device}}


def keep_canonical_layout(model: torch.nn.Module) -> None:
    """Keep every 4-bit weight in bitsandbytes' own layout, for training and evaluation alike.

    On a CPU with AVX512-BF16, bitsandbytes repacks a 4-bit weight in place, into the layout
    of its inference kernel, the first time the layer runs in eval mode without gradients.
    That kernel has no backward: after a checkpoint evaluation had repacked the layers, a
    training step gave the adapters no gradient at all (the loss stayed flat, with only
    torch's "autograd kernel was not registered" warning), and the base checksum changed
    though no base weight was trained. In the one layout, evaluations compute what training
    computed, and the frozen base keeps its bytes.
    """
    from bitsandbytes.nn import Linear4bit

    for module in model.modules():
        if isinstance(module, Linear4bit) and hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
