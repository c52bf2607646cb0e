"""Text measures the IFEval checkers count with: words, sentences, word tokens, language.

Google's reference checkers (``instructions_util.py``) count words with NLTK's
``RegexpTokenizer(r"\\w+")``, sentences with NLTK's Punkt model for English, capitalised words
over ``nltk.word_tokenize`` and the language with ``langdetect``. None of NLTK's models is
installable from a package index, so the two NLTK tokenizers are rewritten here:

- ``count_sentences`` follows Punkt's decision procedure (``nltk.tokenize.punkt``, Kiss &
  Strunk 2006) for the English model with its abbreviation list, sentence starters and
  collocations, but without its orthographic statistics (20,000 words); where Punkt consults
  them (after an abbreviation, an initial, an ellipsis or a number) a rule stands in, stated at
  ``_ortho``. ``benchmarks/ifeval_agreement.py`` measures the counts against NLTK's.
- ``word_tokens`` is NLTK's ``NLTKWordTokenizer`` (the improved Treebank tokenizer), regex for
  regex; only whether a token is upper case is read, which Punkt's sentence split before it
  never changes, so it runs on the whole text.

``langdetect`` (pure Python, Apache-2.0) is the reference's own detector; it is imported when a
language is first checked, so the API, which never scores, does not need it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache
from typing import Any

# --- words ----------------------------------------------------------------------------------

_WORD = re.compile(r"\w+")


def count_words(text: str) -> int:
    """Runs of word characters: NLTK's ``RegexpTokenizer(r"\\w+")``, as the reference counts."""
    return len(_WORD.findall(text))


# --- sentences: Punkt's procedure with the English model's lists ---------------------------

# nltk_data punkt English: the abbreviation types, sentence starters and collocations
# (lower case, without the final period).
ABBREVIATIONS = frozenset(
    """. . |a.a|a.c|a.d|a.g|a.h|a.m|a.m.e|a.s|a.t|adm|ala|ariz|aug|ave|b.f|b.v|bros|c|c.i.t|
c.o.m.b|c.v|calif|chg|cie|co|col|colo|conn|corp|cos|ct|d|d.c|d.h|d.w|dec|dr|e|e.f|e.h|e.l|e.m|
f|f.g|f.j|feb|fla|fri|ft|g|g.d|g.f|g.k|ga|gen|h|h.c|h.f|h.m|i.m.s|ill|inc|j.b|j.c|j.j|j.k|j.p|
j.r|jan|jr|k|kan|ky|l|l.a|l.f|l.p|lt|ltd|m|m.b.a|m.d.c|m.j|maj|messrs|mg|mich|minn|mr|mrs|ms|
n|n.c|n.d|n.h|n.j|n.m|n.v|n.y|nev|nov|oct|ok|okla|ore|p|p.a.m|p.m|pa|ph.d|prof|r|r.a|r.h|r.i|
r.j|r.k|r.t|rep|reps|s|s.a|s.a.y|s.c|s.g|s.p.a|s.s|sen|sep|sept|sr|st|sw|t|t.j|tenn|tues|u.k|
u.n|u.s|u.s.a|u.s.s.r|v|va|vs|vt|w|w.c|w.r|w.va|w.w|wash|wed|wis|yr""".replace("\n", "").split("|")
)
SENTENCE_STARTERS = frozenset(
    """according although among both but despite even he however i if in indeed instead it
many meanwhile moreover most nevertheless nonetheless nor sales separately similarly since so
some the there these they this though thus under when while yet""".split()
)
COLLOCATIONS = frozenset(
    [("##number##", w) for w in "abreast aes business cbot colgate commodities cooper "
     "corrections credit dividend financing genentech henley insider international leisure "
     "letters notable pay-fone pegasus pepper review rj wedgestone who zimmer".split()]
    + [("b", "edelman"), ("b", "levine"), ("b", "smith"), ("b", "stewart"), ("b", "wigton"),
       ("i", "magnin"), ("i", "toussie"), ("j", "aron"), ("j", "fialka"), ("j", "walter"),
       ("o", "ludcke")]
)  # fmt: skip

