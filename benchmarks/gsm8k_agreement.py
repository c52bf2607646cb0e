"""GSM8K answer extraction: forgetguard against lm-evaluation-harness 0.4.13's own code.

    python benchmarks/gsm8k_agreement.py --lmeval-python PATH [--responses ROWS.tmp]

``PATH`` is the Python of a venv with ``lm-eval==0.4.13`` (``python -m venv V &&
V/bin/pip install lm-eval==0.4.13 --no-deps`` and what its filters import: numpy, pyyaml).
A subprocess there reads lm-eval's ``tasks/gsm8k/gsm8k.yaml``, builds its two filter chains
(``RegexFilter`` + ``TakeFirstFilter``) and scores each filtered answer with ``exact_match``
with the yaml's own arguments; forgetguard's ``gen_benchmark`` extraction reads the same
responses here. ``--responses`` adds the responses of a ``benchmarks/gsm8k_reference.py`` run.

Writes ``benchmarks/results/gsm8k_agreement.{json,md}``; ``tests/suites/test_gen_benchmark.py``
pins forgetguard's extraction to the lm-eval outputs stored there, without lm-eval.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from app.suites.kinds.gen_benchmark import exact_match, extract  # noqa: E402

RESULTS = REPO / "benchmarks" / "results" / "gsm8k_agreement"

# (case id, model response, reference solution): hand-written around what the filters and the
# ignore-regexes treat specially.
CASES: list[tuple[str, str, str]] = [
    ("plain", "She makes 9 * 2 = $18.\n#### 18", "Janet makes 9 * 2 = 18\n#### 18"),
    ("cot-so-the-answer-is", "9 * 2 = 18. So the answer is 18.", "#### 18"),
    ("comma-thousands", "The total is $1,000.\n#### 1,000", "#### 1000"),
    ("comma-millions-flexible", "The total is 1,234,567.", "#### 1234567"),
    ("decimal-zeros", "#### 1000.00", "#### 1000"),
    ("decimal", "It takes 1.5 hours.\n#### 1.5", "#### 1.5"),
    ("negative", "The change is -5.\n#### -5", "#### -5"),
    ("negative-flexible", "So the temperature fell to -12", "#### -12"),
    ("negative-zero", "#### -0", "#### 0"),
    ("no-number", "I do not know how to solve this.", "#### 7"),
    ("empty", "", "#### 7"),
    ("several-hashes", "#### 3\nWait, recompute.\n#### 4", "#### 4"),
    ("several-hashes-first-right", "#### 3\n#### 4", "#### 3"),
    ("trailing-period-strict", "#### 5.", "#### 5"),
    ("two-periods", "#### 5..", "#### 5"),
    ("dollar-strict", "#### $18", "#### 18"),
    ("dollar-flexible", "It costs $18", "#### 18"),
    ("dollar-space", "It costs $ 5", "#### 5"),
    ("no-space-after-hashes", "####18", "#### 18"),
    ("single-digit", "The answer is 7", "#### 7"),
    ("last-number-wins", "18 dollars and 2 cents", "#### 18"),
    ("dots-only", "Thinking...", "#### 7"),
    ("commas-only-strict", "#### ,,,", "#### 5"),
    ("dash-only", "The answer is -", "#### 5"),
    ("units-after", "#### 18 apples", "#### 18"),
    ("arabic-digits", "#### ١٨", "#### 18"),
    ("trailing-newlines", "Answer: 10.\n\n", "#### 10"),
    ("calculator-annotation", "2 * 3 = <<2*3=6>>6\n#### 6", "2 * 3 = <<2*3=6>>6\n#### 6"),
    ("reference-with-comma", "#### 1000", "#### 1,000"),
    ("percent", "The discount is 25%", "#### 25"),
    ("fraction", "Each gets 3/4", "#### 0.75"),
    ("leading-zero", "#### 007", "#### 7"),
    ("multiline-hash", "So:\n#### 12\nQuestion", "#### 12"),
    ("upper-case-invalid", "#### [INVALID]", "#### 3"),
    ("huge", "#### " + "1" * 60, "#### " + "1" * 60),
]

LMEVAL_PROGRAM = r"""
import json, sys
from pathlib import Path
import yaml
import lm_eval
from lm_eval.filters.extraction import RegexFilter
from lm_eval.filters.selection import TakeFirstFilter
from lm_eval.api.metrics import exact_match_hf_evaluate

task = Path(lm_eval.__file__).parent / "tasks" / "gsm8k" / "gsm8k.yaml"
config = yaml.safe_load(task.read_text())
metric = dict(config["metric_list"][0])
assert metric.pop("metric") == "exact_match"
for key in ("aggregation", "higher_is_better"):
    metric.pop(key)
chains = {}
for entry in config["filter_list"]:
    steps = []
    for step in entry["filter"]:
        kwargs = {k: v for k, v in step.items() if k != "function"}
        make = {"regex": RegexFilter, "take_first": TakeFirstFilter}[step["function"]]
        steps.append(make(**kwargs))
    chains[entry["name"]] = steps
