"""Log-likelihood requests split into tokens as lm-eval and lighteval split them."""

from __future__ import annotations

from pathlib import Path

from workers.engine.base import Prompt
from workers.engine.loading import load_tokenizer
from workers.engine.transformers_backend import encode_pair, encode_prompt


def test_the_context_s_trailing_whitespace_is_scored_with_the_continuation(
    tiny_model_dir: Path,
) -> None:
    tok = load_tokenizer(tiny_model_dir)
    ctx, cont = encode_pair(tok, Prompt("Question: sky?\nAnswer: ", chat=False), "blue")
    whole = tok("Question: sky?\nAnswer: blue").input_ids
    assert ctx == tok("Question: sky?\nAnswer:").input_ids
    assert ctx + cont == whole and tok.decode(cont) == " blue"


def test_a_continuation_is_tokenized_as_it_reads_after_its_context(tiny_model_dir: Path) -> None:
    tok = load_tokenizer(tiny_model_dir)
    ctx, cont = encode_pair(tok, Prompt("Answer:", chat=False), " Paris")
    assert ctx + cont == tok("Answer: Paris").input_ids


def test_in_chat_the_template_s_final_newline_moves_into_the_continuation(
    tiny_model_dir: Path,
) -> None:
    tok = load_tokenizer(tiny_model_dir)
    prompt = Prompt("What is the capital of France?", chat=True)
    rendered = tok.decode(encode_prompt(tok, prompt))
    assert rendered.endswith("\n")
    ctx, cont = encode_pair(tok, prompt, " Paris")
    assert tok.decode(cont) == "\n Paris"
    assert tok.decode(ctx) == rendered.rstrip()


def test_an_empty_continuation_asks_nothing(tiny_model_dir: Path) -> None:
    tok = load_tokenizer(tiny_model_dir)
    ctx, cont = encode_pair(tok, Prompt("Answer:", chat=False), "")
    assert cont == [] and ctx == tok("Answer:").input_ids
