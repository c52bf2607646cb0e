"""Perplexity: negative log-likelihood per token of raw texts, and KL to the base model.

Each text is read raw (no prompt format) with ``token_nll``; the row keeps its NLL sum, its
token count and the top-k next tokens per position, so a later comparison computes
KL(base ‖ candidate) (``app.stats.kl``) without loading either model. Nothing passes or
fails per item; the comparison is the drift per suite and fails past ``max_nll_increase``
or ``max_kl``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

from pydantic import Field

from app.core.formatting import number
from app.stats.kl import TOPK, stored_topk, suite_kl
from app.suites.registry import (
    Contribution,
    Display,
    Item,
    ItemRow,
    Pairs,
    Request,
    Row,
    Suite,
    SuiteKind,
    TokenTopK,
    finding,
    register_kind,
)
from app.suites.rules import CompareOptions
from app.suites.schema import MAX_ITEMS, ItemId, Short, Strict, SuiteBase, Text

LARGEST_NLL_INCREASES = 5  # texts listed per suite in the comparison


class PerplexityItem(Strict):
    id: ItemId
    text: Text
    category: Short = "general"


class PerplexitySuite(SuiteBase):
    kind: Literal["perplexity"]
    items: list[PerplexityItem] = Field(min_length=1, max_length=MAX_ITEMS)


def read_text(item: Item, suite: Suite, fmt: str) -> list[Request]:
    """The item's raw text, whatever the prompt format."""
    return [Request(item["text"])]


def score_perplexity(
    item: Item, results: Sequence[tuple[float, int] | TokenTopK], suite: Suite
) -> dict[str, Any]:
    """Negative log-likelihood per token of the text; nothing passes or fails.

    With a ``TokenTopK`` result the row also keeps ``topk``: per predicted position the ``k``
    most probable next-token ids and their log-probabilities, what a later comparison needs
    for KL(base ‖ candidate) without loading the base again.
    """
    result = results[0]
    details: dict[str, Any]
    if isinstance(result, TokenTopK):
        nll, tokens = result.nll_sum, result.tokens
        details = {
            "nll_sum": nll,
            "tokens": tokens,
            "topk": stored_topk(result.ids, result.logprobs, result.targets),
        }
    else:
        nll, tokens = result
        details = {"nll_sum": nll, "tokens": tokens}
    return {
        "passed": None,
        "score": nll / tokens if tokens else None,
        "category": item.get("category"),
        "severity": None,
        "details": details,
    }


def aggregate_perplexity(rows: Sequence[ItemRow]) -> dict[str, Any]:
    """Mean negative log-likelihood per token over all texts (token-weighted) and perplexity."""
    nll = sum(float((r.details or {}).get("nll_sum", 0.0)) for r in rows)
    tokens = sum(int((r.details or {}).get("tokens", 0)) for r in rows)
    per_token = nll / tokens if tokens else 0.0
    by_cat: dict[str, dict[str, float]] = {}
    for r in rows:
        entry = by_cat.setdefault(r.category or "general", {"nll_sum": 0.0, "tokens": 0})
        entry["nll_sum"] += float((r.details or {}).get("nll_sum", 0.0))
        entry["tokens"] += int((r.details or {}).get("tokens", 0))
    return {
        "kind": "perplexity",
        "nll_per_token": per_token,
        "perplexity": math.exp(per_token) if tokens else None,
        "tokens": tokens,
        "total": len(rows),
        "by_category": {
            cat: {
                "nll_per_token": e["nll_sum"] / e["tokens"] if e["tokens"] else 0.0,
                "tokens": int(e["tokens"]),
            }
            for cat, e in by_cat.items()
        },
    }


def _nll(rows: Sequence[Row]) -> tuple[float, int]:
    nll = sum(float((r.details or {}).get("nll_sum", 0.0)) for r in rows)
    tokens = sum(int((r.details or {}).get("tokens", 0)) for r in rows)
    return nll, tokens


