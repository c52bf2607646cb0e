"""Check that lm-eval built, item by item, exactly the requests forgetguard's suites hold.

Reads the ``samples_*.jsonl`` that ``lm-eval run --log_samples`` wrote for the tasks of
``make_tasks.py`` and compares each logged (context, continuation) with the ``lm-eval``
rendering of the same item in the pulled suite (description + context, target delimiter +
choice; partial scoring: description + contexts[i], delimiter + continuation). Prints every
item's log-likelihoods as lm-eval computed them, and exits 1 on any difference.

    .venv/bin/python benchmarks/lmeval/compare_requests.py var/lmeval/out
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from app.core.config import get_settings  # noqa: E402
from app.suites.benchmarks.items import ChoiceItem  # noqa: E402
from app.suites.benchmarks.pull import load, suite_path  # noqa: E402

TASKS = {
    "arc_easy_local": "arc-easy",
    "arc_challenge_local": "arc-challenge",
    "hellaswag_local": "hellaswag",
    "winogrande_local": "winogrande",
}
SAMPLES = re.compile(r"samples_(?P<task>.+)_\d{4}-\d\d-\d\dT[\d.-]+\.jsonl$")


def requests(item: ChoiceItem, delimiter: str = " ") -> list[tuple[str, str]]:
    r = item.renderings["lm-eval"]
    if r.contexts is not None and r.continuation is not None:
        return [(r.description + c, delimiter + r.continuation) for c in r.contexts]
    return [(r.description + (r.context or ""), delimiter + c) for c in r.choices or []]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("output", type=Path, help="lm-eval's --output_path")
    parser.add_argument("--benchmarks-dir", type=Path, default=None)
    args = parser.parse_args()
    where = args.benchmarks_dir or get_settings().benchmarks_dir
    suites: dict[str, list[ChoiceItem]] = {}
    same = differ = 0
    for path in sorted(args.output.rglob("samples_*.jsonl")):
        match = SAMPLES.search(path.name)
        if not match:
            continue
        task = match["task"]
        subject = re.fullmatch(r"mmlu_(.+)_local", task)
        name = "mmlu" if subject else TASKS.get(task)
        if name is None:
            continue
        if name not in suites:
            suites[name] = list(load(suite_path(where, name)).items)
        items = [i for i in suites[name] if not subject or i.category == subject[1]]
        for line in path.read_text(encoding="utf-8").splitlines():
            sample = json.loads(line)
            doc = int(sample["doc_id"])
            logged = [(a["arg_0"], a["arg_1"]) for a in sample["arguments"].values()]
            lls = [float(r[0][0]) for r in sample["resps"]]
            ok = logged == requests(items[doc])
            same, differ = same + ok, differ + (not ok)
            metrics = {k: sample[k] for k in ("acc", "acc_norm") if k in sample}
            print(f"{task} doc {doc}: {'same' if ok else 'DIFFERENT'} lls {lls} {metrics}")
    print(f"{same} of {same + differ} items: lm-eval's requests equal the suite's renderings")
    return 0 if differ == 0 and same > 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
