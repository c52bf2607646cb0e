"""IFEval, instruction following with verifiable instructions (Zhou et al. 2023).

Each item's prompt is answered greedily, in the suite's own ``max_new_tokens`` (default 1,280,
as lighteval runs it), and every instruction of the item is checked on the stripped response by
forgetguard's own checkers (``app.suites.ifeval.checks``): strictly, and loosely (the
reference's eight response variants: first or last line dropped, ``*`` removed). An item
passes when every instruction is followed strictly (lm-eval's ``prompt_level_strict_acc``).

The result carries lm-eval's four metrics (``prompt_level_strict_acc``,
``inst_level_strict_acc``, ``prompt_level_loose_acc``, ``inst_level_loose_acc``) and their
averages of prompt and instruction level (``average_strict``, ``average_loose``): SmolLM2's
model card reports "IFEval (average of prompt and instruction level)" without saying strict
or loose, so both are given. The comparison gives each instruction type's accuracy before and
after and the paired statistics at prompt level (strict). It is report-only: an IFEval drop is
a finding that never fails the verdict by itself (no rule of the rule book is about
instruction following yet); gate on it with a checklist suite or read it beside the verdict.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from app.core.formatting import percent
from app.suites.accuracy import paired_statistics
from app.suites.ifeval.checks import follows, follows_loose, parse_kwargs
from app.suites.ifeval.schema import IFEvalSuite
from app.suites.registry import (
    Card,
    Contribution,
    Display,
    Item,
    ItemRow,
    Pairs,
    Result,
    Row,
    Suite,
    SuiteKind,
    finding,
    register_kind,
)
from app.suites.rules import CompareOptions


def score_ifeval(item: Item, results: Sequence[str], suite: Suite) -> dict[str, Any]:
    """Every instruction checked strictly and loosely; passed: all followed strictly."""
    response = results[0]
    strict, loose = [], []
    for instruction, raw in zip(item["instruction_id_list"], item["kwargs"], strict=True):
        kwargs = parse_kwargs(instruction, raw)
        strict.append(follows(instruction, kwargs, response, item["prompt"]))
        loose.append(follows_loose(instruction, kwargs, response, item["prompt"]))
    return {
        "passed": all(strict),
        "score": sum(strict) / len(strict),
        "category": None,
        "severity": None,
        "details": {
            "instruction_id_list": list(item["instruction_id_list"]),
            "strict": strict,
            "loose": loose,
        },
    }


def _instructions(rows: Sequence[ItemRow], mode: str) -> list[tuple[str, bool]]:
    out: list[tuple[str, bool]] = []
    for row in rows:
        details = row.details or {}
        out.extend(zip(details.get("instruction_id_list", []), details.get(mode, []), strict=True))
    return out


def _rate(hits: int, total: int) -> float:
    return hits / total if total else 0.0


def aggregate_ifeval(rows: Sequence[ItemRow]) -> dict[str, Any]:
    """lm-eval's four IFEval metrics, their prompt/instruction averages, and per instruction."""
    out: dict[str, Any] = {"kind": "ifeval", "prompts": len(rows)}
    by_instruction: dict[str, dict[str, Any]] = {}
    for mode in ("strict", "loose"):
        prompt_hits = sum(all((r.details or {}).get(mode, [False])) for r in rows)
        followed = _instructions(rows, mode)
        prompt_acc = _rate(prompt_hits, len(rows))
        inst_acc = _rate(sum(ok for _, ok in followed), len(followed))
        out[f"prompt_level_{mode}_acc"] = prompt_acc
        out[f"inst_level_{mode}_acc"] = inst_acc
        out[f"average_{mode}"] = (prompt_acc + inst_acc) / 2
        out["instructions"] = len(followed)
        for instruction, ok in followed:
            entry = by_instruction.setdefault(instruction, {"total": 0})
            if mode == "strict":
                entry["total"] += 1
            entry[mode] = entry.get(mode, 0) + int(ok)
    for entry in by_instruction.values():
        entry["strict_acc"] = _rate(entry["strict"], entry["total"])
        entry["loose_acc"] = _rate(entry["loose"], entry["total"])
    out["by_instruction"] = dict(sorted(by_instruction.items()))
    return out


