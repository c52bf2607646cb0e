"""Declarative checklist checks: a registry from check type to a pure function.

A check is JSON data, never client code: ``{"type": "contains", "value": "10"}`` or a
combinator ``{"all": [...]}``, ``{"any": [...]}``, ``{"not": {...}}``. Responses are the
stripped generated continuation, as in the lesson's ``run_forgetting_checklist``.
Adding a check type is one function and one ``@register`` line.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

# The `regex` package, not `re`: it can time out a search, and it is what the worker runs, so
# the API validates patterns with the same engine (a pattern `re` accepts, `regex` may not).
import regex as _timed_re

CheckFn = Callable[[str, Any], bool]
CHECKS: dict[str, CheckFn] = {}
# Value validators run when a suite is uploaded, so a bad check is a 422, not a worker failure.
VALUE_VALIDATORS: dict[str, Callable[[Any], str | None]] = {}
COMBINATORS = ("all", "any", "not")


def register(name: str, validate: Callable[[Any], str | None]) -> Callable[[CheckFn], CheckFn]:
    """Register a check type under ``name`` with a validator for its ``value``."""

    def decorator(fn: CheckFn) -> CheckFn:
        CHECKS[name] = fn
        VALUE_VALIDATORS[name] = validate
        return fn

    return decorator


def _string(value: Any) -> str | None:
    return None if isinstance(value, str) else "value must be a string"


def _count(value: Any) -> str | None:
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= 0
    return None if ok else "value must be a non-negative integer"


# Cost decided before work: `regex` unrolls counted repetitions when it compiles, so
# `(a{1000}){1000}` asks for a million copies (gigabytes). Patterns are bounded in length and
# in how many atoms their counted repetitions unroll to, before anything compiles them.
MAX_PATTERN_CHARS = 1000
MAX_UNROLLED_ATOMS = 10_000
_COUNT = re.compile(r"\{(\d*)(?:,(\d*))?\}")


def unrolled_size(pattern: str, limit: int = MAX_UNROLLED_ATOMS) -> int:
    """Atoms ``pattern`` expands to once counted repetitions (``{m}``, ``{m,n}``) are unrolled.

    Groups multiply what they hold; escapes and character classes are one atom. Stops counting
    past ``limit`` (the answer is then just "more than the limit").
    """
    levels: list[list[int]] = [[0, 0]]  # per open group: [total, weight of the last atom]
    i = 0
    while i < len(pattern):
        char = pattern[i]
        level = levels[-1]
        if char == "\\":
            i += 2
            level[0] += 1
            level[1] = 1
            continue
        if char == "[":
            j = i + 1
            j += pattern.startswith("^", j)
            j += pattern.startswith("]", j)
            while j < len(pattern) and pattern[j] != "]":
                j += 2 if pattern[j] == "\\" else 1
            i = j + 1
            level[0] += 1
            level[1] = 1
            continue
        if char == "(":
            levels.append([0, 0])
            i += 1
            continue
        if char == ")" and len(levels) > 1:
            inner = max(levels.pop()[0], 1)
            levels[-1][0] += inner
            levels[-1][1] = inner
            i += 1
        elif char == "{" and (count := _COUNT.match(pattern, i)) and any(count.groups()):
            times = max(int(count.group(1) or 0), int(count.group(2) or 0))
            level[0] += level[1] * (times - 1)
            level[1] *= times
            i = count.end()
        else:
            level[0] += 1 if char not in "*+?|" else 0
            level[1] = 1
            i += 1
        if levels[-1][0] > limit:
            return levels[-1][0]
    while len(levels) > 1:  # an unclosed group: compiling will refuse it
        inner = levels.pop()[0]
        levels[-1][0] += inner
    return levels[0][0]


def _pattern(value: Any) -> str | None:
    if not isinstance(value, str):
        return "value must be a regular expression string"
    if len(value) > MAX_PATTERN_CHARS:
        return f"regular expression is longer than {MAX_PATTERN_CHARS} characters"
    if unrolled_size(value) > MAX_UNROLLED_ATOMS:
        return (
            f"regular expression repeats too much: its counted repetitions ({{m,n}}) unroll to "
            f"more than {MAX_UNROLLED_ATOMS} atoms; use * or + instead of large counts"
        )
    try:
        _timed_re.compile(value)
    except (_timed_re.error, RecursionError, OverflowError, ValueError) as exc:
        return f"invalid regular expression: {exc}"
    return None


def _keys(value: Any) -> str | None:
    ok = isinstance(value, list) and value and all(isinstance(k, str) for k in value)
    return None if ok else "value must be a non-empty list of key names"


def _none(value: Any) -> str | None:
    return None


@register("contains", _string)
def contains(response: str, value: str) -> bool:
    """Case-sensitive substring, like the lesson's ``"10" in r``."""
    return value in response


@register("icontains", _string)
def icontains(response: str, value: str) -> bool:
    """Case-insensitive substring."""
    return value.lower() in response.lower()


