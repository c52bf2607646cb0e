"""The IFEval suite definition: items of ``{id, prompt, instruction_id_list, kwargs}``.

Every instruction's kwargs are validated at upload against its type's model
(``app.suites.ifeval.checks``), so an unknown instruction id or an argument of the wrong type
is a 422 naming the item (``items[i]``) and the instruction, and nothing is created.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, ValidationError, model_validator

from app.suites.benchmarks.items import BenchmarkSource
from app.suites.ifeval.checks import INSTRUCTIONS, parse_kwargs
from app.suites.schema import MAX_ITEMS, ItemId, Strict, SuiteBase, Text

# lighteval runs IFEval with up to 1,280 new tokens, above the bound other generating suites
# and evaluations have (``MAX_NEW_TOKENS``, 512): an IFEval suite may ask for up to this many
# (SmolLM2's 2,048-token context as lighteval ran it); the stored response is still cut at
# FORGETGUARD_MAX_STORED_RESPONSE_CHARS (16,384 characters, about 4,000 tokens).
DEFAULT_MAX_NEW_TOKENS = 1280
MAX_SUITE_NEW_TOKENS = 2048
InstructionId = Annotated[str, Field(min_length=1, max_length=100)]


class IFEvalItem(Strict):
    id: ItemId
    prompt: Text
    instruction_id_list: list[InstructionId] = Field(min_length=1, max_length=20)
    kwargs: list[dict[str, Any]] = Field(max_length=20)

    @model_validator(mode="after")
    def _valid_instructions(self) -> IFEvalItem:
        if len(self.kwargs) != len(self.instruction_id_list):
            raise ValueError(
                f"kwargs has {len(self.kwargs)} entries for {len(self.instruction_id_list)} "
                "instructions: one kwargs object per instruction id, in order"
            )
        for index, (instruction, kwargs) in enumerate(
            zip(self.instruction_id_list, self.kwargs, strict=True)
        ):
            if instruction not in INSTRUCTIONS:
                raise ValueError(
                    f"instruction_id_list[{index}]: unknown instruction id {instruction!r}; "
                    f"known: {', '.join(INSTRUCTIONS)}"
                )
            try:
                parse_kwargs(instruction, kwargs)
            except ValidationError as exc:
                problems = "; ".join(
                    f"{'.'.join(str(p) for p in e['loc']) or 'kwargs'}: {e['msg']}"
                    for e in exc.errors()
                )
                raise ValueError(f"kwargs[{index}] of {instruction!r}: {problems}") from None
        return self


class IFEvalSuite(SuiteBase):
    """An IFEval suite: uploaded, or pulled (``forgetguard benchmarks pull ifeval``)."""

    kind: Literal["ifeval"]
    source: BenchmarkSource | None = None  # where the items came from (a pulled suite)
    # Generation length this suite needs, whatever the evaluation's generation settings say.
    max_new_tokens: int = Field(DEFAULT_MAX_NEW_TOKENS, ge=1, le=MAX_SUITE_NEW_TOKENS)
    items: list[IFEvalItem] = Field(min_length=1, max_length=MAX_ITEMS)
