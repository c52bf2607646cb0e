"""Generation benchmarks (GSM8K) scored as lm-evaluation-harness 0.4.13 scores ``gsm8k``.

Each item is one ``generate`` request: ``num_fewshot`` chain-of-thought examples
(``Question: …\\nAnswer: {answer}\\n\\n``) then ``Question: {question}\\nAnswer:``, greedy, cut
at the suite's ``until`` (lm-eval: ``"Question:"``, ``"</s>"``, ``"<|im_end|>"``) and at
``max_new_tokens`` (256). The answer is read by both of lm-eval's filters, each followed by its
``exact_match`` against the reference solution:

- ``strict-match``: the first ``#### N`` (regex ``#### (\\-?[0-9\\.\\,]+)``);
- ``flexible-extract``: the last number-like span (``(-?[$0-9.,]{2,})|(-?[0-9]+)``);

a response where the regex finds nothing becomes ``"[invalid]"``, which matches nothing.
``passed`` is the suite's ``headline`` filter (flexible-extract by default); both are stored
per item and aggregated. ``docs/benchmarks.md`` ("GSM8K") says where each rule comes from.
"""

from __future__ import annotations

import random
import re
from collections.abc import Mapping, Sequence
from functools import lru_cache
from typing import Any

from app.core.formatting import percent
from app.stats import statistics as stats
from app.suites.accuracy import by_category, category_findings, paired_statistics
from app.suites.benchmarks.items import GenerationBenchmark
from app.suites.registry import (
    Card,
    Contribution,
    Display,
    Item,
    ItemRow,
    Pairs,
    Request,
    Result,
    Row,
    Suite,
    SuiteKind,
    finding,
    register_kind,
)
from app.suites.rules import CompareOptions

# --- lm-eval's filters and metric (lm_eval/filters/extraction.py, api/metrics.py) ----------

FILTERS: dict[str, tuple[re.Pattern[str], int]] = {
    # name: (regex_pattern, group_select), then take_first (one response per item)
    "strict-match": (re.compile(r"#### (\-?[0-9\.\,]+)"), 0),
    "flexible-extract": (re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)"), -1),
}
FALLBACK = "[invalid]"  # RegexFilter's fallback
# gsm8k.yaml's exact_match: ignore_case true, ignore_punctuation false, and these removed
# from prediction and reference, in this order.
REGEXES_TO_IGNORE = (",", r"\$", r"(?s).*#### ", r"\.$")


def regex_filter(response: str, pattern: re.Pattern[str], group_select: int) -> str:
    """lm-eval's ``RegexFilter`` on one response: the selected match, stripped, or the fallback.

    With several groups ``findall`` gives tuples; the first non-empty group of the selected
    match is taken (an all-empty tuple is the fallback).
    """
    matches = pattern.findall(response)
    if not matches:
        return FALLBACK
    match = matches[group_select]
    if isinstance(match, tuple):
        groups = [m for m in match if m]
        if not groups:
            return FALLBACK
        match = groups[0]
    return str(match).strip()


def _normalise(text: str) -> str:
    for regex in REGEXES_TO_IGNORE:
        text = re.sub(regex, "", text)
    return text.lower()


def exact_match(prediction: str, reference: str) -> bool:
    """lm-eval's ``exact_match`` as gsm8k.yaml configures it, for one prediction."""
    return _normalise(prediction) == _normalise(reference)


def extract(response: str) -> dict[str, str]:
    """What each filter reads from ``response``: ``{"strict-match": …, "flexible-extract": …}``."""
    return {name: regex_filter(response, rx, group) for name, (rx, group) in FILTERS.items()}


# --- prompts --------------------------------------------------------------------------------


def _turn(question: str) -> str:
    return f"Question: {question}\nAnswer:"  # gsm8k.yaml doc_to_text


