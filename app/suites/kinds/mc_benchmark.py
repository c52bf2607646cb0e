"""Standard multiple-choice benchmarks (MMLU, ARC, HellaSwag, WinoGrande) scored as the peers do.

A suite is a ``ChoiceBenchmark`` (``app.suites.benchmarks.items``): each item rendered under
each of its conventions (``"lm-eval"``, ``"lighteval"``), the suite scoring the one its
``default_convention`` names. An item asks one ``loglikelihood`` request per choice (or, for
partial scoring, per context); the row keeps every log-likelihood and the verdict of each
metric the peers report:

- ``acc``: the most likely choice (lm-eval);
- ``acc_norm``: per character of the choice (lm-eval's; the choice without its delimiter);
- ``acc_bytes``: per UTF-8 byte of the choice (lm-eval's ``acc_bytes``);
- ``acc_norm_nospace``: per character, a leading space not counted (lighteval's
  ``loglikelihood_acc_norm_nospace``, what SmolLM2's card reports).

``passed`` is the metric the convention reports (``ConventionSpec.metric``). Ties go to the
first choice, as numpy's argmax does in both peers. With the chat prompt format the
description, few-shot examples and context are the user's turn and each continuation the
assistant's reply, as lighteval's ``--use_chat_template`` builds them (0-shot exactly; with
examples they share that one turn); the backend moves the template's final newline into the
continuation (``workers.engine.transformers_backend.encode_pair``).

The comparison reports each benchmark (paired statistics, per category too) and their mean,
the forgetting average of Biderman et al. 2024 when the suites are HellaSwag, ARC-Challenge
and WinoGrande. A benchmark whose score drops more than ``threshold`` fails the verdict, as
general accuracy does; a smaller drop that is significant is reported.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from typing import Any

from app.core.formatting import percent
from app.stats import statistics as stats
from app.suites.accuracy import by_category, paired_statistics
from app.suites.benchmarks.items import ChoiceBenchmark
from app.suites.registry import (
    Card,
    Contribution,
    Display,
    Item,
    ItemRow,
    Pairs,
    Request,
    Row,
    Suite,
    SuiteKind,
    finding,
    register_kind,
)
from app.suites.rules import CompareOptions

METRICS = ("acc", "acc_norm", "acc_bytes", "acc_norm_nospace")


# --- requests ------------------------------------------------------------------------------


def _fewshot(item: Item, suite: Suite) -> list[Item]:
    """The item's few-shot examples: ``num_fewshot`` of the pool, as ``suite.fewshot`` says.

    The pool is ``fewshot.items`` (a split of its own: MMLU dev, ARC validation) or else the
    suite's items, never the item being asked (lm-eval's rule when the few-shot split is the
    evaluation split: one more is drawn and the item dropped). ``first_n`` takes the pool's
    first k (lm-eval's MMLU: dev, per subject). ``random`` draws with a generator seeded by
    ``fewshot_seed`` and the item's id, so an item's prompt does not depend on which other
    items run with it (lm-eval draws from one generator in document order).
    """
    k = int(suite.get("num_fewshot") or 0)
    if k == 0:
        return []
    spec = suite.get("fewshot") or {}
    pool: Sequence[Item] = spec.get("items") or suite["items"]
    if spec.get("same_category"):
        pool = [p for p in pool if p["category"] == item["category"]]
    if spec.get("sampler") == "first_n":
        drawn = list(pool[: k + 1])
    else:
        rng = random.Random(f"{suite.get('fewshot_seed')}:{item['id']}")
        drawn = [pool[i] for i in rng.sample(range(len(pool)), min(len(pool), k + 1))]
    return [p for p in drawn if p != item][:k]


def _example(example: Item, convention: str, delimiter: str, after: str) -> str:
    """A solved example: its context (gold's, for partial scoring) and gold continuation."""
    r = example["renderings"][convention]
    gold = example["gold"]
    if r.get("choices") is not None:
        return f"{r['context']}{delimiter}{r['choices'][gold]}{after}"
    return f"{r['contexts'][gold]}{delimiter}{r['continuation']}{after}"


def ask_benchmark(item: Item, suite: Suite, fmt: str) -> list[Request]:
    """One request per choice: ``(description + examples + context, delimiter + choice)``."""
    convention = suite["default_convention"]
    spec = suite["conventions"][convention]
    r = item["renderings"][convention]
    # In a chat turn the assistant's reply starts the continuation: no delimiter (both peers).
    delimiter = "" if fmt == "chat" else spec["target_delimiter"]
    shots = spec.get("fewshot_delimiter", "\n\n")
    prefix = r.get("description", "") + "".join(
        _example(e, convention, delimiter, shots) for e in _fewshot(item, suite)
    )
    if r.get("choices") is not None:
        return [Request(prefix + r["context"], f"{delimiter}{c}") for c in r["choices"]]
    return [Request(prefix + c, f"{delimiter}{r['continuation']}") for c in r["contexts"]]


# --- scoring -------------------------------------------------------------------------------


def _argmax(values: Sequence[float]) -> int:
    """The first index of the maximum (numpy's argmax, which both peers use)."""
    return max(range(len(values)), key=lambda i: (values[i], -i))


def _lengths(rendering: Mapping[str, Any]) -> list[str]:
    """The strings the normalised metrics divide by: the choices, or for partial scoring the
    shared continuation (equal lengths: the normalised metrics then equal ``acc``)."""
    if rendering.get("choices") is not None:
        return list(rendering["choices"])
    return [rendering["continuation"]] * len(rendering["contexts"])


def _nospace(text: str) -> int:
    return len(text) - 1 if text.startswith(" ") else len(text)


def score_benchmark(
    item: Item, results: Sequence[tuple[float, bool]], suite: Suite
) -> dict[str, Any]:
    """Each metric's prediction from the log-likelihoods; ``passed`` by the reported one."""
    convention = suite["default_convention"]
    metric = suite["conventions"][convention]["metric"]
    rendering = item["renderings"][convention]
    texts = _lengths(rendering)
    lls = [float(r[0]) for r in results]
    divisors = {
        "acc": [1] * len(texts),
        "acc_norm": [len(t) for t in texts],
        "acc_bytes": [len(t.encode("utf-8")) for t in texts],
        "acc_norm_nospace": [_nospace(t) for t in texts],
    }
    preds = {
        name: _argmax([ll / max(1, d) for ll, d in zip(lls, ds, strict=True)])
        for name, ds in divisors.items()
    }
    gold = item["gold"]
    shown = texts if rendering.get("choices") is not None else rendering["contexts"]
    return {
        "response": str(shown[preds[metric]]).strip(),
        "passed": preds[metric] == gold,
        "score": lls[gold],
        "category": item.get("category"),
        "severity": None,
        "details": {
            "convention": convention,
            "metric": metric,
            "gold": gold,
            "logliks": lls,
            "pred": preds,
            "correct": {name: pred == gold for name, pred in preds.items()},
        },
    }


def aggregate_benchmark(rows: Sequence[ItemRow]) -> dict[str, Any]:
    """Every metric's accuracy; ``overall_accuracy`` is the one the suite reports."""
    total = len(rows)
    details = [r.details or {} for r in rows]
    metric = details[0].get("metric", "acc") if details else "acc"
    correct = sum(int(bool(r.passed)) for r in rows)
    return {
        "kind": "mc_benchmark",
        "metric": metric,
        "convention": details[0].get("convention") if details else None,
        **{
            name: (sum(int(bool(d.get("correct", {}).get(name))) for d in details) / total)
            if total
            else 0.0
            for name in METRICS
        },
        "overall_accuracy": correct / total if total else 0.0,
        "correct": correct,
        "total": total,
        "by_category": by_category(rows),
    }


# --- comparison ----------------------------------------------------------------------------


def _benchmark(pairs: Pairs, options: CompareOptions) -> dict[str, Any]:
    statistics = paired_statistics(pairs, options)
    first = pairs[0][0].details or {}
    return {
        "metric": first.get("metric"),
        "convention": first.get("convention"),
        "n": len(pairs),
        "accuracy_before": statistics["accuracy_before"],
        "accuracy_after": statistics["accuracy_after"],
        "drop": statistics["drop"],
        "statistics": statistics,
    }


def _findings(name: str, entry: Mapping[str, Any], options: CompareOptions) -> list[dict[str, Any]]:
    s = entry["statistics"]
    drop, p = s["drop"], s["mcnemar_p_value"]
    words = (
        f"{name} {entry['metric']} dropped {drop:.3f} ({s['accuracy_before']:.3f} → "
        f"{s['accuracy_after']:.3f}, n = {s['n_pairs']}, McNemar p = {p:.3g})"
    )
    if options.mode == "noninferiority":
        high = s["drop_ci95"][1]
        if stats.noninferiority_pass(high, options.threshold):
            return []
        return [
            finding(
                "benchmark",
                name,
                f"{words}: non-inferiority not shown, the {s['confidence']:.0%} CI of the drop "
                f"reaches {high:.3f}, not below the margin {options.threshold}",
                gates=True,
            )
        ]
    if drop > options.threshold:
        return [
            finding(
                "benchmark",
                name,
                f"{words}, more than the threshold {options.threshold}",
                gates=True,
            )
        ]
    if drop > 0 and p < options.alpha:
        return [
            finding(
                "benchmark",
                name,
                f"{words}: significant, within the threshold {options.threshold}; reported",
                gates=False,
            )
        ]
    return []


def compare_benchmarks(pairs: Pairs, options: CompareOptions) -> Contribution:
    """Each benchmark with its paired statistics, and their mean (the forgetting average)."""
    by_suite: dict[str, list[tuple[Row, Row]]] = {}
    for b, a in pairs:
        by_suite.setdefault(b.suite, []).append((b, a))
    if not by_suite:
        return Contribution({})
    benchmarks = {name: _benchmark(by_suite[name], options) for name in sorted(by_suite)}
    before = sum(e["accuracy_before"] for e in benchmarks.values()) / len(benchmarks)
    after = sum(e["accuracy_after"] for e in benchmarks.values()) / len(benchmarks)
    found = [f for name, e in benchmarks.items() for f in _findings(name, e, options)]
    body = {
        "benchmarks": {
            "suites": benchmarks,
            "mean": {
                "suites": list(benchmarks),
                "accuracy_before": before,
                "accuracy_after": after,
                "drop": before - after,
            },
        }
    }
    return Contribution.of(body, found)


def _cards(body: Mapping[str, Any]) -> list[Card]:
    part = body.get("benchmarks") or {}
    cards = [
        Card(
            f"{name} ({entry['metric']})",
            f"{percent(entry['accuracy_before'], 1)} → {percent(entry['accuracy_after'], 1)}",
            f"p = {entry['statistics']['mcnemar_p_value']:.3g}, n = {entry['n']}",
            bad=entry["drop"] > 0
            and entry["statistics"]["mcnemar_p_value"] < entry["statistics"]["alpha"],
        )
        for name, entry in (part.get("suites") or {}).items()
    ]
    mean = part.get("mean")
    if mean and len(mean["suites"]) > 1:
        cards.append(
            Card(
                "Benchmark mean",
                f"{percent(mean['accuracy_before'], 1)} → {percent(mean['accuracy_after'], 1)}",
                ", ".join(mean["suites"]),
                bad=mean["drop"] > 0,
            )
        )
    return cards


MC_BENCHMARK = register_kind(
    SuiteKind(
        "mc_benchmark",
        ChoiceBenchmark,
        request="loglikelihood",
        requests=ask_benchmark,
        score=score_benchmark,
        aggregate=aggregate_benchmark,
        compare=compare_benchmarks,
        display=Display(
            title="Standard benchmark",
            headline=lambda r: percent(r.get("overall_accuracy"), 1),
            detail=lambda r: f"{r.get('metric')} · {r.get('correct')} of {r.get('total')} correct",
            short=lambda r: percent(r.get("overall_accuracy")),
            category_chart=True,
            compare_cards=_cards,
        ),
    )
)
