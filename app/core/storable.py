"""What the database can store: one check of everything a client sends, before any route runs.

PostgreSQL refuses NUL in text, JSON has no Infinity or NaN (SQLite would store them as
non-standard JSON, PostgreSQL refuses them), and a lone UTF-16 surrogate cannot be encoded as
UTF-8 (hashing or storing it raises). Rather than guard each field, every string and number of
a JSON request body, every query parameter and the path are checked here, the same way for both
databases, so a hostile value is a 422 that names where it is, and never reaches SQL.
"""

from __future__ import annotations

import json
import math
from typing import Any
from urllib.parse import unquote_to_bytes

# Depth is bounded before this runs (the nesting guard), so recursion here is bounded too.


class Unstorable(ValueError):
    """A value the database cannot store; ``where`` says which, as ``body.a[0].b``."""

    def __init__(self, where: str, what: str) -> None:
        super().__init__(f"{where} {what}")
        self.where = where
        self.what = what


def _constant(name: str) -> Any:
    raise Unstorable("body", f"holds {name}, which JSON does not allow; send a finite number")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise Unstorable("body", f"holds the number {text[:40]}, too large for a float")
    return value


def text_problem(value: str) -> str | None:
    """Why ``value`` cannot be stored (a NUL character, a lone surrogate), or None."""
    if "\x00" in value:
        return "holds a NUL character (\\u0000), which cannot be stored; remove it"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return "holds a lone UTF-16 surrogate (\\ud800–\\udfff), which is not text; remove it"
    return None


def check_value(value: Any, where: str = "body") -> None:
    """Raise :class:`Unstorable` for the first string (key or value) or float not storable."""
    if isinstance(value, str):
        problem = text_problem(value)
        if problem:
            raise Unstorable(where, problem)
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise Unstorable(where, "is not a finite number")
    elif isinstance(value, dict):
        for key, item in value.items():
            problem = text_problem(key)
            if problem:
                raise Unstorable(f"{where} (a key)", problem)
            check_value(item, f"{where}.{key}"[:200])
    elif isinstance(value, list):
        for index, item in enumerate(value):
            check_value(item, f"{where}[{index}]"[:200])


def check_json_body(body: bytes) -> None:
    """Parse ``body`` as the API will and check every value; malformed JSON is left to the API."""
    try:
        parsed = json.loads(body, parse_constant=_constant, parse_float=_finite)
    except (ValueError, RecursionError) as exc:
        if isinstance(exc, Unstorable):
            raise
        return  # not JSON: the route's own parser answers it
    check_value(parsed)


def check_url(path: str, query_string: bytes) -> None:
    """Refuse a NUL (``%00``) or a string that is not UTF-8 in the path or a query parameter."""
    problem = text_problem(path)
    if problem:
        raise Unstorable("the path", problem)
    for part in query_string.replace(b"+", b" ").split(b"&"):
        name, _, raw = part.partition(b"=")
        decoded = unquote_to_bytes(raw)
        shown = unquote_to_bytes(name).decode("utf-8", "replace")[:60]
        if b"\x00" in decoded or b"\x00" in unquote_to_bytes(name):
            raise Unstorable(f"query parameter {shown!r}", "holds a NUL character (%00); remove it")
        try:
            decoded.decode("utf-8")
        except UnicodeDecodeError:
            raise Unstorable(
                f"query parameter {shown!r}", "is not UTF-8 text; percent-encode UTF-8"
            ) from None
