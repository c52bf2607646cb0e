"""vLLM in the worker process: paged attention, continuous batching, tensor/data parallelism.

One engine is kept per base model across jobs (start-up is paid once); LoRA adapters are
served unmerged on it with ``LoRARequest``. LoRA support is switched on only for an adapter,
with the smallest ``max_lora_rank`` that fits it: on CPU an engine with LoRA enabled runs
every request through its LoRA kernels, adapter or not, and their cost grows with the rank
(measured on the reference model, 252 prompts: 9.7 s without LoRA, 17.4 s at rank 16, 34.1 s
at rank 64). So on CPU a base run and an adapter run each get an engine of their own (an
eager start-up takes seconds there); on GPUs, where start-up is the dear part and the LoRA
kernels are cheap, an engine with LoRA serves base runs too.

Prompts are tokenized here with the model's own Hugging Face tokenizer, exactly as the
transformers backend does (:func:`encode_prompt`), and handed to vLLM as token ids; answers
are decoded from the generated ids the same way. Log-likelihoods, token NLL and the top-k
next tokens (KL to base) come from vLLM's prompt log-probabilities.

``import vllm`` happens only when this module is imported: the API and the transformers
worker never need it.
"""

from __future__ import annotations

import gc
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# configure_process (workers/engine/process.py) has set VLLM_ENABLE_V1_MULTIPROCESSING=0 and
# VLLM_CONFIGURE_LOGGING=0 by now: the entry points call it before anything is imported.
import vllm
from vllm import LLM, SamplingParams
from vllm.inputs import TokensPrompt
from vllm.lora.request import LoRARequest

from app.core.clientfiles import ReadBudget, read_client_json
from app.core.errors import Problem
from app.core.modelcheck import safetensors_params
from workers.engine.base import Backend, EngineInfo, Prompt, TokenTopK
from workers.engine.transformers_backend import encode_pair, encode_prompt
from workers.engine.vllm_memory import (
    GIB,
    KV_CACHE_SETTING,
    UTILIZATION_CEILING,
    NotEnoughMemory,
    cpu_memory_utilization,
    kv_cache_bytes,
    memory,
    startup_advice,
)

log = logging.getLogger("forgetguard.worker")

# Modules an adapter may target. The output head is left out on purpose: wrapping it for
# LoRA breaks prompt log-probabilities on vLLM's CPU backend (0.32), and forgetguard's
# adapters never train it; an adapter that does is refused rather than silently cut.
LORA_TARGET_MODULES = (
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
)

# The ranks vLLM accepts as ``max_lora_rank`` (vllm.config.lora.MaxLoRARanks).
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)

# Prompts handed to vLLM at once between progress reports (vLLM schedules them itself).
GENERATE_CHUNK = 256
SCORE_CHUNK = 256


@dataclass(frozen=True)
class VLLMSettings:
    """Worker settings for the engine (``FORGETGUARD_VLLM_*``)."""

    tensor_parallel_size: int = 1
    data_parallel_size: int = 1
    # None: 0.9 on GPUs; on a CPU what the engine needs (workers.engine.vllm_memory).
    gpu_memory_utilization: float | None = None
    dtype: str = "auto"
    max_model_len: int | None = None
    # The largest adapter rank a worker serves; an engine is started with the smallest of
    # VLLM_LORA_RANKS that fits the adapter at hand.
    max_lora_rank: int = 64


def _on_cpu() -> bool:
    from vllm.platforms import current_platform

    return bool(current_platform.is_cpu())


def engine_version() -> str:
    """``vllm X.Y.Z`` as recorded with every evaluation."""
    return f"vllm {vllm.__version__}"


def engine_lora_rank(adapter_rank: int) -> int:
    """The smallest ``max_lora_rank`` vLLM accepts that serves an adapter of this rank."""
    for rank in VLLM_LORA_RANKS:
        if rank >= adapter_rank:
            return rank
    raise AdapterNotServable(
        f"adapter rank {adapter_rank} exceeds the largest rank vLLM serves ({VLLM_LORA_RANKS[-1]})"
    )


