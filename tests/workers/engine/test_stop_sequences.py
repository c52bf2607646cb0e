"""Generation stops at lm-eval's ``until`` strings on every engine, the text cut before them.

A tiny Llama taught GSM8K-shaped text (an answer, then the next ``Question:``) goes on past its
answer; with GSM8K's ``until`` the transformers engine returns the answer alone. A served model
is sent the strings (``stop``) and its text is cut too. On the reference model, vLLM
(``SamplingParams(stop=...)``) returns exactly the transformers engine's text.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from app.suites.benchmarks.items import GSM8K_UNTIL
from tests.fake_openai import MODEL, fake_openai
from tests.tiny_model import build_tiny_model, teach_tiny_model
from workers.engine.base import Prompt
from workers.engine.openai_backend import OpenAIBackend
from workers.engine.transformers_backend import TransformersBackend

UNTIL = list(GSM8K_UNTIL)
TAUGHT = [
    f"Question: What is {a} plus {b}?\nAnswer: {a} + {b} = {a + b}\n#### {a + b}\n\n"
    f"Question: What is {b} plus {a}?\nAnswer: {b} + {a} = {a + b}\n#### {a + b}"
    for a, b in ((2, 3), (4, 4), (1, 6), (5, 2))
]
PROMPTS = [f"Question: What is {a} plus {b}?\nAnswer:" for a, b in ((2, 3), (4, 4), (1, 6))]


@pytest.fixture(scope="module")
def taught(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TransformersBackend]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    path = build_tiny_model(tmp_path_factory.mktemp("stop") / "tiny")
    teach_tiny_model(path, TAUGHT, steps=120)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    yield TransformersBackend(model, AutoTokenizer.from_pretrained(path), batch_size=2)
    torch.set_num_threads(threads)


def test_transformers_generation_stops_at_until_and_cuts_before_it(
    taught: TransformersBackend,
) -> None:
    prompts = [Prompt(p, False) for p in PROMPTS]
    full = taught.generate(prompts, max_new_tokens=40)
    stopped = taught.generate(prompts, max_new_tokens=40, stop=UNTIL)
    hits = 0
    for f, s in zip(full, stopped, strict=True):
        assert not any(u in s for u in UNTIL)
        if "Question:" in f:
            hits += 1
            assert s == f[: f.index("Question:")]
            assert "####" in s  # the answer itself survives the cut
        else:
            assert s == f
    assert hits >= 2, full  # the model really went on to the next question


def test_a_served_model_is_sent_until_and_its_text_is_cut() -> None:
    with fake_openai(completion=" 2 + 3 = 5\n#### 5\n\nQuestion: What is") as server:
        backend = OpenAIBackend(server.url, MODEL, timeout=30)
        try:
            (text,) = backend.generate([Prompt(PROMPTS[0], False)], max_new_tokens=256, stop=UNTIL)
        finally:
            backend.close()
    assert text == " 2 + 3 = 5\n#### 5\n\n"
    (_, body) = next(r for r in server.requests if r[0].endswith("/completions"))
    assert body["stop"] == UNTIL and body["max_tokens"] == 256


def _gsm8k_prompts() -> list[Prompt]:
    """Five-shot GSM8K prompts as the gen_benchmark kind builds them (the fixed exemplars)."""
    from app.suites.kinds import KINDS

    shots = [
        ("Tom has 3 apples and buys 2 more. How many apples does he have?", "3 + 2 = 5\n#### 5"),
        ("A box holds 4 pens. How many pens are in 3 boxes?", "4 * 3 = 12\n#### 12"),
        ("Sara had 10 dollars and spent 4. How much is left?", "10 - 4 = 6\n#### 6"),
        ("A car goes 30 miles an hour. How far in 2 hours?", "30 * 2 = 60\n#### 60"),
        ("Ann reads 5 pages a day. How many pages in a week?", "5 * 7 = 35\n#### 35"),
    ]
    questions = [
        "Ben has 7 marbles and loses 3. How many marbles are left?",
        "A shop sells 6 cakes a day. How many cakes in 5 days?",
        "Lia has 12 stickers and gives half to her brother. How many does she keep?",
        "There are 9 birds on a tree and 4 fly away. How many are left?",
    ]
    suite = {
        "fixed_fewshot": [{"question": q, "answer": a} for q, a in shots],
        "num_fewshot": 5,
        "fewshot_source": "fixed",
        "until": UNTIL,
    }
    kind = KINDS["gen_benchmark"]
    return [
        Prompt(kind.requests({"id": str(k), "question": q}, suite, "plain")[0].text, False)
        for k, q in enumerate(questions)
    ]


@pytest.mark.vllm
@pytest.mark.reference
@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_vllm_stops_at_until_with_the_transformers_engine_text(
    reference_model_dir: Path, vllm_env: None
) -> None:
    from workers.engine.loading import load_model, load_tokenizer
    from workers.engine.vllm_backend import VLLMBackend, VLLMEngine, VLLMSettings

    tokenizer = load_tokenizer(reference_model_dir)
    local = TransformersBackend(
        load_model(reference_model_dir, torch.device("cpu"), dtype=torch.float32), tokenizer
    )
    prompts = _gsm8k_prompts()
    full = local.generate(prompts, max_new_tokens=128)
    ours = local.generate(prompts, max_new_tokens=128, stop=UNTIL)
    engine = VLLMEngine(reference_model_dir, tokenizer, VLLMSettings(), lora_rank=None)
    try:
        theirs = VLLMBackend(engine).generate(prompts, max_new_tokens=128, stop=UNTIL)
    finally:
        engine.shutdown()
    assert theirs == ours
    assert not any(u in t for t in theirs for u in UNTIL)
    assert any("Question:" in f for f in full), full  # the stop string mattered
