"""Score a model on the built-in suites, in one process (a temporary SQLite database and the
real worker code path), and print a Markdown report.

    python benchmarks/reference_scores.py [--model models/smollm2-135m-instruct] [--format chat]

Writes ``benchmarks/results/reference_scores.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from fastapi.testclient import TestClient  # noqa: E402

from app.core.config import Settings  # noqa: E402
from app.core.database import upgrade  # noqa: E402
from app.main import create_app  # noqa: E402
from workers.main import Worker  # noqa: E402

SUITES = ["general-qa", "general-mc", "general-text", "forgetting-checklist"]


def report(results: dict, model: str, prompt_format: str, seconds: float) -> str:  # type: ignore[type-arg]
    qa, mc, text = results["general-qa"], results["general-mc"], results["general-text"]
    checklist = results["forgetting-checklist"]
    lines = [
        f"Model `{model}`, prompt format `{prompt_format}`, greedy, 50 new tokens "
        f"({seconds:.0f} s on this machine).",
        "",
        "| general-qa category | correct | accuracy |",
        "|---|---|---|",
    ]
    for cat, entry in qa["by_category"].items():
        lines.append(f"| {cat} | {entry['correct']}/{entry['total']} | {entry['accuracy']:.3f} |")
    lines += [
        f"| **overall** | **{qa['correct']}/{qa['total']}** | **{qa['overall_accuracy']:.3f}** |",
        "",
        "| suite | metric | value |",
        "|---|---|---|",
        f"| general-mc ({mc['total']} items) | acc / acc_norm "
        f"| {mc['acc']:.3f} / {mc['acc_norm']:.3f} |",
        f"| general-text ({text['total']} texts, {text['tokens']} tokens) | NLL/token (perplexity) "
        f"| {text['nll_per_token']:.3f} ({text['perplexity']:.1f}) |",
        f"| forgetting-checklist ({checklist['passed'] + checklist['failed']} checks) | score "
        f"| {checklist['score']:.3f} |",
    ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, default=REPO / "models" / "smollm2-135m-instruct")
    parser.add_argument("--format", choices=["chat", "plain"], default="chat")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args()
    if not (args.model / "config.json").is_file():
        print(
            f"model {args.model} not found: run `forgetguard models pull smollm2-135m-instruct`",
            file=sys.stderr,
        )
        return 2
    with tempfile.TemporaryDirectory(prefix="fg-scores-") as tmp:
        settings = Settings(
            database_url=f"sqlite:///{tmp}/scores.db",
            model_roots=[args.model.resolve().parent],
            cache_dir=Path(tmp) / "cache",
        )
        upgrade(settings.database_url)
        with TestClient(create_app(settings)) as client:
            created = client.post(
                "/evaluations",
                json={
                    "model": {"path": str(args.model.resolve())},
                    "suites": SUITES,
                    "prompt_format": args.format,
                    "cache": False,
                },
            )
            assert created.status_code == 202, created.text
            start = time.perf_counter()
            Worker(settings, device=args.device, once=True, worker_id="scores").run()
            seconds = time.perf_counter() - start
            evaluation = client.get(f"/evaluations/{created.json()['id']}").json()
    if evaluation["status"] != "succeeded":
        print(f"evaluation {evaluation['status']}: {evaluation['error']}", file=sys.stderr)
        return 1
    text = report(evaluation["results"], args.model.name, args.format, seconds)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "reference_scores.json").write_text(json.dumps(evaluation["results"], indent=2))
    (args.out / "reference_scores.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