class VLLMEngine:
    """A started ``vllm.LLM`` for one base model, with its tokenizer.

    ``lora_rank`` None starts it without LoRA support; otherwise it serves adapters up to that
    rank (one of :data:`VLLM_LORA_RANKS`).
    """

    def __init__(
        self, model_dir: Path, tokenizer: Any, settings: VLLMSettings, lora_rank: int | None
    ) -> None:
        self.model_dir = model_dir
        self.tokenizer = tokenizer
        self.settings = settings
        self.lora_rank = lora_rank
        dtype = settings.dtype
        if dtype == "auto" and _on_cpu():
            # As the transformers engine does: float32 on CPU (vLLM's own "auto" would cast a
            # float32 checkpoint to 16 bits, and answers would no longer match).
            dtype = "float32"
        utilization = settings.gpu_memory_utilization
        if utilization is None:
            utilization = _cpu_utilization(model_dir, dtype) if _on_cpu() else UTILIZATION_CEILING
        kwargs: dict[str, Any] = {
            "model": str(model_dir),
            "tokenizer": str(model_dir),
            "dtype": dtype,
            "trust_remote_code": False,
            # Only safetensors, as everywhere in forgetguard: never a pickle.
            "load_format": "safetensors",
            "tensor_parallel_size": settings.tensor_parallel_size,
            "gpu_memory_utilization": utilization,
            "seed": 0,
        }
        if lora_rank is not None:
            kwargs |= {
                "enable_lora": True,
                "max_loras": 1,
                "max_lora_rank": lora_rank,
                "lora_target_modules": list(LORA_TARGET_MODULES),
            }
        if settings.data_parallel_size > 1:
            kwargs["data_parallel_size"] = settings.data_parallel_size
        if settings.max_model_len is not None:
            kwargs["max_model_len"] = settings.max_model_len
        if _on_cpu():
            # CUDA graphs do not exist on CPU; eager start-up is several times faster there.
            kwargs["enforce_eager"] = True
        try:
            self.llm = LLM(**kwargs)
        except ValueError as exc:
            if "memory" not in str(exc).lower():
                raise
            raise NotEnoughMemory(startup_advice(str(exc), utilization)) from None
        config = self.llm.llm_engine.model_config
        self.max_len = int(config.max_model_len)
        self.dtype = str(config.dtype).removeprefix("torch.")
        self._lora_ids: dict[str, int] = {}

    def serves(self, lora_rank: int | None) -> bool:
        """Whether this engine is the one to use for an adapter of ``lora_rank`` (None: base).

        On CPU only an exact fit: LoRA kernels slow every request and start-up is cheap. On
        GPUs any engine whose LoRA rank suffices: a start-up costs more than the kernels.
        """
        if _on_cpu():
            return self.lora_rank == (None if lora_rank is None else engine_lora_rank(lora_rank))
        return lora_rank is None or (self.lora_rank or 0) >= lora_rank

    def lora(self, adapter_dir: Path | None) -> LoRARequest | None:
        """The request that serves ``adapter_dir`` unmerged (None: the base model)."""
        if adapter_dir is None:
            return None
        rank = check_adapter(adapter_dir, self.settings.max_lora_rank)
        if self.lora_rank is None or rank > self.lora_rank:
            raise AdapterNotServable(
                f"this engine serves adapters up to rank {self.lora_rank or 0}, not {rank}"
            )
        key = str(adapter_dir)
        if key not in self._lora_ids:
            self._lora_ids[key] = len(self._lora_ids) + 1
        return LoRARequest(f"adapter-{self._lora_ids[key]}", self._lora_ids[key], key)

    def shutdown(self) -> None:
        """Stop the engine and free its memory (its engine-core process, its KV cache)."""
        llm = self.__dict__.pop("llm", None)
        if llm is None:
            return
        engine = getattr(llm, "llm_engine", None)
        core = getattr(engine, "engine_core", None)
        if core is not None and hasattr(core, "shutdown"):
            core.shutdown()
        del llm, engine, core
        gc.collect()


def _cpu_utilization(model_dir: Path, dtype: str) -> float:
    """A CPU engine's reservation: its weights (at ``dtype``) and KV cache, on what is free."""
    total, available = memory()
    params = safetensors_params(model_dir, model_dir.name)
    width = 4 if dtype in ("float32", "float", "auto") else 2
    kv_cache = kv_cache_bytes()
    # vLLM reads the variable itself: the KV cache it allocates is the one reserved for.
    os.environ.setdefault(KV_CACHE_SETTING, f"{kv_cache / GIB:g}")
    return cpu_memory_utilization(
        total=total, available=available, weights=params * width, kv_cache=kv_cache
    )


class AdapterNotServable(ValueError):
    """An adapter this engine would not apply in full (vLLM would drop part of it)."""


