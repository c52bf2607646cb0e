"""vLLM on a shared CPU (issue 29, part 11): the engine reserves what it needs, not 90 % of the
RAM, and a machine without that much free memory gets a message naming the setting."""

from __future__ import annotations

from pathlib import Path

import pytest

from workers.engine.vllm_memory import (
    GIB,
    NotEnoughMemory,
    cpu_memory_utilization,
    kv_cache_bytes,
    memory,
    startup_advice,
)


def test_a_shared_machine_reserves_what_the_engine_needs() -> None:
    # The case that failed: 23.5 GiB of RAM, other processes using 2.7 GiB (more than a tenth).
    share = cpu_memory_utilization(
        total=int(23.54 * GIB), available=int(20.87 * GIB), weights=540 << 20, kv_cache=2 * GIB
    )
    assert share * 23.54 * GIB <= 20.87 * GIB  # vLLM's start-up check passes
    assert 0.1 < share < 0.2
    # A big machine never reserves more than vLLM's own default.
    big = cpu_memory_utilization(total=100 * GIB, available=100 * GIB, weights=93 * GIB, kv_cache=0)
    assert big == 0.9


def test_too_little_free_memory_names_the_settings() -> None:
    with pytest.raises(NotEnoughMemory) as caught:
        cpu_memory_utilization(total=8 * GIB, available=3 * GIB, weights=GIB, kv_cache=4 * GIB)
    assert "VLLM_CPU_KVCACHE_SPACE" in str(caught.value)
    assert "3.0 of 8.0 GiB are free" in str(caught.value)
    advice = startup_advice("Available memory on node 0 (1/8 GiB) on startup is less", 0.5)
    assert "FORGETGUARD_VLLM_GPU_MEMORY_UTILIZATION" in advice


def test_kv_cache_and_memory_are_read_from_the_environment(tmp_path: Path) -> None:
    assert kv_cache_bytes({"VLLM_CPU_KVCACHE_SPACE": "3"}) == 3 * GIB
    assert kv_cache_bytes({}) == 2 * GIB
    with pytest.raises(NotEnoughMemory):
        kv_cache_bytes({"VLLM_CPU_KVCACHE_SPACE": "lots"})
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       24684544 kB\nMemFree: 1 kB\nMemAvailable:   21884544 kB\n")
    assert memory(meminfo) == (24684544 * 1024, 21884544 * 1024)
    total, available = memory()
    assert 0 < available <= total
