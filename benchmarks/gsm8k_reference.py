"""GSM8K on the reference model, beside the number its model card publishes (1.4, 5-shot).

    python benchmarks/gsm8k_reference.py [--model models/smollm2-135m-instruct] [--items 200]
        [--seed 0] [--format chat] [--num-fewshot 5]

Runs a seeded sample of the pulled ``gsm8k`` suite (``forgetguard benchmarks pull gsm8k``)
through the ``gen_benchmark`` kind and the transformers engine (float32, CPU), in process: the
worker's driver and scorer, no database. Few-shot examples are drawn from all 1,319 items as
the full suite would draw them. The sample is run in its drawn order, ``--batch-size`` items
at a time, so the items done when a run is stopped are a random sample too (finishing order
within a batch favours short answers; whole batches do not). Rows are appended to
``benchmarks/results/gsm8k_reference-<format>.tmp`` (a rerun resumes; ``--summarise`` only
writes the summary of what is there) and the summary goes to
``benchmarks/results/gsm8k_reference-<format>.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from app.suites.kinds import KINDS, validate_suite  # noqa: E402
from app.suites.registry import ItemRow  # noqa: E402

PUBLISHED = 0.014  # SmolLM2-135M-Instruct card: GSM8K 5-shot, lighteval qem, chat template
Z95 = 1.959963984540054
DIFFERENCES = (
    "weights: the card's model as a Q4_1 GGUF dequantised to float32 (forgetguard's reference "
    "model), run in float32 on CPU by the transformers engine; the card: the original weights "
    "in bfloat16 on vLLM",
    "items: a seeded sample of the 1,319 test items (the card: all of them)",
    "few-shot: 5 examples drawn from the other *test* items by lm-eval's sampler (seed 1234); "
    "the card: lighteval's `random_sampling_from_train` (train split, `Random(42)`), which the "
    "pulled wheel does not have",
    "chat template: all examples and the question in one user turn; lighteval sends each "
    'example as a user turn and an assistant turn (`" " + answer`)',
    "stop: lm-eval's `until` (`Question:`, `</s>`, `<|im_end|>`); lighteval's "
    "`stop_sequence` is `Question:`, `Question`; both 256 new tokens at most, and the chat "
    "model's `<|im_end|>` ends both",
    "context: the model's 8,192 positions; the card's `max_model_length` 2,048 (5-shot "
    "prompts are ~1,000 tokens, so nothing is truncated either way)",
)


def wilson(correct: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a proportion (sound near 0, where GSM8K's small models sit)."""
    if n == 0:
        return (0.0, 1.0)
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def sample_positions(n_items: int, k: int, seed: int) -> list[int]:
    """``k`` item positions drawn with ``random.Random(seed)``, in the order drawn."""
    return random.Random(seed).sample(range(n_items), min(k, n_items))


def summarise(rows: list[dict[str, Any]], settings: dict[str, Any]) -> dict[str, Any]:
    """The kind's aggregate plus a Wilson 95 % interval for each filter's exact_match."""
    aggregate = KINDS["gen_benchmark"].aggregate([ItemRow.of(r) for r in rows])
    n = aggregate["total"]
    intervals = {}
    for name, p in aggregate["exact_match"].items():
        correct = round(p * n)
        intervals[name] = {"correct": correct, "ci95_wilson": list(wilson(correct, n))}
    invalid = {
        name: sum(r["details"]["filtered"][name] == "[invalid]" for r in rows)
        for name in aggregate["exact_match"]
    }
    return {
        "settings": settings,
        "published": {"value": PUBLISHED, "metric": "qem (lighteval gsm8k_normalizer)"},
        "aggregate": aggregate,
        "intervals": intervals,
        "invalid": invalid,
    }


