"""The standard benchmarks against the peers, in one run: published numbers, lm-eval's per-item
agreement, and log-likelihood throughput, each with the machine it ran on.

    .venv/bin/forgetguard benchmarks pull mmlu arc-easy arc-challenge hellaswag winogrande
    make lmeval && .venv/bin/python benchmarks/lmeval/make_tasks.py
    .venv/bin/python benchmarks/standard_benchmarks.py [--sample 500] [--agreement 200]
        [--throughput 300 --repeats 3]

a. **Published numbers.** The reference model with SmolLM2-135M-Instruct's card settings
   (lighteval's prompts, chat template, 0-shot, ``acc_norm_nospace``) on a seeded sample,
   stratified by category, of HellaSwag validation, ARC-Easy and ARC-Challenge test and MMLU
   test (``--sample 0``: every item), with a 95 % Wilson interval, beside the card's 40.9 /
   37.3 / 29.3.
b. **lm-eval agreement.** lm-eval 0.4.13's HF backend (``.venv-lmeval``) on its own task
   definitions over the same local files (``benchmarks/lmeval/make_tasks.py``), and forgetguard
   on the same items with the ``lm-eval`` convention in plain format: the first
   ``--agreement`` documents of each task (MMLU: the first ``--mmlu-per-subject`` of each
   subject). Per item, ``acc`` and ``acc_norm`` must agree; every disagreement is listed with
   both sides' log-likelihoods.
c. **Throughput.** The first ``--throughput`` HellaSwag items, each engine in a process of its
   own from start to results (``--repeats`` times, the median reported), answers compared.

Writes ``benchmarks/results/standard_benchmarks.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from app.suites.references import stratified_sample  # noqa: E402
from benchmarks.machine import describe, line  # noqa: E402

MODEL = REPO / "models" / "smollm2-135m-instruct"
BENCHMARKS_DIR = REPO / "var" / "benchmarks"
TASKS_DIR = REPO / "var" / "lmeval" / "tasks"
# SmolLM2-135M-Instruct's model card (lighteval, chat template, 0-shot, acc_norm_nospace).
PUBLISHED = {"HellaSwag": 40.9, "ARC (Easy + Challenge) / 2": 37.3, "MMLU (cloze)": 29.3}
CARD = {"HellaSwag": ["hellaswag"], "ARC (Easy + Challenge) / 2": ["arc-easy", "arc-challenge"],
        "MMLU (cloze)": ["mmlu"]}  # fmt: skip
LMEVAL_TASKS = {
    "arc-easy": "arc_easy_local",
    "arc-challenge": "arc_challenge_local",
    "hellaswag": "hellaswag_local",
    "winogrande": "winogrande_local",
}


def suite(name: str) -> dict[str, Any]:
    path = BENCHMARKS_DIR / f"{name}.json"
    if not path.is_file():
        raise SystemExit(f"{path} is missing: run `forgetguard benchmarks pull {name}`")
    return json.loads(path.read_text(encoding="utf-8"))  # type: ignore[no-any-return]


def run(definition: dict[str, Any], items: list[Any], fmt: str, convention: str) -> list[Any]:
    """forgetguard's rows for ``items`` of a suite (the worker's drivers, in this process)."""
    import torch

    from workers.engine.loading import load_model, load_tokenizer
    from workers.evaluation.inprocess import run_suites

    global _loaded
    if _loaded is None:
        _loaded = (load_tokenizer(MODEL), load_model(MODEL, torch.device("cpu")))
    tok, model = _loaded
    subset = {**definition, "items": items, "default_convention": convention}
    return run_suites(model, tok, [subset], prompt_format=fmt)


_loaded: tuple[Any, Any] | None = None


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


# --- a. published numbers ---------------------------------------------------------------


def published(sample: int) -> dict[str, Any]:
    per_suite: dict[str, Any] = {}
    for names in CARD.values():
        for name in names:
            definition = suite(name)
            items = definition["items"]
            chosen = stratified_sample(items, sample, 0) if 0 < sample < len(items) else items
            start = time.perf_counter()
            rows = run(definition, chosen, "chat", "lighteval")
            k = sum(bool(r.passed) for r in rows)
            per_suite[name] = {
                "n": len(rows),
                "of": len(items),
                "correct": k,
                "acc_norm_nospace": k / len(rows),
                "ci95": wilson(k, len(rows)),
                "seconds": time.perf_counter() - start,
            }
            print(f"{name}: {k}/{len(rows)}", flush=True)
    table = {}
    for label, names in CARD.items():
        entries = [per_suite[n] for n in names]
        value = sum(e["acc_norm_nospace"] for e in entries) / len(entries)
        low = sum(e["ci95"][0] for e in entries) / len(entries)
        high = sum(e["ci95"][1] for e in entries) / len(entries)
        table[label] = {
            "published": PUBLISHED[label],
            "forgetguard": 100 * value,
            "ci95": [100 * low, 100 * high],
            "gap": 100 * value - PUBLISHED[label],
            "n": sum(e["n"] for e in entries),
        }
    return {"suites": per_suite, "table": table}


# --- b. lm-eval agreement -----------------------------------------------------------------


def lm_eval(venv: Path, tasks: list[str], limit: int, out: Path) -> tuple[dict[str, Any], float]:
    """Run lm-eval's HF backend; its per-task samples by doc id, and the wall time."""
    command = [
        str(venv / "bin" / "lm-eval"), "run", "--include_path", str(TASKS_DIR),
        "--tasks", ",".join(tasks), "--limit", str(limit), "--model", "hf",
        "--model_args", f"pretrained={MODEL},dtype=float32", "--device", "cpu",
        "--batch_size", "16", "--log_samples", "--output_path", str(out),
    ]  # fmt: skip
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    start = time.perf_counter()
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"lm-eval failed:\n{done.stderr[-3000:]}")
    samples: dict[str, Any] = {}
    for path in out.rglob("samples_*.jsonl"):
        task = path.name.removeprefix("samples_").rsplit("_", 1)[0]
        samples[task] = {
            s["doc_id"]: s for s in map(json.loads, path.read_text().splitlines()) if s
        }
    return samples, seconds


