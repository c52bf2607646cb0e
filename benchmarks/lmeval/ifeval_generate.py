"""lm-eval's HF backend on lm-eval's own ``ifeval`` task, for ``benchmarks/ifeval_throughput.py``.

Run with the lm-eval venv's python (``make lmeval``); never imports forgetguard::

    .venv-lmeval/bin/python benchmarks/lmeval/ifeval_generate.py --model DIR --docs SAMPLE.jsonl \\
        [--batch-size 16] [--threads 2]

The task is lm-eval 0.4.13's ``tasks/ifeval/ifeval.yaml`` as written (``output_type``,
``doc_to_text``, ``generation_kwargs``: ``until: []``, greedy, ``max_gen_toks: 1280``,
0-shot), read from the installed package, with two changes: the documents come from
``--docs`` (``dataset_path: json``, the dataset's own columns) instead of the hub, and it runs
``predict_only`` (lm-eval's own mode for generating without metrics), because its checkers
import langdetect and NLTK's Punkt data, which the lm-eval venv does not have; forgetguard's
checker scores the responses afterwards (its agreement with lm-eval's checker is
``benchmarks/ifeval_agreement.py``). ``simple_evaluate`` with ``apply_chat_template=True``
builds the requests as ``lm-eval run --apply_chat_template`` does. Model load is timed apart;
``generation_s`` is the evaluator's ``generate_until`` call, after one short untimed warm-up.
Prints one ``RESULT {json}`` line: responses and chat-templated contexts by document key.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def ifeval_config(docs: Path) -> dict[str, Any]:
    """lm-eval's ifeval.yaml with the documents read from ``docs`` and no metric functions."""
    import lm_eval
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    # ``!function utils.…`` names the checkers' module; kept as text, never imported.
    Loader.add_constructor("!function", lambda loader, node: loader.construct_scalar(node))
    path = Path(lm_eval.__file__).parent / "tasks" / "ifeval" / "ifeval.yaml"
    config: dict[str, Any] = yaml.load(path.read_text(encoding="utf-8"), Loader=Loader)
    config.pop("process_results", None)
    config["metric_list"] = [{"metric": "bypass"}]
    config["task"] = "ifeval_sample"
    config["dataset_path"] = "json"
    config["dataset_name"] = None
    config["dataset_kwargs"] = {"data_files": {config["test_split"]: str(docs.resolve())}}
    return config


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--docs", type=Path, required=True)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    args = parser.parse_args()

    started = time.perf_counter()
    import importlib.metadata

    import torch

    torch.set_num_threads(args.threads)
    from lm_eval import simple_evaluate
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=args.model, dtype="float32", device="cpu", batch_size=args.batch_size)
    startup = time.perf_counter() - started

    warmup = {"until": [], "do_sample": False, "temperature": 0.0, "max_gen_toks": 16}
    lm.generate_until(
        [Instance("generate_until", {}, ("Say hello.", warmup), 0)], disable_tqdm=True
    )
    timings: list[float] = []
    generate_until = lm.generate_until

    def timed(requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        start = time.perf_counter()
        out: list[str] = generate_until(requests, disable_tqdm=True)
        timings.append(time.perf_counter() - start)
        return out

    lm.generate_until = timed  # type: ignore[method-assign]
    config = ifeval_config(args.docs)
    results = simple_evaluate(
        model=lm,
        tasks=[config],
        apply_chat_template=True,
        predict_only=True,
        log_samples=True,
        bootstrap_iters=0,
    )
    if results is None or len(timings) != 1:
        raise SystemExit(f"expected one generate_until call, saw {len(timings)}")
    responses, contexts = {}, {}
    for sample in results["samples"]["ifeval_sample"]:
        key = str(sample["doc"]["key"])
        responses[key] = sample["resps"][0][0]
        arguments = sample["arguments"]
        if isinstance(arguments, dict):  # {"gen_args_0": {"arg_0": context, "arg_1": kwargs}}
            arguments = [list(a.values()) for a in arguments.values()]
        contexts[key] = arguments[0][0]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30
    print(
        "RESULT "
        + json.dumps(
            {
                "engine": "lm-eval",
                "version": f"lm-eval {importlib.metadata.version('lm_eval')} HF "
                f"(transformers {importlib.metadata.version('transformers')})",
                "lm_eval": importlib.metadata.version("lm_eval"),
                "torch": torch.__version__,
                "threads": torch.get_num_threads(),
                "batch_size": args.batch_size,
                "generation_kwargs": config["generation_kwargs"],
                "startup_s": round(startup, 2),
                "generation_s": round(timings[0], 2),
                "peak_rss_gib": round(peak, 2),
                "responses": responses,
                "contexts": contexts,
            }
        ),
        flush=True,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
