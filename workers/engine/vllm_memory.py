"""How much memory a vLLM engine may reserve on a CPU, on a machine it shares.

On the CPU backend vLLM's ``gpu_memory_utilization`` is the share of the machine's RAM the
engine reserves, and it refuses to start unless that much is free ("Available memory on node 0
(20.87/23.54 GiB) on startup is less than desired CPU memory utilization (0.9, …)"). Its
default, 0.9, therefore fails whenever other processes use a tenth of the RAM. Unless the
operator sets ``FORGETGUARD_VLLM_GPU_MEMORY_UTILIZATION``, a CPU engine reserves what it needs
(the weights, the KV cache of ``VLLM_CPU_KVCACHE_SPACE`` GiB, a runtime slack), and a machine
without that much free memory gets a message saying which setting to change.

Neither torch nor vLLM is imported here.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

GIB = 1024**3
KV_CACHE_SETTING = "VLLM_CPU_KVCACHE_SPACE"
UTILIZATION_SETTING = "FORGETGUARD_VLLM_GPU_MEMORY_UTILIZATION"
# vLLM's KV cache on CPU when VLLM_CPU_KVCACHE_SPACE is unset (GiB), as `make` sets it.
DEFAULT_KV_CACHE_GIB = 2.0
# The engine's own allocations beyond the weights and the KV cache (activations, buffers).
RUNTIME_SLACK_BYTES = 1 * GIB
# vLLM's own default, the most a CPU engine reserves; and how much of the free memory it may
# count on (the rest moves while it starts).
UTILIZATION_CEILING = 0.9
FREE_SHARE = 0.95


class NotEnoughMemory(ValueError):
    """A vLLM engine cannot start here with these settings; the message says which to change."""


def kv_cache_bytes(environ: Mapping[str, str] | None = None) -> int:
    """The KV cache a CPU engine allocates: ``VLLM_CPU_KVCACHE_SPACE`` GiB."""
    env = os.environ if environ is None else environ
    raw = env.get(KV_CACHE_SETTING) or ""
    try:
        gib = float(raw) if raw else DEFAULT_KV_CACHE_GIB
    except ValueError:
        raise NotEnoughMemory(f"{KV_CACHE_SETTING}={raw!r} is not a number of GiB") from None
    return int(gib * GIB)


def memory(meminfo: Path = Path("/proc/meminfo")) -> tuple[int, int]:
    """``(total, available)`` bytes of RAM on this machine."""
    fields: dict[str, int] = {}
    for line in meminfo.read_text().splitlines():
        name, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            fields[name] = int(parts[0]) * 1024
    return fields["MemTotal"], fields.get("MemAvailable", fields.get("MemFree", 0))


def cpu_memory_utilization(*, total: int, available: int, weights: int, kv_cache: int) -> float:
    """The share of RAM a CPU engine reserves: what it needs (weights, KV cache, slack), never
    more than vLLM's own default; :class:`NotEnoughMemory` when that much is not free."""
    needed = weights + kv_cache + RUNTIME_SLACK_BYTES
    if needed > available * FREE_SHARE:
        raise NotEnoughMemory(
            f"vLLM on this CPU needs about {needed / GIB:.1f} GiB (weights {weights / GIB:.1f} "
            f"GiB, KV cache {kv_cache / GIB:.1f} GiB from {KV_CACHE_SETTING}, "
            f"{RUNTIME_SLACK_BYTES / GIB:.0f} GiB runtime) but only {available / GIB:.1f} of "
            f"{total / GIB:.1f} GiB are free: lower {KV_CACHE_SETTING} (GiB) on the worker, "
            "free memory, or evaluate on the transformers backend"
        )
    return min(UTILIZATION_CEILING, needed / total)


def startup_advice(error: str, utilization: float) -> str:
    """vLLM refused to start for memory: its message, and the settings that change it."""
    return (
        f"vLLM could not start: {error[:500]} (it reserved {utilization:.2f} of the RAM); set "
        f"{UTILIZATION_SETTING} on the worker to a share of the RAM that is free, or lower "
        f"{KV_CACHE_SETTING} (GiB)"
    )
