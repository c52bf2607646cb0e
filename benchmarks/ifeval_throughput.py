"""IFEval generation time on the reference model: forgetguard's transformers engine, its vLLM
backend and lm-evaluation-harness's HF backend, in one run, with the answers compared item by
item.

Every engine answers the same seeded sample of the pulled ``ifeval`` suite
(``forgetguard benchmarks pull ifeval``) as the suite asks it: the chat template, greedy, the
suite's ``max_new_tokens`` (1,280), no stop string but the model's end of turn. Each runs in a
child process of its own, one after the other, in the environment a user would run it from:

* ``transformers``: forgetguard's engine in the main venv (``.venv``), through the worker's
  own driver and scorer (``workers.evaluation.scoring.run_items``), float32;
* ``vllm``: forgetguard's vLLM backend in ``.venv-vllm`` (``make vllm``), the same driver,
  float32, eager;
* ``lm-eval``: lm-eval 0.4.13's HF backend in ``.venv-lmeval`` (``make lmeval``), on its own
  ``ifeval`` task definition with the documents read from the same sample
  (``benchmarks/lmeval/ifeval_generate.py``), ``--apply_chat_template``, float32.

All get the same thread count (``--threads``, default: the cores this process may use) and
``OMP_WAIT_POLICY=PASSIVE``. Start-up (import and model load or engine start) is timed apart;
one short untimed warm-up call precedes one timed pass over the sample. forgetguard's timing is
its driver's whole call (prompt rendering, generation, scoring); lm-eval's is its
``generate_until`` call (what its evaluator spends generating). Generated tokens are each
stripped response re-encoded by the model's tokenizer, the same count for every engine.
Agreement is per item against the transformers engine: byte-identical stripped responses, and
the same prompt-level strict verdict by forgetguard's IFEval checker (lm-eval's responses are
scored by the same checker, so a verdict differs only where a response does).

Writes ``ifeval_throughput.{json,md}`` under ``--out``. Run it with the main venv's python::

    python benchmarks/ifeval_throughput.py [--sample 100] [--seed 0]
        [--engines transformers,vllm,lm-eval] [--lmeval-batch-size 16] [--threads N]
        [--model models/smollm2-135m-instruct] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.machine import describe, line  # noqa: E402

SUITE = REPO / "var/benchmarks/ifeval.json"
WORK = REPO / "var/ifeval_throughput"
VENVS = {"transformers": ".venv", "vllm": ".venv-vllm", "lm-eval": ".venv-lmeval"}
LABELS = {
    "transformers": "forgetguard transformers engine",
    "vllm": "forgetguard vLLM backend",
    "lm-eval": "lm-eval HF backend",
}
WARMUP_TOKENS = 16


def _available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def load_suite(path: Path = SUITE) -> dict[str, Any]:
    if not path.is_file():
        raise SystemExit(f"{path} is missing: run `forgetguard benchmarks pull ifeval`")
    suite: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return suite


def sample_items(suite: dict[str, Any], n: int, seed: int) -> list[dict[str, Any]]:
    """``n`` items drawn with ``random.Random(seed)``, in the order drawn."""
    items: list[dict[str, Any]] = suite["items"]
    return random.Random(seed).sample(items, min(n, len(items)))


# --- children ---------------------------------------------------------------------------------


def _result(payload: dict[str, Any]) -> None:
    payload["peak_rss_gib"] = round(
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30, 2
    )
    print("RESULT " + json.dumps(payload), flush=True)


def forgetguard_child(backend: str, model: Path, sample: Path, threads: int) -> None:
    """One forgetguard backend on the sample through the worker's driver; prints RESULT."""
    from workers.engine.process import configure_process

    configure_process()
    started = time.perf_counter()
    import torch

    from workers.engine.base import Prompt
    from workers.engine.loading import load_tokenizer

    torch.set_num_threads(threads)
    engine: Any
    if backend == "transformers":
        import transformers

        from workers.engine.loading import load_model
        from workers.engine.transformers_backend import TransformersBackend

        engine = TransformersBackend(
            load_model(model, torch.device("cpu"), dtype=torch.float32), load_tokenizer(model)
        )
        version = f"transformers {transformers.__version__}"
    else:
        from workers.engine import vllm_backend

        cache = vllm_backend.EngineCache(vllm_backend.VLLMSettings(dtype="float32"))
        engine = vllm_backend.VLLMBackend(
            cache.get(model, "ifeval-bench", lambda: load_tokenizer(model))
        )
        version = vllm_backend.engine_version()
    startup = time.perf_counter() - started

    from app.suites.kinds import validate_suite
    from workers.evaluation.scoring import RunSettings, run_items

    suite = validate_suite(json.loads(sample.read_text(encoding="utf-8"))).model_dump(mode="json")
    # What an evaluation asks by default: chat format (the model has a template), no stop
    # strings of its own; the suite's max_new_tokens replaces the evaluation's.
    settings = RunSettings(prompt_format="chat", max_new_tokens=50, stop=())
    engine.generate([Prompt("Say hello.", True)] * 2, max_new_tokens=WARMUP_TOKENS)  # untimed
    rows: list[dict[str, Any]] = []
    started = time.perf_counter()
    run_items("ifeval", engine, suite, list(enumerate(suite["items"])), settings, rows.extend)
    generation = time.perf_counter() - started
    _result(
        {
            "engine": backend,
            "version": version,
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "startup_s": round(startup, 2),
            "generation_s": round(generation, 2),
            "responses": {r["item_id"]: r["response"] for r in rows},
        }
    )