# Stands in for Punkt's orthographic statistics (``_ortho``): frequent English words, which
# the English model has seen in lower case; a capitalised word outside this list is taken for
# a name (never seen in lower case).
COMMON_WORDS = frozenset(
    """a about above across additionally after again against all also always an and another
any are as at back be because been before being below best better between both but by can
could did do does doing down during each either else even every first for from further
furthermore get give go good had has have having he her here hers him his how however i if
in instead into is it its just keep last let like make many may maybe me more moreover most
much must my never new next no not now of off often on once one only or other our out over
overall please rather remember same second see she should since so some still such take than
thank thanks that the their them then there therefore these they third this those though
through thus to today too try under unless until up upon us use very was wait we well were
what when where whether which while who why will with within without would yes yet you your
""".split()
)

# Punkt's English language variables (nltk.tokenize.punkt.PunktLanguageVars).
_SENT_END = ".?!"
_NON_WORD = r"(?:[)\";}\]\*:@\'\({\[!?])"
_MULTI_CHAR = r"(?:\-{2,}|\.{2,}|(?:\.\s+){2,}\.)"
_WORD_START = r"[^\(\"\`{\[:;&\#\*@\)}\]\-,]"
_WORD_TOKEN = re.compile(
    rf"""(
        {_MULTI_CHAR}
        |
        (?={_WORD_START})\S+?
        (?=
            \s|$|{_NON_WORD}|{_MULTI_CHAR}|,(?=$|\s|{_NON_WORD}|{_MULTI_CHAR})
        )
        |
        \S
    )""",
    re.UNICODE | re.VERBOSE,
)
_PERIOD_CONTEXT = re.compile(
    rf"[{re.escape(_SENT_END)}](?=(?P<after_tok>{_NON_WORD}|\s+(?P<next_tok>\S+)))",
    re.UNICODE,
)
_REALIGN = re.compile(r'["\')\]}]+?(?:\s+|(?=--)|$)', re.MULTILINE)
_NUMBER = re.compile(r"^-?[\.,]?\d[\d,\.-]*\.?$")
_ELLIPSIS = re.compile(r"\.\.+$")
_INITIAL = re.compile(r"[^\W\d]\.$")
_ORTHO_PUNCT = ";:,.!?"


@dataclass
class _Token:
    tok: str
    sentbreak: bool = False
    abbr: bool = False
    ellipsis: bool = False

    @property
    def type(self) -> str:
        return _NUMBER.sub("##number##", self.tok.lower())

    @property
    def type_no_period(self) -> str:
        t = self.type
        return t[:-1] if len(t) > 1 and t[-1] == "." else t

    @property
    def type_no_sentperiod(self) -> str:
        return self.type_no_period if self.sentbreak else self.type

    @property
    def first_upper(self) -> bool:
        return self.tok[0].isupper()

    @property
    def first_lower(self) -> bool:
        return self.tok[0].islower()


def _first_pass(token: _Token) -> None:
    tok = token.tok
    if tok in _SENT_END:
        token.sentbreak = True
    elif _ELLIPSIS.match(tok):
        token.ellipsis = True
    elif tok.endswith(".") and not tok.endswith(".."):
        stem = tok[:-1].lower()
        if stem in ABBREVIATIONS or stem.split("-")[-1] in ABBREVIATIONS:
            token.abbr = True
        else:
            token.sentbreak = True


def _ortho(token: _Token) -> bool | None:
    """Punkt's orthographic heuristic (does ``token`` start a sentence?) without the English
    model's statistics of where each word was seen capitalised. True: a capitalised frequent
    word (Punkt: seen in lower case and never capitalised mid-sentence); False: punctuation,
    or a word in lower case (Punkt: seen capitalised, or never seen starting a sentence in
    lower case); None: unknown (a capitalised name)."""
    if token.tok in _ORTHO_PUNCT:
        return False
    if token.first_upper and token.type_no_sentperiod in COMMON_WORDS:
        return True
    if token.first_lower:
        return False
    return None


