"""The suite-kind registry: what a kind is, and the one table everything asks.

A ``SuiteKind`` is everything about one kind of suite: its schema, the request type its items
need (a ``workers.engine.base.Backend`` method), how an item becomes requests and how their
results are scored (pure Python: the worker's driver only makes the backend calls), the
aggregate over its stored rows, its contribution to ``/compare``, and how the dashboard shows
it. Each kind is one file in ``app/suites/kinds/`` that calls ``register_kind`` once; read
``KINDS`` through ``app.suites.kinds``, which loads them all.

The types here are the contract between a kind and the rest: ``Request`` and what each request
type returns (``TokenTopK``), ``ItemRow`` (what aggregates read), ``Row``/``Pairs`` and
``Contribution`` (what comparisons read and give back).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import KW_ONLY, dataclass, field
from functools import cache
from typing import Annotated, Any, Literal, Union, get_args

from pydantic import Field, GetCoreSchemaHandler, TypeAdapter
from pydantic_core import core_schema

from app.suites.rules import CompareOptions
from app.suites.schema import DEFAULT_PROMPT_TEMPLATE, SuiteBase, render_prompt

# --- requests: what a kind asks of the model ----------------------------------------------

RequestType = Literal["generate", "loglikelihood", "token_nll"]
REQUEST_TYPES: tuple[RequestType, ...] = ("generate", "loglikelihood", "token_nll")

Item = Mapping[str, Any]  # one item of a suite definition, as stored (JSON)
Suite = Mapping[str, Any]  # a suite definition as stored, suite-level settings included


@dataclass(frozen=True)
class Request:
    """One thing asked of the model for an item; an item may need several.

    ``generate`` returns the stripped greedy continuation of ``text``; ``loglikelihood``
    ``(sum log p(continuation | text), continuation is greedy)``; ``token_nll`` the text's
    ``(nll_sum, tokens)``, or a ``TokenTopK`` when the kind asks for ``topk``.
    """

    text: str  # the prompt (generate, loglikelihood) or the raw text read (token_nll)
    continuation: str = ""  # loglikelihood: scored after ``text``, its delimiter included
    stop: tuple[str, ...] = ()  # generate: stop strings beside the evaluation's own
    chat: bool | None = None  # ``text`` as a user turn; None: as the run's prompt format says


@dataclass(frozen=True)
class TokenTopK:
    """``token_nll``'s sums for one text plus, at each predicted position in order, the ``k``
    most probable next tokens (ids and log-probabilities over the full vocabulary, most
    probable first) and the token that is actually there (``targets``)."""

    nll_sum: float
    tokens: int
    ids: list[list[int]]
    logprobs: list[list[float]]
    targets: list[int]


def question_text(item: Item, suite: Suite, fmt: str) -> str:
    """What the model is asked: the suite template in plain format (``fmt``), the bare question
    in chat."""
    if "prompt" in item:  # items that carry their prompt verbatim
        return str(item["prompt"])
    question = str(item.get("question", ""))
    if fmt == "chat":
        return question
    return render_prompt(suite.get("prompt_template") or DEFAULT_PROMPT_TEMPLATE, question)


def ask_question(item: Item, suite: Suite, fmt: str) -> list[Request]:
    """The default: one request, the item's question or prompt as ``question_text`` puts it."""
    return [Request(question_text(item, suite, fmt))]


# --- rows: what aggregates and comparisons read -------------------------------------------


@dataclass(slots=True)
class ItemRow:
    """What aggregation needs from a stored item row."""

    item_id: str
    passed: bool | None
    score: float | None
    category: str | None
    severity: str | None
    response: str | None
    details: dict[str, Any] | None

    @classmethod
    def of(cls, row: Any) -> ItemRow:
        """From a stored row (attributes) or a row being written (a mapping)."""
        get = row.__getitem__ if isinstance(row, Mapping) else row.__getattribute__
        return cls(*(get(name) for name in cls.__slots__))


