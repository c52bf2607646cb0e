"""forgetguard's IFEval checkers: each instruction type on responses written to pass and fail,
the loose variants, the text measures, and kwargs validation."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from app.suites.ifeval.checks import (
    INSTRUCTIONS,
    follows,
    follows_loose,
    loose_variants,
    parse_kwargs,
)
from app.suites.ifeval.text import count_sentences, count_words, split_sentences, word_tokens


def check(instruction: str, kwargs: dict[str, Any], response: str, prompt: str = "") -> bool:
    return follows(instruction, parse_kwargs(instruction, kwargs), response, prompt)


def test_the_25_instruction_types_of_ifeval_are_registered() -> None:
    assert len(INSTRUCTIONS) == 25
    assert "detectable_format:multiple_sections" in INSTRUCTIONS


@pytest.mark.parametrize(
    ("instruction", "kwargs", "good", "bad"),
    [
        ("punctuation:no_comma", {}, "No commas here.", "One, two."),
        ("keywords:existence", {"keywords": ["apple", "pie"]}, "Apple PIE", "apple tart"),
        (
            "keywords:frequency",
            {"keyword": "cat", "frequency": 2, "relation": "at least"},
            "cat and Cat",
            "one cat",
        ),
        ("keywords:forbidden_words", {"forbidden_words": ["bad"]}, "badly done", "a bad day"),
        (
            "keywords:letter_frequency",
            {"letter": "z", "let_frequency": 2, "let_relation": "less than"},
            "zebra",
            "zz top",
        ),
        (
            "length_constraints:number_words",
            {"num_words": 3, "relation": "less than"},
            "two words",
            "one two three",
        ),
        (
            "length_constraints:number_sentences",
            {"num_sentences": 2, "relation": "at least"},
            "One. Two.",
            "Only one sentence, no end",
        ),
        ("length_constraints:number_paragraphs", {"num_paragraphs": 2}, "a\n***\nb", "a ***"),
        (
            "length_constraints:nth_paragraph_first_word",
            {"num_paragraphs": 2, "nth_paragraph": 2, "first_word": "then"},
            'First.\n\n"Then, more.',
            "First.\n\nNext.",
        ),
        ("detectable_content:number_placeholders", {"num_placeholders": 2}, "[a] [b]", "[a]"),
        (
            "detectable_content:postscript",
            {"postscript_marker": "P.S."},
            "Hi.\np.s. bye",
            "Hi. ps bye",
        ),
        ("detectable_format:number_bullet_lists", {"num_bullets": 2}, "* a\n- b", "* a"),
        ("detectable_format:constrained_response", {}, "My answer is yes.", "Yes."),
        (
            "detectable_format:number_highlighted_sections",
            {"num_highlights": 2},
            "*a* **b**",
            "*a*",
        ),
        (
            "detectable_format:multiple_sections",
            {"section_spliter": "Section", "num_sections": 2},
            "Section 1\na\nSection 2\nb",
            "Section 1 only",
        ),
        ("detectable_format:json_format", {}, '```json\n{"a": 1}\n```', "{a: 1}"),
        ("detectable_format:title", {}, "<<My Title>>\ntext", "<< >>"),
        ("combination:two_responses", {}, "one\n******\ntwo", "one\n******\none"),
        ("combination:repeat_prompt", {"prompt_to_repeat": "Say hi"}, "say hi. Hi!", "Hi!"),
        ("startend:end_checker", {"end_phrase": "Peace!"}, '"All done. Peace!"', "Peace! Out."),
        ("startend:quotation", {}, '"quoted"', '"half'),
        ("change_case:english_lowercase", {}, "all lower case english words here", "Not lower"),
        ("change_case:english_capital", {}, "ALL CAPITAL ENGLISH WORDS HERE", "Mixed Case"),
        (
            "change_case:capital_word_frequency",
            {"capital_frequency": 2, "capital_relation": "at least"},
            "I DON'T",
            "Only One Here",
        ),
        (
            "language:response_language",
            {"language": "fr"},
            "Bonjour, je suis très content de vous voir aujourd'hui.",
            "Hello, I am very happy to see you today.",
        ),
    ],
)
def test_each_instruction_passes_and_fails(
    instruction: str, kwargs: dict[str, Any], good: str, bad: str
) -> None:
    assert check(instruction, kwargs, good)
    assert not check(instruction, kwargs, bad)


def test_an_empty_response_follows_nothing() -> None:
    assert not check("punctuation:no_comma", {}, "   ")


def test_loose_drops_the_first_line_and_the_stars() -> None:
    response = "Sure, here it is:\n*no commas here*"
    assert not check("punctuation:no_comma", {}, response)
    kwargs = parse_kwargs("punctuation:no_comma", {})
    assert follows_loose("punctuation:no_comma", kwargs, response)
    assert loose_variants("a\nb\nc")[2:5] == ["b\nc", "a\nb", "b"]


def test_letter_frequency_counts_the_character_the_prompt_names() -> None:
    # The reference draws a random letter for '!'; forgetguard counts '!'.
    assert check(
        "keywords:letter_frequency",
        {"letter": "!", "let_frequency": 3, "let_relation": "at least"},
        "Wow! Yes! Great!",
    )


def test_sentences_split_as_punkt_does() -> None:
    text = 'He met Dr. Smith. "Really?" she asked. 1. **Bold** item. e.g. this counts.'
    assert split_sentences(text) == [
        "He met Dr. Smith.",
        '"Really?"',
        "she asked.",
        "1.",
        "**Bold** item.",
        "e.g.",
        "this counts.",
    ]
    assert count_sentences("No end mark") == 1
    assert count_words("it's 3.5 km") == 5


def test_word_tokens_are_nltk_treebank_tokens() -> None:
    assert word_tokens("I DON'T know (USA), can't!") == [
        "I", "DO", "N'T", "know", "(", "USA", ")", ",", "ca", "n't", "!",
    ]  # fmt: skip


def test_none_kwargs_are_dropped_and_wrong_types_refused() -> None:
    parsed = parse_kwargs("punctuation:no_comma", {"num_words": None, "keywords": None})
    assert parsed.model_dump() == {}
    with pytest.raises(ValidationError, match="num_highlights"):
        parse_kwargs("detectable_format:number_highlighted_sections", {"num_highlights": "3"})
    with pytest.raises(ValidationError, match="relation"):
        parse_kwargs("length_constraints:number_words", {"num_words": 3, "relation": "about"})
    with pytest.raises(ValueError, match="unknown instruction id 'keywords:vibes'"):
        parse_kwargs("keywords:vibes", {})