def check_adapter(adapter_dir: Path, max_rank: int) -> int:
    """The adapter's rank; refuses one vLLM cannot serve exactly (type, rank, target modules)."""
    try:
        config = read_client_json(
            adapter_dir / "adapter_config.json", "adapter_config.json", ReadBudget()
        )
    except Problem as exc:
        raise AdapterNotServable(exc.detail) from None
    if not isinstance(config, dict):
        raise AdapterNotServable("adapter_config.json is not a JSON object")
    if config.get("peft_type", "LORA") != "LORA":
        raise AdapterNotServable(f"vLLM serves LoRA adapters only, not {config.get('peft_type')}")
    rank = int(config.get("r", 0))
    if rank > max_rank:
        raise AdapterNotServable(
            f"adapter rank {rank} exceeds the engine's max_lora_rank {max_rank}; raise "
            "FORGETGUARD_VLLM_MAX_LORA_RANK on the worker"
        )
    targets = config.get("target_modules") or []
    if isinstance(targets, str):
        targets = [] if targets == "all-linear" else [targets]
    unknown = sorted(t for t in targets if t.rsplit(".", 1)[-1] not in LORA_TARGET_MODULES)
    if unknown or config.get("modules_to_save"):
        raise AdapterNotServable(
            f"the adapter trains {unknown or config.get('modules_to_save')}, which the vLLM "
            f"backend does not apply (it serves {list(LORA_TARGET_MODULES)}); evaluate it on "
            "the transformers backend"
        )
    engine_lora_rank(rank)
    return rank


class EngineCache:
    """Keeps one engine (the last base model used) across jobs."""

    def __init__(self, settings: VLLMSettings) -> None:
        self.settings = settings
        self.current: VLLMEngine | None = None
        self._key: str | None = None

    def get(
        self,
        model_dir: Path,
        base_fingerprint: str,
        tokenizer: Callable[[], Any],
        lora_rank: int | None = None,
    ) -> VLLMEngine:
        """The engine for ``model_dir`` and an adapter of ``lora_rank`` (None: no adapter).

        Started on first use; another model, or LoRA needs the running engine does not fit
        (:meth:`VLLMEngine.serves`), replace it.
        """
        current = self.current
        if current is not None and self._key == base_fingerprint and current.serves(lora_rank):
            return current
        self.close()
        engine_rank = None if lora_rank is None else engine_lora_rank(lora_rank)
        lora = "no LoRA" if engine_rank is None else f"LoRA up to rank {engine_rank}"
        log.info("starting vLLM %s on %s (%s)", vllm.__version__, model_dir, lora)
        self.current = VLLMEngine(model_dir, tokenizer(), self.settings, engine_rank)
        self._key = base_fingerprint
        return self.current

    def close(self) -> None:
        """Shut the engine down (before training on a GPU, or when switching models)."""
        if self.current is not None:
            self.current.shutdown()
        self.current = None
        self._key = None


@dataclass(frozen=True)
class _Scored:
    """One predicted prompt position: the token there, and the most probable ones."""

    logprob: float
    greedy: bool
    top_ids: list[int]
    top_logprobs: list[float]


