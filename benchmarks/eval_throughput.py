"""Evaluation throughput: the lesson's per-item ``pipeline`` loop versus ``workers.engine``.

For each prompt format (plain, chat) both paths answer the same QA items with greedy
decoding and the lesson's scoring (an item is correct when any accepted answer, lowercased,
is a substring of the lowercased stripped continuation):

* lesson: ``pipeline("text-generation", model=model, tokenizer=tok, max_new_tokens=50)``,
  then per item ``generator(prompt, temperature=0.0, do_sample=False)`` exactly as written;
* engine: ``engine.generate`` on the same prompts, tokenized (and timed) by this script.

Model loading is timed separately and excluded; both paths get one untimed warm-up call.
Writes ``eval_throughput.json`` and ``eval_throughput.md`` under ``--out``. Usage:

    python benchmarks/eval_throughput.py [--model models/smollm2-135m-instruct] [--limit 80]
        [--formats plain,chat] [--max-new-tokens 50] [--batch-size auto] [--out benchmarks/results]

Exit status 2 when the model directory is missing.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

# Idle OpenMP threads sleep instead of spinning. On a dedicated machine this costs little;
# on a shared one (other jobs on the same cores) spinning threads made a batch-64 decode
# step 8x slower and a batch-1 step 4x slower in our measurements, which says more about
# the neighbours than about either code path. Must be set before torch is imported;
# export OMP_WAIT_POLICY=ACTIVE to measure the spinning behaviour instead.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO))

from benchmarks.machine import describe, line  # noqa: E402

LESSON_TEMPLATE = "Question: {question}\nAnswer:"

# Used only when the suite file is missing: general questions with accepted answers.
FALLBACK_ITEMS: list[dict[str, Any]] = [
    {"id": f"fb-{i:03d}", "question": q, "answers": a, "category": c}
    for i, (q, a, c) in enumerate(
        [
            ("What is the capital of France?", ["Paris"], "geography"),
            ("What is the capital of Japan?", ["Tokyo"], "geography"),
            ("What is the capital of Italy?", ["Rome"], "geography"),
            ("What is the capital of Germany?", ["Berlin"], "geography"),
            ("What is the capital of Spain?", ["Madrid"], "geography"),
            ("What is the capital of Canada?", ["Ottawa"], "geography"),
            ("What is the capital of Australia?", ["Canberra"], "geography"),
            ("What is the largest ocean on Earth?", ["Pacific"], "geography"),
            ("What is the longest river in Africa?", ["Nile"], "geography"),
            ("On which continent is Egypt?", ["Africa"], "geography"),
            ("What is 2 + 2?", ["4", "four"], "math"),
            ("What is 7 times 8?", ["56", "fifty-six"], "math"),
            ("What is 10 divided by 2?", ["5", "five"], "math"),
            ("What is the square root of 81?", ["9", "nine"], "math"),
            ("How many sides does a triangle have?", ["3", "three"], "math"),
            ("How many minutes are in an hour?", ["60", "sixty"], "math"),
            ("What is 15 minus 6?", ["9", "nine"], "math"),
            ("What is 12 plus 30?", ["42", "forty-two"], "math"),
            ("What planet is known as the Red Planet?", ["Mars"], "science"),
            ("What gas do plants absorb from the air?", ["carbon dioxide", "co2"], "science"),
            ("What is the chemical symbol for water?", ["H2O"], "science"),
            ("What is the chemical symbol for gold?", ["Au"], "science"),
            ("What is the largest planet in our solar system?", ["Jupiter"], "science"),
            ("At what temperature in Celsius does water boil at sea level?", ["100"], "science"),
            ("What force keeps us on the ground?", ["gravity"], "science"),
            ("What organ pumps blood through the body?", ["heart"], "science"),
            ("How many legs does a spider have?", ["8", "eight"], "science"),
            ("Who wrote Romeo and Juliet?", ["Shakespeare"], "literature"),
            ("Who wrote Pride and Prejudice?", ["Austen"], "literature"),
            ("Who wrote 1984?", ["Orwell"], "literature"),
            ("Who wrote The Odyssey?", ["Homer"], "literature"),
            ("Who painted the Mona Lisa?", ["Leonardo", "da Vinci"], "art"),
            ("Who was the first President of the United States?", ["Washington"], "history"),
            ("In which year did World War II end?", ["1945"], "history"),
            ("Who was the first person to walk on the Moon?", ["Armstrong"], "history"),
            ("Which ancient civilization built the pyramids of Giza?", ["Egypt"], "history"),
            ("What is the opposite of hot?", ["cold"], "language"),
            ("What is the plural of mouse?", ["mice"], "language"),
            ("What language is mainly spoken in Brazil?", ["Portuguese"], "language"),
            ("How many days are in a week?", ["7", "seven"], "general"),
            ("How many months are in a year?", ["12", "twelve"], "general"),
            ("What color do you get by mixing blue and yellow?", ["green"], "general"),
            ("What do bees make?", ["honey"], "general"),
            ("What is frozen water called?", ["ice"], "general"),
        ]
    )
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command line (see module docstring)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="models/smollm2-135m-instruct", help="model directory")
    p.add_argument("--suite", default="app/suites/data/general-qa.json", help="QA suite JSON")
    p.add_argument("--limit", type=int, default=None, help="first N items only")
    p.add_argument("--formats", default="plain,chat", help="comma-separated: plain, chat")
    p.add_argument("--max-new-tokens", type=int, default=50)
    p.add_argument("--batch-size", default="auto", help="engine batch size or 'auto'")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--out", default="benchmarks/results", help="output directory")
    args = p.parse_args(argv)
    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    bad = [f for f in formats if f not in ("plain", "chat")]
    if bad or not formats:
        p.error(f"--formats must be a comma-separated subset of plain,chat (got {args.formats!r})")
    args.formats = formats
    if args.batch_size != "auto":
        try:
            args.batch_size = int(args.batch_size)
        except ValueError:
            p.error("--batch-size must be an integer or 'auto'")
    return args


def _resolve(path: str) -> Path:
    candidate = Path(path)
    if not candidate.is_absolute() and not candidate.exists() and (REPO / candidate).exists():
        return REPO / candidate
    return candidate


def load_items(suite_path: Path) -> tuple[list[dict[str, Any]], str, str]:
    """(items, prompt template, source description); falls back to the built-in questions."""
    if not suite_path.is_file():
        return list(FALLBACK_ITEMS), LESSON_TEMPLATE, f"built-in fallback ({suite_path} missing)"
    data = json.loads(suite_path.read_text(encoding="utf-8"))
    template = data.get("prompt_template") or LESSON_TEMPLATE
    return list(data["items"]), template, str(suite_path)


def is_correct(answer: str, answers: list[str]) -> bool:
    """The lesson's scoring on an already stripped, lowercased answer."""
    return any(a.lower() in answer for a in answers)


