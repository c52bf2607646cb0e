"""The 25 IFEval instruction types: each a typed kwargs model and a pure check function.

Each check answers "does ``response`` follow this instruction?" exactly as Google's reference
checker of the same id does (``instructions.py`` of google-research/instruction_following_eval,
as lm-evaluation-harness 0.4.13 ships it, Apache-2.0), reimplemented here so that scoring needs
no NLTK data and no randomness: the reference fills a missing argument with a random value,
forgetguard's kwargs models make every argument the instruction reads required. Where this
module departs from the reference on purpose it says so (``letter_frequency``);
``benchmarks/ifeval_agreement.py`` measures the agreement on real responses.

``follows(instruction_id, kwargs, response, prompt)`` is the reference's
``response.strip() and check_following(response)``; ``loose_variants`` are the eight
responses its loose score tries.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from app.suites.ifeval.text import count_sentences, count_words, detect_language, word_tokens

Relation = Literal["less than", "at least"]
Count = Annotated[int, Field(ge=0, le=1_000_000)]
Word = Annotated[str, Field(min_length=1, max_length=200)]
Phrase = Annotated[str, Field(min_length=1, max_length=2_000)]

# What langdetect can answer (its 55 profiles): a language it cannot name is never followed.
LANGUAGES = (
    "af ar bg bn ca cs cy da de el en es et fa fi fr gu he hi hr hu id it ja kn ko lt lv mk ml "
    "mr ne nl no pa pl pt ro ru sk sl so sq sv sw ta te th tl tr uk ur vi zh-cn zh-tw"
).split()


def _known_language(code: str) -> str:
    if code not in LANGUAGES:
        raise ValueError(f"{code!r} is not a language langdetect names: {', '.join(LANGUAGES)}")
    return code


Language = Annotated[str, AfterValidator(_known_language)]


class Kwargs(BaseModel):
    """An instruction's arguments: unknown names and coerced types are refused."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class NoKwargs(Kwargs):
    pass


def _compare(count: int, relation: str, threshold: int) -> bool:
    return count < threshold if relation == "less than" else count >= threshold


# --- keywords -------------------------------------------------------------------------------


class Keywords(Kwargs):
    keywords: list[Word] = Field(min_length=1, max_length=100)


def keyword_existence(k: Keywords, response: str, prompt: str) -> bool:
    # The reference searches each keyword as a regular expression; escaped here, which is
    # the same for every keyword made of letters, digits and spaces (all of IFEval's).
    return all(re.search(re.escape(w), response, flags=re.IGNORECASE) for w in k.keywords)


class KeywordFrequency(Kwargs):
    keyword: Word
    frequency: Count
    relation: Relation


def keyword_frequency(k: KeywordFrequency, response: str, prompt: str) -> bool:
    found = re.findall(re.escape(k.keyword.strip()), response, flags=re.IGNORECASE)
    return _compare(len(found), k.relation, k.frequency)


class ForbiddenWords(Kwargs):
    forbidden_words: list[Word] = Field(min_length=1, max_length=100)


def forbidden_words(k: ForbiddenWords, response: str, prompt: str) -> bool:
    return not any(
        re.search(r"\b" + re.escape(w) + r"\b", response, flags=re.IGNORECASE)
        for w in k.forbidden_words
    )


class LetterFrequency(Kwargs):
    letter: Annotated[str, Field(min_length=1, max_length=1)]
    let_frequency: Count
    let_relation: Relation


def letter_frequency(k: LetterFrequency, response: str, prompt: str) -> bool:
    # The reference replaces anything but an ASCII letter with a random letter (IFEval asks
    # for '#' and '!' once each); forgetguard counts the character the prompt names.
    counts = Counter(response.lower())
    return _compare(counts[k.letter.lower()], k.let_relation, k.let_frequency)


# --- language and case ----------------------------------------------------------------------


class ResponseLanguage(Kwargs):
    language: Language


def response_language(k: ResponseLanguage, response: str, prompt: str) -> bool:
    found = detect_language(response)
    return found is None or found == k.language  # undetectable: followed, as the reference


def english_capital(k: NoKwargs, response: str, prompt: str) -> bool:
    return response.isupper() and detect_language(response) in ("en", None)


def english_lowercase(k: NoKwargs, response: str, prompt: str) -> bool:
    return response.islower() and detect_language(response) in ("en", None)


class CapitalWordFrequency(Kwargs):
    capital_frequency: Count
    capital_relation: Relation


def capital_word_frequency(k: CapitalWordFrequency, response: str, prompt: str) -> bool:
    capitals = sum(1 for token in word_tokens(response) if token.isupper())
    return _compare(capitals, k.capital_relation, k.capital_frequency)


# --- length ---------------------------------------------------------------------------------


class NumberSentences(Kwargs):
    num_sentences: Count
    relation: Relation


def number_sentences(k: NumberSentences, response: str, prompt: str) -> bool:
    return _compare(count_sentences(response), k.relation, k.num_sentences)


