"""SVG charts and page view models: pure functions, tested without a server."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest
from markupsafe import Markup

from app.ui import views
from app.ui.charts import LineSeries, Note, Series, grouped_bar_chart, line_chart, nice_ticks

SVG = "{http://www.w3.org/2000/svg}"
EVIL = "<script>alert('x')</script> & \"quotes\""


def _parse(svg: str) -> ET.Element:
    return ET.fromstring(svg)  # raises on anything that is not well-formed XML


def test_grouped_bars_draw_one_bar_per_series_and_category() -> None:
    svg = grouped_bar_chart(
        ["geography", "math"],
        [Series("before", [0.7, 0.5], "#999"), Series("after", [0.05, None], "#00f")],
        title="Accuracy",
        value_format="{:.0%}",
        notes=[Note("▼ 65 pts", "bad"), None],
    )
    root = _parse(svg)
    bars = [r for r in root.iter(f"{SVG}rect") if r.find(f"{SVG}title") is not None]
    assert len(bars) == 3  # the missing after-value of math draws "n/a", not a bar
    widths = [float(b.get("width", 0)) for b in bars]
    # Row by row: geography before 0.7, geography after 0.05, math before 0.5; to scale.
    assert widths[0] > widths[2] > widths[1]
    assert widths[0] / widths[2] == pytest.approx(0.7 / 0.5, rel=0.01)
    text = "".join(root.itertext())
    assert "70%" in text and "5%" in text and "n/a" in text and "▼ 65 pts" in text
    assert root.get("role") == "img" and root.find(f"{SVG}title").text == "Accuracy"  # type: ignore[union-attr]


def test_chart_labels_are_escaped() -> None:
    svg = grouped_bar_chart([EVIL], [Series(EVIL, [0.5], "#000")], title=EVIL, notes=[Note(EVIL)])
    assert isinstance(svg, Markup)
    assert "<script>" not in svg and "&lt;script&gt;" in svg
    root = _parse(svg)
    assert root.find(f"{SVG}script") is None
    assert EVIL in "".join(root.itertext())  # the label survives, as text

    line = line_chart(
        [LineSeries(EVIL, [(1, 2.0), (2, 1.0)])], title=EVIL, x_label=EVIL, y_label=EVIL
    )
    assert "<script>" not in line and EVIL in "".join(_parse(line).itertext())


def test_bar_values_are_clamped_to_the_axis() -> None:
    root = _parse(grouped_bar_chart(["a"], [Series("s", [7.0], "#000")], title="t", width=500))
    bar = next(r for r in root.iter(f"{SVG}rect") if r.find(f"{SVG}title") is not None)
    assert float(bar.get("width", 0)) < 500


def test_mismatched_lengths_are_refused() -> None:
    with pytest.raises(ValueError, match="values for 2 categories"):
        grouped_bar_chart(["a", "b"], [Series("s", [1.0], "#000")], title="t")


def test_line_chart_plots_every_point_and_says_when_empty() -> None:
    root = _parse(
        line_chart(
            [LineSeries("loss", [(1, 2.5), (2, 1.9), (3, 1.2)])],
            title="Loss",
            x_label="step",
            y_label="loss",
        )
    )
    polyline = root.find(f"{SVG}polyline")
    assert polyline is not None and len(polyline.get("points", "").split()) == 3
    assert len(list(root.iter(f"{SVG}circle"))) == 3
    empty = line_chart([LineSeries("loss", [])], title="Loss", x_label="step", y_label="loss")
    assert "no data yet" in empty and "<polyline" not in empty


def test_nice_ticks_cover_the_range_with_round_steps() -> None:
    assert nice_ticks(0, 1) == [0.0, 0.25, 0.5, 0.75, 1.0]
    ticks = nice_ticks(0.13, 2.71)
    assert ticks[0] <= 0.13 and ticks[-1] >= 2.71 and len(ticks) <= 7
    assert nice_ticks(5, 5)[0] < 5 < nice_ticks(5, 5)[-1]
    assert nice_ticks(float("nan"), 1) == [0.0, 1.0]


def test_category_rows_put_the_worst_drop_first() -> None:
    body = {
        "threshold": 0.1,
        "category_drops": {"math": 0.05, "geography": 0.7},
        "statistics": {
            "by_category": {"geography": {"forgotten": 25, "learned": 0, "mcnemar_p_value": 1e-7}}
        },
    }
    before = {
        "general-qa": {
            "kind": "qa",
            "by_category": {
                "math": {"correct": 5, "total": 10},
                "geography": {"correct": 8, "total": 10},
            },
        }
    }
    after = {
        "general-qa": {
            "kind": "qa",
            "by_category": {
                "math": {"correct": 4, "total": 10},
                "geography": {"correct": 1, "total": 10},
            },
        }
    }
    rows = views.category_rows(body, before, after)
    assert [r["category"] for r in rows] == ["geography", "math"]
    assert rows[0]["before"] == 0.8 and rows[0]["after"] == 0.1 and rows[0]["fell"] is True
    assert rows[1]["fell"] is False and rows[0]["forgotten"] == 25


def test_change_notes_use_words_and_symbols_not_only_colour() -> None:
    assert views.change_note(0.65, 0.1) == Note("▼ 65 pts", "bad")
    assert views.change_note(0.05, 0.1) == Note("▼ 5 pts", "neutral")
    assert views.change_note(-0.1, 0.1) == Note("▲ 10 pts", "good")
    assert views.change_note(0.0, 0.1) == Note("no change", "neutral")


def test_training_curves_take_numeric_step_loss_and_lr_only() -> None:
    curves = views.training_curves(
        [
            {"step": 1, "loss": 2.0, "learning_rate": 1e-4, "epoch": 0.1},
            {"step": 2, "loss": float("nan"), "learning_rate": 9e-5},
            {"message": "no step"},
            None,  # type: ignore[list-item]
            {"step": 3, "loss": "1.5", "eval_loss": 1.7},
            {"step": True, "loss": 1.0},
        ]
    )
    assert curves["loss"] == [(1.0, 2.0)]
    assert curves["learning_rate"] == [(1.0, 1e-4), (2.0, 9e-5)]
    assert curves["eval_loss"] == [(3.0, 1.7)]


def test_flips_are_grouped_by_the_worst_category_first() -> None:
    flips = [
        {"category": "math", "item_id": "m1"},
        {"category": "geography", "item_id": "g2"},
        {"category": "geography", "item_id": "g1"},
        {"category": None, "item_id": "x"},
    ]
    ordered = views.sort_flips(flips, ["geography", "math"])
    assert [f["item_id"] for f in ordered] == ["g1", "g2", "m1", "x"]