class Timer:
    """Wall-clock and process CPU time of a block.

    CPU time (all threads) is reported next to wall time because on a shared machine
    wall time also measures the neighbours: CPU time only counts the cycles this process
    actually got (it still includes slow-downs from shared caches and memory bandwidth).
    """

    def __enter__(self) -> Timer:
        self._wall, self._cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall = time.perf_counter() - self._wall
        self.cpu = time.process_time() - self._cpu


def run_lesson(
    generator: Any, prompts: list[str], items: list[dict[str, Any]]
) -> tuple[Timer, list[str], list[bool]]:
    """The lesson's loop, verbatim apart from collecting the answers."""
    answers_out: list[str] = []
    correct_out: list[bool] = []
    with Timer() as timer:
        for prompt, item in zip(prompts, items, strict=True):
            output = generator(prompt, temperature=0.0, do_sample=False)[0]["generated_text"]
            answer = output[len(prompt) :].strip().lower()
            correct = any(a.lower() in answer for a in item["answers"])
            answers_out.append(answer)
            correct_out.append(correct)
    return timer, answers_out, correct_out


def run_engine(
    engine: Any,
    model: Any,
    tokenizer: Any,
    prompts: list[str],
    items: list[dict[str, Any]],
    fmt: str,
    args: Any,
) -> tuple[Timer, list[str], list[bool]]:
    """Tokenize (timed: the pipeline tokenizes inside its timing too) and batch-generate."""
    with Timer() as timer:
        if fmt == "chat":
            ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
        else:
            ids = [tokenizer(p)["input_ids"] for p in prompts]
        texts = engine.generate(
            model, tokenizer, ids, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size
        )
    answers = [t.strip().lower() for t in texts]
    return (
        timer,
        answers,
        [is_correct(a, item["answers"]) for a, item in zip(answers, items, strict=True)],
    )


def _load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:  # not available on this platform
        return None