def run_child(engine: str, args: argparse.Namespace, sample: Path) -> dict[str, Any]:
    python = REPO / VENVS[engine] / "bin" / "python"
    if not python.is_file():
        make = {"transformers": "make install", "vllm": "make vllm", "lm-eval": "make lmeval"}
        raise SystemExit(f"{python} is missing: {make[engine]}")
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": str(args.threads)}
    env.update({"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    if engine == "lm-eval":
        command = [str(python), str(REPO / "benchmarks/lmeval/ifeval_generate.py")]
        command += ["--model", str(args.model), "--docs", str(sample.with_suffix(".jsonl"))]
        command += ["--batch-size", str(args.lmeval_batch_size), "--threads", str(args.threads)]
    else:
        command = [str(python), __file__, "--child", engine, "--model", str(args.model)]
        command += ["--threads", str(args.threads), "--sample-file", str(sample)]
        if engine == "vllm":
            env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
            # vLLM's CPU threads, bound to as many cores as the others use.
            env.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{args.threads - 1}")
    print(f"running {engine} …", file=sys.stderr, flush=True)
    started = time.perf_counter()
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, check=False)
    lines = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        print(done.stdout[-2000:], done.stderr[-6000:], file=sys.stderr)
        raise SystemExit(f"{engine} failed with exit status {done.returncode}")
    result: dict[str, Any] = json.loads(lines[-1].removeprefix("RESULT "))
    result["process_s"] = round(time.perf_counter() - started, 2)
    if engine == "vllm":
        result["omp_threads_bind"] = env["VLLM_CPU_OMP_THREADS_BIND"]
    print(
        f"{engine}: start-up {result['startup_s']} s, generation {result['generation_s']} s",
        file=sys.stderr,
        flush=True,
    )
    return result


# --- comparison -------------------------------------------------------------------------------


def chat_text(tokenizer: Any, prompt: str) -> str:
    """The text forgetguard's engines feed the model for an IFEval prompt."""
    from workers.engine.base import Prompt
    from workers.engine.transformers_backend import _prompt_text

    return _prompt_text(tokenizer, Prompt(prompt, True))[0]


def first_difference(a: str, b: str) -> dict[str, Any]:
    """Where two responses part: the character offset and a little of each side."""
    pairs = enumerate(zip(a, b, strict=False))
    at = next((i for i, (x, y) in pairs if x != y), min(len(a), len(b)))
    return {"at_char": at, "reference": a[at : at + 60], "this": b[at : at + 60]}


def compare(
    items: list[dict[str, Any]], runs: list[dict[str, Any]], tokenizer: Any
) -> dict[str, Any]:
    """Per engine: tokens, rates, ratios, and item-by-item agreement with the first engine."""
    from app.suites.kinds.ifeval import score_ifeval

    def tokens(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False).input_ids)

    for run in runs:
        responses = run["responses"]
        run["responses"] = {i["id"]: responses[i["id"]].strip() for i in items}
        run["tokens"] = {k: tokens(v) for k, v in run["responses"].items()}
        run["verdicts"] = {i["id"]: score_ifeval(i, [run["responses"][i["id"]]], {}) for i in items}
    reference = runs[0]
    out: dict[str, Any] = {}
    for run in runs:
        generated = sum(run["tokens"].values())
        strict = [run["verdicts"][i["id"]]["passed"] for i in items]
        same_text, same_verdict, differs = 0, 0, []
        for item in items:
            key = item["id"]
            a, b = reference["responses"][key], run["responses"][key]
            va, vb = reference["verdicts"][key]["passed"], run["verdicts"][key]["passed"]
            same_text += a == b
            same_verdict += va == vb
            if a != b:
                differs.append(
                    {
                        "item": key,
                        "tokens": [reference["tokens"][key], run["tokens"][key]],
                        "strict": [va, vb],
                        **first_difference(a, b),
                    }
                )
        out[run["engine"]] = {
            "label": LABELS[run["engine"]],
            "version": run["version"],
            "torch": run.get("torch"),
            "threads": run.get("threads"),
            "startup_s": run["startup_s"],
            "generation_s": run["generation_s"],
            "process_s": run["process_s"],
            "peak_rss_gib": run["peak_rss_gib"],
            "prompts_per_s": len(items) / run["generation_s"],
            "generated_tokens": generated,
            "tokens_per_s": generated / run["generation_s"],
            "at_cap": sum(t >= run.get("max_new_tokens", 1280) for t in run["tokens"].values()),
            "speedup_vs_transformers": reference["generation_s"] / run["generation_s"],
            "identical_responses": same_text,
            "same_strict_verdict": same_verdict,
            "prompt_level_strict_acc": sum(strict) / len(items),
            "differences": differs,
            **{k: run[k] for k in ("batch_size", "omp_threads_bind") if k in run},
        }
    return out


