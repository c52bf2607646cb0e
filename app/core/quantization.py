"""A base model loaded quantized under an adapter: how the adapter's folder says so (no torch).

A QLoRA adapter was trained on a 4-bit NF4 copy of its base, and reproduces what it learned only
on that same base. Its folder therefore records the quantization (``base_quantization.json``,
written beside ``adapter_config.json``): whoever loads the adapter loads the base that way, and
the fingerprint of base + adapter ends in ``+nf4``, so an evaluation of it is never mistaken for,
or answered from the cache of, the same adapter on the base as stored.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal, cast, get_args

from app.core.clientfiles import ReadBudget, read_client_json
from app.core.errors import Problem

Quantization = Literal["nf4"]
QUANTIZATIONS: tuple[str, ...] = get_args(Quantization)
BASE_QUANTIZATION_FILE = "base_quantization.json"
# The evaluation backends that load a quantized base with its adapter the way training ran it.
# vLLM would serve the adapter on its own copy of the base (as stored, or quantized its way).
QUANTIZED_BACKENDS: tuple[str, ...] = ("transformers",)


def marker(quantization: Quantization) -> dict[str, str]:
    """What an adapter folder's ``base_quantization.json`` holds."""
    return {"quantization": quantization}


def adapter_quantization(
    adapter_dir: Path | None, budget: ReadBudget | None = None
) -> Quantization | None:
    """How the adapter's base must be loaded (None: as stored); 422 for a value not known here."""
    if adapter_dir is None:
        return None
    path = adapter_dir / BASE_QUANTIZATION_FILE
    if not os.path.lexists(path):
        return None
    data = read_client_json(path, BASE_QUANTIZATION_FILE, budget or ReadBudget())
    value = data.get("quantization") if isinstance(data, dict) else None
    if value in QUANTIZATIONS:
        return cast(Quantization, value)
    raise Problem(
        422,
        "Unknown base quantization",
        f"{BASE_QUANTIZATION_FILE} of the adapter asks for quantization {value!r}; "
        f"this server loads {list(QUANTIZATIONS)}",
    )


def with_quantization(fingerprint: str, quantization: str | None) -> str:
    """The fingerprint of a model whose base is loaded quantized: ``sha256:…+nf4``."""
    return fingerprint if quantization is None else f"{fingerprint}+{quantization}"


def backend_refusal(backend: str, quantization: str | None) -> str | None:
    """Why ``backend`` cannot evaluate an adapter whose base is loaded ``quantization``; None
    when it can."""
    if quantization is None or backend in QUANTIZED_BACKENDS:
        return None
    return (
        f"the adapter was trained on a {quantization} base (QLoRA), and backend {backend!r} "
        "cannot load that base with the adapter the way training ran it; use backend "
        + " or ".join(repr(b) for b in QUANTIZED_BACKENDS)
    )
