"""Suite kinds: one registry entry per kind, which everything else asks.

``KINDS`` maps a kind's name to its ``SuiteKind``: the pydantic schema of its suites, the
request type its items need (a ``workers.engine.base.Backend`` method), the pure ``aggregate``
over its item rows, its ``compare`` contribution to ``/compare``, and how the dashboard shows it.
Adding a kind is one ``register_kind`` call here plus its scoring function on the worker side
(``workers.evaluation.runners.register_scorer``); the app stays importable without torch.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from typing import Annotated, Any, Literal, Union, get_args

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    GetCoreSchemaHandler,
    TypeAdapter,
    field_validator,
    model_validator,
)
from pydantic_core import core_schema

from app.comparison.contributions import (
    CompareOptions,
    Contribution,
    Pairs,
    compare_checklist,
    compare_multiple_choice,
    compare_perplexity,
    compare_qa,
)
from app.core.formatting import number, percent
from app.suites.aggregates import (
    ItemRow,
    aggregate_checklist,
    aggregate_multiple_choice,
    aggregate_perplexity,
    aggregate_qa,
)
from app.suites.checks import validate_check

DEFAULT_PROMPT_TEMPLATE = "Question: {question}\nAnswer:"
MAX_TEXT = 8 * 1024
MAX_ITEMS = 10_000

Name = Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9._-]{0,99}$")]
ItemId = Annotated[
    str, Field(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9][A-Za-z0-9._:/-]*$")
]
Text = Annotated[str, Field(min_length=1, max_length=MAX_TEXT)]
Short = Annotated[str, Field(min_length=1, max_length=100)]
Severity = Literal["critical", "high", "medium", "low"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class QAItem(_Strict):
    id: ItemId
    question: Text
    answers: list[Annotated[str, Field(min_length=1, max_length=1000)]] = Field(min_length=1)
    category: Short = "general"


class ChecklistItem(_Strict):
    id: ItemId
    test: Short
    prompt: Text
    severity: Severity = "medium"
    check: dict[str, Any]
    category: Short = "general"

    @field_validator("check")
    @classmethod
    def _valid_check(cls, check: dict[str, Any]) -> dict[str, Any]:
        problems = validate_check(check)
        if problems:
            raise ValueError("; ".join(problems))
        return check


class MultipleChoiceItem(_Strict):
    id: ItemId
    question: Text
    choices: list[Annotated[str, Field(min_length=1, max_length=1000)]] = Field(min_length=2)
    gold: int = Field(ge=0)
    category: Short = "general"

    @model_validator(mode="after")
    def _gold_in_range(self) -> MultipleChoiceItem:
        if self.gold >= len(self.choices):
            raise ValueError(f"gold {self.gold} is out of range for {len(self.choices)} choices")
        return self


class PerplexityItem(_Strict):
    id: ItemId
    text: Text
    category: Short = "general"


class SuiteBase(_Strict):
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


def _template_has_question(template: str) -> str:
    if "{question}" not in template:
        raise ValueError("prompt_template must contain the placeholder {question}")
    return template


class QASuite(SuiteBase):
    kind: Literal["qa"]
    prompt_template: Annotated[str, Field(max_length=2000)] = DEFAULT_PROMPT_TEMPLATE
    items: list[QAItem] = Field(min_length=1, max_length=MAX_ITEMS)

    _check_template = field_validator("prompt_template")(_template_has_question)


class ChecklistSuite(SuiteBase):
    kind: Literal["checklist"]
    items: list[ChecklistItem] = Field(min_length=1, max_length=MAX_ITEMS)


class MultipleChoiceSuite(SuiteBase):
    kind: Literal["multiple_choice"]
    prompt_template: Annotated[str, Field(max_length=2000)] = DEFAULT_PROMPT_TEMPLATE
    items: list[MultipleChoiceItem] = Field(min_length=1, max_length=MAX_ITEMS)

    _check_template = field_validator("prompt_template")(_template_has_question)


class PerplexitySuite(SuiteBase):
    kind: Literal["perplexity"]
    items: list[PerplexityItem] = Field(min_length=1, max_length=MAX_ITEMS)


RequestType = Literal["generate", "loglikelihood", "token_nll"]
REQUEST_TYPES: tuple[RequestType, ...] = ("generate", "loglikelihood", "token_nll")
Result = Mapping[str, Any]  # a kind's aggregate, as stored in an evaluation's results


@dataclass(frozen=True)
class Card:
    """One number on a dashboard card: a label, the value, a line under it (``bad``: in red)."""

    label: str
    value: str
    detail: str = ""
    bad: bool = False


@dataclass(frozen=True)
class Display:
    """How the dashboard shows a kind: its result on the evaluation pages, its comparison."""

    title: str  # what suites of this kind measure, in words
    headline: Callable[[Result], str]  # the number on the evaluation's result card
    detail: Callable[[Result], str]  # the line under it
    short: Callable[[Result], str]  # the score in the evaluations list
    category_chart: bool = False  # draw the result's ``by_category`` accuracy as bars
    severity_table: bool = False  # list every item of the suite, most severe first
    item_score: str | None = None  # label of an item's ``score`` in the items table
    # Cards from the kind's part of the /compare body; None: the compare page has its own.
    compare_cards: Callable[[Mapping[str, Any]], list[Card]] | None = None


@dataclass(frozen=True)
class SuiteKind:
    """Everything the service knows about one suite kind; the worker keeps its scoring."""

    name: str
    model: type[SuiteBase]  # the suite schema; its ``kind`` field is ``Literal[name]``
    request: RequestType  # which Backend method the worker calls for its items
    aggregate: Callable[[Sequence[ItemRow]], dict[str, Any]]
    compare: Callable[[Pairs, CompareOptions], Contribution]
    display: Display
    compare_needs_text: bool = False  # the comparison reads every row's response and details
    # Bumped when workers start storing more per item (a new comparison reads it); a cached
    # run recorded before then must not answer, or the new figure stays missing for good.
    records_version: int = 1

    @property
    def generates(self) -> bool:
        """Greedy generation: ``max_new_tokens`` and ``stop`` change its scores."""
        return self.request == "generate"


KINDS: dict[str, SuiteKind] = {}


def register_kind(kind: SuiteKind) -> SuiteKind:
    """Add a suite kind: uploads, evaluations, comparisons and the dashboard all ask ``KINDS``."""
    if kind.name in KINDS:
        raise ValueError(f"suite kind {kind.name!r} is already registered")
    if kind.request not in REQUEST_TYPES:
        raise ValueError(f"request {kind.request!r} is not one of {', '.join(REQUEST_TYPES)}")
    field = kind.model.model_fields.get("kind")
    if field is None or get_args(field.annotation) != (kind.name,):
        raise ValueError(f"{kind.model.__name__}.kind must be Literal[{kind.name!r}]")
    KINDS[kind.name] = kind
    return kind


def unregister_kind(name: str) -> None:
    """Remove a suite kind (tests that add a throwaway kind clean up with this)."""
    KINDS.pop(name, None)


def _discriminated(models: tuple[type[SuiteBase], ...]) -> Any:
    """The registered kinds' suite models as one union, told apart by ``kind``."""
    return Annotated[Union[models], Field(discriminator="kind")]  # noqa: UP007


