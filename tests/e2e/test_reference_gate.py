"""``forgetguard gate`` end to end: a real HTTP server, a real worker process, the gate as a
subprocess. A model against itself exits 0; a collapsed candidate exits 1 with a McNemar
p < 0.01, a CI of the drop above zero and its forgotten answers; the JUnit report parses."""

from __future__ import annotations

import json
import random
import shutil
import socket
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.core.config import Settings
from tests.conftest import REPO, settings_env, start_worker

pytestmark = [pytest.mark.slow, pytest.mark.one_db]


@contextmanager
def serving(settings: Settings) -> Iterator[str]:
    """The API on a free local port in a background thread; yields its base URL."""
    import uvicorn

    from app.main import create_app

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the API did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@contextmanager
def working(settings: Settings, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """A real worker process for the duration of the block."""
    worker = start_worker(settings, log=log)
    try:
        yield worker
    finally:
        worker.terminate()
        try:
            worker.wait(timeout=60)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()


def run_gate(
    settings: Settings, server: str, *args: str, timeout: float = 600
) -> subprocess.CompletedProcess[str]:
    """``forgetguard gate --server URL ARGS…`` as CI would run it."""
    env = settings_env(settings)
    env.pop("GITHUB_STEP_SUMMARY", None)
    return subprocess.run(
        [sys.executable, "-m", "app.cli", "gate", "--server", server, *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=timeout,
    )


def last_line(result: subprocess.CompletedProcess[str]) -> str:
    return result.stderr.strip().splitlines()[-1]


def junit_ids_and_failures(path: Path) -> tuple[dict[str, str], set[str]]:
    """The report's properties, and ``classname/name`` of each failing testcase."""
    root = ET.parse(path).getroot()
    properties = {p.get("name", ""): p.get("value", "") for p in root.iter("property")}
    failing = {
        f"{c.get('classname')}/{c.get('name')}"
        for c in root.iter("testcase")
        if c.find("failure") is not None
    }
    return properties, failing


def assert_collapse(server: str, before: str, after: str) -> dict[str, Any]:
    """The /compare evidence the issue asks for on a collapsed candidate."""
    body = httpx.get(f"{server}/compare", params={"before": before, "after": after}).json()
    assert body["statistics"]["mcnemar_p_value"] < 0.01, body["statistics"]
    assert body["statistics"]["drop_ci95"][0] > 0
    forgotten = body["flips"]["forgotten"]
    assert forgotten and all(
        f["response_before"] is not None and f["response_after"] is not None for f in forgotten
    )
    assert body["verdict"] == "fail"
    return dict(body)


def category_drops_reported(body: dict[str, Any], junit: Path, limit: float) -> None:
    """Categories that dropped more than ``limit`` are in the report, but not as failures: with
    no ``--max-category-drop`` they do not gate, and JUnit fails only where the verdict did."""
    dropped = {cat for cat, s in body["statistics"]["by_category"].items() if s["drop"] > limit}
    assert dropped, "a collapsed candidate drops in some category"
    cases = {
        c.get("name"): c
        for c in ET.parse(junit).getroot().iter("testcase")
        if c.get("classname") == "forgetguard.category"
    }
    for cat in dropped:
        assert cases[cat].find("failure") is None, cat
        assert "reported, not gated" in (cases[cat].findtext("system-out") or ""), cat


# --------------------------------------------------------------------------- tiny model


def _noise_weights(model_dir: Path) -> None:
    """Overwrite every weight with noise: a candidate whose fine-tune collapsed."""
    import torch
    from safetensors.torch import load_file, save_file

    path = model_dir / "model.safetensors"
    state = load_file(path)
    generator = torch.Generator().manual_seed(0)
    save_file(
        {k: torch.randn(v.shape, generator=generator).to(v.dtype) for k, v in state.items()},
        path,
        metadata={"format": "pt"},
    )


def test_gate_passes_a_model_against_itself_and_fails_a_collapsed_one(
    settings: Settings, tiny_model_dir: Path, tmp_path: Path
) -> None:
    from tests.tiny_model import QA_PAIRS, qa_texts, teach_tiny_model

    models = tmp_path / "models"
    base = teach_tiny_model(shutil.copytree(tiny_model_dir, models / "taught"), qa_texts())
    collapsed = shutil.copytree(base, models / "collapsed")
    _noise_weights(collapsed)
    suite = tmp_path / "tiny-facts.json"
    suite.write_text(
        json.dumps(
            {
                "name": "tiny-facts",
                "kind": "qa",
                "items": [
                    {
                        "id": f"f{i:02d}",
                        "question": q,
                        "answers": [a.rstrip(".").split()[-1]],
                        "category": "capitals" if "capital" in q else "facts",
                    }
                    for i, (q, a) in enumerate(QA_PAIRS)
                ],
            }
        )
    )
    common = [
        "--suite",
        str(suite),
        "--prompt-format",
        "plain",
        "--max-new-tokens",
        "12",
        "--timeout",
        "300",
    ]

    with serving(settings) as server, working(settings, tmp_path / "worker.log"):
        same = run_gate(
            settings,
            server,
            "--base-model",
            str(base),
            "--candidate",
            str(base),
            *common,
            "--junit",
            str(tmp_path / "same.xml"),
        )
        assert same.returncode == 0, same.stderr + (tmp_path / "worker.log").read_text()[-2000:]
        assert last_line(same).startswith("forgetguard gate: PASS: no forgetting rule failed")
        assert "verdict: PASS" in same.stdout
        properties, failing = junit_ids_and_failures(tmp_path / "same.xml")
        assert failing == set()
        base_evaluation = properties["before"]
        before_body = httpx.get(
            f"{server}/compare",
            params={"before": properties["before"], "after": properties["after"]},
        ).json()
        assert before_body["overall_accuracy_before"] >= 0.5  # the taught model knows its facts
        assert before_body["statistics"]["forgotten"] == before_body["statistics"]["learned"] == 0

        broken = run_gate(
            settings,
            server,
            "--base-model",
            str(base),
            "--candidate",
            str(collapsed),
            *common,
            "--junit",
            str(tmp_path / "broken.xml"),
            "--markdown",
            str(tmp_path / "broken.md"),
        )
        assert broken.returncode == 1, broken.stderr
        assert last_line(broken).startswith("forgetguard gate: FAIL: accuracy dropped")
        properties, failing = junit_ids_and_failures(tmp_path / "broken.xml")
        assert properties["before"] == base_evaluation  # the base was not evaluated again
        body = assert_collapse(server, properties["before"], properties["after"])
        assert "forgetguard.accuracy/overall" in failing
        category_drops_reported(body, tmp_path / "broken.xml", 0.10)
        assert "❌ FAIL" in (tmp_path / "broken.md").read_text()


# --------------------------------------------------------------------------- reference model


def _collapse_reference(reference: Path, out: Path, *, texts: int = 10, steps: int = 8) -> Path:
    """A full fine-tune at lr 1e-3 on a few drug Q&A chats: the lesson's collapsing recipe.

    Plain torch, seeded, short sequences (56 tokens) so it stays cheap on two CPU cores.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(reference, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(
        reference, dtype=torch.float32, use_safetensors=True, local_files_only=True
    )
    records = [
        json.loads(line)
        for line in (REPO / "app" / "datasets" / "drug-qa.jsonl").read_text().splitlines()[:texts]
    ]
    chats = [
        tokenizer.apply_chat_template(
            [
                {"role": "user", "content": r["prompt"]},
                {"role": "assistant", "content": r["completion"]},
            ],
            tokenize=False,
        )
        for r in records
    ]
    batch = tokenizer(chats, return_tensors="pt", padding=True, truncation=True, max_length=56)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        model(**batch, labels=labels).loss.backward()
        optimizer.step()
    model.eval()
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


@pytest.mark.reference
@pytest.mark.timeout(1800)  # minutes on two idle CPU cores; generous for a shared machine
def test_gate_on_the_reference_model_catches_a_collapsed_full_fine_tune(
    settings: Settings, reference_model_dir: Path, tmp_path: Path
) -> None:
    collapsed = _collapse_reference(reference_model_dir, tmp_path / "models" / "ref-collapsed")
    general = json.loads((REPO / "app" / "suites" / "data" / "general-qa.json").read_text())
    by_category: dict[str, list[dict[str, Any]]] = {}
    for item in general["items"]:
        by_category.setdefault(item["category"], []).append(item)
    rng = random.Random(0)
    items = [item for group in by_category.values() for item in rng.sample(group, 5)]
    suite = tmp_path / "general-sample.json"
    suite.write_text(json.dumps({"name": "general-sample", "kind": "qa", "items": items}))
    common = ["--suite", str(suite), "--max-new-tokens", "24", "--timeout", "540"]

    with serving(settings) as server, working(settings, tmp_path / "worker.log"):
        broken = run_gate(
            settings,
            server,
            "--base-model",
            str(reference_model_dir),
            "--candidate",
            str(collapsed),
            *common,
            "--junit",
            str(tmp_path / "junit.xml"),
        )
        assert broken.returncode == 1, broken.stderr + (tmp_path / "worker.log").read_text()[-3000:]
        properties, failing = junit_ids_and_failures(tmp_path / "junit.xml")
        body = assert_collapse(server, properties["before"], properties["after"])
        category_drops_reported(body, tmp_path / "junit.xml", 0.10)
        # The base against itself: both sides answered from the cache, at once.
        same = run_gate(
            settings,
            server,
            "--base-model",
            str(reference_model_dir),
            "--candidate",
            str(reference_model_dir),
            *common,
            timeout=60,
        )
        assert same.returncode == 0, same.stderr
        assert "same run compared with itself" in last_line(same)
