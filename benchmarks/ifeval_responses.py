"""Generate the reference model's answers to the 541 IFEval prompts, once, for the agreement
check (``benchmarks/ifeval_agreement.py``) and the test that pins forgetguard's checkers.

    python benchmarks/ifeval_responses.py --data input_data.jsonl \
        [--model models/smollm2-135m-instruct] [--out tests/suites/data/ifeval_responses.jsonl.gz]

forgetguard's own transformers engine, the chat template, greedy, 1,280 new tokens (what
lighteval allows IFEval), the answer stripped as the evaluation driver stores it. Resumable:
answers already in ``<out>.partial`` are kept, each with the ``max_new_tokens`` it was made
with (greedy: an answer shorter than a smaller cap is the same under a larger one).
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from workers.engine.base import Prompt  # noqa: E402
from workers.engine.loading import load_model, load_tokenizer  # noqa: E402
from workers.engine.transformers_backend import (  # noqa: E402
    TransformersBackend,
    configure_threads,
    select_device,
    select_dtype,
)

MAX_NEW_TOKENS = 1280


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", required=True, help="IFEval input_data.jsonl")
    parser.add_argument("--model", default=str(REPO / "models/smollm2-135m-instruct"))
    parser.add_argument("--out", default=str(REPO / "tests/suites/data/ifeval_responses.jsonl.gz"))
    parser.add_argument("--max-new-tokens", type=int, default=MAX_NEW_TOKENS)
    args = parser.parse_args()

    rows = [json.loads(line) for line in Path(args.data).read_text().splitlines() if line]
    out = Path(args.out)
    partial = out.with_name(out.name + ".partial")
    done: dict[int, str] = {}
    caps: dict[int, int] = {}  # the generation length each answer had
    if partial.exists():
        for line in partial.read_text().splitlines():
            entry = json.loads(line)
            done[entry["key"]] = entry["response"]
            caps[entry["key"]] = entry.get("max_new_tokens", MAX_NEW_TOKENS)
    todo = [r for r in rows if r["key"] not in done]
    print(f"{len(done)} done, {len(todo)} to generate", flush=True)

    configure_threads()
    device = select_device("cpu")
    model_dir = Path(args.model)
    backend = TransformersBackend(
        load_model(model_dir, device, dtype=select_dtype(device)), load_tokenizer(model_dir)
    )
    start = time.monotonic()
    with partial.open("a") as sink:

        def on_result(index: int, text: str) -> None:
            key = todo[index]["key"]
            done[key] = text.strip()  # what the evaluation driver stores and scores
            caps[key] = args.max_new_tokens
            line = {"key": key, "response": done[key], "max_new_tokens": caps[key]}
            sink.write(json.dumps(line) + "\n")
            sink.flush()
            print(f"{len(done)}/{len(rows)} {time.monotonic() - start:.0f}s", flush=True)

        backend.generate(
            [Prompt(r["prompt"], True) for r in todo],
            max_new_tokens=args.max_new_tokens,
            on_result=on_result,
        )
    with gzip.open(out, "wt", encoding="utf-8") as f:
        for r in rows:
            row = {**r, "response": done[r["key"]], "max_new_tokens": caps[r["key"]]}
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(f"wrote {out} ({len(rows)} responses, {time.monotonic() - start:.0f}s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