def _compare(rows: list[Any], lm: dict[int, Any]) -> dict[str, Any]:
    """Per item: both sides' acc (and acc_norm where lm-eval reports it), disagreements listed."""
    agree: dict[str, int] = {}
    listed = []
    worst = 0.0
    for doc_id, row in enumerate(rows):
        theirs = lm[doc_id]
        ours = row.details
        lls = [float(r[0]) for r in theirs["filtered_resps"]]
        worst = max(worst, max(abs(a - b) for a, b in zip(lls, ours["logliks"], strict=True)))
        for metric in ("acc", "acc_norm"):
            if metric not in theirs:
                continue
            same = bool(theirs[metric]) == bool(ours["correct"][metric])
            agree[metric] = agree.get(metric, 0) + same
            if not same:
                listed.append(
                    {
                        "item": row.item_id,
                        "metric": metric,
                        "lm_eval": lls,
                        "forgetguard": ours["logliks"],
                        "gold": ours["gold"],
                    }
                )
    n = len(rows)
    return {
        "n": n,
        "agree": {m: {"items": k, "rate": k / n} for m, k in agree.items()},
        "max_abs_loglik_diff": worst,
        "disagreements": listed,
    }


def agreement(venv: Path, limit: int, per_subject: int, work: Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    samples, seconds = lm_eval(venv, list(LMEVAL_TASKS.values()), limit, work / "agree")
    for name, task in LMEVAL_TASKS.items():
        definition = suite(name)
        items = definition["items"][:limit]
        out[name] = _compare(run(definition, items, "plain", "lm-eval"), samples[task])
        print(f"{name}: {out[name]['agree']}", flush=True)
    if per_subject:
        samples, _ = lm_eval(venv, ["mmlu_local"], per_subject, work / "mmlu")
        definition = suite("mmlu")
        by_subject: dict[str, list[Any]] = {}
        for item in definition["items"]:
            by_subject.setdefault(item["category"], []).append(item)
        rows, docs = [], {}
        for subject, items in sorted(by_subject.items()):
            for item in items[:per_subject]:
                docs[len(docs)] = samples[f"mmlu_{subject}_local"][int(item["id"].split("/")[1])]
            rows += run(definition, items[:per_subject], "plain", "lm-eval")
        out["mmlu"] = _compare(rows, docs)
        print(f"mmlu: {out['mmlu']['agree']}", flush=True)
    return {"lm_eval_seconds": seconds, "benchmarks": out}


# --- c. throughput ------------------------------------------------------------------------


def _time_forgetguard(n: int) -> None:
    """In a process of its own: load, score the first n HellaSwag items, print the timings."""
    start = time.perf_counter()
    definition = suite("hellaswag")
    rows = run(definition, definition["items"][:n], "plain", "lm-eval")
    print(json.dumps({"seconds": time.perf_counter() - start,
                      "acc": [bool(r.details["correct"]["acc"]) for r in rows]}))  # fmt: skip


def throughput(venv: Path, n: int, repeats: int, work: Path) -> dict[str, Any]:
    ours, theirs = [], []
    answers: dict[str, Any] = {}
    for k in range(repeats):
        done = subprocess.run(
            [sys.executable, __file__, "--time-forgetguard", str(n)],
            cwd=REPO, capture_output=True, text=True, check=True,
        )  # fmt: skip
        result = json.loads(done.stdout.strip().splitlines()[-1])
        ours.append(result["seconds"])
        answers["forgetguard"] = result["acc"]
        samples, seconds = lm_eval(venv, ["hellaswag_local"], n, work / f"speed{k}")
        theirs.append(seconds)
        docs = samples["hellaswag_local"]
        answers["lm_eval"] = [bool(docs[i]["acc"]) for i in range(n)]
        print(f"repeat {k + 1}: forgetguard {ours[-1]:.1f} s, lm-eval {theirs[-1]:.1f} s")
    same = sum(a == b for a, b in zip(answers["forgetguard"], answers["lm_eval"], strict=True))
    return {
        "items": n,
        "requests": 4 * n,
        "repeats": repeats,
        "forgetguard_transformers_s": ours,
        "lm_eval_hf_s": theirs,
        "median_ratio": statistics.median(theirs) / statistics.median(ours),
        "same_acc": same,
    }


# --- report -------------------------------------------------------------------------------


def markdown(result: dict[str, Any]) -> str:
    lines = [f"Machine: {line(result['machine'])}.", ""]
    if "published" in result:
        lines += [
            "**a. Published numbers** (SmolLM2-135M-Instruct card: lighteval, chat template, "
            "0-shot, acc_norm_nospace; forgetguard on the reference model, Q4_1 dequantised to "
            "float32, on a seeded stratified sample with a 95 % Wilson interval)",
            "",
            "| benchmark | card | forgetguard | 95 % CI | gap | items |",
            "|---|---|---|---|---|---|",
        ]
        for label, e in result["published"]["table"].items():
            lines.append(
                f"| {label} | {e['published']:.1f} | {e['forgetguard']:.1f} | "
                f"{e['ci95'][0]:.1f}–{e['ci95'][1]:.1f} | {e['gap']:+.1f} | {e['n']} |"
            )
        lines.append("")
    if "agreement" in result:
        lines += [
            "**b. lm-eval 0.4.13 agreement** (its HF backend and task definitions over the same "
            "files; forgetguard with the lm-eval convention, plain prompts; per item)",
            "",
            "| benchmark | items | acc agree | acc_norm agree | max abs Δ log-likelihood |",
            "|---|---|---|---|---|",
        ]
        for name, e in result["agreement"]["benchmarks"].items():
            cells = [
                f"{e['agree'][m]['items']}/{e['n']} ({100 * e['agree'][m]['rate']:.1f} %)"
                if m in e["agree"]
                else "not reported by lm-eval"
                for m in ("acc", "acc_norm")
            ]
            lines.append(
                f"| {name} | {e['n']} | {cells[0]} | {cells[1]} | {e['max_abs_loglik_diff']:.2e} |"
            )
        lines.append("")
        for name, e in result["agreement"]["benchmarks"].items():
            for d in e["disagreements"]:
                gold = d["gold"]
                lines.append(
                    f"- {name} `{d['item']}` ({d['metric']}): lm-eval {d['lm_eval']}, forgetguard "
                    f"{d['forgetguard']}, gold {gold}"
                )
        lines.append("")
    if "throughput" in result:
        t = result["throughput"]
        lines += [
            f"**c. Throughput** (the first {t['items']} HellaSwag items, {t['requests']} "
            f"log-likelihood requests, each engine a process of its own from start to results, "
            f"{t['repeats']} repeats)",
            "",
            "| engine | seconds (each repeat) | median |",
            "|---|---|---|",
            *(
                f"| {engine} | {', '.join(f'{s:.1f}' for s in t[key])} "
                f"| {statistics.median(t[key]):.1f} |"
                for engine, key in (
                    ("forgetguard transformers", "forgetguard_transformers_s"),
                    ("lm-eval HF", "lm_eval_hf_s"),
                )
            ),
            "",
            f"forgetguard is **{t['median_ratio']:.2f}×** lm-eval's HF backend; acc agrees on "
            f"{t['same_acc']}/{t['items']} items.",
        ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sample", type=int, default=500, help="items per benchmark for (a)")
    parser.add_argument("--agreement", type=int, default=200, help="documents per task for (b)")
    parser.add_argument("--mmlu-per-subject", type=int, default=3)
    parser.add_argument("--throughput", type=int, default=300, help="HellaSwag items for (c)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--lm-eval-venv", type=Path, default=REPO / ".venv-lmeval")
    parser.add_argument("--only", choices=["published", "agreement", "throughput"], nargs="*")
    parser.add_argument("--time-forgetguard", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.time_forgetguard:
        _time_forgetguard(args.time_forgetguard)
        return
    only = set(args.only or ["published", "agreement", "throughput"])
    lm_version = subprocess.run(
        [str(args.lm_eval_venv / "bin" / "python"), "-c",
         "import importlib.metadata as m; print(m.version('lm_eval'))"],
        capture_output=True, text=True,
    ).stdout.strip() or None  # fmt: skip
    result: dict[str, Any] = {"machine": describe(lm_eval=lm_version), "settings": dict(vars(args))}
    result["settings"]["lm_eval_venv"] = str(args.lm_eval_venv.relative_to(REPO))
    with tempfile.TemporaryDirectory() as tmp:
        if "published" in only:
            result["published"] = published(args.sample)
        if "agreement" in only:
            result["agreement"] = agreement(
                args.lm_eval_venv, args.agreement, args.mmlu_per_subject, Path(tmp)
            )
        if "throughput" in only:
            result["throughput"] = throughput(
                args.lm_eval_venv, args.throughput, args.repeats, Path(tmp)
            )
    out = REPO / "benchmarks" / "results"
    previous = out / "standard_benchmarks.json"
    if args.only and previous.is_file():  # a partial run keeps the other sections' results
        result = {**json.loads(previous.read_text()), **result}
    (out / "standard_benchmarks.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "standard_benchmarks.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