@lru_cache(maxsize=8)
def _drawn(seed: int, n: int, ids: tuple[str, ...]) -> dict[str, tuple[int, ...]]:
    """lm-eval's default sampler over the suite's own items: one ``Random(seed)``, for each
    item in suite order ``sample(pool, n + 1)`` and the item itself removed, first ``n`` kept.

    Drawn for the whole suite at once, so an item's examples do not depend on which items a
    (resumed) run still has to do.
    """
    rnd = random.Random(seed)
    pool = range(len(ids))
    draws = {}
    for index, item_id in enumerate(ids):
        draws[item_id] = tuple(k for k in rnd.sample(pool, n + 1) if k != index)[:n]
    return draws


def fewshot_examples(item: Item, suite: Suite) -> list[tuple[str, str]]:
    """The item's ``(question, answer)`` examples, as the suite's few-shot settings say."""
    n = int(suite.get("num_fewshot", 0))
    if n == 0:
        return []
    if suite.get("fewshot_source") == "fixed":
        return [(ex["question"], ex["answer"]) for ex in suite["fixed_fewshot"][:n]]
    items = suite["items"]
    draws = _drawn(int(suite["fewshot_seed"]), n, tuple(i["id"] for i in items))
    return [(items[k]["question"], items[k]["answer"]) for k in draws[item["id"]]]


def gsm8k_prompt(item: Item, suite: Suite) -> str:
    """lm-eval's context: each example ``doc_to_text + " " + answer + "\\n\\n"``, then the
    question's ``doc_to_text``. In chat format the same text is the one user turn."""
    shots = "".join(f"{_turn(q)} {a}\n\n" for q, a in fewshot_examples(item, suite))
    return shots + _turn(str(item["question"]))


def ask_gsm8k(item: Item, suite: Suite, fmt: str) -> list[Request]:
    """One greedy generation, stopped at the suite's ``until``."""
    return [Request(gsm8k_prompt(item, suite), stop=tuple(suite.get("until", ())))]


# --- scoring and aggregation ---------------------------------------------------------------


def score_gsm8k(item: Item, results: Sequence[str], suite: Suite) -> dict[str, Any]:
    """Both filters' answers and their ``exact_match``; ``passed`` is the headline's."""
    filtered = extract(results[0])
    matched = {name: exact_match(value, str(item["answer"])) for name, value in filtered.items()}
    headline = str(suite.get("headline", "flexible-extract"))
    return {
        "passed": matched[headline],
        "score": float(matched[headline]),
        "category": item.get("category"),
        "severity": None,
        "details": {
            "question": item["question"],
            "target": item["target"],
            "filtered": filtered,
            "exact_match": matched,
            "headline": headline,
        },
    }


def _matched(row: ItemRow, name: str) -> bool:
    return bool(((row.details or {}).get("exact_match") or {}).get(name))


def _exact_match(rows: Sequence[ItemRow]) -> dict[str, float]:
    n = len(rows)
    return {name: sum(_matched(r, name) for r in rows) / n if n else 0.0 for name in FILTERS}


def _stderr(p: float, n: int) -> float:
    """lm-eval's ``mean_stderr`` of a 0/1 metric: sample standard deviation / sqrt(n)."""
    return (p * (1 - p) * n / (n - 1)) ** 0.5 / n**0.5 if n > 1 else 0.0


def aggregate_gsm8k(rows: Sequence[ItemRow]) -> dict[str, Any]:
    """``exact_match`` under each filter (with lm-eval's stderr), overall and by category;
    ``overall_accuracy`` is the headline filter's."""
    total = len(rows)
    correct = sum(int(bool(r.passed)) for r in rows)
    headline = next(((r.details or {}).get("headline") for r in rows), None)
    em = _exact_match(rows)
    cats = by_category(rows)
    for cat, entry in cats.items():
        entry["exact_match"] = _exact_match([r for r in rows if (r.category or "general") == cat])
    return {
        "kind": "gen_benchmark",
        "metric": "exact_match",
        "headline": headline or "flexible-extract",
        "exact_match": em,
        "exact_match_stderr": {name: _stderr(p, total) for name, p in em.items()},
        "overall_accuracy": correct / total if total else 0.0,
        "correct": correct,
        "total": total,
        "by_category": cats,
    }


# --- comparison -----------------------------------------------------------------------------