class NumberWords(Kwargs):
    num_words: Count
    relation: Relation


def number_words(k: NumberWords, response: str, prompt: str) -> bool:
    return _compare(count_words(response), k.relation, k.num_words)


class NumberParagraphs(Kwargs):
    num_paragraphs: Count


def number_paragraphs(k: NumberParagraphs, response: str, prompt: str) -> bool:
    paragraphs = re.split(r"\s?\*\*\*\s?", response)
    count = len(paragraphs)
    for index, paragraph in enumerate(paragraphs):
        if not paragraph.strip():
            if index in (0, len(paragraphs) - 1):
                count -= 1
            else:
                return False  # an empty paragraph between two dividers
    return count == k.num_paragraphs


class NthParagraphFirstWord(Kwargs):
    num_paragraphs: Count
    nth_paragraph: Annotated[int, Field(ge=1, le=1_000)]
    first_word: Word


def nth_paragraph_first_word(k: NthParagraphFirstWord, response: str, prompt: str) -> bool:
    paragraphs = re.split(r"\n\n", response)
    count = sum(1 for p in paragraphs if p.strip())
    if k.nth_paragraph > count:
        return False
    paragraph = paragraphs[k.nth_paragraph - 1].strip()
    if not paragraph:
        return False
    word = paragraph.split()[0].strip().lstrip("'").lstrip('"')
    first = ""
    for letter in word:
        if letter in {".", ",", "?", "!", "'", '"'}:
            break
        first += letter.lower()
    return count == k.num_paragraphs and first == k.first_word.lower()


# --- content --------------------------------------------------------------------------------


class NumberPlaceholders(Kwargs):
    num_placeholders: Count


def number_placeholders(k: NumberPlaceholders, response: str, prompt: str) -> bool:
    return len(re.findall(r"\[.*?\]", response)) >= k.num_placeholders


class Postscript(Kwargs):
    postscript_marker: Word


def postscript(k: Postscript, response: str, prompt: str) -> bool:
    marker = k.postscript_marker.strip()
    if marker == "P.P.S":
        pattern = r"\s*p\.\s?p\.\s?s.*$"
    elif marker == "P.S.":
        pattern = r"\s*p\.\s?s\..*$"
    else:  # the reference puts the marker into the pattern as it is
        pattern = r"\s*" + re.escape(marker.lower()) + r".*$"
    return bool(re.findall(pattern, response.lower(), flags=re.MULTILINE))


# --- format ---------------------------------------------------------------------------------


class NumberBullets(Kwargs):
    num_bullets: Count


def number_bullet_lists(k: NumberBullets, response: str, prompt: str) -> bool:
    stars = re.findall(r"^\s*\*[^\*].*$", response, flags=re.MULTILINE)
    dashes = re.findall(r"^\s*-.*$", response, flags=re.MULTILINE)
    return len(stars) + len(dashes) == k.num_bullets


CONSTRAINED_RESPONSES = ("My answer is yes.", "My answer is no.", "My answer is maybe.")


def constrained_response(k: NoKwargs, response: str, prompt: str) -> bool:
    return any(option in response.strip() for option in CONSTRAINED_RESPONSES)


class NumberHighlights(Kwargs):
    num_highlights: Count


def number_highlighted_sections(k: NumberHighlights, response: str, prompt: str) -> bool:
    singles = re.findall(r"\*[^\n\*]*\*", response)
    doubles = re.findall(r"\*\*[^\n\*]*\*\*", response)
    count = sum(1 for h in singles if h.strip("*").strip())
    count += sum(1 for h in doubles if h.removeprefix("**").removesuffix("**").strip())
    return count >= k.num_highlights


class MultipleSections(Kwargs):
    section_spliter: Word  # (sic): the dataset's spelling
    num_sections: Count


def multiple_sections(k: MultipleSections, response: str, prompt: str) -> bool:
    # The reference puts the splitter into the pattern unescaped; escaped here (the same for
    # IFEval's words).
    pattern = r"\s?" + re.escape(k.section_spliter.strip()) + r"\s?\d+\s?"
    return len(re.split(pattern, response)) - 1 >= k.num_sections


def json_format(k: NoKwargs, response: str, prompt: str) -> bool:
    value = (
        response.strip()
        .removeprefix("```json")
        .removeprefix("```Json")
        .removeprefix("```JSON")
        .removeprefix("```")
        .removesuffix("```")
        .strip()
    )
    try:
        json.loads(value)
    except ValueError:
        return False
    return True


def title(k: NoKwargs, response: str, prompt: str) -> bool:
    titles = re.findall(r"<<[^\n]+>>", response)
    return any(t.lstrip("<").rstrip(">").strip() for t in titles)


# --- combination, start and end, punctuation ------------------------------------------------


def two_responses(k: NoKwargs, response: str, prompt: str) -> bool:
    valid = []
    parts = response.split("******")
    for index, part in enumerate(parts):
        if not part.strip():
            if index not in (0, len(parts) - 1):
                return False
        else:
            valid.append(part)
    return len(valid) == 2 and valid[0].strip() != valid[1].strip()


