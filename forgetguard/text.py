"""Server text made safe to show: one line, control characters escaped, cut to a bound.

A problem's ``detail``, an evaluation's ``error``, a reason, a category or a model's answer come
from the server (and through it from a model or a client), so they may hold newlines, ANSI
escapes or a 5 MB string. Printed raw into a CI log, a newline followed by ``::error::`` would
be read as a workflow command, and HTML in a Markdown summary would be rendered. Everything the
client package prints or writes that the server sent goes through these functions.
"""

from __future__ import annotations

import unicodedata
from typing import Any

# How much of one piece of server text a line shows.
LINE_LIMIT = 500
# Characters that reorder or hide text on display (bidirectional controls): escaped like
# control characters, so a log shows what the server sent, not what it wanted shown.
_BIDI = frozenset("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
# Markdown and HTML: what could start markup, a link, an image, a code span or a table cell.
_MARKDOWN = {
    "&": "&amp;",
    "<": "&lt;",
    ">": "&gt;",
    **{c: "\\" + c for c in "\\`*_[]|~"},
}


def _escape(char: str) -> str:
    if char in _NAMED:
        return _NAMED[char]
    if char in _BIDI or unicodedata.category(char) in ("Cc", "Cs", "Zl", "Zp"):
        code = ord(char)
        return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"
    return char


def one_line(value: Any, limit: int = LINE_LIMIT) -> str:
    """``value`` as one printable line: control characters escaped (``\\n``, ``\\x1b``), cut to
    ``limit`` characters with a note of how long it was."""
    text = "" if value is None else str(value)
    cut = len(text) > limit
    escaped = "".join(map(_escape, text[:limit] if cut else text))
    if len(escaped) > limit:  # escapes lengthen it
        escaped, cut = escaped[:limit], True
    return f"{escaped}… ({len(text):,} characters)" if cut else escaped


def markdown(value: Any, limit: int = LINE_LIMIT) -> str:
    """``value`` for a Markdown document: one line (:func:`one_line`) in which no HTML tag,
    link, image, emphasis, code span or table cell boundary can start."""
    return "".join(_MARKDOWN.get(c, c) for c in one_line(value, limit))


def xml_text(value: Any, limit: int | None = None) -> str:
    """``value`` for an XML attribute or text node: characters XML 1.0 cannot hold are escaped
    (ElementTree escapes ``<``, ``&`` and quotes itself); with ``limit``, one line."""
    if limit is not None:
        return one_line(value, limit)
    text = "" if value is None else str(value)
    return "".join(
        c
        if c in "\n\t"
        or (c >= " " and c not in "\x7f\ufffe\uffff" and unicodedata.category(c) != "Cs")
        else _escape(c)
        for c in text
    )


def duration(seconds: float) -> str:
    """``42s``, ``3m 05s``, ``2h 07m``: a wait, a run or an ETA, as people read them."""
    minutes, secs = divmod(max(0, int(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    if hours:
        return f"{hours}h {minutes:02d}m"
    return f"{minutes}m {secs:02d}s" if minutes else f"{secs}s"