@cache
def _union(models: tuple[type[SuiteBase], ...]) -> TypeAdapter[Any]:
    # What refuses an unknown or missing kind with the errors clients always got.
    return TypeAdapter(_discriminated(models))


def validate_suite(value: Any) -> SuiteBase:
    """A suite definition validated against the schema of the registered kind it names."""
    if isinstance(value, SuiteBase) and type(value) in (k.model for k in KINDS.values()):
        return value
    name = value.get("kind") if isinstance(value, dict) else None
    kind = KINDS.get(name) if isinstance(name, str) else None
    if kind is None:  # not an object, no kind, or an unknown one: the union says which
        _union(tuple(k.model for k in KINDS.values())).validate_python(value)
        raise AssertionError("unreachable: the union refuses what no kind accepts")
    return kind.model.model_validate(value)


class _AnySuite:
    """Pydantic hook: validate with ``validate_suite``; document the kinds registered now."""

    @classmethod
    def __get_pydantic_core_schema__(
        cls, source: Any, handler: GetCoreSchemaHandler
    ) -> core_schema.CoreSchema:
        documented = _discriminated(tuple(k.model for k in KINDS.values()))
        return core_schema.no_info_plain_validator_function(
            validate_suite, json_schema_input_schema=handler.generate_schema(documented)
        )


# Request bodies take this: kinds registered after import are accepted too.
SuiteDefinition = Annotated[SuiteBase, _AnySuite]


def _accuracy_detail(result: Result) -> str:
    return f"{result.get('correct')} of {result.get('total')} correct"


def _checklist_short(result: Result) -> str:
    passed = result.get("passed", 0)
    return f"{passed}/{passed + result.get('failed', 0)}"


register_kind(
    SuiteKind(
        "qa",
        QASuite,
        request="generate",
        aggregate=aggregate_qa,
        compare=compare_qa,
        display=Display(
            title="Question answering accuracy",
            headline=lambda r: percent(r.get("overall_accuracy"), 1),
            detail=_accuracy_detail,
            short=lambda r: percent(r.get("overall_accuracy")),
            category_chart=True,
        ),
    )
)
register_kind(
    SuiteKind(
        "checklist",
        ChecklistSuite,
        request="generate",
        aggregate=aggregate_checklist,
        compare=compare_checklist,
        compare_needs_text=True,
        display=Display(
            title="Behavioural checklist",
            headline=_checklist_short,
            detail=lambda r: f"checks passed ({percent(r.get('score'))})",
            short=_checklist_short,
            severity_table=True,
        ),
    )
)
register_kind(
    SuiteKind(
        "multiple_choice",
        MultipleChoiceSuite,
        request="loglikelihood",
        aggregate=aggregate_multiple_choice,
        compare=compare_multiple_choice,
        display=Display(
            title="Multiple-choice accuracy",
            headline=lambda r: percent(r.get("overall_accuracy"), 1),
            detail=lambda r: f"{_accuracy_detail(r)} · acc_norm {percent(r.get('acc_norm'), 1)}",
            short=lambda r: percent(r.get("overall_accuracy")),
            category_chart=True,
        ),
    )
)
register_kind(
    SuiteKind(
        "perplexity",
        PerplexitySuite,
        request="token_nll",
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


def render_prompt(template: str, question: str) -> str:
    """Fill ``{question}``; plain replacement, so a template can never reach Python's format()."""
    return template.replace("{question}", question)
