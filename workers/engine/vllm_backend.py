"""vLLM in the worker process: paged attention, continuous batching, tensor/data parallelism.

One engine is kept per base model across jobs (start-up is paid once); LoRA adapters are
served unmerged on it with ``LoRARequest``, so a base run and an adapter run share the
engine. Prompts are tokenized here with the model's own Hugging Face tokenizer, exactly as
the transformers backend does (:func:`encode_prompt`), and handed to vLLM as token ids;
answers are decoded from the generated ids the same way. Log-likelihoods and token NLL come
from vLLM's prompt log-probabilities.

``import vllm`` happens only when this module is imported: the API and the transformers
worker never need it.
"""

from __future__ import annotations

import gc
import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from workers.engine.base import Backend, EngineInfo, Prompt
from workers.engine.transformers_backend import encode_prompt

os.environ.setdefault("VLLM_CONFIGURE_LOGGING", "0")
# The engine core runs in this process: a worker stopped by a signal (or os._exit after its
# grace period) leaves no engine process behind, and nothing is spawned from a module that
# is being imported.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

import vllm  # noqa: E402
from vllm import LLM, SamplingParams  # noqa: E402
from vllm.inputs import TokensPrompt  # noqa: E402
from vllm.lora.request import LoRARequest  # noqa: E402

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

# Prompts handed to vLLM at once between progress reports (vLLM schedules them itself).
GENERATE_CHUNK = 256
SCORE_CHUNK = 256


@dataclass(frozen=True)
class VLLMSettings:
    """Worker settings for the engine (``FORGETGUARD_VLLM_*``)."""

    tensor_parallel_size: int = 1
    data_parallel_size: int = 1
    gpu_memory_utilization: float = 0.9
    dtype: str = "auto"
    max_model_len: int | None = None
    max_lora_rank: int = 64


def _on_cpu() -> bool:
    from vllm.platforms import current_platform

    return bool(current_platform.is_cpu())


def engine_version() -> str:
    """``vllm X.Y.Z`` as recorded with every evaluation."""
    return f"vllm {vllm.__version__}"


class VLLMEngine:
    """A started ``vllm.LLM`` for one base model, with its tokenizer."""

    def __init__(self, model_dir: Path, tokenizer: Any, settings: VLLMSettings) -> None:
        self.model_dir = model_dir
        self.tokenizer = tokenizer
        self.settings = settings
        dtype = settings.dtype
        if dtype == "auto" and _on_cpu():
            # As the transformers engine does: float32 on CPU (vLLM's own "auto" would cast a
            # float32 checkpoint to 16 bits, and answers would no longer match).
            dtype = "float32"
        kwargs: dict[str, Any] = {
            "model": str(model_dir),
            "tokenizer": str(model_dir),
            "dtype": dtype,
            "trust_remote_code": False,
            # Only safetensors, as everywhere in forgetguard: never a pickle.
            "load_format": "safetensors",
            "tensor_parallel_size": settings.tensor_parallel_size,
            "gpu_memory_utilization": settings.gpu_memory_utilization,
            "enable_lora": True,
            "max_loras": 1,
            "max_lora_rank": settings.max_lora_rank,
            "lora_target_modules": list(LORA_TARGET_MODULES),
            "seed": 0,
        }
        if settings.data_parallel_size > 1:
            kwargs["data_parallel_size"] = settings.data_parallel_size
        if settings.max_model_len is not None:
            kwargs["max_model_len"] = settings.max_model_len
        if _on_cpu():
            # CUDA graphs do not exist on CPU; eager start-up is several times faster there.
            kwargs["enforce_eager"] = True
        self.llm = LLM(**kwargs)
        config = self.llm.llm_engine.model_config
        self.max_len = int(config.max_model_len)
        self.dtype = str(config.dtype).removeprefix("torch.")
        self._lora_ids: dict[str, int] = {}

    def lora(self, adapter_dir: Path | None) -> LoRARequest | None:
        """The request that serves ``adapter_dir`` unmerged (None: the base model)."""
        if adapter_dir is None:
            return None
        check_adapter(adapter_dir, self.settings.max_lora_rank)
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


class AdapterNotServable(ValueError):
    """An adapter this engine would not apply in full (vLLM would drop part of it)."""


def check_adapter(adapter_dir: Path, max_rank: int) -> None:
    """Refuse an adapter vLLM cannot serve exactly: wrong type, rank, or target modules."""
    try:
        config = json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise AdapterNotServable(f"cannot read {adapter_dir}/adapter_config.json: {exc}") from None
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


class EngineCache:
    """Keeps one engine (the last base model used) across jobs."""

    def __init__(self, settings: VLLMSettings) -> None:
        self.settings = settings
        self.current: VLLMEngine | None = None
        self._key: str | None = None

    def get(
        self, model_dir: Path, base_fingerprint: str, tokenizer: Callable[[], Any]
    ) -> VLLMEngine:
        """The engine for ``model_dir`` (started on first use; another model replaces it)."""
        if self.current is not None and self._key == base_fingerprint:
            return self.current
        self.close()
        log.info("starting vLLM %s on %s", vllm.__version__, model_dir)
        self.current = VLLMEngine(model_dir, tokenizer(), self.settings)
        self._key = base_fingerprint
        return self.current

    def close(self) -> None:
        """Shut the engine down (before training on a GPU, or when switching models)."""
        if self.current is not None:
            self.current.shutdown()
        self.current = None
        self._key = None


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

    def _prompt_logprobs(self, ids: list[list[int]]) -> list[list[tuple[float, bool]]]:
        """Per sequence, for every token after the first: ``(log p(token | before), greedy)``."""
        params = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=1)
        out: list[list[tuple[float, bool]]] = []
        for start in range(0, len(ids), SCORE_CHUNK):
            chunk = ids[start : start + SCORE_CHUNK]
            for seq, output in zip(chunk, self._run(chunk, params), strict=True):
                scored = []
                for token, entry in zip(seq[1:], (output.prompt_logprobs or [])[1:], strict=True):
                    logprob = entry[token]
                    scored.append((float(logprob.logprob), logprob.rank == 1))
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
            ctx = encode_prompt(self.tokenizer, prompt)
            cont = list(self.tokenizer(continuation, add_special_tokens=False).input_ids)
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
                (sum(lp for lp, _ in cont_scores), all(greedy for _, greedy in cont_scores))
            )
        return results

    def token_nll(self, texts: Sequence[str]) -> list[tuple[float, int]]:
        # Windows overlapping by one token, so each token is predicted exactly once.
        window = self.engine.max_len - 1
        pieces: list[tuple[int, list[int]]] = []
        for k, text in enumerate(texts):
            seq = list(self.tokenizer(text).input_ids)
            start = 0
            while start < len(seq) - 1:
                pieces.append((k, seq[start : start + window]))
                start += window - 1
        sums = [0.0] * len(texts)
        counts = [0] * len(texts)
        scored = self._prompt_logprobs([p for _, p in pieces])
        for (k, _), values in zip(pieces, scored, strict=True):
            sums[k] -= sum(lp for lp, _ in values)
            counts[k] += len(values)
        return list(zip(sums, counts, strict=True))


def device_description(settings: VLLMSettings) -> str:
    """``cpu``, or the CUDA devices the engine spans (tensor × data parallel)."""
    if _on_cpu():
        return "cpu"
    count = settings.tensor_parallel_size * settings.data_parallel_size
    return ",".join(f"cuda:{i}" for i in range(count))
