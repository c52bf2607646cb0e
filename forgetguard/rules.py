"""The comparison rule book: when a candidate counts as having forgotten what its base knew.

One pydantic model, one default and one meaning per rule. Everything that decides a verdict
reads it: ``GET /compare`` (its query parameters), ``forgetguard gate`` (its options), a
fine-tune job's ``evaluation`` block, the dashboard's compare page and ``ForgetGuardCallback``.
It lives in the client package (pydantic only) so the gate runs without the server installed;
the server extends it with how it computes (``app.suites.rules.CompareOptions``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

Mode = Literal["threshold", "noninferiority"]
CategoryRule = Literal["point", "significant"]


class CompareRules(BaseModel):
    """The verdict's rules; the defaults are the lesson's (a drop above 0.10 is forgetting)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    threshold: Annotated[
        float,
        Field(
            ge=0.0,
            le=1.0,
            description="Largest accepted drop in overall accuracy (the lesson's rule); "
            "with mode=noninferiority, the margin the CI's upper bound must stay below.",
        ),
    ] = 0.10
    max_category_drop: Annotated[
        float | None,
        Field(
            ge=0.0,
            le=1.0,
            description="Also fail when one category's accuracy drops more than this.",
        ),
    ] = None
    category_rule: Annotated[
        CategoryRule,
        Field(
            description="point: a category fails on its drop; significant: only when the drop "
            "is significant after Holm adjustment across categories.",
        ),
    ] = "point"
    alpha: Annotated[
        float,
        Field(
            gt=0.0,
            lt=0.5,
            description="Significance level of the tests; the CI of the drop is 1 - alpha.",
        ),
    ] = 0.05
    max_nll_increase: Annotated[
        float | None,
        Field(
            ge=0.0,
            le=100.0,
            description="Also fail when NLL/token on a perplexity suite rises by more than "
            "this fraction (0.1 = 10 %).",
        ),
    ] = None
    max_kl: Annotated[
        float | None,
        Field(
            ge=0.0,
            le=100.0,
            description="Also fail when mean KL(base ‖ candidate) per token on a perplexity "
            "suite exceeds this (nats).",
        ),
    ] = None
    max_behaviour_drop: Annotated[
        float,
        Field(
            ge=0.0,
            le=1.0,
            description="A critical checklist behaviour (the items sharing its 'behaviour', "
            "reworded prompts of one check) fails when its pass rate falls by more than this, "
            "or significantly (exact McNemar on its items at alpha). A behaviour of one item "
            "fails when that item does (the lesson's rule), marked as low evidence.",
        ),
    ] = 0.25
    mode: Annotated[
        Mode,
        Field(
            description="threshold: fail when the point drop exceeds threshold; "
            "noninferiority: fail unless the CI's upper bound of the drop is below threshold.",
        ),
    ] = "threshold"
    max_drop: Annotated[
        float,
        Field(
            ge=0.0,
            le=1.0,
            description="The guard's rule for checkpoints (a fine-tune job's guard, "
            "ForgetGuardCallback): a checkpoint is acceptable when its verdict passes and its "
            "overall accuracy fell by at most this much. Reported, never a reason to fail.",
        ),
    ] = 0.05

    def acceptable(self, verdict: str, accuracy_drop: float | None) -> bool:
        """The guard's rule: the verdict passes and overall accuracy fell by at most max_drop.

        ``accuracy_drop`` is the comparison's (before − after, the lesson's rounding); None
        (no accuracy suite) leaves the verdict alone to decide.
        """
        return verdict == "pass" and (accuracy_drop is None or accuracy_drop <= self.max_drop)

    def guard(self, body: Mapping[str, Any]) -> dict[str, Any]:
        """The guard's reading of a ``/compare`` body: ``{"max_drop", "drop", "acceptable"}``."""
        drop = body.get("accuracy_drop")
        return {
            "max_drop": self.max_drop,
            "drop": drop,
            "acceptable": self.acceptable(str(body.get("verdict")), drop),
        }

    def changed(self) -> dict[str, Any]:
        """The rules that differ from their defaults (what a query string needs to carry)."""
        defaults = type(self)()
        return {
            name: value
            for name, value in self.model_dump().items()
            if value != getattr(defaults, name)
        }


RULE_NAMES: tuple[str, ...] = tuple(CompareRules.model_fields)