def _suite_comparison(pairs: list[tuple[Row, Row]], options: CompareOptions) -> dict[str, Any]:
    before = aggregate_ifeval([b for b, _ in pairs])
    after = aggregate_ifeval([a for _, a in pairs])
    metrics = [
        "prompt_level_strict_acc",
        "inst_level_strict_acc",
        "prompt_level_loose_acc",
        "inst_level_loose_acc",
        "average_strict",
        "average_loose",
    ]
    by_instruction = {}
    for name in sorted(set(before["by_instruction"]) | set(after["by_instruction"])):
        b = before["by_instruction"].get(name, {})
        a = after["by_instruction"].get(name, {})
        by_instruction[name] = {
            "total": b.get("total", a.get("total", 0)),
            "strict_before": b.get("strict_acc"),
            "strict_after": a.get("strict_acc"),
            "loose_before": b.get("loose_acc"),
            "loose_after": a.get("loose_acc"),
        }
    return {
        "before": {m: before[m] for m in metrics},
        "after": {m: after[m] for m in metrics},
        "drop": {m: before[m] - after[m] for m in metrics},
        "by_instruction": by_instruction,
        # Prompt level, strict: the item's ``passed``.
        "statistics": paired_statistics(pairs, options),
        "forgotten": [b.item_id for b, a in pairs if b.passed and not a.passed],
        "learned": [b.item_id for b, a in pairs if a.passed and not b.passed],
    }


def compare_ifeval(pairs: Pairs, options: CompareOptions) -> Contribution:
    """Per suite: the metrics before and after, per instruction type, paired statistics.

    Report-only: a significant prompt-level drop is a finding that does not gate.
    """
    by_suite: dict[str, list[tuple[Row, Row]]] = {}
    for b, a in pairs:
        by_suite.setdefault(b.suite, []).append((b, a))
    body = {name: _suite_comparison(members, options) for name, members in by_suite.items()}
    found = []
    for name, entry in body.items():
        stats = entry["statistics"]
        if stats["drop"] > 0 and stats["mcnemar_p_value"] < options.alpha:
            found.append(
                finding(
                    "ifeval",
                    name,
                    f"IFEval prompt-level strict accuracy fell {stats['drop']:.3f} "
                    f"({stats['accuracy_before']:.3f} → {stats['accuracy_after']:.3f}, "
                    f"p = {stats['mcnemar_p_value']:.2g}); reported, IFEval does not fail the "
                    "verdict by itself",
                    gates=False,
                )
            )
    return Contribution.of({"ifeval": body or None}, found)


def _compare_cards(body: Any) -> list[Card]:
    cards = []
    for name, entry in (body.get("ifeval") or {}).items():
        before, after = entry["before"], entry["after"]
        cards.append(
            Card(
                f"{name}: IFEval prompt-level strict",
                f"{percent(before['prompt_level_strict_acc'])} → "
                f"{percent(after['prompt_level_strict_acc'])}",
                f"instruction level {percent(before['inst_level_strict_acc'])} → "
                f"{percent(after['inst_level_strict_acc'])} (report-only)",
                bad=entry["statistics"]["drop"] > 0
                and entry["statistics"]["mcnemar_p_value"] < entry["statistics"]["alpha"],
            )
        )
    return cards


def _detail(result: Result) -> str:
    return (
        f"prompt-level strict; instruction level {percent(result.get('inst_level_strict_acc'))}, "
        f"loose {percent(result.get('prompt_level_loose_acc'))} / "
        f"{percent(result.get('inst_level_loose_acc'))}"
    )


IFEVAL = register_kind(
    SuiteKind(
        "ifeval",
        IFEvalSuite,
        request="generate",
        score=score_ifeval,
        aggregate=aggregate_ifeval,
        compare=compare_ifeval,
        compare_needs_text=True,  # per-instruction outcomes live in every row's details
        display=Display(
            title="Instruction following (IFEval)",
            headline=lambda r: percent(r.get("prompt_level_strict_acc"), 1),
            detail=_detail,
            short=lambda r: percent(r.get("prompt_level_strict_acc")),
            item_score="instructions followed (strict)",
            compare_cards=_compare_cards,
        ),
    )
)
