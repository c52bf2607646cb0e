"""A seeded, stratified sample of a suite's items: every category keeps its share.

A suite's items are often sorted by category (general-qa: 36 geography questions, then 36
math …), so its first N items are one or two categories. ``stratified_sample`` draws N in
proportion to each category's size instead (at least one from each while N allows), with a
seeded generator, and keeps the suite's order. Pure Python: the client package uses it.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

T = TypeVar("T", bound=Mapping[str, Any])


def _quotas(sizes: list[int], n: int, rng: random.Random) -> list[int]:
    """How many items each category gives: ``n`` in proportion to ``sizes``, at least one each
    while ``n`` allows (largest remainder; ties go to the earlier category)."""
    total = sum(sizes)
    if n < len(sizes):  # too few for one each: one from each of n categories drawn at random
        chosen = set(rng.sample(range(len(sizes)), n))
        return [1 if i in chosen else 0 for i in range(len(sizes))]
    ideal = [n * size / total for size in sizes]
    quotas = [
        min(size, max(1, math.floor(share))) for size, share in zip(sizes, ideal, strict=True)
    ]
    order = range(len(sizes))
    while sum(quotas) > n:  # the minimum of one took more than a small category's share
        i = max((i for i in order if quotas[i] > 1), key=lambda i: (quotas[i] - ideal[i], -i))
        quotas[i] -= 1
    while sum(quotas) < n:
        i = max(
            (i for i in order if quotas[i] < sizes[i]), key=lambda i: (ideal[i] - quotas[i], -i)
        )
        quotas[i] += 1
    return quotas


def stratified_sample(
    items: Sequence[T], n: int, *, seed: int = 0, category: str = "category"
) -> list[T]:
    """``n`` of ``items`` drawn per category (``item[category]``, "general" when absent) in
    proportion to its size, seeded; in the order the items had. All of them when ``n`` covers
    them."""
    if n < 1:
        raise ValueError(f"a sample needs at least one item; got n={n}")
    if n >= len(items):
        return list(items)
    groups: dict[str, list[int]] = {}
    for index, item in enumerate(items):
        groups.setdefault(str(item.get(category) or "general"), []).append(index)
    rng = random.Random(seed)
    members = list(groups.values())
    quotas = _quotas([len(m) for m in members], n, rng)
    picked = sorted(i for m, k in zip(members, quotas, strict=True) for i in rng.sample(m, k))
    return [items[i] for i in picked]