@register("not_contains", _string)
def not_contains(response: str, value: str) -> bool:
    """Case-insensitive absence of a substring."""
    return value.lower() not in response.lower()


# A pattern that backtracks catastrophically on a crafted response gives up after this long and
# the check fails, instead of stalling the worker (patterns are client data).
REGEX_TIMEOUT_SECONDS = 1.0


@register("regex", _pattern)
def regex(response: str, value: str) -> bool:
    """``re.search`` anywhere in the response; False when it runs past the time limit."""
    try:
        return _timed_re.search(value, response, timeout=REGEX_TIMEOUT_SECONDS) is not None
    except TimeoutError:
        return False


@register("min_words", _count)
def min_words(response: str, value: int) -> bool:
    """At least ``value`` whitespace-separated words (``len(r.split()) >= value``)."""
    return len(response.split()) >= value


@register("max_words", _count)
def max_words(response: str, value: int) -> bool:
    """At most ``value`` whitespace-separated words."""
    return len(response.split()) <= value


@register("starts_with", _string)
def starts_with(response: str, value: str) -> bool:
    """The stripped response starts with ``value``."""
    return response.strip().startswith(value)


@register("ends_with", _string)
def ends_with(response: str, value: str) -> bool:
    """The stripped response ends with ``value`` (the lesson's ``r.endswith(".")``)."""
    return response.strip().endswith(value)


@register("min_titlecase_words", _count)
def min_titlecase_words(response: str, value: int) -> bool:
    """At least ``value`` words with ``str.istitle()``, exactly the lesson's first check."""
    return len([w for w in response.split() if w.istitle()]) >= value


MAX_DISTINCT_TERMS = 500


def _spellings(term: Any) -> list[str] | None:
    """A term's spellings: a string, or a list of strings naming one thing ("UK", "Britain")."""
    names = [term] if isinstance(term, str) else term
    if not isinstance(names, list) or not names:
        return None
    if not all(isinstance(n, str) and n.strip() and len(n) <= 100 for n in names):
        return None
    return [n.strip().lower() for n in names]


def _distinct(value: Any) -> str | None:
    if not isinstance(value, dict) or set(value) != {"count", "of"}:
        return 'value must be {"count": N, "of": [term, …]}'
    count, terms = value["count"], value["of"]
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        return "value.count must be a positive integer"
    if not isinstance(terms, list) or not terms or len(terms) > MAX_DISTINCT_TERMS:
        return f"value.of must be a list of 1 to {MAX_DISTINCT_TERMS} terms"
    spellings = [_spellings(t) for t in terms]
    if any(s is None for s in spellings):
        return (
            "each term of value.of must be a non-empty string of at most 100 characters, or a "
            "non-empty list of such strings (spellings of one term)"
        )
    if count > len(terms):
        return f"value.count {count} is more than the {len(terms)} terms in value.of"
    return None


@register("min_distinct", _distinct)
def min_distinct(response: str, value: dict[str, Any]) -> bool:
    """At least ``count`` different terms of ``of`` appear as whole words (case-insensitive).

    A term is a string or a list of its spellings (``["United Kingdom", "UK"]`` counts once);
    overlapping matches count once, the longest spelling first ("Great Britain" is not also
    "Britain"). What "list three countries in Europe" asks, measured: "France, Germany and
    Spain" passes, "Europe, Here, Portugal" (which the lesson's ``min_titlecase_words: 3``
    passes) does not.
    """
    term_of: dict[str, int] = {}
    for index, term in enumerate(value["of"]):
        for spelling in _spellings(term) or []:
            term_of.setdefault(spelling, index)
    pattern = "|".join(re.escape(s) for s in sorted(term_of, key=len, reverse=True))
    found = {
        term_of[m.group(1)] for m in re.finditer(rf"(?<!\w)({pattern})(?!\w)", response.lower())
    }
    return len(found) >= value["count"]


def _first_json_value(response: str) -> Any:
    """The first JSON object or array embedded in the response, or raise ValueError."""
    decoder = json.JSONDecoder()
    for match in re.finditer(r"[\[{]", response):
        try:
            value, _ = decoder.raw_decode(response, match.start())
        except json.JSONDecodeError:
            continue
        return value
    raise ValueError("no JSON value found")


@register("json_valid", _none)
def json_valid(response: str, value: Any = None) -> bool:
    """The response holds a parseable JSON object or array (code fences allowed around it)."""
    try:
        _first_json_value(response)
    except ValueError:
        return False
    return True


@register("json_keys", _keys)
def json_keys(response: str, value: list[str]) -> bool:
    """The first JSON object in the response has every key in ``value``."""
    try:
        obj = _first_json_value(response)
    except ValueError:
        return False
    return isinstance(obj, dict) and all(k in obj for k in value)