def render_markdown(report: dict[str, Any]) -> str:
    """Human-readable summary of ``report``."""
    lines = [
        "# Evaluation throughput: lesson loop vs engine",
        "",
        f"- model: `{report['model']}` ({report['dtype']} on {report['device']}, "
        f"{report['threads']} threads, OMP_WAIT_POLICY={report['omp_wait_policy']})",
        f"- suite: {report['suite']}; max_new_tokens={report['max_new_tokens']}, "
        f"engine batch_size={report['batch_size']}",
        f"- model load: {report['load_seconds']:.2f} s (excluded from the timings below)",
        f"- load average (1/5/15 min) at start {report.get('load_average_start')}, "
        f"at end {report.get('load_average_end')}",
        f"- torch {report['versions']['torch']}, "
        f"transformers {report['versions']['transformers']}, "
        f"{report['platform']}",
        "",
        "| format | items | lesson s | lesson items/s | engine s | engine items/s | speed-up | "
        "CPU-time speed-up | correctness agreement | identical answers | lesson acc | "
        "engine acc |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for fmt, r in report["formats"].items():
        lines.append(
            f"| {fmt} | {r['items']} | {r['lesson']['seconds']:.1f} | "
            f"{r['lesson']['items_per_s']:.2f} | {r['engine']['seconds']:.1f} | "
            f"{r['engine']['items_per_s']:.2f} | {r['speedup']:.1f}x | "
            f"{r['cpu_time_speedup']:.1f}x | "
            f"{r['agreement_pct']:.1f} % | {r['identical_answers_pct']:.1f} % | "
            f"{r['lesson']['accuracy']:.3f} | {r['engine']['accuracy']:.3f} |"
        )
    lines += [
        "",
        "Speed-up = engine items/s ÷ lesson items/s (wall clock); CPU-time speed-up = lesson "
        "CPU seconds ÷ engine CPU seconds (process, all threads), less sensitive to other "
        "jobs on a shared machine. Agreement = share of items both paths "
        "score the same; identical answers = share whose stripped, lowercased continuations "
        "are equal.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; return the process exit status."""
    args = parse_args(argv)
    model_dir = _resolve(args.model)
    if not (model_dir / "config.json").is_file():
        print(
            f"error: model directory {model_dir} not found (no config.json). Pull the "
            "reference model (SmolLM2-135M-Instruct) there or pass --model PATH.",
            file=sys.stderr,
        )
        return 2

    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

    from workers.engine import transformers_backend as engine

    items, template, suite_source = load_items(_resolve(args.suite))
    if args.limit is not None:
        items = items[: args.limit]
    if not items:
        print("error: no items to evaluate", file=sys.stderr)
        return 2

    threads = engine.configure_threads()
    device = engine.select_device(args.device)
    dtype = engine.select_dtype(device)
    t0 = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model: Any = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    model = model.to(device)
    model.eval()
    load_seconds = time.perf_counter() - t0
    generator = pipeline(
        "text-generation", model=model, tokenizer=tokenizer, max_new_tokens=args.max_new_tokens
    )

    report: dict[str, Any] = {
        "model": str(args.model),
        "suite": suite_source,
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "threads": threads,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "max_new_tokens": args.max_new_tokens,
        "batch_size": args.batch_size,
        "load_seconds": load_seconds,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "platform": line(describe()),
        # Timings on a shared machine mean little without the load they were taken under.
        "load_average_start": _load_average(),
        "formats": {},
    }
    for fmt in args.formats:
        if fmt == "chat":
            if not getattr(tokenizer, "chat_template", None):
                print(f"skipping chat: {model_dir} has no chat template", file=sys.stderr)
                continue
            prompts: list[str] = [
                str(
                    tokenizer.apply_chat_template(
                        [{"role": "user", "content": item["question"]}],
                        tokenize=False,
                        add_generation_prompt=True,
                    )
                )
                for item in items
            ]
        else:
            prompts = [template.replace("{question}", item["question"]) for item in items]

        # Untimed warm-ups: first-call allocations and lazy initialisation hit both paths.
        generator(prompts[0], temperature=0.0, do_sample=False, max_new_tokens=2)
        run_engine(
            engine,
            model,
            tokenizer,
            prompts[:2],
            items[:2],
            fmt,
            argparse.Namespace(max_new_tokens=2, batch_size=args.batch_size),
        )

        print(f"[{fmt}] lesson loop on {len(items)} items ...", file=sys.stderr, flush=True)
        lesson_t, lesson_answers, lesson_ok = run_lesson(generator, prompts, items)
        print(f"[{fmt}] lesson: {lesson_t.wall:.1f} s; engine ...", file=sys.stderr, flush=True)
        engine_t, engine_answers, engine_ok = run_engine(
            engine, model, tokenizer, prompts, items, fmt, args
        )
        lesson_s, engine_s = lesson_t.wall, engine_t.wall
        n = len(items)
        agree = sum(a == b for a, b in zip(lesson_ok, engine_ok, strict=True))
        identical = sum(a == b for a, b in zip(lesson_answers, engine_answers, strict=True))
        result = {
            "items": n,
            "lesson": {
                "seconds": lesson_s,
                "cpu_seconds": lesson_t.cpu,
                "items_per_s": n / lesson_s,
                "accuracy": sum(lesson_ok) / n,
            },
            "engine": {
                "seconds": engine_s,
                "cpu_seconds": engine_t.cpu,
                "items_per_s": n / engine_s,
                "accuracy": sum(engine_ok) / n,
            },
            "speedup": lesson_s / engine_s,
            "cpu_time_speedup": lesson_t.cpu / engine_t.cpu,
            "agreement_pct": 100.0 * agree / n,
            "identical_answers_pct": 100.0 * identical / n,
            "disagreements": [
                {"id": item["id"], "lesson": la, "engine": ea}
                for item, la, ea, lo, eo in zip(
                    items, lesson_answers, engine_answers, lesson_ok, engine_ok, strict=True
                )
                if lo != eo
            ],
        }
        report["formats"][fmt] = result
        print(
            f"[{fmt}] engine: {engine_s:.1f} s; speed-up {result['speedup']:.1f}x, "
            f"agreement {result['agreement_pct']:.1f} %",
            file=sys.stderr,
            flush=True,
        )

    report["load_average_end"] = _load_average()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval_throughput.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    markdown = render_markdown(report)
    (out / "eval_throughput.md").write_text(markdown, encoding="utf-8")
    print(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