def _second_pass(first: _Token, second: _Token) -> None:
    if not first.tok.endswith("."):
        return
    typ, next_typ = first.type_no_period, second.type_no_sentperiod
    initial = bool(_INITIAL.match(first.tok))
    if (typ, next_typ) in COLLOCATIONS:
        first.sentbreak, first.abbr = False, True
        return
    if (first.abbr or first.ellipsis) and not initial:
        if _ortho(second) is True or (second.first_upper and next_typ in SENTENCE_STARTERS):
            first.sentbreak = True
            return
    if initial or typ == "##number##":
        starts = _ortho(second)
        if starts is False:
            first.sentbreak, first.abbr = False, True
        elif starts is None and initial and second.first_upper:
            # Punkt: a capitalised word never seen in lower case follows an initial (a name).
            first.sentbreak, first.abbr = False, True


def _contains_sentbreak(context: str) -> bool:
    tokens = [_Token(m) for m in _WORD_TOKEN.findall(context)]
    for token in tokens:
        _first_pass(token)
    for first, second in zip(tokens, tokens[1:], strict=False):
        _second_pass(first, second)
    return any(t.sentbreak for t in tokens[:-1])


def _end_contexts(text: str) -> list[tuple[re.Match[str], str]]:
    """Punkt's candidate sentence ends, each with the text it decides on."""
    out: list[tuple[re.Match[str], str]] = []
    previous: tuple[re.Match[str], slice] | None = None
    previous_slice = slice(0, 0)
    for match in _PERIOD_CONTEXT.finditer(text):
        before = text[previous_slice.stop : match.start()]
        spaces = [i for i, c in enumerate(before) if c.isspace()]
        start = spaces[-1] + previous_slice.stop + 1 if spaces else previous_slice.start
        word = slice(start, match.start())
        if previous is not None and previous_slice.stop <= word.start:
            m, s = previous
            out.append((m, text[s] + m.group() + m.group("after_tok")))
        previous, previous_slice = (match, word), word
    if previous is not None:
        m, s = previous
        out.append((m, text[s] + m.group() + m.group("after_tok")))
    return out


def split_sentences(text: str) -> list[str]:
    """The sentences of ``text`` as Punkt (English) splits them, closing quotes realigned."""
    slices: list[slice] = []
    last = 0
    for match, context in _end_contexts(text):
        if _contains_sentbreak(context):
            slices.append(slice(last, match.end()))
            last = match.start("next_tok") if match.group("next_tok") else match.end()
    slices.append(slice(last, len(text.rstrip())))
    out: list[str] = []
    realign = 0
    for i, current in enumerate(slices):
        current = slice(current.start + realign, current.stop)
        following = slices[i + 1] if i + 1 < len(slices) else None
        if following is None:
            if text[current]:
                out.append(text[current])
            continue
        m = _REALIGN.match(text[following])
        if m:
            out.append(text[current.start : following.start + len(m.group(0).rstrip())])
            realign = m.end()
        else:
            realign = 0
            if text[current]:
                out.append(text[current])
    return out


def count_sentences(text: str) -> int:
    """How many sentences Punkt finds in ``text`` (see the module docstring)."""
    return len(split_sentences(text))


# --- word tokens: NLTK's NLTKWordTokenizer ---------------------------------------------------