cases = json.load(sys.stdin)
out = {"version": lm_eval.__version__ if hasattr(lm_eval, "__version__") else None,
       "metric_kwargs": metric, "until": config["generation_kwargs"]["until"], "cases": []}
for case in cases:
    row = {"id": case["id"], "filtered": {}, "exact_match": {}}
    for name, steps in chains.items():
        resps = [[case["response"]]]
        for step in steps:
            resps = list(step.apply(resps, [case]))
        (value,) = resps
        row["filtered"][name] = value
        score = exact_match_hf_evaluate(
            predictions=[value], references=[case["reference"]], **metric
        )["exact_match"]
        row["exact_match"][name] = bool(score == 1.0)
    out["cases"].append(row)
json.dump(out, sys.stdout)
"""


def run_lmeval(python: str, cases: list[dict[str, str]]) -> dict[str, Any]:
    """lm-eval's filters and metric on ``cases``, in the lm-eval venv."""
    version = subprocess.run(
        [python, "-c", "import importlib.metadata as m; print(m.version('lm_eval'))"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    done = subprocess.run(
        [python, "-c", LMEVAL_PROGRAM],
        input=json.dumps(cases),
        check=True,
        capture_output=True,
        text=True,
    )
    result: dict[str, Any] = json.loads(done.stdout)
    result["version"] = version
    return result


def forgetguard(case: dict[str, str]) -> dict[str, Any]:
    """forgetguard's ``gen_benchmark`` extraction and exact_match of one case."""
    filtered = extract(case["response"])
    return {
        "filtered": filtered,
        "exact_match": {k: exact_match(v, case["reference"]) for k, v in filtered.items()},
    }


def model_cases(path: Path) -> list[dict[str, str]]:
    """Responses and references of a ``gsm8k_reference.py`` run (its ``.tmp`` rows)."""
    suite = json.loads((REPO / "var" / "benchmarks" / "gsm8k.json").read_text(encoding="utf-8"))
    answers = {item["id"]: item["answer"] for item in suite["items"]}
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    return [
        {
            "id": f"model-{r['item_id']}",
            "response": r["response"],
            "reference": answers[r["item_id"]],
        }
        for r in rows
    ]


def report(result: dict[str, Any]) -> str:
    cases = result["cases"]
    agree = sum(c["agree"] for c in cases)
    lines = [
        "# GSM8K extraction: forgetguard vs lm-evaluation-harness",
        "",
        f"lm-eval {result['lmeval_version']} `tasks/gsm8k/gsm8k.yaml`: filters `strict-match` and "
        f"`flexible-extract` (`RegexFilter` + `TakeFirstFilter`), `exact_match` with "
        f"`{json.dumps(result['metric_kwargs'])}`, run by lm-eval's own code; forgetguard's "
        "`app/suites/kinds/gen_benchmark.py` on the same responses.",
        "",
        f"**{agree} of {len(cases)} cases agree** on both filtered answers and both exact_match "
        f"values ({sum(c['id'].startswith('model-') for c in cases)} of them responses of the "
        "reference model, the rest hand-written).",
        "",
        "| case | strict-match | flexible-extract | exact_match (strict, flexible) | agree |",
        "|---|---|---|---|---|",
    ]
    for c in cases:
        if c["id"].startswith("model-"):
            continue
        lm = c["lmeval"]
        lines.append(
            f"| {c['id']} | `{lm['filtered']['strict-match']}` | "
            f"`{lm['filtered']['flexible-extract']}` | "
            f"{lm['exact_match']['strict-match']}, {lm['exact_match']['flexible-extract']} | "
            f"{'yes' if c['agree'] else '**no**'} |"
        )
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--lmeval-python", required=True, help="python of the lm-eval venv")
    parser.add_argument("--responses", type=Path, help="rows of a gsm8k_reference.py run")
    args = parser.parse_args()

    cases = [{"id": i, "response": r, "reference": ref} for i, r, ref in CASES]
    if args.responses:
        cases += model_cases(args.responses)
    lm = run_lmeval(args.lmeval_python, cases)
    rows = []
    for case, theirs in zip(cases, lm["cases"], strict=True):
        ours = forgetguard(case)
        theirs = {"filtered": theirs["filtered"], "exact_match": theirs["exact_match"]}
        rows.append({**case, "lmeval": theirs, "forgetguard": ours, "agree": ours == theirs})
    result = {
        "lmeval_version": lm["version"],
        "metric_kwargs": lm["metric_kwargs"],
        "until": lm["until"],
        "cases": rows,
    }
    RESULTS.with_suffix(".json").write_text(
        json.dumps(result, indent=1, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    RESULTS.with_suffix(".md").write_text(report(result), encoding="utf-8")
    disagree = [r["id"] for r in rows if not r["agree"]]
    print(
        f"{len(rows) - len(disagree)} of {len(rows)} agree"
        + (f"; differ: {disagree}" if disagree else "")
    )
    return 1 if disagree else 0


if __name__ == "__main__":
    raise SystemExit(main())
