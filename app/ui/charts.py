"""Server-side SVG charts: pure functions from numbers and labels to an SVG string.

Every label goes through :func:`markupsafe.escape`, so a category named ``<script>`` is drawn
as text. The functions return :class:`markupsafe.Markup` (a ``str``) so Jinja2's autoescape
leaves the already-escaped SVG alone. No JavaScript, no external fonts: the charts render the
same in a browser, a screenshot, and an e-mailed HTML file.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from markupsafe import Markup, escape

Tone = Literal["bad", "good", "neutral"]

#: Colours that stay distinguishable for the common colour-vision deficiencies (grey vs blue).
BEFORE_COLOR = "#9ca3af"
AFTER_COLOR = "#1d4ed8"
TONE_COLORS: dict[str, str] = {"bad": "#b91c1c", "good": "#15803d", "neutral": "#4b5563"}
LINE_COLORS = ("#1d4ed8", "#c2410c", "#047857", "#7c3aed")
FONT = "system-ui, -apple-system, 'Segoe UI', Roboto, 'Helvetica Neue', Arial, sans-serif"


@dataclass(frozen=True)
class Series:
    """One bar per category: a legend name, the values (``None`` = no bar) and a fill colour."""

    name: str
    values: Sequence[float | None]
    color: str


@dataclass(frozen=True)
class Note:
    """Text written at the right end of a category row, e.g. ``▼ 0.65``, coloured by tone."""

    text: str
    tone: Tone = "neutral"


@dataclass(frozen=True)
class LineSeries:
    """A named polyline of ``(x, y)`` points."""

    name: str
    points: Sequence[tuple[float, float]]
    color: str | None = None


def _num(value: float) -> str:
    """A coordinate with at most one decimal, so the SVG stays small and diffable."""
    return f"{value:.1f}".rstrip("0").rstrip(".")


def _text(
    x: float,
    y: float,
    content: str,
    *,
    anchor: str = "start",
    size: int = 12,
    fill: str = "#374151",
    weight: str = "normal",
    extra: str = "",
) -> str:
    return (
        f'<text x="{_num(x)}" y="{_num(y)}" text-anchor="{anchor}" font-size="{size}" '
        f'fill="{fill}" font-weight="{weight}"{extra}>{escape(content)}</text>'
    )


def _truncate(label: str, limit: int) -> str:
    return label if len(label) <= limit else label[: limit - 1] + "…"


def _open_svg(width: float, height: float, title: str, desc: str) -> list[str]:
    # role="img" + <title>/<desc> is what screen readers announce for an inline SVG chart.
    return [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" role="img" '
        f'viewBox="0 0 {_num(width)} {_num(height)}" width="{_num(width)}" height="{_num(height)}" '
        f'font-family="{FONT}" preserveAspectRatio="xMinYMin meet">',
        f"<title>{escape(title)}</title>",
        f"<desc>{escape(desc)}</desc>",
    ]


def grouped_bar_chart(
    categories: Sequence[str],
    series: Sequence[Series],
    *,
    title: str,
    max_value: float = 1.0,
    value_format: str = "{:.2f}",
    notes: Sequence[Note | None] | None = None,
    width: int = 760,
    label_width: int = 170,
    bar_height: int = 14,
) -> Markup:
    """Horizontal grouped bars: one row per category, one bar per series, value at each bar's end.

    Horizontal because category names are words and read best left-aligned; ``notes`` (one per
    category, optional) label each row's change in words as well as colour.
    """
    if notes is not None and len(notes) != len(categories):
        raise ValueError("notes must have one entry (or None) per category")
    for s in series:
        if len(s.values) != len(categories):
            raise ValueError(
                f"series {s.name!r} has {len(s.values)} values for {len(categories)} categories"
            )
    max_value = max_value if max_value > 0 else 1.0
    note_width = 110 if notes is not None else 0
    value_room = 46  # room for the value written after the longest bar
    plot_x = label_width
    plot_w = width - label_width - note_width - value_room
    legend_h = 28
    gap_in_group = 3
    group_h = len(series) * bar_height + (len(series) - 1) * gap_in_group
    row_h = group_h + 16
    axis_h = 24
    height = legend_h + max(1, len(categories)) * row_h + axis_h

    desc_rows = []
    for i, cat in enumerate(categories):
        parts = [f"{s.name} {_fmt(s.values[i], value_format)}" for s in series]
        if notes is not None and notes[i] is not None:
            parts.append(notes[i].text)  # type: ignore[union-attr]
        desc_rows.append(f"{cat}: " + ", ".join(parts))
    out = _open_svg(width, height, title, "; ".join(desc_rows) or "no data")

    # Legend: a swatch and the series name, in words (colour is never the only cue).
    lx = plot_x
    for s in series:
        out.append(
            f'<rect x="{_num(lx)}" y="8" width="12" height="12" rx="2" fill="{escape(s.color)}"/>'
        )
        out.append(_text(lx + 17, 18.5, s.name, size=12))
        lx += 17 + 8 * len(s.name) + 24

    top = legend_h
    bottom = legend_h + max(1, len(categories)) * row_h
    # Grid at quarters of the range, labelled under the plot.
    for q in range(5):
        gx = plot_x + plot_w * q / 4
        out.append(
            f'<line x1="{_num(gx)}" y1="{top}" x2="{_num(gx)}" y2="{_num(bottom)}" '
            f'stroke="#e5e7eb" stroke-width="1"/>'
        )
        out.append(
            _text(
                gx,
                bottom + 16,
                _fmt(max_value * q / 4, value_format),
                anchor="middle",
                size=11,
                fill="#6b7280",
            )
        )

    if not categories:
        out.append(
            _text(
                plot_x + plot_w / 2, top + row_h / 2 + 4, "no data", anchor="middle", fill="#6b7280"
            )
        )
    for i, cat in enumerate(categories):
        y0 = top + i * row_h + 8
        out.append(
            _text(
                plot_x - 10,
                y0 + group_h / 2 + 4,
                _truncate(cat, 24),
                anchor="end",
                size=13,
                fill="#111827",
                extra=f' data-category="{escape(cat)}"',
            )
        )
        for j, s in enumerate(series):
            value = s.values[i]
            by = y0 + j * (bar_height + gap_in_group)
            if value is None:
                out.append(_text(plot_x + 4, by + bar_height - 3, "n/a", size=11, fill="#6b7280"))
                continue
            bw = plot_w * min(max(value, 0.0), max_value) / max_value
            out.append(
                f'<rect x="{_num(plot_x)}" y="{_num(by)}" width="{_num(max(bw, 1.5))}" '
                f'height="{bar_height}" rx="2" fill="{escape(s.color)}">'
                f"<title>{escape(f'{cat} — {s.name}: {_fmt(value, value_format)}')}</title></rect>"
            )
            out.append(
                _text(
                    plot_x + bw + 5,
                    by + bar_height - 3,
                    _fmt(value, value_format),
                    size=11,
                    fill="#374151",
                )
            )
        if notes is not None and notes[i] is not None:
            note = notes[i]
            assert note is not None
            out.append(
                _text(
                    width - 4,
                    y0 + group_h / 2 + 5,
                    note.text,
                    anchor="end",
                    size=13,
                    fill=TONE_COLORS[note.tone],
                    weight="bold",
                )
            )
    out.append("</svg>")
    return Markup("".join(out))


def _fmt(value: float | None, value_format: str) -> str:
    return "n/a" if value is None else value_format.format(value)


def nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    """Round tick values covering ``[low, high]`` (1, 2, 2.5, 5 × 10^k steps)."""
    if not (math.isfinite(low) and math.isfinite(high)):
        return [0.0, 1.0]
    if high < low:
        low, high = high, low
    if high == low:
        pad = abs(high) * 0.1 or 1.0
        low, high = low - pad, high + pad
    raw = (high - low) / max(1, count - 1)
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    start = math.floor(low / step) * step
    ticks = []
    value = start
    while value <= high + step * 1e-9:
        ticks.append(round(value, 12))
        value += step
    if ticks[-1] < high:
        ticks.append(round(value, 12))
    return ticks


def _tick_label(value: float) -> str:
    if value == 0:
        return "0"
    if abs(value) < 1e-2 or abs(value) >= 1e5:
        return f"{value:.1e}".replace("e-0", "e-").replace("e+0", "e")
    return f"{value:.4g}"


def line_chart(
    series: Sequence[LineSeries],
    *,
    title: str,
    x_label: str,
    y_label: str,
    width: int = 640,
    height: int = 240,
    y_from_zero: bool = False,
) -> Markup:
    """A line chart with axes, round ticks, a legend and a dot on each point of short series."""
    points = [p for s in series for p in s.points if math.isfinite(p[0]) and math.isfinite(p[1])]
    margin_l, margin_r, margin_t, margin_b = 64, 16, 30, 42
    plot_w, plot_h = width - margin_l - margin_r, height - margin_t - margin_b
    desc = "; ".join(
        f"{s.name}: {len(s.points)} points"
        + (
            f", first {_tick_label(s.points[0][1])}, last {_tick_label(s.points[-1][1])}"
            if s.points
            else ""
        )
        for s in series
    )
    out = _open_svg(width, height, title, desc or "no data")
    if not points:
        out.append(_text(width / 2, height / 2, "no data yet", anchor="middle", fill="#6b7280"))
        out.append("</svg>")
        return Markup("".join(out))

    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x_ticks = nice_ticks(min(xs), max(xs))
    y_ticks = nice_ticks(0.0 if y_from_zero else min(ys), max(ys))
    x0, x1, y0, y1 = x_ticks[0], x_ticks[-1], y_ticks[0], y_ticks[-1]

    def sx(x: float) -> float:
        return margin_l + (x - x0) / ((x1 - x0) or 1.0) * plot_w

    def sy(y: float) -> float:
        return margin_t + plot_h - (y - y0) / ((y1 - y0) or 1.0) * plot_h

    for t in y_ticks:
        out.append(
            f'<line x1="{margin_l}" y1="{_num(sy(t))}" x2="{margin_l + plot_w}" '
            f'y2="{_num(sy(t))}" stroke="#e5e7eb"/>'
        )
        out.append(
            _text(margin_l - 6, sy(t) + 4, _tick_label(t), anchor="end", size=11, fill="#6b7280")
        )
    for t in x_ticks:
        out.append(
            _text(
                sx(t),
                margin_t + plot_h + 16,
                _tick_label(t),
                anchor="middle",
                size=11,
                fill="#6b7280",
            )
        )
    out.append(
        f'<line x1="{margin_l}" y1="{margin_t + plot_h}" x2="{margin_l + plot_w}" '
        f'y2="{margin_t + plot_h}" stroke="#9ca3af"/>'
    )
    out.append(_text(margin_l + plot_w / 2, height - 6, x_label, anchor="middle", size=12))
    out.append(
        _text(
            14,
            margin_t + plot_h / 2,
            y_label,
            anchor="middle",
            size=12,
            extra=f' transform="rotate(-90 14 {_num(margin_t + plot_h / 2)})"',
        )
    )

    lx = margin_l
    for k, s in enumerate(series):
        color = s.color or LINE_COLORS[k % len(LINE_COLORS)]
        pts = [(x, y) for x, y in s.points if math.isfinite(x) and math.isfinite(y)]
        if pts:
            path = " ".join(f"{_num(sx(x))},{_num(sy(y))}" for x, y in pts)
            out.append(
                f'<polyline points="{path}" fill="none" stroke="{escape(color)}" '
                f'stroke-width="2" stroke-linejoin="round"/>'
            )
            if len(pts) <= 40:
                out.extend(
                    f'<circle cx="{_num(sx(x))}" cy="{_num(sy(y))}" r="2.5" fill="{escape(color)}">'
                    f"<title>{escape(f'{s.name} at {x_label} {_tick_label(x)}: {_tick_label(y)}')}"
                    f"</title></circle>"
                    for x, y in pts
                )
        out.append(f'<rect x="{_num(lx)}" y="10" width="14" height="3" fill="{escape(color)}"/>')
        out.append(_text(lx + 19, 15, s.name, size=12))
        lx += 19 + 8 * len(s.name) + 20
    out.append("</svg>")
    return Markup("".join(out))