@dataclass(slots=True)
class Row(ItemRow):
    """An item row with the suite it belongs to and what was asked (for comparisons)."""

    suite: str = ""
    kind: str = ""
    prompt: str = ""

    @classmethod
    def written(cls, row: Mapping[str, Any], suite: str, kind: str) -> Row:
        """From an item row as a run writes it (``run_items``), of ``suite`` (a ``kind``)."""
        fields = {name: row[name] for name in ItemRow.__slots__}
        return cls(**fields, suite=suite, kind=kind, prompt=row["prompt"])


Pairs = Sequence[tuple[Row, Row]]  # the same item before and after


@dataclass(frozen=True)
class Contribution:
    """A kind's part of the ``/compare`` body and the reasons it gives the verdict to fail.

    ``findings``: every regression it found, ``{"rule", "subject", "message", "gates"}``; the
    ones that gate are the ``reasons``, the others are reported only (see ``of``).
    """

    body: dict[str, Any]
    reasons: list[str] = field(default_factory=list)
    findings: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def of(cls, body: dict[str, Any], findings: list[dict[str, Any]]) -> Contribution:
        """A contribution whose reasons are exactly its gating findings' messages."""
        return cls(body, [f["message"] for f in findings if f["gates"]], findings)


def finding(rule: str, subject: str, message: str, *, gates: bool) -> dict[str, Any]:
    """One regression: what rule, on what, in words, and whether it fails the verdict."""
    return {"rule": rule, "subject": subject, "message": message, "gates": gates}


# --- display: how the dashboard shows a kind ----------------------------------------------

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


# --- the kind -----------------------------------------------------------------------------

Scored = dict[str, Any]  # an item row's fields: passed, score, category, severity, details …


@dataclass(frozen=True)
class SuiteKind:
    """Everything about one suite kind, from its schema to its dashboard card.

    ``requests(item, suite, fmt)`` builds an item's requests (suite-level settings such as a
    prompt template, few-shot examples or delimiters are in ``suite``); the worker sends them
    with the backend method ``request`` names, and ``score(item, results, suite)`` turns the
    results (one per request, in order) into the row's fields: ``passed``, ``score``,
    ``category``, ``severity``, ``details``, and ``response`` or ``prompt`` to replace the
    driver's (the first generation; the first request's text). ``aggregate`` reduces the
    stored rows to the kind's result (any number of metrics); ``compare`` gives its part of
    ``/compare`` from the rows paired before/after.
    """

    name: str
    model: type[SuiteBase]  # the suite schema; its ``kind`` field is ``Literal[name]``
    _: KW_ONLY
    request: RequestType  # which Backend method the worker calls for its items
    score: Callable[[Item, Sequence[Any], Suite], Scored]
    aggregate: Callable[[Sequence[ItemRow]], dict[str, Any]]
    compare: Callable[[Pairs, CompareOptions], Contribution]
    display: Display
    requests: Callable[[Item, Suite, str], Sequence[Request]] = ask_question
    # token_nll: ask the backend for this many next tokens per position too (``token_topk``);
    # ``score`` then gets a ``TokenTopK``, or ``(nll_sum, tokens)`` if the backend can't.
    topk: int = 0
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
    """Add a suite kind: uploads, the worker, comparisons and the dashboard all ask ``KINDS``."""
    if kind.name in KINDS:
        raise ValueError(f"suite kind {kind.name!r} is already registered")
    if kind.request not in REQUEST_TYPES:
        raise ValueError(f"request {kind.request!r} is not one of {', '.join(REQUEST_TYPES)}")
    field_ = kind.model.model_fields.get("kind")
    if field_ is None or get_args(field_.annotation) != (kind.name,):
        raise ValueError(f"{kind.model.__name__}.kind must be Literal[{kind.name!r}]")
    KINDS[kind.name] = kind
    return kind


def unregister_kind(name: str) -> None:
    """Remove a suite kind (tests that add a throwaway kind clean up with this)."""
    KINDS.pop(name, None)


# --- validation: a suite definition against the kind it names -----------------------------


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
