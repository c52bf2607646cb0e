"""Schema pieces every suite kind builds on: names, ids, text limits, severity, the suite base.

A kind's own item and suite models live in its file (``app/suites/kinds/<kind>.py``); what
they share is here, so a limit or a pattern is written once.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

DEFAULT_PROMPT_TEMPLATE = "Question: {question}\nAnswer:"
MAX_TEXT = 8 * 1024
MAX_ITEMS = 10_000
# Greedy generation's longest answer: a suite's own max_new_tokens, as an evaluation's
# (app.core.schemas.GenerationSettings, which cannot import it: tests hold them equal).
MAX_NEW_TOKENS = 512

Name = Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9._-]{0,99}$")]
ItemId = Annotated[
    str, Field(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9][A-Za-z0-9._:/-]*$")
]
Text = Annotated[str, Field(min_length=1, max_length=MAX_TEXT)]
Short = Annotated[str, Field(min_length=1, max_length=100)]
Choice = Annotated[str, Field(min_length=1, max_length=1000)]
PromptTemplate = Annotated[str, Field(max_length=2000)]
Severity = Literal["critical", "high", "medium", "low"]
SEVERITY_ORDER = {"critical": 0, "high": 1, "medium": 2, "low": 3}  # most severe first


class Strict(BaseModel):
    """Unknown fields and coerced types are refused: a typo in a suite is an error, not a no-op."""

    model_config = ConfigDict(extra="forbid", strict=True)


class SuiteBase(Strict):
    """What every suite has: a name, a description, and items with unique ids."""

    name: Name
    description: Annotated[str, Field(max_length=MAX_TEXT)] | None = None

    @model_validator(mode="after")
    def _unique_ids(self) -> Any:
        seen: dict[str, int] = {}
        for index, item in enumerate(self.items):  # type: ignore[attr-defined]
            if item.id in seen:
                raise ValueError(
                    f"duplicate item id {item.id!r} at items[{index}] "
                    f"(first at items[{seen[item.id]}])"
                )
            seen[item.id] = index
        return self


def template_has_question(template: str) -> str:
    """A ``prompt_template`` validator: the template must place the question."""
    if "{question}" not in template:
        raise ValueError("prompt_template must contain the placeholder {question}")
    return template


def render_prompt(template: str, question: str) -> str:
    """Fill ``{question}``; plain replacement, so a template can never reach Python's format()."""
    return template.replace("{question}", question)