class VLLMBackend(Backend):
    """The three request types on a :class:`VLLMEngine`, optionally through a LoRA adapter."""

    name = "vllm"

    def __init__(self, engine: VLLMEngine, adapter_dir: Path | None = None) -> None:
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.lora = engine.lora(adapter_dir)

    def info(self) -> EngineInfo:
        return EngineInfo(
            backend=self.name,
            device=device_description(self.engine.settings),
            dtype=self.engine.dtype,
            version=engine_version(),
        )

    def _run(self, ids: list[list[int]], params: Any) -> list[Any]:
        prompts = [TokensPrompt(prompt_token_ids=p) for p in ids]
        outputs: list[Any] = self.engine.llm.generate(
            prompts, params, use_tqdm=False, lora_request=self.lora
        )
        return outputs

    def generate(
        self,
        prompts: Sequence[Prompt],
        *,
        max_new_tokens: int,
        stop: Sequence[str] = (),
        on_result: Callable[[int, str], None] | None = None,
    ) -> list[str]:
        params = SamplingParams(
            temperature=0.0, max_tokens=max_new_tokens, stop=list(stop) or None, seed=0
        )
        results: list[str] = [""] * len(prompts)
        for start in range(0, len(prompts), GENERATE_CHUNK):
            chunk = prompts[start : start + GENERATE_CHUNK]
            ids = [encode_prompt(self.tokenizer, p) for p in chunk]
            for offset, output in enumerate(self._run(ids, params)):
                # Decoded as the transformers backend decodes, then cut before a stop string.
                text = self.tokenizer.decode(
                    list(output.outputs[0].token_ids), skip_special_tokens=True
                )
                cuts = [pos for pos in (text.find(s) for s in stop) if pos >= 0]
                if cuts:
                    text = text[: min(cuts)]
                results[start + offset] = text
                if on_result is not None:
                    on_result(start + offset, text)
        return results

    def _prompt_logprobs(self, ids: list[list[int]], k: int = 1) -> list[list[_Scored]]:
        """Per sequence, for every token after the first: its log-probability given what came
        before, whether it was the greedy choice, and the ``k`` most probable tokens there."""
        params = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=k)
        out: list[list[_Scored]] = []
        for start in range(0, len(ids), SCORE_CHUNK):
            chunk = ids[start : start + SCORE_CHUNK]
            for seq, output in zip(chunk, self._run(chunk, params), strict=True):
                scored = []
                for token, entry in zip(seq[1:], (output.prompt_logprobs or [])[1:], strict=True):
                    # The entry holds the top k by rank, plus the token there if it is not.
                    top = sorted(
                        ((lp.rank, i, lp.logprob) for i, lp in entry.items() if lp.rank <= k),
                        key=lambda t: (t[0], t[1]),
                    )
                    scored.append(
                        _Scored(
                            float(entry[token].logprob),
                            entry[token].rank == 1,
                            [i for _, i, _ in top],
                            [float(lp) for _, _, lp in top],
                        )
                    )
                out.append(scored)
        return out

    def _prefix_id(self) -> int:
        for cand in (self.tokenizer.bos_token_id, self.tokenizer.eos_token_id):
            if isinstance(cand, int):
                return cand
        raise ValueError("empty context and the tokenizer has neither a BOS nor an EOS token")

    def loglikelihood(self, requests: Sequence[tuple[Prompt, str]]) -> list[tuple[float, bool]]:
        # vLLM needs room for one generated token after the prompt.
        limit = self.engine.max_len - 1
        sequences: list[list[int]] = []
        starts: list[int] = []
        for prompt, continuation in requests:
            ctx, cont = encode_pair(self.tokenizer, prompt, continuation)
            if len(cont) >= limit:
                raise ValueError(
                    f"a continuation of {len(cont)} tokens exceeds the model context {limit}"
                )
            if not ctx:
                ctx = [self._prefix_id()]
            ctx = ctx[max(0, len(ctx) + len(cont) - limit) :]
            sequences.append(ctx + cont)
            starts.append(len(ctx))
        results: list[tuple[float, bool]] = []
        for seq, start, scored in zip(
            sequences, starts, self._prompt_logprobs(sequences), strict=True
        ):
            cont_scores = scored[start - 1 :] if len(seq) > start else []
            results.append(
                (sum(s.logprob for s in cont_scores), all(s.greedy for s in cont_scores))
            )
        return results

    def _windows(self, texts: Sequence[str]) -> list[tuple[int, list[int]]]:
        """``(text index, token ids)`` windows overlapping by one token, so each token is
        predicted exactly once (as the transformers engine windows long texts)."""
        window = self.engine.max_len - 1
        pieces: list[tuple[int, list[int]]] = []
        for k, text in enumerate(texts):
            seq = list(self.tokenizer(text).input_ids)
            start = 0
            while start < len(seq) - 1:
                pieces.append((k, seq[start : start + window]))
                start += window - 1
        return pieces

    def token_nll(self, texts: Sequence[str]) -> list[tuple[float, int]]:
        return [(t.nll_sum, t.tokens) for t in self.token_topk(texts, 1)]

    def token_topk(self, texts: Sequence[str], k: int) -> list[TokenTopK]:
        if k < 1:
            raise ValueError("k must be at least 1")
        pieces = self._windows(texts)
        sums, counts = [0.0] * len(texts), [0] * len(texts)
        tops: list[tuple[list[list[int]], list[list[float]], list[int]]] = [
            ([], [], []) for _ in texts
        ]
        scored_pieces = self._prompt_logprobs([p for _, p in pieces], k)
        for (t, seq), scored in zip(pieces, scored_pieces, strict=True):
            sums[t] -= sum(s.logprob for s in scored)
            counts[t] += len(scored)
            ids, logprobs, targets = tops[t]
            ids.extend(s.top_ids for s in scored)
            logprobs.extend(s.top_logprobs for s in scored)
            targets.extend(seq[1:])
        return [TokenTopK(sums[t], counts[t], *tops[t]) for t in range(len(texts))]


def device_description(settings: VLLMSettings) -> str:
    """``cpu``, or the CUDA devices the engine spans (tensor × data parallel)."""
    if _on_cpu():
        return "cpu"
    count = settings.tensor_parallel_size * settings.data_parallel_size
    return ",".join(f"cuda:{i}" for i in range(count))
