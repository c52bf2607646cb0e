"""KL(base ‖ candidate) per token from the top-k next tokens each run stored. Pure functions.

A perplexity row carries, per predicted position, the ``k`` most probable next-token ids and
their log-probabilities (``details.topk``). Comparing later needs no model, so the full
distributions are gone; what is computed is the KL between the two distributions coarsened to
``k + 1`` outcomes: the base's top-k ids one by one, and "any other token".

- For base ids that are also in the candidate's top-k, the candidate's stored probability is
  exact. For a base id missing from the candidate's top-k the candidate's probability is not
  stored; it is at most the candidate's k-th largest probability, and that bound is used. The
  candidate's "other" mass is ``1 −`` the sum of the values used (never negative: the values
  used sum to at most the candidate's top-k mass).
- Coarsening never increases KL (data-processing inequality), so with every base id found in
  the candidate's top-k the figure is a lower bound on the true per-token KL. A missing id's
  own term is understated by ``p · log(q_bound / q_true) ≥ 0``, unbounded when the candidate
  gives it almost nothing, so ``kl_missing_fraction`` (the base's probability mass per position
  that fell outside the candidate's top-k) says how far to trust the figure: near 0 it is a
  lower bound.
- Identical stored values give exactly 0: every term is ``p · (log p − log p)``.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

FLOOR = 1e-12  # the candidate's "other" mass when its top-k already holds (almost) all of it
TOPK = 16  # next tokens stored per predicted position
TOPK_DECIMALS = 5  # log-probabilities are stored rounded: compact, and the KL needs no more


def targets_digest(targets: Sequence[int]) -> str:
    """Which tokens were predicted: two runs' top-k pair up position by position only if equal."""
    return hashlib.sha256(json.dumps(list(targets)).encode()).hexdigest()[:16]


def stored_topk(
    ids: Sequence[Sequence[int]], logprobs: Sequence[Sequence[float]], targets: Sequence[int]
) -> dict[str, Any]:
    """The stored form of one text's top-k next tokens, as :func:`text_kl` reads it."""
    return {
        "k": max((len(r) for r in ids), default=0),
        "targets": targets_digest(targets),
        "ids": [list(r) for r in ids],
        # Clamped: a masked token's -inf is not JSON, and e^-1000 is 0 for the KL anyway.
        "logprobs": [[round(max(v, -1000.0), TOPK_DECIMALS) for v in row] for row in logprobs],
    }


def position_kl(
    base_ids: Sequence[int],
    base_lps: Sequence[float],
    cand_ids: Sequence[int],
    cand_lps: Sequence[float],
) -> tuple[float, float]:
    """``(coarsened KL(base ‖ candidate), base probability mass missing from candidate top-k)``."""
    cand = dict(zip(cand_ids, cand_lps, strict=True))
    q_bound = min(cand_lps) if cand_lps else -math.inf
    kl = 0.0
    p_sum = q_sum = missing = 0.0
    for i, lp in zip(base_ids, base_lps, strict=True):
        p = math.exp(lp)
        lq = cand.get(i)
        if lq is None:
            lq = q_bound
            missing += p
        p_sum += p
        q_sum += math.exp(lq)
        kl += p * (lp - lq)
    p_rest = max(0.0, 1.0 - p_sum)
    q_rest = max(0.0, 1.0 - q_sum)
    if p_rest > 0.0 and p_rest != q_rest:
        kl += p_rest * math.log(p_rest / max(q_rest, FLOOR))
    return max(kl, 0.0), missing


def text_kl(
    base: Mapping[str, Any], candidate: Mapping[str, Any]
) -> tuple[float, float, int] | None:
    """Summed coarsened KL, summed missing mass and positions over one text's ``topk`` pair.

    None when the two did not predict the same tokens (another tokenizer): positions don't pair.
    """
    if base.get("targets") != candidate.get("targets"):
        return None
    if len(base["ids"]) != len(candidate["ids"]):
        return None
    kl = missing = 0.0
    for b_ids, b_lps, c_ids, c_lps in zip(
        base["ids"], base["logprobs"], candidate["ids"], candidate["logprobs"], strict=True
    ):
        k, m = position_kl(b_ids, b_lps, c_ids, c_lps)
        kl += k
        missing += m
    return kl, missing, len(base["ids"])


def suite_kl(
    pairs: Sequence[tuple[Mapping[str, Any] | None, Mapping[str, Any] | None]],
) -> dict[str, Any]:
    """Mean per-token KL over paired texts (each a mapping with ``topk``), or why there is none.

    Returns ``{"kl_per_token", "kl_positions", "kl_missing_fraction"}`` or ``{"kl_per_token":
    None, "kl_note": reason}``.
    """
    total = missing = 0.0
    positions = 0
    for b, a in pairs:
        b_top, a_top = (b or {}).get("topk"), (a or {}).get("topk")
        if b_top is None or a_top is None:
            which = "before" if b_top is None else "after"
            return {
                "kl_per_token": None,
                "kl_note": f"the {which} run stored no top-k next tokens (an evaluation from "
                "before they were recorded: evaluate that model again, the cache will not "
                "answer with it; or a backend without full distributions, such as a served "
                "model): KL to base omitted",
            }
        one = text_kl(b_top, a_top)
        if one is None:
            return {
                "kl_per_token": None,
                "kl_note": "the runs tokenized the texts differently: KL to base omitted",
            }
        total, missing, positions = total + one[0], missing + one[1], positions + one[2]
    return {
        "kl_per_token": total / positions if positions else 0.0,
        "kl_positions": positions,
        "kl_missing_fraction": missing / positions if positions else 0.0,
    }