def report(summary: dict[str, Any]) -> str:
    s, agg = summary["settings"], summary["aggregate"]
    lines = [
        f"# GSM8K on `{s['model']}` ({s['items']} of 1,319 test items, seed {s['seed']})",
        "",
        f"The first {s['items']} of {s['drawn']} items drawn with `random.Random({s['seed']})`, "
        "run whole batches at a time in the order drawn (a random sample at any stopping point).",
        "",
        f"forgetguard `gen_benchmark`, {s['num_fewshot']}-shot "
        f"(`fewshot_source: {s['fewshot_source']}`, seed {s['fewshot_seed']}), prompt format "
        f"`{s['format']}`, greedy, `until` {s['until']}, max_new_tokens {s['max_new_tokens']}, "
        f"transformers engine, {s['dtype']} on CPU; {s['seconds']:.0f} s.",
        "",
        "| filter | exact_match | correct | 95 % CI (Wilson) | lm-eval stderr | [invalid] |",
        "|---|---|---|---|---|---|",
    ]
    for name, p in agg["exact_match"].items():
        ci = summary["intervals"][name]
        lines.append(
            f"| {name}{' (headline)' if name == agg['headline'] else ''} | {100 * p:.1f} | "
            f"{ci['correct']}/{agg['total']} | {100 * ci['ci95_wilson'][0]:.1f}–"
            f"{100 * ci['ci95_wilson'][1]:.1f} | {100 * agg['exact_match_stderr'][name]:.1f} | "
            f"{summary['invalid'][name]} |"
        )
    lines += [
        f"| published (model card, lighteval qem) | {100 * PUBLISHED:.1f} | | | | |",
        "",
        "The card's `qem` with `gsm8k_normalizer` reads the number after `#### `, as",
        "strict-match does. Settings that differ from the card's run:",
        "",
        *(f"- {line}" for line in DIFFERENCES),
    ]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="models/smollm2-135m-instruct")
    parser.add_argument("--suite", default="var/benchmarks/gsm8k.json")
    parser.add_argument("--items", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--format", choices=("chat", "plain"), default="chat")
    parser.add_argument("--num-fewshot", type=int, default=5)
    parser.add_argument("--fewshot-source", choices=("items", "fixed"), default="items")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--summarise", action="store_true", help="only summarise what is done")
    args = parser.parse_args()

    import torch

    from workers.engine.loading import load_model, load_tokenizer
    from workers.engine.transformers_backend import TransformersBackend
    from workers.evaluation.scoring import RunSettings, run_items

    torch.set_num_threads(args.threads)
    raw = json.loads(Path(args.suite).read_text(encoding="utf-8"))
    raw |= {"num_fewshot": args.num_fewshot, "fewshot_source": args.fewshot_source}
    suite = validate_suite(raw).model_dump(mode="json")
    positions = sample_positions(len(suite["items"]), args.items, args.seed)
    stem = REPO / "benchmarks" / "results" / f"gsm8k_reference-{args.format}"
    partial = stem.with_suffix(".tmp")
    rows = (
        [json.loads(line) for line in partial.read_text().splitlines()] if partial.exists() else []
    )
    done = {r["item_id"] for r in rows}
    pending = [(p, suite["items"][p]) for p in positions if suite["items"][p]["id"] not in done]
    seconds = sum(r.get("seconds", 0.0) for r in rows)

    if not args.summarise and pending:
        model_dir = REPO / args.model
        tokenizer = load_tokenizer(model_dir)
        model = load_model(model_dir, torch.device("cpu"), dtype=torch.float32)
        backend = TransformersBackend(model, tokenizer, batch_size=args.batch_size)
        settings = RunSettings(prompt_format=args.format, max_new_tokens=50, stop=())
        for start in range(0, len(pending), args.batch_size):
            chunk = pending[start : start + args.batch_size]
            chunk_rows: list[dict[str, Any]] = []
            began = time.monotonic()
            run_items("gen_benchmark", backend, suite, chunk, settings, chunk_rows.extend)
            took = time.monotonic() - began
            with partial.open("a", encoding="utf-8") as out:  # whole chunks only
                for row in chunk_rows:
                    row["seconds"] = took / len(chunk_rows)
                    out.write(json.dumps(row, ensure_ascii=False) + "\n")
            rows.extend(chunk_rows)
            seconds += took
            print(f"{len(rows)}/{len(positions)} items, {seconds:.0f} s", flush=True)
    wanted = {suite["items"][p]["id"] for p in positions}
    rows = [r for r in rows if r["item_id"] in wanted]
    summary = summarise(
        rows,
        {
            "model": args.model,
            "items": len(rows),
            "drawn": len(positions),
            "seed": args.seed,
            "format": args.format,
            "num_fewshot": suite["num_fewshot"],
            "fewshot_source": suite["fewshot_source"],
            "fewshot_seed": suite["fewshot_seed"],
            "until": suite["until"],
            "max_new_tokens": suite["max_new_tokens"],
            "dtype": "float32",
            "seconds": seconds,
        },
    )
    stem.with_suffix(".json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    stem.with_suffix(".md").write_text(report(summary), encoding="utf-8")
    print(report(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