def prompt_check(items: list[dict[str, Any]], lm: dict[str, Any], tokenizer: Any) -> int:
    """How many of lm-eval's chat-templated contexts are forgetguard's text, byte for byte."""
    contexts = lm.get("contexts", {})
    return sum(contexts.get(i["id"]) == chat_text(tokenizer, i["prompt"]) for i in items)


def report(result: dict[str, Any]) -> str:
    meta, engines = result["meta"], result["engines"]
    n = meta["prompts"]
    lines = [
        "# IFEval generation throughput: forgetguard transformers vs vLLM vs lm-eval HF",
        "",
        f"`{meta['command']}`",
        "",
        f"{n} IFEval prompts drawn from the pulled suite's {meta['suite_items']} with "
        f"`random.Random({meta['seed']})`{meta['sample_note']}; chat template, greedy, "
        f"max_new_tokens {meta['max_new_tokens']} (the suite's), no stop string but the "
        f"model's end of turn; float32 on CPU; {meta['threads']} threads for every engine, "
        "OMP_WAIT_POLICY=PASSIVE. One run, each engine in its own process, one after the "
        "other; one untimed warm-up call, then one timed pass.",
        "",
        f"Machine: {meta['machine']}.",
        f"Load average (1/5/15 min) at start {meta['load_start']}, at end {meta['load_end']}.",
        "",
        "| engine | version | start-up | generation | prompts/s | generated tokens | "
        "tokens/s | × vs transformers | identical responses | same strict verdict | "
        "prompt-level strict | peak memory |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for e in engines.values():
        lines.append(
            f"| {e['label']} | {e['version']} | {e['startup_s']:.1f} s | "
            f"{e['generation_s']:.1f} s | {e['prompts_per_s']:.3f} | {e['generated_tokens']:,} | "
            f"{e['tokens_per_s']:.1f} | {e['speedup_vs_transformers']:.2f}× | "
            f"{e['identical_responses']}/{n} | {e['same_strict_verdict']}/{n} | "
            f"{100 * e['prompt_level_strict_acc']:.1f} % | {e['peak_rss_gib']:.1f} GiB |"
        )
    lm = engines.get("lm-eval")
    lines += [
        "",
        "Generation: forgetguard's is the worker driver's whole call on the sample (rendering, "
        "generation, scoring); lm-eval's is its `generate_until` call. Start-up is import and "
        "model load (vLLM: engine start). Generated tokens: each stripped response re-encoded "
        "by the model's tokenizer, the same count for every engine. Agreement is against the "
        "transformers engine, item by item; every engine's responses are scored by "
        "forgetguard's IFEval checker.",
    ]
    if lm:
        lines += [
            "",
            f"lm-eval ran its own `ifeval` task definition (generation_kwargs "
            f"`{json.dumps(meta['lmeval_generation_kwargs'])}`) with `--apply_chat_template`, "
            f"batch size {lm.get('batch_size')}; its chat-templated context was forgetguard's "
            f"prompt text byte for byte on {meta['lmeval_same_prompt']}/{n} prompts.",
        ]
    lines += ["", "## Responses that differ from the transformers engine's", ""]
    any_diff = False
    for e in engines.values():
        for d in e["differences"]:
            any_diff = True
            lines.append(
                f"- {e['label']}, item {d['item']}: {d['tokens'][0]} vs {d['tokens'][1]} tokens, "
                f"strict {d['strict'][0]} vs {d['strict'][1]}; they part at character "
                f"{d['at_char']}: {json.dumps(d['reference'])} vs {json.dumps(d['this'])}"
            )
    if not any_diff:
        lines.append("None: every engine gave the transformers engine's responses byte for byte.")
    if meta.get("notes"):
        lines += ["", "## Notes", "", *(f"- {note}" for note in meta["notes"])]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="models/smollm2-135m-instruct")
    p.add_argument("--sample", type=int, default=100, help="prompts drawn from the suite")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--engines", default="transformers,vllm,lm-eval")
    p.add_argument("--lmeval-batch-size", type=int, default=16)
    p.add_argument("--threads", type=int, default=_available_cores())
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--note", action="append", default=[], help="a line for the report's notes")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--sample-file", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    model = Path(args.model)
    args.model = model if model.is_absolute() else (REPO / model).resolve()
    if not (args.model / "config.json").is_file():
        print(f"model directory {args.model} is missing: forgetguard models pull", file=sys.stderr)
        return 2
    if args.child:
        forgetguard_child(args.child, args.model, Path(args.sample_file), args.threads)
        return 0

    suite = load_suite()
    items = sample_items(suite, args.sample, args.seed)
    WORK.mkdir(parents=True, exist_ok=True)
    sample = WORK / f"ifeval-{len(items)}-seed{args.seed}.json"
    sample.write_text(json.dumps({**suite, "items": items}), encoding="utf-8")
    with sample.with_suffix(".jsonl").open("w", encoding="utf-8") as fh:
        for item in items:  # lm-eval's ifeval documents: the dataset's own columns
            doc = {
                "key": int(item["id"]),
                "prompt": item["prompt"],
                "instruction_id_list": item["instruction_id_list"],
                "kwargs": item["kwargs"],
            }
            fh.write(json.dumps(doc, ensure_ascii=False) + "\n")

    load_start = [round(x, 2) for x in os.getloadavg()]
    runs = [run_child(engine, args, sample) for engine in args.engines.split(",")]
    load_end = [round(x, 2) for x in os.getloadavg()]

    from workers.engine.loading import load_tokenizer

    tokenizer = load_tokenizer(args.model)
    for run in runs:
        run["max_new_tokens"] = suite["max_new_tokens"]
    engines = compare(items, runs, tokenizer)
    lm = next((r for r in runs if r["engine"] == "lm-eval"), None)
    versions = {}
    if lm:
        versions["lm_eval"] = lm.get("lm_eval")
    meta = {
        "command": "python benchmarks/ifeval_throughput.py " + " ".join(argv or sys.argv[1:]),
        "machine": line(describe(**versions)),
        "machine_detail": describe(**versions),
        "model": args.model.name,
        "suite_items": len(suite["items"]),
        "prompts": len(items),
        "item_ids": [i["id"] for i in items],
        "seed": args.seed,
        "sample_note": ""
        if len(items) == args.sample
        else f" (asked {args.sample}, the suite has {len(items)})",
        "max_new_tokens": suite["max_new_tokens"],
        "threads": args.threads,
        "load_start": load_start,
        "load_end": load_end,
        "notes": args.note,
    }
    if lm:
        meta["lmeval_generation_kwargs"] = lm.get("generation_kwargs")
        meta["lmeval_same_prompt"] = prompt_check(items, lm, tokenizer)
    result = {"meta": meta, "engines": engines}
    out = Path(args.out) if Path(args.out).is_absolute() else REPO / args.out
    out.mkdir(parents=True, exist_ok=True)
    (out / "ifeval_throughput.json").write_text(
        json.dumps(result, indent=1, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    text = report(result)
    (out / "ifeval_throughput.md").write_text(text, encoding="utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
