"""Numbers as a person reads them: percentages and decimals, ``n/a`` for missing or NaN."""

from __future__ import annotations

import math


def _missing(value: float | None) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def percent(value: float | None, digits: int = 0) -> str:
    """``0.6905`` → ``"69%"`` (``digits`` after the point); ``"n/a"`` when missing."""
    return "n/a" if value is None or _missing(value) else f"{value:.{digits}%}"


def number(value: float | None, digits: int = 3) -> str:
    """``3.4821`` → ``"3.482"`` (``digits`` after the point); ``"n/a"`` when missing."""
    return "n/a" if value is None or _missing(value) else f"{value:.{digits}f}"