def _drift(pairs: list[tuple[Row, Row]]) -> dict[str, Any] | None:
    if not pairs:
        return None
    suites: dict[str, Any] = {}
    for name in dict.fromkeys(b.suite for b, _ in pairs):
        sub = [(b, a) for b, a in pairs if b.suite == name]
        # Each run is normalised by its own token count: the two models may tokenize differently.
        nll_b, tokens_b = _nll([b for b, _ in sub])
        nll_a, tokens_a = _nll([a for _, a in sub])
        before = nll_b / tokens_b if tokens_b else 0.0
        after = nll_a / tokens_a if tokens_a else 0.0
        ranked = sorted(sub, key=lambda p: (p[0].score or 0.0) - (p[1].score or 0.0))
        per_text = [
            {
                "item_id": b.item_id,
                "category": b.category,
                "nll_per_token_before": b.score,
                "nll_per_token_after": a.score,
                "change": (a.score or 0.0) - (b.score or 0.0),
            }
            for b, a in ranked[:LARGEST_NLL_INCREASES]
        ]
        suites[name] = {
            "nll_per_token_before": before,
            "nll_per_token_after": after,
            "change": after - before,
            "relative_change": (after - before) / before if before else 0.0,
            "texts": len(sub),
            "tokens_before": tokens_b,
            "tokens_after": tokens_a,
            "largest_increases": per_text,
            **suite_kl([(b.details, a.details) for b, a in sub]),
        }
    worst = max(suites.values(), key=lambda s: s["relative_change"])
    kls = [s["kl_per_token"] for s in suites.values() if s["kl_per_token"] is not None]
    notes = [f"{n}: {s['kl_note']}" for n, s in suites.items() if "kl_note" in s]
    return {
        "suites": suites,
        "relative_change": worst["relative_change"],
        # The worst suite's NLL rise and KL to base: both label-free drift signals.
        "nll": {
            "before": worst["nll_per_token_before"],
            "after": worst["nll_per_token_after"],
            "relative_change": worst["relative_change"],
        },
        "kl_per_token": max(kls) if kls else None,
        **({"kl_note": "; ".join(notes)} if notes else {}),
    }


def compare_perplexity(pairs: Pairs, options: CompareOptions) -> Contribution:
    """NLL-per-token drift and KL to base per suite; fails past ``max_nll_increase``/``max_kl``."""
    drift = _drift(list(pairs))
    found = []
    if options.max_nll_increase is not None and drift is not None:
        for name, suite in drift["suites"].items():
            if suite["relative_change"] > options.max_nll_increase:
                found.append(
                    finding(
                        "drift",
                        name,
                        f"NLL/token on {name!r} rose {suite['relative_change']:.1%} "
                        f"({suite['nll_per_token_before']:.3f} → "
                        f"{suite['nll_per_token_after']:.3f}), more than "
                        f"{options.max_nll_increase:.0%}",
                        gates=True,
                    )
                )
    if options.max_kl is not None and drift is not None:
        for name, suite in drift["suites"].items():
            if suite["kl_per_token"] is None:
                found.append(
                    finding(
                        "drift",
                        name,
                        f"max_kl is set but KL to base on {name!r} is unavailable "
                        f"({suite['kl_note']}); reported, does not fail the gate",
                        gates=False,
                    )
                )
            elif suite["kl_per_token"] > options.max_kl:
                found.append(
                    finding(
                        "drift",
                        name,
                        f"KL(base ‖ candidate) on {name!r} is {suite['kl_per_token']:.4f} "
                        f"nats/token, more than max_kl {options.max_kl}",
                        gates=True,
                    )
                )
    return Contribution.of({"drift": drift}, found)


PERPLEXITY = register_kind(
    SuiteKind(
        "perplexity",
        PerplexitySuite,
        request="token_nll",
        requests=read_text,
        # Next tokens per predicted position, for KL to the base later (app/stats/kl.py).
        topk=TOPK,
        score=score_perplexity,
        aggregate=aggregate_perplexity,
        compare=compare_perplexity,
        compare_needs_text=True,
        records_version=2,  # 2: the top-k next tokens per position (KL to base)
        display=Display(
            title="Negative log-likelihood per token",
            headline=lambda r: number(r.get("nll_per_token"), 2),
            detail=lambda r: f"NLL per token · perplexity {number(r.get('perplexity'), 1)}",
            short=lambda r: f"NLL {number(r.get('nll_per_token'), 2)}",
            item_score="NLL/token",
        ),
    )
)
