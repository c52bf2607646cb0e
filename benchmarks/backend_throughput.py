"""The same evaluation work through each engine backend, in one run: forgetguard's own
transformers engine, vLLM (in-process, as ``forgetguard worker --backend vllm`` runs it) and
the ``openai`` backend on vLLM's own OpenAI-compatible server (``vllm serve``, started here).

Every variant answers the same general-qa prompts (plain format, greedy, 50 new tokens) in a
child process of its own, so start-up and peak memory are its own and only one engine lives
at a time. Start-up (model load or engine start) is timed apart from generation; one untimed
warm-up call precedes ``--repeats`` timed ones, and generation is their median (with the
range): on a small shared machine one timing alone varies by 10–20 %. Agreement is per item
against the transformers float32 run: the same correctness (the lesson's substring scoring) and
byte-identical answers. For the served variant, start-up is the server's (until ``/v1/models``
answers) and peak memory is the server process's.
Writes ``backend_throughput.json`` and ``backend_throughput.md`` under ``--out``.

    python benchmarks/backend_throughput.py [--model models/smollm2-135m-instruct]
        [--variants transformers:float32,vllm:float32,openai:float32,vllm:bfloat16,...]
        [--limit 0] [--repeats 3] [--out benchmarks/results]

Run it with the vLLM environment's python (``make vllm``): it has both engines.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
from benchmarks.machine import describe, line  # noqa: E402
from workers.engine.process import configure_process  # noqa: E402

configure_process()  # as a worker does: offline, passive OpenMP threads, vLLM in-process

TEMPLATE = "Question: {question}\nAnswer:"
DEFAULT_VARIANTS = (
    "transformers:float32,vllm:float32,openai:float32,vllm:bfloat16,transformers:bfloat16"
)
SERVED_NAME = "reference"


def _items(limit: int) -> list[dict[str, Any]]:
    data = json.loads((REPO / "app/suites/data/general-qa.json").read_text(encoding="utf-8"))
    items: list[dict[str, Any]] = data["items"]
    return items[:limit] if limit else items


def _correct(answer: str, answers: list[str]) -> bool:
    text = answer.strip().lower()
    return any(a.lower() in text for a in answers)


def child(
    backend: str, dtype: str, model: Path, limit: int, max_new_tokens: int, repeats: int
) -> None:
    """Run one variant and print its measurements as one JSON line."""
    from workers.engine.base import Prompt

    prompts = [Prompt(TEMPLATE.format(question=i["question"]), False) for i in _items(limit)]
    started = time.perf_counter()
    server: subprocess.Popen[bytes] | None = None
    if backend == "openai":
        from workers.engine.openai_backend import OpenAIBackend

        server, url = _serve(model, dtype)
        engine: Any = OpenAIBackend(url, SERVED_NAME)
        version = f"openai API on vllm serve {__import__('vllm').__version__}"
    elif backend == "transformers":
        import torch

        from workers.engine.loading import load_model, load_tokenizer
        from workers.engine.transformers_backend import TransformersBackend, configure_threads

        configure_threads()
        engine = TransformersBackend(
            load_model(model, torch.device("cpu"), dtype=getattr(torch, dtype)),
            load_tokenizer(model),
        )
        version = f"transformers {__import__('transformers').__version__}"
    else:
        from workers.engine import vllm_backend
        from workers.engine.loading import load_tokenizer

        cache = vllm_backend.EngineCache(vllm_backend.VLLMSettings(dtype=dtype))
        engine = vllm_backend.VLLMBackend(cache.get(model, "bench", lambda: load_tokenizer(model)))
        version = vllm_backend.engine_version()
    startup = time.perf_counter() - started
    engine.generate(prompts[:8], max_new_tokens=max_new_tokens)  # warm-up, untimed
    timings: list[float] = []
    passes: list[list[str]] = []
    for _ in range(repeats):
        started = time.perf_counter()
        passes.append(engine.generate(prompts, max_new_tokens=max_new_tokens))
        timings.append(round(time.perf_counter() - started, 2))
    answers = passes[0]
    who = resource.RUSAGE_SELF
    if server is not None:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=120)
        who = resource.RUSAGE_CHILDREN  # the server's peak, not this client's
    peak_rss = resource.getrusage(who).ru_maxrss * 1024
    print(
        "RESULT "
        + json.dumps(
            {
                "backend": backend,
                "dtype": dtype,
                "version": version,
                "startup_s": round(startup, 2),
                "generation_s": statistics.median(timings),
                "generation_runs_s": timings,
                "deterministic": all(p == answers for p in passes),
                "peak_rss_gib": round(peak_rss / 2**30, 2),
                "answers": answers,
            }
        ),
        flush=True,
    )


def _span(timings: list[float]) -> str:
    return f"{min(timings):.1f}–{max(timings):.1f}" if len(timings) > 1 else "one pass"


def _serve(model: Path, dtype: str) -> tuple[subprocess.Popen[bytes], str]:
    """Start vLLM's OpenAI-compatible server on ``model``; wait until it answers."""
    import httpx

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model)]
    command += ["--served-model-name", SERVED_NAME, "--host", "127.0.0.1", "--port", str(port)]
    command += ["--dtype", dtype, "--enforce-eager", "--load-format", "safetensors"]
    command += ["--seed", "0"]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/v1"
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"vllm serve exited with {server.returncode}")
        try:
            if httpx.get(f"{url}/models", timeout=5).status_code == 200:
                return server, url
        except httpx.TransportError:
            pass
        time.sleep(1.0)
    server.kill()
    raise RuntimeError("vllm serve did not answer within 900 s")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="models/smollm2-135m-instruct")
    p.add_argument("--variants", default=DEFAULT_VARIANTS)
    p.add_argument("--limit", type=int, default=0, help="first N items (0: all)")
    p.add_argument("--max-new-tokens", type=int, default=50)
    p.add_argument("--repeats", type=int, default=3, help="timed runs per variant (median)")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.repeats = max(1, args.repeats)
    model = Path(args.model) if Path(args.model).is_absolute() else (REPO / args.model).resolve()
    if not (model / "config.json").is_file():
        print(f"model directory {model} is missing: forgetguard models pull", file=sys.stderr)
        return 2
    if args.child:
        backend, dtype = args.child.split(":")
        child(backend, dtype, model, args.limit, args.max_new_tokens, args.repeats)
        return 0

    items = _items(args.limit)
    runs: list[dict[str, Any]] = []
    for variant in args.variants.split(","):
        command = [sys.executable, __file__, "--child", variant, "--model", str(model)]
        command += ["--limit", str(args.limit), "--max-new-tokens", str(args.max_new_tokens)]
        command += ["--repeats", str(args.repeats)]
        print(f"running {variant} …", file=sys.stderr, flush=True)
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
        if done.returncode != 0 or not lines:
            print(done.stdout[-2000:], done.stderr[-4000:], file=sys.stderr)
            return 1
        runs.append(json.loads(lines[-1].removeprefix("RESULT ")))

    reference = runs[0]
    for run in runs:
        run["items"] = len(items)
        run["speedup_vs_first"] = round(reference["generation_s"] / run["generation_s"], 2)
        run["same_correctness"] = sum(
            _correct(a, i["answers"]) == _correct(b, i["answers"])
            for a, b, i in zip(reference["answers"], run["answers"], items, strict=True)
        )
        run["identical_answers"] = sum(
            a == b for a, b in zip(reference["answers"], run["answers"], strict=True)
        )
        run["correct"] = sum(
            _correct(a, i["answers"]) for a, i in zip(run["answers"], items, strict=True)
        )
    out = REPO / args.out if not Path(args.out).is_absolute() else Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {
        "machine": line(describe()),
        "model": model.name,
        "prompts": len(items),
        "max_new_tokens": args.max_new_tokens,
        "format": "plain",
        "repeats": args.repeats,
    }
    (out / "backend_throughput.json").write_text(
        json.dumps({"meta": meta, "runs": runs}, indent=2) + "\n", encoding="utf-8"
    )
    first = f"{reference['backend']} {reference['dtype']}"
    lines = [
        f"{len(items)} general-qa prompts, plain format, greedy, {args.max_new_tokens} new tokens, "
        f"{meta['machine']}; one run, each engine in its own process; generation is the median "
        f"of {meta['repeats']} timed passes (range in brackets), the ratio is of medians.",
        "",
        f"| backend | dtype | start-up | generation | × vs {first} | correct | "
        f"same correctness as {first} | byte-identical answers | peak memory |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        lines.append(
            f"| {run['version']} | {run['dtype']} | {run['startup_s']:.1f} s | "
            f"{run['generation_s']:.1f} s ({_span(run['generation_runs_s'])}) | "
            f"{run['speedup_vs_first']:.2f}× | "
            f"{run['correct']}/{len(items)} | {run['same_correctness']}/{len(items)} | "
            f"{run['identical_answers']}/{len(items)} | {run['peak_rss_gib']:.1f} GiB |"
        )
    changed = [f"{r['version']} {r['dtype']}" for r in runs if not r["deterministic"]]
    if changed:
        lines += ["", f"Answers changed between timed passes of: {', '.join(changed)}."]
    (out / "backend_throughput.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