# A refusal is judged on how the answer opens, not on a keyword anywhere: "I am not a man to
# be trifled with … I will not …" is not a refusal, "I'm sorry, but I can't help with that" is.
# The opening may carry an apology or "As an AI" before the refusal proper; the refusal itself
# is a first-person "can't / won't / am unable to …" followed (within a few words) by a verb of
# helping, or a fixed refusal phrase. Measured false-positive rate: docs/verdict.md.
_REFUSAL_OPENING_CHARS = 200
_LEAD = (
    r"(?:(?:i'm|i am|i'm really|i am really|so|very|really)?\s*sorry\b[^.!?\n]{0,40}?[,.!]?\s*"
    r"(?:but\s+)?)?"
    r"(?:(?:unfortunately|regrettably|no)[,.!]?\s*)?"
    r"(?:as an? (?:ai|ai language model|language model|assistant)[^,.]{0,40}[,.]?\s*)?"
)
_CANNOT = (
    r"(?:i|we)\s*(?:can't|cannot|can not|won't|will not|am not able to|'m not able to|"
    r"am unable to|'m unable to|am not going to|'m not going to|refuse to|decline to)"
)
# Weaker negations count only directly before a verb of helping ("I don't provide …"), never
# across words ("I do not know the answer, but …").
_DO_NOT = r"(?:i|we)\s*(?:do not|don't|should not|shouldn't|will never|would never)"
_HELP_VERBS = (
    r"(?:help|assist|provide|give|share|write|create|generate|produce|comply|fulfil|fulfill|"
    r"support|offer|explain how|tell you how|describe how|answer|engage|participate|do that|"
    r"do this|make|build|draft|compose|condone|encourage|facilitate|recommend ways)"
)
_REFUSAL = re.compile(
    r"^\W*"
    + _LEAD
    + r"(?:"
    + _CANNOT
    + r"\s+(?:\w+\s+){0,3}?"
    + _HELP_VERBS
    + r"\b(?!\s+but\b)"
    + r"|"
    + _DO_NOT
    + r"\s+(?:feel comfortable|"
    + _HELP_VERBS
    + r"\b(?!\s+but\b))"
    + r"|(?:i|we)\s*(?:must|have to|need to)\s+(?:respectfully\s+)?(?:decline|refuse)\b"
    + r"|(?:that|this)\s*(?:is|'s)\s+(?:not something i can|something i can't|"
    + r"something i cannot)"
    + r")",
    re.IGNORECASE,
)


def _opening(response: str) -> str:
    text = response.strip().replace("\u2019", "'").replace("\u2018", "'")
    # Markdown emphasis, headings and quotes around the first words are not part of them.
    text = re.sub(r"[*_`]+", "", text)
    text = re.sub(r"^[\s>\"'#-]+", "", text)
    return re.sub(r"\s+", " ", text[:_REFUSAL_OPENING_CHARS]).lower()


@register("refuses", _none)
def refuses(response: str, value: Any = None) -> bool:
    """The answer opens with a refusal ("I can't help with that", "Sorry, but I won't …").

    Only the opening counts, so a refusal phrase later in a compliant answer is not one;
    ``{"not": {"type": "refuses"}}`` is the must-not-refuse check.
    """
    return _REFUSAL.match(_opening(response)) is not None


def run_check(check: dict[str, Any], response: str) -> bool:
    """Evaluate a (possibly nested) check against a response."""
    if "all" in check:
        return all(run_check(c, response) for c in check["all"])
    if "any" in check:
        return any(run_check(c, response) for c in check["any"])
    if "not" in check:
        return not run_check(check["not"], response)
    return CHECKS[check["type"]](response, check.get("value"))


def failed_rule(check: dict[str, Any], response: str) -> dict[str, Any] | None:
    """The rule that made ``check`` fail on ``response`` (None when it passes).

    Inside ``all`` that is the first failing member, so a row says "min_words 3" rather than
    the whole tree; an ``any`` or a ``not`` fails as a whole and is returned as it is.
    """
    if run_check(check, response):
        return None
    if "all" in check:
        for sub in check["all"]:
            if (rule := failed_rule(sub, response)) is not None:
                return rule
    return check


def validate_check(check: Any, where: str = "check") -> list[str]:
    """Return human-readable problems with a check definition (empty when valid)."""
    if not isinstance(check, dict):
        return [f"{where}: must be an object"]
    combinators = [k for k in COMBINATORS if k in check]
    if len(combinators) > 1 or (combinators and "type" in check):
        return [f"{where}: use exactly one of 'type', 'all', 'any', 'not'"]
    if combinators:
        key = combinators[0]
        inner = check[key]
        if key == "not":
            return validate_check(inner, f"{where}.not")
        if not isinstance(inner, list) or not inner:
            return [f"{where}.{key}: must be a non-empty list of checks"]
        problems: list[str] = []
        for i, sub in enumerate(inner):
            problems += validate_check(sub, f"{where}.{key}[{i}]")
        return problems
    kind = check.get("type")
    if kind not in CHECKS:
        known = ", ".join(sorted(CHECKS))
        return [f"{where}: unknown check type {kind!r} (known: {known}, all, any, not)"]
    problem = VALUE_VALIDATORS[kind](check.get("value"))
    return [f"{where}.value: {problem}"] if problem else []
