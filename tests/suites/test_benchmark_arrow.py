"""The Arrow IPC stream reader that pulled benchmarks go through (no pyarrow needed)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from app.suites.benchmarks.arrow import ArrowError, read_stream

DATA = Path(__file__).parent / "data"


def test_reads_every_type_the_benchmarks_use_across_batches_with_nulls() -> None:
    # columns.arrow was written by pyarrow 26.0.1 (two record batches); columns.json is what
    # pyarrow reads back from it (binary shown as hex).
    rows = read_stream((DATA / "columns.arrow").read_bytes())
    for row in rows:
        row["raw"] = None if row["raw"] is None else row["raw"].hex()
    assert rows == json.loads((DATA / "columns.json").read_text(encoding="utf-8"))
    assert [type(row["i64"]) for row in rows] == [int, int, int]


def test_refuses_a_type_it_does_not_read_naming_the_column() -> None:
    with pytest.raises(ArrowError, match=r"column 'x' has Arrow type FloatingPoint"):
        read_stream((DATA / "float.arrow").read_bytes())


@pytest.mark.parametrize("cut", [7, 100, 1000])
def test_a_truncated_stream_is_an_error_not_short_data(cut: int) -> None:
    data = (DATA / "columns.arrow").read_bytes()[:cut]
    with pytest.raises(ArrowError):
        read_stream(data)


def test_bytes_that_are_not_a_stream_are_refused() -> None:
    with pytest.raises(ArrowError, match="no schema"):
        read_stream(b"")
    with pytest.raises(ArrowError):
        read_stream(b"\xff\xff\xff\xff\x10\x00\x00\x00" + b"\x00" * 8)
