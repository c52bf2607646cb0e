"""Engine correctness on a tiny taught Llama: batching must never change results.

Every fast path (left padding, dropping finished rows, refilling freed slots, shared
multiple-choice contexts, windowed NLL) is compared with the straightforward
computation: ``model.generate`` one prompt at a time, or one full forward per request.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.tiny_model import CORPUS, QA_PAIRS, build_tiny_model, qa_texts, teach_tiny_model
from workers.engine import transformers_backend as engine

CONTEXT = 128  # tiny context window so that windowed token_nll is exercised by short texts
MAX_NEW = 24


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, Any]]:
    """The tiny Llama, overfit on Q/A pairs so it answers them and stops with EOS."""
    # One thread: a 64-wide model gains nothing from more, and on a shared 2-core machine
    # spinning OpenMP threads made these tests an order of magnitude slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    path = build_tiny_model(
        tmp_path_factory.mktemp("engine") / "tiny", max_position_embeddings=CONTEXT
    )
    teach_tiny_model(path, qa_texts())
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.eval()
    yield model, tokenizer
    torch.set_num_threads(threads)


def _prompts(tokenizer: Any) -> list[list[int]]:
    """~40 prompts of very different lengths; some end with EOS early, some run to the limit."""
    texts = [f"Question: {q}\nAnswer:" for q, _ in QA_PAIRS]  # taught: short EOS-terminated answers
    texts += [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True
        )
        for q, _ in QA_PAIRS[:6]
    ]
    texts += CORPUS[:10]  # untaught: mostly run to max_new_tokens
    texts += ["The", "Question:", "A good recipe", " ".join(CORPUS[1:4])]
    texts += [
        "Question: What is the capital of Peru?\nAnswer:",
        "Question: Who wrote Hamlet?\nAnswer:",
    ]
    texts += ["Answer:", "In the spring the"]
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


def _hf_generate(model: Any, tokenizer: Any, prompt: list[int], max_new_tokens: int) -> str:
    ids = torch.tensor([prompt])
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
    )
    return tokenizer.decode(out[0, len(prompt) :], skip_special_tokens=True)


# --------------------------------------------------------------------------- devices


def test_select_dtype_and_device_on_cpu() -> None:
    assert engine.select_dtype(torch.device("cpu")) == torch.float32
    assert engine.select_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        assert engine.select_device(None) == torch.device("cpu")
        assert engine.select_device("auto") == torch.device("cpu")
        with pytest.raises(RuntimeError):
            engine.select_device("cuda:0")


def test_configure_threads_uses_the_available_cores() -> None:
    before = torch.get_num_threads()
    try:
        n = engine.configure_threads()
        assert n >= 1 and torch.get_num_threads() == n
    finally:
        torch.set_num_threads(before)


# --------------------------------------------------------------------------- generate


def test_generate_is_batch_invariant_and_matches_hf_generate(tiny: tuple[Any, Any]) -> None:
    model, tokenizer = tiny
    prompts = _prompts(tokenizer)
    assert len(prompts) >= 40 and len({len(p) for p in prompts}) >= 15
    one = engine.generate(model, tokenizer, prompts, max_new_tokens=MAX_NEW, batch_size=1)
    sixteen = engine.generate(model, tokenizer, prompts, max_new_tokens=MAX_NEW, batch_size=16)
    # 7 rows: freed slots are refilled one or two at a time, many merges of different widths.
    seven = engine.generate(model, tokenizer, prompts, max_new_tokens=MAX_NEW, batch_size=7)
    auto = engine.generate(model, tokenizer, prompts, max_new_tokens=MAX_NEW, batch_size="auto")
    assert one == sixteen == seven == auto
    reference = [_hf_generate(model, tokenizer, p, MAX_NEW) for p in prompts]
    assert one == reference
    # The fixture is meaningful: both early EOS stops and full-length runs occur.
    assert one[0] == " Paris"
    lengths = {len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in one}
    assert min(lengths) <= 2 and max(lengths) >= MAX_NEW - 2


def test_generate_shares_a_common_prompt_prefix(
    tiny: tuple[Any, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Chat prompts share the template's head: it runs once, and results do not change."""
    model, tokenizer = tiny
    system = "Please answer the question in one short sentence."
    prompts = [
        tokenizer(
            tokenizer.apply_chat_template(
                [{"role": "system", "content": system}, {"role": "user", "content": q}],
                tokenize=False,
                add_generation_prompt=True,
            ),
            add_special_tokens=False,
        )["input_ids"]
        for q, _ in QA_PAIRS
    ]
    real_forward = engine._forward
    shapes: list[tuple[int, ...]] = []

    def forward(model: Any, input_ids: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        shapes.append(tuple(input_ids.shape))
        return real_forward(model, input_ids, *args, **kwargs)

    monkeypatch.setattr(engine, "_forward", forward)
    out16 = engine.generate(model, tokenizer, prompts, max_new_tokens=MAX_NEW, batch_size=16)
    assert shapes[0][0] == 1 and shapes[0][1] >= 10  # the shared prefix, once
    prefills = shapes[1 : next(k for k, sh in enumerate(shapes) if sh[1] == 1)]
    assert sum(rows for rows, _ in prefills) == 16  # every prompt prefilled once ...
    assert max(width for _, width in prefills) < min(len(p) for p in prompts)  # ... suffix only
    out5 = engine.generate(model, tokenizer, prompts, max_new_tokens=MAX_NEW, batch_size=5)
    monkeypatch.setattr(engine, "_forward", real_forward)
    assert out16 == out5 == [_hf_generate(model, tokenizer, p, MAX_NEW) for p in prompts]


def test_generate_without_editable_cache_drops_rows_only(
    tiny: tuple[Any, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Models whose cache cannot be edited (sliding windows, ...): drop-only batching."""
    model, tokenizer = tiny
    prompts = _prompts(tokenizer)[:20]
    expected = engine.generate(model, tokenizer, prompts, max_new_tokens=MAX_NEW, batch_size=1)
    monkeypatch.setattr(
        engine, "_make_cache", lambda m: None
    )  # the model builds a plain DynamicCache
    assert (
        engine.generate(model, tokenizer, prompts, max_new_tokens=MAX_NEW, batch_size=6) == expected
    )


def test_growing_cache_layer_matches_plain_tensors() -> None:
    """The in-place KV buffer behaves exactly like concatenating tensors."""
    torch.manual_seed(0)
    layer = engine._GrowingLayer()
    ref_k, ref_v = torch.randn(3, 2, 5, 4), torch.randn(3, 2, 5, 4)
    layer.update(ref_k.clone(), ref_v.clone())
    for _ in range(engine._CACHE_GROW + 10):  # past the preallocated margin: one regrowth
        k, v = torch.randn(3, 2, 1, 4), torch.randn(3, 2, 1, 4)
        keys, values = layer.update(k, v)
        ref_k, ref_v = torch.cat([ref_k, k], dim=2), torch.cat([ref_v, v], dim=2)
        assert torch.equal(keys, ref_k) and torch.equal(values, ref_v)
    assert layer.get_seq_length() == ref_k.shape[2]

    layer.batch_select_indices(torch.tensor([2, 0]))
    layer.trim_left(3)
    ref_k, ref_v = ref_k[[2, 0]][:, :, 3:], ref_v[[2, 0]][:, :, 3:]
    assert torch.equal(layer._live()[0], ref_k) and layer.get_seq_length() == ref_k.shape[2]

    # Merge two more layers of different lengths: everything left-padded to the widest.
    width = ref_k.shape[2] + 4
    other = engine._GrowingLayer()
    ok, ov = torch.randn(1, 2, width, 4), torch.randn(1, 2, width, 4)
    other.update(ok, ov)
    short = engine._GrowingLayer()
    sk, sv = torch.randn(2, 2, 3, 4), torch.randn(2, 2, 3, 4)
    short.update(sk, sv)
    layer.absorb([other, short], width)

    def pad(x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.pad(x, (0, 0, width - x.shape[2], 0))

    ref_k = torch.cat([pad(ref_k), ok, pad(sk)])
    ref_v = torch.cat([pad(ref_v), ov, pad(sv)])
    assert torch.equal(layer._live()[0], ref_k) and torch.equal(layer._live()[1], ref_v)
    k, v = torch.randn(5, 2, 2, 4), torch.randn(5, 2, 2, 4)
    keys, values = layer.update(k, v)
    assert torch.equal(keys, torch.cat([ref_k, k], dim=2)) and torch.equal(
        values, torch.cat([ref_v, v], dim=2)
    )


def test_length_groups_limit_padding() -> None:
    lengths = [30, 11, 29, 12, 28, 12, 5, 27, 13] * 20
    groups = engine._length_groups(lengths)
    assert sorted(k for g in groups for k in g) == list(range(len(lengths)))
    for group in groups:
        sizes = [lengths[k] for k in group]
        padded = max(sizes) * len(sizes)
        assert padded <= 1.1 * sum(sizes) or padded <= engine._PREFILL_MIN_TOKENS
    assert engine._length_groups([7]) == [[0]]


def test_generate_stop_strings_truncate(tiny: tuple[Any, Any]) -> None:
    model, tokenizer = tiny
    prompts = _prompts(tokenizer)
    full = engine.generate(model, tokenizer, prompts, max_new_tokens=MAX_NEW, batch_size=8)
    stops = ["\n", " is", "."]
    stopped = engine.generate(
        model, tokenizer, prompts, max_new_tokens=MAX_NEW, stop=stops, batch_size=8
    )
    hits = 0
    for f, s in zip(full, stopped, strict=True):
        cuts = [f.find(x) for x in stops if x in f]
        expected = f[: min(cuts)] if cuts else f
        hits += bool(cuts)
        assert s == expected
        assert not any(x in s for x in stops)
    assert hits >= 5  # the stop strings really occurred


def test_generate_on_result_called_once_per_prompt(tiny: tuple[Any, Any]) -> None:
    model, tokenizer = tiny
    prompts = _prompts(tokenizer)
    seen: list[tuple[int, str]] = []
    out = engine.generate(
        model,
        tokenizer,
        prompts,
        max_new_tokens=8,
        batch_size=5,
        on_result=lambda i, t: seen.append((i, t)),
    )
    assert sorted(i for i, _ in seen) == list(range(len(prompts)))
    assert all(out[i] == t for i, t in seen)


def test_generate_on_result_exception_aborts(tiny: tuple[Any, Any]) -> None:
    model, tokenizer = tiny
    prompts = _prompts(tokenizer)
    calls: list[int] = []

    def boom(index: int, text: str) -> None:
        calls.append(index)
        if len(calls) == 3:
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        engine.generate(model, tokenizer, prompts, max_new_tokens=8, batch_size=4, on_result=boom)
    assert len(calls) == 3


def test_generate_respects_generation_config_eos(tiny: tuple[Any, Any]) -> None:
    model, tokenizer = tiny
    prompt = tokenizer(
        "Question: What is the largest ocean on Earth?\nAnswer:", add_special_tokens=False
    )
    ids = prompt["input_ids"]
    (text,) = engine.generate(model, tokenizer, [ids], max_new_tokens=MAX_NEW)
    assert text == " The Pacific Ocean"
    second = tokenizer(" The Pacific Ocean", add_special_tokens=False)["input_ids"][1]
    saved = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, second]
    try:
        (cut,) = engine.generate(model, tokenizer, [ids], max_new_tokens=MAX_NEW)
    finally:
        model.generation_config.eos_token_id = saved
    assert cut == " The"


def test_generate_edge_cases(tiny: tuple[Any, Any]) -> None:
    model, tokenizer = tiny
    assert engine.generate(model, tokenizer, []) == []
    prompts = _prompts(tokenizer)[:3]
    assert engine.generate(model, tokenizer, prompts, max_new_tokens=0) == ["", "", ""]
    one_token = engine.generate(model, tokenizer, prompts, max_new_tokens=1, batch_size=2)
    assert one_token == [_hf_generate(model, tokenizer, p, 1) for p in prompts]
    with pytest.raises(ValueError):
        engine.generate(model, tokenizer, [[]])
    with pytest.raises(ValueError):
        engine.generate(model, tokenizer, prompts, batch_size=0)


# --------------------------------------------------------------------------- loglikelihood


def _naive_loglikelihood(
    model: Any, context: list[int], continuation: list[int]
) -> tuple[float, bool]:
    ids = torch.tensor([context + continuation])
    with torch.inference_mode():
        logprobs = torch.log_softmax(model(ids).logits[0].float(), dim=-1)
    span = logprobs[len(context) - 1 : -1]
    target = torch.tensor(continuation)
    total = span.gather(1, target[:, None]).sum().item()
    return total, bool((span.argmax(-1) == target).all())


def test_loglikelihood_matches_full_forward(tiny: tuple[Any, Any]) -> None:
    model, tokenizer = tiny

    def enc(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    requests: list[tuple[list[int], list[int]]] = []
    # Multiple choice: one context, several choices of different lengths (shared prefill).
    for q, a in QA_PAIRS[:6]:
        ctx = enc(f"Question: {q}\nAnswer:")
        for choice in [f" {a}", " Rome", " a much longer wrong answer than the others", " Ice"]:
            requests.append((ctx, enc(choice)))
    # Distinct contexts, single-token continuations, and a long context.
    requests += [(enc(t[:-1]), enc(t[-1:])) for t in CORPUS[:5]]
    requests.append((enc(" ".join(CORPUS[:3])), enc(" The river runs")))
    expected = [_naive_loglikelihood(model, c, x) for c, x in requests]
    for bs in (1, 5, "auto"):
        got = engine.loglikelihood(model, tokenizer, requests, batch_size=bs)
        assert len(got) == len(requests)
        for (lp, greedy), (ref_lp, ref_greedy) in zip(got, expected, strict=True):
            assert lp == pytest.approx(ref_lp, abs=1e-4)
            assert greedy == ref_greedy
    got = engine.loglikelihood(model, tokenizer, requests)
    # Taught answers are the greedy continuation; the others are not.
    assert got[0][1] is True and got[2][1] is False
    assert all(lp < 0 for lp, _ in got)


def test_loglikelihood_edge_cases(tiny: tuple[Any, Any]) -> None:
    model, tokenizer = tiny
    cont = tokenizer(" Paris", add_special_tokens=False)["input_ids"]
    (empty_ctx,) = engine.loglikelihood(model, tokenizer, [([], cont)])
    assert empty_ctx[0] == pytest.approx(
        _naive_loglikelihood(model, [tokenizer.bos_token_id], cont)[0], abs=1e-4
    )
    assert engine.loglikelihood(model, tokenizer, [([1, 2], [])]) == [(0.0, True)]
    assert engine.loglikelihood(model, tokenizer, []) == []
    # Over-long input: left-truncated to the model's context like lm-eval.
    long_ctx = tokenizer(" ".join(CORPUS) * 2, add_special_tokens=False)["input_ids"]
    assert len(long_ctx) > CONTEXT
    ((lp, _),) = engine.loglikelihood(model, tokenizer, [(long_ctx, cont)])
    kept = (long_ctx + cont)[-(CONTEXT + 1) :]
    assert lp == pytest.approx(_naive_loglikelihood(model, kept[: -len(cont)], cont)[0], abs=1e-4)


# --------------------------------------------------------------------------- token_nll


def _naive_nll(model: Any, ids: list[int]) -> tuple[float, int]:
    x = torch.tensor([ids])
    with torch.inference_mode():
        logits = model(x).logits[0].float()
    nll = torch.nn.functional.cross_entropy(logits[:-1], x[0, 1:], reduction="sum").item()
    return nll, len(ids) - 1


def test_token_nll_matches_straightforward_computation(tiny: tuple[Any, Any]) -> None:
    model, tokenizer = tiny
    texts = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in CORPUS[:8]]
    texts.append([tokenizer.bos_token_id] + texts[0])
    expected = [_naive_nll(model, t) for t in texts]
    for bs in (1, 3, "auto"):
        got = engine.token_nll(model, tokenizer, texts, batch_size=bs)
        for (nll, n), (ref, ref_n) in zip(got, expected, strict=True):
            assert n == ref_n
            assert nll == pytest.approx(ref, abs=1e-3, rel=1e-5)
    assert engine.token_nll(model, tokenizer, [[5], []]) == [(0.0, 0), (0.0, 0)]


def test_token_nll_windows_long_sequences(tiny: tuple[Any, Any]) -> None:
    model, tokenizer = tiny
    long = tokenizer(" ".join(CORPUS) * 2, add_special_tokens=False)["input_ids"]
    assert len(long) > 2 * CONTEXT

    def windowed(ids: list[int], window: int) -> tuple[float, int]:
        # Windows overlap by one token: each token after the first is predicted exactly once.
        total, count, start = 0.0, 0, 0
        while start < len(ids) - 1:
            nll, n = _naive_nll(model, ids[start : start + window])
            total, count, start = total + nll, count + n, start + window - 1
        return total, count

    short = long[:50]
    got = engine.token_nll(model, tokenizer, [long, short], batch_size=4)
    ref = windowed(long, CONTEXT)
    assert got[0][1] == len(long) - 1 == ref[1]
    assert got[0][0] == pytest.approx(ref[0], rel=1e-5)
    assert got[1][0] == pytest.approx(_naive_nll(model, short)[0], rel=1e-5)
    (explicit,) = engine.token_nll(model, tokenizer, [long], max_length=40)
    ref40 = windowed(long, 40)
    assert explicit[1] == ref40[1] and explicit[0] == pytest.approx(ref40[0], rel=1e-5)


def test_token_topk_matches_full_distribution_across_windows(tiny: tuple[Any, Any]) -> None:
    """Top-k at every predicted position, in order, across windows and batch sizes."""
    model, tokenizer = tiny
    long = tokenizer(" ".join(CORPUS) * 2, add_special_tokens=False)["input_ids"]
    short = long[:30]
    k = 5
    for bs in (1, "auto"):
        got = engine.token_topk(
            model, tokenizer, [long, short, [7]], k, batch_size=bs, max_length=40
        )
        nll = engine.token_nll(model, tokenizer, [long, short, [7]], max_length=40)
        assert [g.tokens for g in got] == [n for _, n in nll]
        assert [g.nll_sum for g in got] == pytest.approx([s for s, _ in nll], rel=1e-6)
        assert got[2].tokens == 0 and got[2].ids == [] and got[2].targets == []
        # Short text: one window, so the naive full forward gives the same distributions.
        with torch.inference_mode():
            lp = torch.log_softmax(model(torch.tensor([short])).logits[0, :-1].float(), dim=-1)
        values, indices = lp.topk(k, dim=-1)
        assert got[1].ids == indices.tolist()
        assert torch.tensor(got[1].logprobs) == pytest.approx(values, abs=1e-4)
        assert got[1].targets == short[1:]
        assert len(got[0].ids) == len(got[0].logprobs) == got[0].tokens == len(long) - 1
        assert got[0].targets == long[1:]
        assert all(len(row) == k for row in got[0].ids)
        assert all(row == sorted(row, reverse=True) for row in got[0].logprobs)
    with pytest.raises(ValueError):
        engine.token_topk(model, tokenizer, [short], 0)


def test_auto_batch_halves_on_oom_and_remembers(
    tiny: tuple[Any, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The CUDA OOM search, simulated on CPU: decode steps wider than 4 rows 'run out of memory'.

    The first prefill (16 rows) succeeds and finishes some prompts; the OOM comes later,
    so the retry must resume with the unfinished prompts only and never report twice.
    """
    model, tokenizer = tiny
    prompts = _prompts(tokenizer)
    expected = engine.generate(model, tokenizer, prompts, max_new_tokens=MAX_NEW, batch_size=16)
    monkeypatch.setattr(engine, "_oom_search", lambda device: True)
    monkeypatch.setattr(
        engine, "_CUDA_BATCH", {"generate": 16, "loglikelihood": 16, "token_nll": 16}
    )
    monkeypatch.setattr(engine, "_AUTO_BATCH", {})
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    real_forward = engine._forward
    widths: list[int] = []  # rows of every decode step that ran
    failed: list[int] = []  # rows of every forward that "ran out of memory"

    def forward(model: Any, input_ids: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if input_ids.shape[0] > 4 and input_ids.shape[1] == 1:
            failed.append(input_ids.shape[0])
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        if input_ids.shape[1] == 1:
            widths.append(input_ids.shape[0])
        return real_forward(model, input_ids, *args, **kwargs)

    monkeypatch.setattr(engine, "_forward", forward)
    seen: list[int] = []
    out = engine.generate(
        model,
        tokenizer,
        prompts,
        max_new_tokens=MAX_NEW,
        batch_size="auto",
        on_result=lambda i, t: seen.append(i),
    )
    assert out == expected
    assert sorted(seen) == list(range(len(prompts)))
    assert failed[0] > 8 and failed[-1] in range(5, 9)  # tried 16, then 8 ...
    assert max(widths) <= 4  # ... and decoded with 4
    key = (engine._model_key(model), "cpu", "generate")
    assert engine._AUTO_BATCH[key] == 4
    # Remembered: the next call starts at 4 and never tries wider batches.
    widths.clear()
    engine.generate(model, tokenizer, prompts[:10], max_new_tokens=4, batch_size="auto")
    assert max(widths) <= 4
    # Errors other than OOM propagate untouched.
    with pytest.raises(ValueError, match="boom"):
        engine._with_batch_size(
            model, "token_nll", "auto", lambda bs: (_ for _ in ()).throw(ValueError("boom"))
        )


def test_tiny_model_is_deterministic(tmp_path: Path) -> None:
    a = build_tiny_model(tmp_path / "a", seed=3)
    b = build_tiny_model(tmp_path / "b", seed=3)
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes()


def test_engine_calls_raise_no_deprecation_warnings(tiny: tuple[Any, Any]) -> None:
    """Evaluations log nothing about deprecated transformers APIs (the KV cache argument's
    name changed in transformers 5: the engine passes the one the model's forward takes)."""
    import warnings

    model, tokenizer = tiny
    prompts = _prompts(tokenizer)[:8]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        engine.generate(model, tokenizer, prompts, max_new_tokens=6, batch_size=3)
        engine.loglikelihood(model, tokenizer, [(prompts[0], prompts[1][:3])])
    deprecations = [
        str(w.message)
        for w in caught
        if issubclass(w.category, FutureWarning | DeprecationWarning)
        or "deprecated" in str(w.message).lower()
    ]
    assert deprecations == []