def _flip(b: Row, a: Row) -> dict[str, Any]:
    details = b.details or {}
    return {
        "suite": b.suite,
        "item_id": b.item_id,
        "category": b.category,
        "question": details.get("question", b.prompt),
        "target": details.get("target"),
        "response_before": b.response,
        "response_after": a.response,
    }


def _drop_findings(statistics: Mapping[str, Any], options: CompareOptions) -> list[dict[str, Any]]:
    """The rules qa applies to its accuracy, on the headline exact_match: a drop beyond the
    threshold gates; in non-inferiority mode the drop's upper bound must stay below it."""
    found = []
    before, after, drop = (
        statistics["accuracy_before"],
        statistics["accuracy_after"],
        statistics["drop"],
    )
    if drop > options.threshold:
        found.append(
            finding(
                "exact_match",
                "overall",
                f"exact_match dropped {drop:.3f} ({before:.3f} → {after:.3f}), more than the "
                f"threshold {options.threshold}",
                gates=True,
            )
        )
    if options.mode == "noninferiority":
        high = statistics["drop_ci95"][1]
        if not stats.noninferiority_pass(high, options.threshold):
            found.append(
                finding(
                    "exact_match",
                    "overall",
                    f"non-inferiority not shown: the {statistics['confidence']:.0%} CI of the "
                    f"exact_match drop reaches {high:.3f}, not below the margin "
                    f"{options.threshold}",
                    gates=True,
                )
            )
    return found


def compare_gsm8k(pairs: Pairs, options: CompareOptions) -> Contribution:
    """Both filters before/after, flips and paired statistics of the headline; gates as qa
    does (drop beyond the threshold, non-inferiority, category rules). Absent when none ran."""
    pairs = list(pairs)
    if not pairs:
        return Contribution({})
    statistics = paired_statistics(pairs, options)
    suites = list(dict.fromkeys(b.suite for b, _ in pairs))
    body = {
        "suites": suites,
        "headline": next(((b.details or {}).get("headline") for b, _ in pairs), None),
        "exact_match_before": _exact_match([b for b, _ in pairs]),
        "exact_match_after": _exact_match([a for _, a in pairs]),
        "flips": {
            "forgotten": [_flip(b, a) for b, a in pairs if b.passed and not a.passed],
            "learned": [_flip(b, a) for b, a in pairs if a.passed and not b.passed],
        },
        "statistics": statistics,
    }
    found = _drop_findings(statistics, options)
    if len(statistics["by_category"]) > 1:  # one category is the overall drop again
        found += category_findings(statistics, options)
    return Contribution.of({"gen_benchmark": body}, found)


# --- display --------------------------------------------------------------------------------


def _detail(result: Result) -> str:
    em = result.get("exact_match") or {}
    return (
        f"{result.get('correct')} of {result.get('total')} · strict-match "
        f"{percent(em.get('strict-match'), 1)} · flexible-extract "
        f"{percent(em.get('flexible-extract'), 1)}"
    )


def _compare_cards(body: Mapping[str, Any]) -> list[Card]:
    part = body.get("gen_benchmark")
    if not part:
        return []
    cards = []
    for name in FILTERS:
        before = part["exact_match_before"][name]
        after = part["exact_match_after"][name]
        cards.append(
            Card(
                f"exact_match ({name})",
                f"{percent(before, 1)} → {percent(after, 1)}",
                "headline" if name == part["headline"] else "reported",
                bad=name == part["headline"] and part["statistics"]["drop"] > 0,
            )
        )
    return cards


GEN_BENCHMARK = register_kind(
    SuiteKind(
        "gen_benchmark",
        GenerationBenchmark,
        request="generate",
        requests=ask_gsm8k,
        score=score_gsm8k,
        aggregate=aggregate_gsm8k,
        compare=compare_gsm8k,
        compare_needs_text=True,  # both filters' matches are in every row's details
        display=Display(
            title="Generation benchmark exact match (GSM8K)",
            headline=lambda r: percent(r.get("overall_accuracy"), 1),
            detail=_detail,
            short=lambda r: percent(r.get("overall_accuracy")),
            category_chart=True,
            compare_cards=_compare_cards,
        ),
    )
)