_STARTING_QUOTES = [
    (re.compile("([«“‘„]|[`]+)"), r" \1 "),
    (re.compile(r"^\""), r"``"),
    (re.compile(r"(``)"), r" \1 "),
    (re.compile(r"([ \(\[{<])(\"|\'{2})"), r"\1 `` "),
    (re.compile(r"(?i)(?<!\w)(\')(?!(?:re|ve|ll|m|t|s|d|n)\b)(?=\w)"), r"\1 "),
]
_ENDING_QUOTES = [
    (re.compile("([»”’])"), r" \1 "),
    (re.compile(r"''"), " '' "),
    (re.compile(r'"'), " '' "),
    (re.compile(r"\s+"), " "),
    (re.compile(r"([^' ])('[sS]|'[mM]|'[dD]|') "), r"\1 \2 "),
    (re.compile(r"([^' ])('ll|'LL|'re|'RE|'ve|'VE|n't|N'T) "), r"\1 \2 "),
]
_PUNCTUATION = [
    (re.compile(r'([^\.])(\.)([\]\)}>"\'' "»”’ " r"]*+)\s*$"), r"\1 \2 \3 "),
    (re.compile(r"([:,])([^\d])"), r" \1 \2"),
    (re.compile(r"([:,])$"), r" \1 "),
    (re.compile(r"\.{2,}"), r" \g<0> "),
    (re.compile(r"[;@#$%&]"), r" \g<0> "),
    (re.compile(r"[\u2012-\u2015]"), r" \g<0> "),
    (re.compile(r'([^\.])(\.)([\]\)}>"\']*)\s*$'), r"\1 \2\3 "),
    (re.compile(r"[?!]"), r" \g<0> "),
    (re.compile(r"([^'])' "), r"\1 ' "),
    (re.compile(r"[*]"), r" \g<0> "),
]
_PARENS = (re.compile(r"[\]\[\(\)\{\}\<\>]"), r" \g<0> ")
_DOUBLE_DASHES = (re.compile(r"--"), r" -- ")
_CONTRACTIONS = [
    re.compile(p)
    for p in (
        r"(?i)\b(can)(?#X)(not)\b",
        r"(?i)\b(d)(?#X)('ye)\b",
        r"(?i)\b(gim)(?#X)(me)\b",
        r"(?i)\b(gon)(?#X)(na)\b",
        r"(?i)\b(got)(?#X)(ta)\b",
        r"(?i)\b(lem)(?#X)(me)\b",
        r"(?i)\b(more)(?#X)('n)\b",
        r"(?i)\b(wan)(?#X)(na)(?=\s)",
        r"(?i) ('t)(?#X)(is)\b",
        r"(?i) ('t)(?#X)(was)\b",
    )
]


def word_tokens(text: str) -> list[str]:
    """``text`` split as NLTK's ``NLTKWordTokenizer`` splits one sentence."""
    for regexp, substitution in _STARTING_QUOTES:
        text = regexp.sub(substitution, text)
    for regexp, substitution in _PUNCTUATION:
        text = regexp.sub(substitution, text)
    text = _PARENS[0].sub(_PARENS[1], text)
    text = _DOUBLE_DASHES[0].sub(_DOUBLE_DASHES[1], text)
    text = " " + text + " "
    for regexp, substitution in _ENDING_QUOTES:
        text = regexp.sub(substitution, text)
    for regexp in _CONTRACTIONS:
        text = regexp.sub(r" \1 \2 ", text)
    return text.split()


# --- language --------------------------------------------------------------------------------


@cache
def _detector_factory() -> Any:
    from langdetect import DetectorFactory

    DetectorFactory.seed = 0  # langdetect samples; seeded, a response always gets one answer
    from langdetect import detector_factory

    detector_factory.init_factory()
    return detector_factory._factory


def detect_language(text: str) -> str | None:
    """``langdetect``'s language code for ``text`` (``zh-cn``, ``en`` …); None if it cannot
    tell (no letters), which the reference counts as the instruction followed."""
    from langdetect.lang_detect_exception import LangDetectException

    factory = _detector_factory()
    try:
        detector = factory.create()
        detector.append(text)
        return str(detector.detect())
    except LangDetectException:
        return None