class RepeatPrompt(Kwargs):
    prompt_to_repeat: Annotated[str, Field(min_length=1, max_length=8 * 1024)]


def repeat_prompt(k: RepeatPrompt, response: str, prompt: str) -> bool:
    return response.strip().lower().startswith(k.prompt_to_repeat.strip().lower())


class EndPhrase(Kwargs):
    end_phrase: Phrase


def end_checker(k: EndPhrase, response: str, prompt: str) -> bool:
    return response.strip().strip('"').lower().endswith(k.end_phrase.strip().lower())


def quotation(k: NoKwargs, response: str, prompt: str) -> bool:
    value = response.strip()
    return len(value) > 1 and value[0] == '"' and value[-1] == '"'


def no_comma(k: NoKwargs, response: str, prompt: str) -> bool:
    return "," not in response


# --- the registry ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Instruction:
    """One instruction type: its kwargs model and its check."""

    kwargs: type[Kwargs]
    check: Callable[[Any, str, str], bool]


INSTRUCTIONS: dict[str, Instruction] = {
    "keywords:existence": Instruction(Keywords, keyword_existence),
    "keywords:frequency": Instruction(KeywordFrequency, keyword_frequency),
    "keywords:forbidden_words": Instruction(ForbiddenWords, forbidden_words),
    "keywords:letter_frequency": Instruction(LetterFrequency, letter_frequency),
    "language:response_language": Instruction(ResponseLanguage, response_language),
    "length_constraints:number_sentences": Instruction(NumberSentences, number_sentences),
    "length_constraints:number_paragraphs": Instruction(NumberParagraphs, number_paragraphs),
    "length_constraints:number_words": Instruction(NumberWords, number_words),
    "length_constraints:nth_paragraph_first_word": Instruction(
        NthParagraphFirstWord, nth_paragraph_first_word
    ),
    "detectable_content:number_placeholders": Instruction(NumberPlaceholders, number_placeholders),
    "detectable_content:postscript": Instruction(Postscript, postscript),
    "detectable_format:number_bullet_lists": Instruction(NumberBullets, number_bullet_lists),
    "detectable_format:constrained_response": Instruction(NoKwargs, constrained_response),
    "detectable_format:number_highlighted_sections": Instruction(
        NumberHighlights, number_highlighted_sections
    ),
    "detectable_format:multiple_sections": Instruction(MultipleSections, multiple_sections),
    "detectable_format:json_format": Instruction(NoKwargs, json_format),
    "detectable_format:title": Instruction(NoKwargs, title),
    "combination:two_responses": Instruction(NoKwargs, two_responses),
    "combination:repeat_prompt": Instruction(RepeatPrompt, repeat_prompt),
    "startend:end_checker": Instruction(EndPhrase, end_checker),
    "change_case:capital_word_frequency": Instruction(CapitalWordFrequency, capital_word_frequency),
    "change_case:english_capital": Instruction(NoKwargs, english_capital),
    "change_case:english_lowercase": Instruction(NoKwargs, english_lowercase),
    "punctuation:no_comma": Instruction(NoKwargs, no_comma),
    "startend:quotation": Instruction(NoKwargs, quotation),
}


def parse_kwargs(instruction_id: str, kwargs: Mapping[str, Any]) -> Kwargs:
    """An instruction's kwargs, validated (``None`` values dropped: the Hugging Face copy of
    IFEval writes every argument name into every instruction, unset ones as null)."""
    instruction = INSTRUCTIONS.get(instruction_id)
    if instruction is None:
        raise ValueError(f"unknown instruction id {instruction_id!r}")
    return instruction.kwargs.model_validate({k: v for k, v in kwargs.items() if v is not None})


def follows(instruction_id: str, kwargs: Kwargs, response: str, prompt: str = "") -> bool:
    """Whether ``response`` follows one instruction (an empty response follows none)."""
    return bool(response.strip()) and INSTRUCTIONS[instruction_id].check(kwargs, response, prompt)


def loose_variants(response: str) -> list[str]:
    """The reference's loose responses: as is, without ``*``, without the first line, the last
    line or both, and those without ``*``."""
    lines = response.split("\n")
    no_first = "\n".join(lines[1:]).strip()
    no_last = "\n".join(lines[:-1]).strip()
    no_both = "\n".join(lines[1:-1]).strip()
    return [
        response,
        response.replace("*", ""),
        no_first,
        no_last,
        no_both,
        no_first.replace("*", ""),
        no_last.replace("*", ""),
        no_both.replace("*", ""),
    ]


def follows_loose(instruction_id: str, kwargs: Kwargs, response: str, prompt: str = "") -> bool:
    """Whether any loose variant of ``response`` follows the instruction."""
    return any(follows(instruction_id, kwargs, r, prompt) for r in loose_variants(response))
