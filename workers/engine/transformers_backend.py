"""Batched evaluation engine: greedy generation, log-likelihoods and token NLL.

Pure compute on an already-loaded Hugging Face causal LM and its tokenizer: no database,
no file access. Everything runs under ``torch.inference_mode()`` with the model in eval
mode, on whatever device the model already lives on.

Why this exists instead of ``pipeline(...)`` per item: evaluation suites are hundreds of
short prompts. Decoding them one at a time leaves the hardware mostly idle (a batch-1
decode step reads every weight, plus per-layer launch overhead, to produce one token),
so the engine

* sorts prompts by length (longest first, so a CUDA OOM shows up on the first batch),
* left-pads each batch with an attention mask and explicit ``position_ids``,
* computes a prefix shared by all prompts (a chat template's system prompt) only once,
* decodes greedily with a KV cache in a hand-written loop that drops finished rows from
  the batch *and* from the cache, and refills freed slots with waiting prompts
  (continuous batching), so the batch stays full until the queue drains; the cache is
  preallocated and appended in place instead of re-concatenated at every step,
* shares the context computation between multiple-choice continuations in
  :func:`loglikelihood`.

Greedy outputs equal ``model.generate(do_sample=False)`` at batch size 1 up to
floating-point ties (padding changes matmul shapes, hence rounding, never the math).
"""

from __future__ import annotations

import copy
import inspect
import os
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
import torch.nn.functional as F

from workers.engine.base import Backend, EngineInfo, Prompt, TokenTopK

__all__ = [
    "TransformersBackend",
    "encode_pair",
    "encode_prompt",
    "configure_threads",
    "generate",
    "loglikelihood",
    "select_device",
    "select_dtype",
    "token_nll",
]

T = TypeVar("T")

# Working "auto" batch sizes, remembered per (model id, device, operation) so that the
# OOM-halving search runs once per process and not on every evaluation job.
_AUTO_BATCH: dict[tuple[str, str, str], int] = {}

# First guesses for batch_size="auto" (rows for generate, requests for loglikelihood,
# windows for token_nll). CPU: measured on 2 cores with SmolLM2-135M, the cost per
# generated token of a decode step falls from ~50 ms at 1 row to ~3.3 ms at 64 rows and
# ~3.0 ms at 128, where it flattens (the step becomes compute-bound); prefill-like
# forwards need a few hundred tokens to reach full speed. CUDA starts high and halves
# on OOM.
_CPU_BATCH = {"generate": 128, "loglikelihood": 128, "token_nll": 8}
_CUDA_BATCH = {"generate": 256, "loglikelihood": 128, "token_nll": 32}

# On CPU there is no OOM to search with (the kernel kills the process instead), so the
# generate batch is also capped so that its KV cache stays within this many bytes.
_CPU_KV_BUDGET = 4 << 30

# Upper bound for the float32 logits one forward may materialise (bytes). Full-vocabulary
# logits over long sequences dominate memory in loglikelihood/token_nll, so batches are
# also capped by this budget, not only by row count.
_CPU_LOGITS_BUDGET = 1 << 30
_CUDA_LOGITS_BUDGET = 4 << 30

# Fallback context length for models whose config does not state one.
_DEFAULT_MAX_LENGTH = 2048


# --------------------------------------------------------------------------- devices


def select_device(spec: str | None = None) -> torch.device:
    """Resolve "cpu", "cuda", "cuda:N"; None or "auto": CUDA if available, else CPU.

    Raises ``RuntimeError`` when CUDA is requested explicitly but not available, so a
    misconfigured worker fails loudly instead of silently running 50× slower on CPU.
    """
    if spec is None or spec.strip().lower() in ("", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(spec.strip())
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"device {spec!r} requested but CUDA is not available")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise RuntimeError(
                f"device {spec!r} requested but only "
                f"{torch.cuda.device_count()} CUDA device(s) exist"
            )
    return device


def select_dtype(device: torch.device) -> torch.dtype:
    """Inference dtype for ``device``: bf16 on CUDA when supported, else fp16; fp32 elsewhere.

    CPU stays in fp32 because CPU half-precision matmuls are slow (or emulated) on most
    hardware and results must be comparable run to run.
    """
    if device.type == "cuda":
        with torch.cuda.device(device):
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def _available_cores() -> int:
    """CPU cores this process may use: affinity mask, further capped by a cgroup v2 quota."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cores = os.cpu_count() or 1
    # Containers often expose every host core in the affinity mask but enforce a CFS
    # quota; oversubscribing threads then makes matmuls slower, not faster.
    try:
        with open("/sys/fs/cgroup/cpu.max", encoding="ascii") as fh:
            quota, period = fh.read().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, int(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cores)


def configure_threads() -> int:
    """Set torch's intra-op thread count to the cores available to this process; return it."""
    cores = _available_cores()
    torch.set_num_threads(cores)
    return cores


# --------------------------------------------------------------------------- helpers


def _model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _model_key(model: torch.nn.Module) -> str:
    config = getattr(model, "config", None)
    name = getattr(model, "name_or_path", None) or getattr(config, "_name_or_path", None)
    # Unnamed in-memory models fall back to their identity: sizes must not leak between them.
    return str(name) if name else f"{type(model).__name__}@{id(model)}"


def _eos_ids(model: torch.nn.Module, tokenizer: Any) -> frozenset[int]:
    """EOS ids from the tokenizer and the generation config (chat models often list several)."""
    ids: set[int] = set()
    candidates: list[Any] = [getattr(tokenizer, "eos_token_id", None)]
    gen_config = getattr(model, "generation_config", None)
    if gen_config is not None:
        candidates.append(getattr(gen_config, "eos_token_id", None))
    for cand in candidates:
        if cand is None:
            continue
        if isinstance(cand, int):
            ids.add(cand)
        else:
            ids.update(int(c) for c in cand)
    return frozenset(ids)


def _pad_id(model: torch.nn.Module, tokenizer: Any) -> int:
    """Any valid token id works as padding (it is always masked); prefer the declared pad token."""
    for cand in (
        getattr(tokenizer, "pad_token_id", None),
        getattr(getattr(model, "generation_config", None), "pad_token_id", None),
        getattr(tokenizer, "eos_token_id", None),
    ):
        if isinstance(cand, int):
            return cand
        if isinstance(cand, (list, tuple)) and cand:
            return int(cand[0])
    return 0


def _prefix_id(model: torch.nn.Module, tokenizer: Any) -> int:
    """Token used as context for an empty context (lm-eval's ``prefix_token_id``): BOS, else EOS."""
    for cand in (
        getattr(tokenizer, "bos_token_id", None),
        getattr(tokenizer, "eos_token_id", None),
    ):
        if isinstance(cand, int):
            return cand
    eos = sorted(_eos_ids(model, tokenizer))
    if eos:
        return eos[0]
    raise ValueError("empty context and the tokenizer has neither a BOS nor an EOS token")


def _max_context(model: torch.nn.Module) -> int:
    config = getattr(model, "config", None)
    for attr in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return _DEFAULT_MAX_LENGTH


_LOGITS_TO_KEEP: dict[type, bool] = {}


def _supports_logits_to_keep(model: torch.nn.Module) -> bool:
    cls = type(model)
    if cls not in _LOGITS_TO_KEEP:
        params = inspect.signature(model.forward).parameters
        _LOGITS_TO_KEEP[cls] = "logits_to_keep" in params
    return _LOGITS_TO_KEEP[cls]


_CACHE_ARGUMENT: dict[type, str] = {}


def _cache_argument(model: torch.nn.Module) -> str:
    """The forward argument (and output field) that carries the KV cache.

    transformers 5.x renamed ``past_key_values`` to ``cache`` and warns on the old name; older
    releases know only the old one. Read from the model that does the work: a peft wrapper's
    own ``forward`` passes keyword arguments through to it.
    """
    cls = type(model)
    if cls not in _CACHE_ARGUMENT:
        unwrap = getattr(model, "get_base_model", None)
        base: Any = unwrap() if callable(unwrap) else model
        params = inspect.signature(base.forward).parameters
        _CACHE_ARGUMENT[cls] = "cache" if "cache" in params else "past_key_values"
    return _CACHE_ARGUMENT[cls]


def _forward(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor,
    past_key_values: Any = None,
    *,
    use_cache: bool,
    last_only: bool,
) -> tuple[torch.Tensor, Any]:
    """One forward; returns (logits, cache). ``last_only``: only the last position's logits.

    Projecting only the last hidden state onto the vocabulary matters: for a 49k-token
    vocabulary the lm_head is ~20 % of a small model's weights, and the prefill would
    otherwise materialise ``batch × prompt_len × vocab`` floats for nothing.
    """
    kwargs: dict[str, Any] = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "position_ids": position_ids,
        "use_cache": use_cache,
        "return_dict": True,
    }
    cache_argument = _cache_argument(model)
    if past_key_values is not None:
        kwargs[cache_argument] = past_key_values
    if last_only and _supports_logits_to_keep(model):
        kwargs["logits_to_keep"] = 1
    out = model(**kwargs)
    logits = out.logits
    if last_only:
        logits = logits[:, -1:, :]
    return logits, (getattr(out, cache_argument) if use_cache else None)


def _is_oom(exc: BaseException) -> bool:
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def _oom_search(device: torch.device) -> bool:
    """Whether "auto" searches the batch size by halving on OOM (CUDA: memory is the limit)."""
    return device.type == "cuda"


def _kv_bytes_per_token(model: torch.nn.Module) -> int:
    """KV-cache bytes one token takes across all layers (0 when the config does not say)."""
    config: Any = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()
    try:
        heads = int(config.num_attention_heads)
        kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
        head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
        layers = int(config.num_hidden_layers)
    except (AttributeError, TypeError, ValueError, ZeroDivisionError):
        return 0
    return 2 * layers * kv_heads * head_dim * next(model.parameters()).element_size()


def _with_batch_size(
    model: torch.nn.Module,
    op: str,
    batch_size: int | str,
    run: Callable[[int], T],
    *,
    cpu_cap: int | None = None,
) -> T:
    """Call ``run(bs)``; for ``"auto"`` on CUDA, halve ``bs`` on OOM and remember what worked.

    On CPU, "auto" is a fixed default, lowered to ``cpu_cap`` when given (a memory bound).
    ``run`` must be restartable: each operation keeps its finished results outside the
    call and only recomputes what is missing, so a retry never repeats ``on_result``.
    """
    if batch_size != "auto":
        if isinstance(batch_size, str):
            batch_size = int(batch_size)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1 or 'auto', got {batch_size}")
        return run(batch_size)

    device = _model_device(model)
    key = (_model_key(model), str(device), op)
    if not _oom_search(device):
        bs = _AUTO_BATCH.get(key, _CPU_BATCH[op])
        return run(max(1, min(bs, cpu_cap)) if cpu_cap else bs)

    bs = _AUTO_BATCH.get(key, _CUDA_BATCH[op])
    while True:
        try:
            result = run(bs)
        except Exception as exc:
            if not _is_oom(exc) or bs == 1:
                raise
            # Drop references held by the failed attempt before retrying at half size.
            del exc
            torch.cuda.empty_cache()
            bs = max(1, bs // 2)
            continue
        _AUTO_BATCH[key] = bs
        return result


def _logits_budget(device: torch.device) -> int:
    return _CUDA_LOGITS_BUDGET if device.type == "cuda" else _CPU_LOGITS_BUDGET


def _vocab_size(model: torch.nn.Module) -> int:
    get_head: Any = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    weight = getattr(head, "weight", None)
    if isinstance(weight, torch.Tensor):
        return int(weight.shape[0])
    return int(getattr(model.config, "vocab_size", 50_000))


# --------------------------------------------------------------------------- generate


@dataclass
class _Row:
    """One prompt being decoded."""

    index: int
    ids: list[int] = field(default_factory=list)  # generated tokens, EOS excluded
    steps: int = 0  # tokens produced, EOS included (HF counts it against max_new_tokens)


# Extra positions allocated whenever a cache buffer (re)grows: one reallocation every
# ~64 decode steps instead of DynamicLayer's copy of the whole cache (torch.cat) in every
# layer at every step, a cost that grows with batch size times sequence length.
_CACHE_GROW = 64

# Shared prompt prefixes at least this long are computed once per generate() call. Chat
# templates put the same system prompt and turn markers in front of every question
# (~30 tokens for SmolLM2), often more than the question itself.
_MIN_SHARED_PREFIX = 4

try:  # transformers >= 4.56 (layered caches)
    from transformers.cache_utils import DynamicCache, DynamicLayer

    class _GrowingLayer(DynamicLayer):
        """A ``DynamicLayer`` whose keys/values live in a preallocated buffer, appended in place.

        ``self.keys``/``self.values`` are always views ``buffer[:, :, start:end]``, so all of
        transformers' own bookkeeping (``get_seq_length``, mask sizes) keeps working. The
        extra methods (left padding, row appends, left trimming) are what continuous
        batching needs; they only exist on this class, which is how the decoder knows the
        cache may be edited.
        """

        def __init__(self, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self._kbuf: torch.Tensor | None = None
            self._vbuf: torch.Tensor | None = None
            self._start = 0
            self._end = 0

        def _views(self) -> None:
            assert self._kbuf is not None and self._vbuf is not None
            self.keys = self._kbuf[:, :, self._start : self._end]
            self.values = self._vbuf[:, :, self._start : self._end]

        def _live(self) -> tuple[torch.Tensor, torch.Tensor]:
            """The cached keys and values (views into the buffers)."""
            assert self.keys is not None and self.values is not None
            return self.keys, self.values

        def _set(self, keys: torch.Tensor, values: torch.Tensor, extra: int) -> None:
            """Store ``keys``/``values`` at the start of new buffers with ``extra`` free slots."""
            b, h, n, d = keys.shape
            self._kbuf = keys.new_empty((b, h, n + extra, d))
            self._vbuf = values.new_empty((b, h, n + extra, values.shape[-1]))
            self._kbuf[:, :, :n].copy_(keys)
            self._vbuf[:, :, :n].copy_(values)
            self._start, self._end = 0, n
            self._views()

        def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
            self.dtype, self.device = key_states.dtype, key_states.device
            self.is_initialized = True

        def update(
            self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
        ) -> tuple[torch.Tensor, torch.Tensor]:
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            q = key_states.shape[-2]
            if self._kbuf is None:
                self._set(key_states, value_states, _CACHE_GROW)
                return self._live()
            if self._end + q > self._kbuf.shape[-2]:
                # Geometric-ish growth: long generations reallocate O(log n) times.
                live = self._end - self._start
                self._set(*self._live(), max(_CACHE_GROW, q, live // 2))
            assert self._kbuf is not None and self._vbuf is not None
            self._kbuf[:, :, self._end : self._end + q].copy_(key_states)
            self._vbuf[:, :, self._end : self._end + q].copy_(value_states)
            self._end += q
            self._views()
            return self._live()

        def get_seq_length(self) -> int:
            return self._end - self._start if self._kbuf is not None else 0

        def reset(self) -> None:
            self._kbuf = self._vbuf = None
            self._start = self._end = 0
            super().reset()

        def crop(self, tokens_to_remove: int) -> None:
            if tokens_to_remove > 0:
                raise ValueError("crop expects a negative number of tokens to remove")
            if self._kbuf is not None and tokens_to_remove:
                self._end = max(self._start, self._end + tokens_to_remove)
                self._views()

        def batch_select_indices(self, indices: torch.Tensor) -> None:
            if self._kbuf is not None and self._vbuf is not None:
                indices = indices.to(self._kbuf.device)
                self._kbuf = self._kbuf.index_select(0, indices)
                self._vbuf = self._vbuf.index_select(0, indices)
                self._views()

        def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
            self.batch_select_indices(beam_idx)

        def batch_repeat_interleave(self, repeats: int) -> None:
            if self._kbuf is not None:
                keys, values = self._live()
                self._set(
                    keys.repeat_interleave(repeats, 0),
                    values.repeat_interleave(repeats, 0),
                    _CACHE_GROW,
                )

        def offload(self) -> None:  # buffers are views; offloading is never enabled by the engine
            return None

        def prefetch(self) -> None:
            return None

        # ---- continuous-batching edits

        def absorb(self, others: Sequence[_GrowingLayer], width: int) -> None:
            """Become ``[self; *others]`` along the batch, each left-padded to ``width`` positions.

            The zero padding is masked out by the caller; one concatenation for all parts
            keeps a merge at a single copy of the cache.
            """
            keys_parts: list[torch.Tensor] = []
            values_parts: list[torch.Tensor] = []
            for layer in (self, *others):
                keys, values = layer._live()
                missing = width - keys.shape[-2]
                keys_parts.append(F.pad(keys, (0, 0, missing, 0)) if missing else keys)
                values_parts.append(F.pad(values, (0, 0, missing, 0)) if missing else values)
            self._set(torch.cat(keys_parts), torch.cat(values_parts), _CACHE_GROW)

        def trim_left(self, n: int) -> None:
            """Forget the first ``n`` positions (padding for every row left): no copy."""
            self._start = min(self._end, self._start + n)
            self._views()

except ImportError:  # pragma: no cover - older transformers: plain tuple caches, no refill
    DynamicCache = None  # type: ignore[assignment,misc]
    _GrowingLayer = None  # type: ignore[assignment,misc]


def _make_cache(model: torch.nn.Module) -> Any:
    """A DynamicCache of :class:`_GrowingLayer`, or None to let the model build its own.

    Sliding-window, quantized, linear-attention or shared-KV layers keep extra state, so
    for such models the model's own cache is used and the engine falls back to drop-only
    batching (still correct, the batch is just refilled only when it empties).
    """
    if DynamicCache is None:
        return None
    config: Any = getattr(model, "config", None)
    try:
        cache = DynamicCache(config=config)
    except Exception:  # exotic configs: let the model build what it needs
        return None
    layers = getattr(cache, "layers", None)
    if not layers or any(type(layer) is not DynamicLayer for layer in layers):
        return None
    cache.layers = [_GrowingLayer() for _ in layers]
    return cache


def _cache_is_mergeable(cache: Any) -> bool:
    """Whether ``cache`` is one of ours (editable in place) and holds something."""
    layers: list[Any] = list(getattr(cache, "layers", None) or [])
    return (
        bool(layers)
        and _GrowingLayer is not None
        and all(type(layer) is _GrowingLayer and layer.get_seq_length() > 0 for layer in layers)
    )


# Prefill groups: a prompt joins the current group while the group's padding stays under
# this share of its tokens, or while the group is too small to keep the matmuls efficient.
_PREFILL_PAD_TOLERANCE = 0.1
_PREFILL_MIN_TOKENS = 256


def _length_groups(lengths: list[int]) -> list[list[int]]:
    """Partition positions of ``lengths`` into groups of similar length (longest first)."""
    order = sorted(range(len(lengths)), key=lambda k: -lengths[k])
    groups: list[list[int]] = []
    current: list[int] = []
    width = real = 0
    for k in order:
        n = lengths[k]
        if current:
            padded = width * (len(current) + 1)
            small = padded <= _PREFILL_MIN_TOKENS
            if small or padded <= (1 + _PREFILL_PAD_TOLERANCE) * (real + n):
                current.append(k)
                real += n
                continue
            groups.append(current)
        current, width, real = [k], n, n
    if current:
        groups.append(current)
    return groups


class _Decoder:
    """State of one ``generate`` attempt at a fixed batch size (restartable after an OOM)."""

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        prompts: list[list[int]],
        results: list[str | None],
        *,
        max_new_tokens: int,
        stop: tuple[str, ...],
        on_result: Callable[[int, str], None] | None,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.prompts = prompts
        self.results = results
        self.max_new_tokens = max_new_tokens
        self.stop = stop
        self.on_result = on_result
        self.device = _model_device(model)
        self.eos = _eos_ids(model, tokenizer)
        self.pad = _pad_id(model, tokenizer)
        # A stop string of n characters spans at most n tokens (every token decodes to at
        # least one character, or to a partial byte that shows up as U+FFFD); two extra
        # tokens absorb the byte-level boundary effects of decoding a suffix.
        self.tail_tokens = max((len(s) for s in stop), default=0) + 2
        self.prefix_len = 0
        self.prefix_kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None

    # ---- per-token bookkeeping

    def _accept(self, row: _Row, token: int) -> bool:
        """Record ``token`` for ``row``; return True when the row is finished."""
        row.steps += 1
        if token in self.eos:
            return True
        row.ids.append(token)
        if self.stop:
            # Only the freshly decoded tail is checked: a stop string that just appeared
            # must end inside the newest token, so older text cannot contain a new match.
            tail = self.tokenizer.decode(row.ids[-self.tail_tokens :], skip_special_tokens=True)
            if any(s in tail for s in self.stop):
                return True
        return row.steps >= self.max_new_tokens

    def _finish(self, row: _Row) -> None:
        text = self.tokenizer.decode(row.ids, skip_special_tokens=True)
        if self.stop:
            cuts = [pos for pos in (text.find(s) for s in self.stop) if pos >= 0]
            if cuts:
                text = text[: min(cuts)]
        self.results[row.index] = text
        if self.on_result is not None:
            # Exceptions propagate on purpose: the caller persists per item and a failed
            # write must abort the job rather than silently lose results.
            self.on_result(row.index, text)

    # ---- model calls

    def _prefill(self, indices: list[int]) -> _Batch | None:
        """Prefill prompts ``indices``, pick their first tokens, drop rows already done.

        Prefill is compute-bound, so padding costs as much as real tokens: prompts are
        prefilled in groups of similar length (when the cache allows merging them
        afterwards) instead of padding every prompt to the longest one. Returns the
        surviving rows as one batch whose ``pending`` tokens are not yet in the cache, or
        None when every prompt finished on its first token.
        """
        if self.prefix_kv is not None or _make_cache(self.model) is not None:
            groups = _length_groups([len(self.prompts[i]) for i in indices])
        else:
            groups = [list(range(len(indices)))]
        batches = [self._prefill_group([indices[k] for k in group]) for group in groups]
        alive = [b for b in batches if b is not None]
        if not alive:
            return None
        alive[0].merge(alive[1:])
        return alive[0]

    def _prefill_group(self, indices: list[int]) -> _Batch | None:
        """Prefill one group of prompts, left-padded to the longest.

        With a shared prefix (``self.prefix_kv``), only the suffixes are run, on top of a
        copy of the prefix cache per row; the suffix padding then sits between prefix and
        suffix (``[prefix | pad | suffix]``), which the mask and position ids describe.
        """
        skip = self.prefix_len
        lengths = [len(self.prompts[i]) - skip for i in indices]
        width = max(lengths)
        ids = torch.full((len(indices), width), self.pad, dtype=torch.long)
        mask = torch.zeros((len(indices), width), dtype=torch.long)
        for r, (i, n) in enumerate(zip(indices, lengths, strict=True)):
            ids[r, width - n :] = torch.tensor(self.prompts[i][skip:], dtype=torch.long)
            mask[r, width - n :] = 1
        ids = ids.to(self.device)
        mask = mask.to(self.device)
        # Left padding: real tokens must still be numbered 0..n-1, as at batch size 1.
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0) + skip
        cache = _make_cache(self.model)
        if self.prefix_kv is not None:
            rows = len(indices)
            for layer, (keys, values) in zip(cache.layers, self.prefix_kv, strict=True):
                layer.update(keys.expand(rows, -1, -1, -1), values.expand(rows, -1, -1, -1))
            mask = torch.cat([mask.new_ones((rows, skip)), mask], dim=1)
        logits, cache = _forward(
            self.model, ids, mask, position_ids, cache, use_cache=True, last_only=True
        )
        batch = _Batch(
            rows=[_Row(index=i) for i in indices],
            cache=cache,
            mask=mask,
            pending=logits[:, -1, :].argmax(dim=-1),
            positions=mask.sum(-1),
        )
        return self._settle(batch, batch.pending.tolist(), trim=False)

    def _share_prefix(self, todo: list[int]) -> None:
        """Compute the prompts' common prefix once, if long enough and the cache is editable."""
        self.prefix_len, self.prefix_kv = 0, None
        if len(todo) < 2:
            return
        first = self.prompts[todo[0]]
        common = min(len(self.prompts[i]) for i in todo) - 1  # every row needs >= 1 own token
        for i in todo[1:]:
            other = self.prompts[i]
            n = 0
            while n < common and first[n] == other[n]:
                n += 1
            common = n
            if common < _MIN_SHARED_PREFIX:
                return
        cache = _make_cache(self.model)
        if cache is None:
            return
        ids = torch.tensor([first[:common]], dtype=torch.long, device=self.device)
        mask = torch.ones_like(ids)
        positions = torch.arange(common, device=self.device)[None, :]
        _, cache = _forward(self.model, ids, mask, positions, cache, use_cache=True, last_only=True)
        self.prefix_kv = [(layer.keys.clone(), layer.values.clone()) for layer in cache.layers]
        self.prefix_len = common

    def _settle(self, batch: _Batch, tokens: list[int], *, trim: bool) -> _Batch | None:
        """Record each row's new token, report finished rows and drop them from the batch."""
        done = [self._accept(row, tok) for row, tok in zip(batch.rows, tokens, strict=True)]
        if not any(done):
            return batch
        for row, d in zip(batch.rows, done, strict=True):
            if d:
                self._finish(row)
        keep = [k for k, d in enumerate(done) if not d]
        if not keep:
            return None
        batch.select(keep, trim=trim)
        return batch

    def run(self, batch_size: int) -> None:
        """Decode every prompt whose result is still missing, ``batch_size`` rows at a time."""
        todo = [i for i, r in enumerate(self.results) if r is None]
        # Longest first: the biggest cache is allocated first (OOM shows up immediately)
        # and later, shorter prompts merge into the running batch without widening it.
        todo.sort(key=lambda i: (-len(self.prompts[i]), i))
        queue = todo[::-1]  # pop() from the end = next longest
        self._share_prefix(todo)
        # Refilling costs one extra forward (a prefill) per admission, so wait until a
        # quarter of the batch is free instead of admitting prompts one by one.
        refill_at = max(1, batch_size // 4)
        batch: _Batch | None = None

        while batch is not None or queue:
            free = batch_size - (len(batch.rows) if batch is not None else 0)
            if queue and (batch is None or (batch.mergeable and free >= refill_at)):
                admitted = self._prefill([queue.pop() for _ in range(min(free, len(queue)))])
                if batch is None:
                    batch = admitted
                elif admitted is not None:
                    batch.merge([admitted])
            if batch is not None:
                batch = self._step(batch)

    def _step(self, batch: _Batch) -> _Batch | None:
        """One decode step for every active row: feed the pending token, pick the next."""
        batch.mask = torch.cat([batch.mask, batch.mask.new_ones((batch.mask.shape[0], 1))], dim=1)
        logits, batch.cache = _forward(
            self.model,
            batch.pending.unsqueeze(1),
            batch.mask,
            batch.positions.unsqueeze(1),
            batch.cache,
            use_cache=True,
            last_only=True,
        )
        batch.pending = logits[:, -1, :].argmax(dim=-1)
        batch.positions = batch.positions + 1
        # A single host sync per step; the bookkeeping is plain Python.
        return self._settle(batch, batch.pending.tolist(), trim=True)


@dataclass
class _Batch:
    """Rows being decoded together, with their KV cache.

    Invariant: the cache holds each row's prompt and all generated tokens but the last
    (``pending``), which is fed at the next decode step at position ``positions``.
    ``mask`` marks real (1) versus padding (0) cache positions, padding on the left.
    """

    rows: list[_Row]
    cache: Any
    mask: torch.Tensor
    pending: torch.Tensor
    positions: torch.Tensor

    @property
    def mergeable(self) -> bool:
        """Whether other rows may join (the cache supports in-place edits)."""
        return _cache_is_mergeable(self.cache)

    def select(self, keep: list[int], *, trim: bool) -> None:
        """Keep only rows ``keep`` (drop finished ones from the batch and the cache)."""
        keep_t = torch.tensor(keep, dtype=torch.long, device=self.mask.device)
        self.cache.batch_select_indices(keep_t)
        self.rows = [self.rows[k] for k in keep]
        self.mask, self.pending, self.positions = (
            self.mask[keep_t],
            self.pending[keep_t],
            self.positions[keep_t],
        )
        if trim and _cache_is_mergeable(self.cache):
            # Finished long rows leave columns that are padding for every row left;
            # dropping them keeps attention cost proportional to the live rows.
            live = self.mask.any(dim=0).nonzero()
            start = int(live[0]) if live.numel() else 0
            if start > 0:
                for layer in self.cache.layers:
                    layer.trim_left(start)
                self.mask = self.mask[:, start:]

    def merge(self, others: Sequence[_Batch]) -> None:
        """Append the rows of ``others`` (continuous batching): left-pad all to a common width."""
        if not others:
            return
        parts = [self, *others]
        width = max(b.mask.shape[1] for b in parts)
        for k, layer in enumerate(self.cache.layers):
            layer.absorb([b.cache.layers[k] for b in others], width)
        self.mask = torch.cat([F.pad(b.mask, (width - b.mask.shape[1], 0)) for b in parts])
        self.rows = [row for b in parts for row in b.rows]
        self.pending = torch.cat([b.pending for b in parts])
        self.positions = torch.cat([b.positions for b in parts])


def generate(
    model: torch.nn.Module,
    tokenizer: Any,
    prompts: list[list[int]],
    *,
    max_new_tokens: int = 50,
    stop: Sequence[str] = (),
    batch_size: int | str = "auto",
    on_result: Callable[[int, str], None] | None = None,
) -> list[str]:
    """Greedy-decode a continuation for every prompt; return the texts in input order.

    ``prompts`` are token-id lists, already tokenized (special tokens included as the
    caller wants). Each result is ``tokenizer.decode(new_tokens, skip_special_tokens=True)``,
    not stripped. A sequence stops at EOS (the tokenizer's and every id in
    ``model.generation_config.eos_token_id``), when its decoded continuation contains one
    of ``stop`` (the text is then cut before the earliest stop string), or after
    ``max_new_tokens`` tokens. ``on_result(index, text)`` is called once per prompt as it
    finishes; an exception from it aborts generation and propagates.

    ``batch_size`` is a row count or ``"auto"`` (CPU: a fixed default; CUDA: start large,
    halve on OOM, remember the working size per model and device).
    """
    for k, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(
                f"prompt {k} is empty: greedy decoding needs at least one context token"
            )
    results: list[str | None] = [None] * len(prompts)
    if not prompts:
        return []
    if max_new_tokens <= 0:
        for k in range(len(prompts)):
            results[k] = ""
            if on_result is not None:
                on_result(k, "")
        return [""] * len(prompts)

    # Left-truncate prompts that cannot fit with their continuation (lm-eval does the same):
    # positions past the model's context are meaningless for RoPE/learned embeddings.
    limit = _max_context(model) - max_new_tokens
    if limit > 0:
        prompts = [p[-limit:] if len(p) > limit else list(p) for p in prompts]

    model.eval()
    decoder = _Decoder(
        model,
        tokenizer,
        prompts,
        results,
        max_new_tokens=max_new_tokens,
        stop=tuple(stop),
        on_result=on_result,
    )
    per_row = _kv_bytes_per_token(model) * (max(len(p) for p in prompts) + max_new_tokens)
    cpu_cap = _CPU_KV_BUDGET // per_row if per_row else None
    with torch.inference_mode():
        _with_batch_size(model, "generate", batch_size, decoder.run, cpu_cap=cpu_cap)
    return [r if r is not None else "" for r in results]


# --------------------------------------------------------------------------- loglikelihood


def _chunks_by_budget(
    items: list[T], weight: Callable[[T], int], max_rows: int, budget: int
) -> list[list[T]]:
    """Split ``items`` (in order) into chunks of <= ``max_rows`` rows and ``budget`` weight."""
    chunks: list[list[T]] = []
    current: list[T] = []
    total = 0
    for item in items:
        w = weight(item)
        if current and (len(current) >= max_rows or total + w > budget):
            chunks.append(current)
            current, total = [], 0
        current.append(item)
        total += w
    if current:
        chunks.append(current)
    return chunks


def loglikelihood(
    model: torch.nn.Module,
    tokenizer: Any,
    requests: list[tuple[list[int], list[int]]],
    *,
    batch_size: int | str = "auto",
) -> list[tuple[float, bool]]:
    """Score ``(context_ids, continuation_ids)``: ``(sum log p(continuation | context), greedy)``.

    lm-eval semantics: ``is_greedy`` is True when every continuation token is the argmax
    at its position. An empty context is replaced by the BOS token (else EOS), like
    lm-eval's prefix token; an empty continuation scores ``(0.0, True)``. Over-long
    inputs are left-truncated to the model's context.

    Requests sharing the same context (multiple choice) run that context once: the
    context is prefilled into a KV cache, the cache rows are repeated per continuation,
    and only the continuations are run on top of it.
    """
    results: list[tuple[float, bool] | None] = [None] * len(requests)
    if not requests:
        return []
    max_len = _max_context(model)
    prefix = None
    # Normalise: (context, continuation) with a non-empty context that fits the window.
    norm: list[tuple[tuple[int, ...], tuple[int, ...]]] = []
    for k, (ctx, cont) in enumerate(requests):
        ctx, cont = list(ctx), list(cont)
        if not cont:
            results[k] = (0.0, True)
            norm.append(((), ()))
            continue
        if len(cont) > max_len:
            raise ValueError(
                f"request {k}: continuation of {len(cont)} tokens exceeds "
                f"the model context {max_len}"
            )
        if not ctx:
            if prefix is None:
                prefix = _prefix_id(model, tokenizer)
            ctx = [prefix]
        # The model sees (ctx + cont)[:-1]; keep its last max_len tokens.
        overflow = len(ctx) + len(cont) - 1 - max_len
        if overflow > 0:
            ctx = ctx[overflow:]
        norm.append((tuple(ctx), tuple(cont)))

    device = _model_device(model)
    vocab = _vocab_size(model)
    pad = _pad_id(model, tokenizer)
    model.eval()

    def run(bs: int) -> None:
        groups: dict[tuple[int, ...], list[int]] = defaultdict(list)
        for k, (ctx, _cont) in enumerate(norm):
            if results[k] is None:
                groups[ctx].append(k)
        # Units of work: one context with up to bs of its continuations.
        units: list[tuple[tuple[int, ...], list[int]]] = []
        for ctx, members in groups.items():
            for s in range(0, len(members), bs):
                units.append((ctx, members[s : s + bs]))
        # Longest context first (OOM early); similar context lengths share a padded batch
        # (continuation lengths are grouped separately, inside each batch).
        units.sort(key=lambda u: (-len(u[0]), -max(len(norm[k][1]) for k in u[1])))
        budget = _logits_budget(device) // (
            4 * vocab * 3
        )  # tokens of float32 logits (+log_softmax copies)
        batches: list[list[tuple[tuple[int, ...], list[int]]]] = []
        current: list[tuple[tuple[int, ...], list[int]]] = []
        rows = 0
        tokens = 0
        for unit in units:
            unit_rows = len(unit[1])
            unit_tokens = sum(len(norm[k][1]) for k in unit[1])
            if current and (rows + unit_rows > bs or tokens + unit_tokens > budget):
                batches.append(current)
                current, rows, tokens = [], 0, 0
            current.append(unit)
            rows += unit_rows
            tokens += unit_tokens
        if current:
            batches.append(current)
        for batch in batches:
            _loglikelihood_batch(model, batch, norm, results, pad, device)

    with torch.inference_mode():
        _with_batch_size(model, "loglikelihood", batch_size, run)
    return [r if r is not None else (0.0, True) for r in results]


def _loglikelihood_batch(
    model: torch.nn.Module,
    batch: list[tuple[tuple[int, ...], list[int]]],
    norm: list[tuple[tuple[int, ...], tuple[int, ...]]],
    results: list[tuple[float, bool] | None],
    pad: int,
    device: torch.device,
) -> None:
    """Score one batch of (context, request indices) units; fills ``results``."""
    contexts = [ctx for ctx, _ in batch]
    # Phase 1: every distinct context once, left-padded, cached.
    width = max(len(c) for c in contexts)
    ids = torch.full((len(contexts), width), pad, dtype=torch.long)
    mask = torch.zeros((len(contexts), width), dtype=torch.long)
    for r, ctx in enumerate(contexts):
        ids[r, width - len(ctx) :] = torch.tensor(ctx, dtype=torch.long)
        mask[r, width - len(ctx) :] = 1
    ids, mask = ids.to(device), mask.to(device)
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    ctx_logits, cache = _forward(model, ids, mask, position_ids, use_cache=True, last_only=True)
    first_logprobs = torch.log_softmax(
        ctx_logits[:, -1, :].float(), dim=-1
    )  # predicts continuation[0]

    # Flatten requests: which context row each one extends.
    req_index: list[int] = []
    req_ctx_row: list[int] = []
    for r, (_, members) in enumerate(batch):
        req_index.extend(members)
        req_ctx_row.extend([r] * len(members))
    conts = [norm[k][1] for k in req_index]
    ctx_rows = torch.tensor(req_ctx_row, dtype=torch.long, device=device)
    first_tokens = torch.tensor([c[0] for c in conts], dtype=torch.long, device=device)
    first_lp = first_logprobs[ctx_rows].gather(1, first_tokens[:, None]).squeeze(1)
    first_greedy = first_logprobs[ctx_rows].argmax(dim=-1) == first_tokens

    sums = first_lp.double().tolist()
    greedy = first_greedy.tolist()
    # Phase 2: the continuations' remaining tokens, in groups of similar length (padding
    # is real compute). Each group gets the context cache rows repeated once per
    # continuation and feeds continuation[:-1] (right-padded) on top of them; the mask
    # then reads [left pad | context | continuation | right pad]. Right padding is
    # harmless: no real token attends to a later position.
    longer = [r for r, c in enumerate(conts) if len(c) > 1]
    groups = _length_groups([len(conts[r]) - 1 for r in longer])
    for g, group in enumerate(groups):
        rows = [longer[k] for k in group]
        # Every group but the last works on a copy: feeding tokens extends the cache.
        group_cache = cache if g == len(groups) - 1 else copy.deepcopy(cache)
        row_ctx = ctx_rows[torch.tensor(rows, dtype=torch.long, device=device)]
        group_cache.batch_select_indices(row_ctx)
        tail = max(len(conts[r]) for r in rows) - 1
        cont_ids = torch.full((len(rows), tail), pad, dtype=torch.long)
        cont_mask = torch.zeros((len(rows), tail), dtype=torch.long)
        targets = torch.zeros((len(rows), tail), dtype=torch.long)
        for i, r in enumerate(rows):
            c = conts[r]
            cont_ids[i, : len(c) - 1] = torch.tensor(c[:-1], dtype=torch.long)
            targets[i, : len(c) - 1] = torch.tensor(c[1:], dtype=torch.long)
            cont_mask[i, : len(c) - 1] = 1
        cont_ids, cont_mask, targets = cont_ids.to(device), cont_mask.to(device), targets.to(device)
        full_mask = torch.cat([mask[row_ctx], cont_mask], dim=1)
        pos = mask.sum(-1)[row_ctx][:, None] + torch.arange(tail, device=device)[None, :]
        logits, _ = _forward(
            model, cont_ids, full_mask, pos, group_cache, use_cache=True, last_only=False
        )
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        valid = cont_mask.bool()
        tok_lp = (logprobs.gather(2, targets[:, :, None]).squeeze(2) * valid).double().sum(dim=1)
        tok_greedy = ((logprobs.argmax(dim=-1) == targets) | ~valid).all(dim=1)
        for i, r in enumerate(rows):
            sums[r] += float(tok_lp[i])
            greedy[r] = greedy[r] and bool(tok_greedy[i])

    for k, s, gr in zip(req_index, sums, greedy, strict=True):
        results[k] = (float(s), bool(gr))


# --------------------------------------------------------------------------- token_nll


def token_nll(
    model: torch.nn.Module,
    tokenizer: Any,
    texts_ids: list[list[int]],
    *,
    batch_size: int | str = "auto",
    max_length: int | None = None,
) -> list[tuple[float, int]]:
    """Per sequence: ``(sum of NLL over predicted tokens, number of predicted tokens)``.

    Every token but the first is predicted from the tokens before it (prepend BOS to the
    ids if the first token should be scored too). Sequences longer than ``max_length``
    (default: the model's context) are split into windows of ``max_length`` tokens that
    overlap by exactly one token, the previous window's last token serving as the new
    window's first context token, so each token is predicted exactly once
    (lm-eval's rolling windows with a one-token context). Divide the sums by the counts
    for NLL/token; ``exp`` of that is perplexity.
    """
    return [
        (r.nll_sum, r.tokens)
        for r in _token_pass(
            model, tokenizer, texts_ids, batch_size=batch_size, max_length=max_length, k=0
        )
    ]


def token_topk(
    model: torch.nn.Module,
    tokenizer: Any,
    texts_ids: list[list[int]],
    k: int,
    *,
    batch_size: int | str = "auto",
    max_length: int | None = None,
) -> list[TokenTopK]:
    """``token_nll`` plus, at every predicted position, the ``k`` most probable next tokens.

    One forward pass per window, exactly as ``token_nll`` (same windows, same sums): the
    top-k ids and log-probabilities (full-vocabulary log-softmax, most probable first) and
    the token actually there are collected alongside, in position order.
    """
    if k < 1:
        raise ValueError("k must be at least 1")
    return _token_pass(
        model, tokenizer, texts_ids, batch_size=batch_size, max_length=max_length, k=k
    )


def _token_pass(
    model: torch.nn.Module,
    tokenizer: Any,
    texts_ids: list[list[int]],
    *,
    batch_size: int | str,
    max_length: int | None,
    k: int,
) -> list[TokenTopK]:
    if not texts_ids:
        return []
    window = max_length if max_length is not None else _max_context(model)
    if window < 2:
        raise ValueError("max_length must be at least 2")
    windows: list[tuple[int, list[int]]] = []
    for t, seq in enumerate(texts_ids):
        start = 0
        while start < len(seq) - 1:
            windows.append((t, list(seq[start : start + window])))
            start += window - 1

    device = _model_device(model)
    vocab = _vocab_size(model)
    pad = _pad_id(model, tokenizer)
    model.eval()
    sums: dict[int, float] = defaultdict(float)
    counts: dict[int, int] = defaultdict(int)
    # Per window: (top-k ids, top-k log-probabilities, targets) for its predicted positions.
    tops: dict[int, tuple[list[list[int]], list[list[float]], list[int]]] = {}
    done_windows: set[int] = set()
    order = sorted(range(len(windows)), key=lambda w: (-len(windows[w][1]), w))

    def run(bs: int) -> None:
        todo = [w for w in order if w not in done_windows]
        # Logits plus the float copy (and the log-softmax when collecting top-k).
        budget = _logits_budget(device) // (4 * vocab * (4 if k else 3))
        for chunk in _chunks_by_budget(todo, lambda w: len(windows[w][1]), bs, budget):
            width = max(len(windows[w][1]) for w in chunk)
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for r, w in enumerate(chunk):
                seq = windows[w][1]
                ids[r, : len(seq)] = torch.tensor(seq, dtype=torch.long)
                mask[r, : len(seq)] = 1
            ids, mask = ids.to(device), mask.to(device)
            # Right padding: positions are plain 0..n-1 for every real token.
            position_ids = torch.arange(width, device=device)[None, :].expand(len(chunk), -1)
            logits, _ = _forward(model, ids, mask, position_ids, use_cache=False, last_only=False)
            predicting = logits[:, :-1, :].float()
            nll = F.cross_entropy(
                predicting.reshape(-1, logits.shape[-1]),
                ids[:, 1:].reshape(-1),
                reduction="none",
            ).view(len(chunk), width - 1)
            valid = mask[:, 1:].bool()
            per_row = (nll * valid).double().sum(dim=1).tolist()
            n_pred = valid.sum(dim=1).tolist()
            if k:
                values, indices = torch.log_softmax(predicting, dim=-1).topk(
                    min(k, predicting.shape[-1]), dim=-1
                )
                top_ids, top_lps = indices.tolist(), values.tolist()
                targets = ids[:, 1:].tolist()
            for r, (w, s, n) in enumerate(zip(chunk, per_row, n_pred, strict=True)):
                t = windows[w][0]
                sums[t] += s
                counts[t] += int(n)
                if k:
                    n = int(n)
                    tops[w] = (top_ids[r][:n], top_lps[r][:n], targets[r][:n])
                done_windows.add(w)

    with torch.inference_mode():
        _with_batch_size(model, "token_nll", batch_size, run)
    results = [TokenTopK(float(sums[t]), int(counts[t]), [], [], []) for t in range(len(texts_ids))]
    for w in range(len(windows)) if k else ():
        out = results[windows[w][0]]
        top_ids_w, top_lps_w, targets_w = tops[w]
        out.ids.extend(top_ids_w)
        out.logprobs.extend(top_lps_w)
        out.targets.extend(targets_w)
    return results


# --------------------------------------------------------------------------- backend


def encode_prompt(tokenizer: Any, prompt: Prompt) -> list[int]:
    """Token ids for one prompt: the chat template for chat prompts, plain tokenization otherwise.

    Plain prompts are tokenized with the tokenizer's defaults, as the lesson's ``pipeline`` does;
    the chat template already contains its special tokens.
    """
    text, special = _prompt_text(tokenizer, prompt)
    return list(tokenizer(text, add_special_tokens=special).input_ids)


def _prompt_text(tokenizer: Any, prompt: Prompt) -> tuple[str, bool]:
    """The text the model reads for ``prompt``, and whether tokenizing it adds special tokens
    (a rendered chat template already holds them)."""
    if prompt.chat:
        rendered = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt.text}], tokenize=False, add_generation_prompt=True
        )
        return str(rendered), False
    return prompt.text, True


def encode_pair(tokenizer: Any, prompt: Prompt, continuation: str) -> tuple[list[int], list[int]]:
    """``(context ids, continuation ids)`` of a log-likelihood request, as the peers split them.

    lm-eval (``TemplateLM._encode_pair``) and lighteval (``tok_encode_pair``): the context's
    trailing whitespace moves to the continuation, ``context + continuation`` is encoded
    whole, and the continuation is what follows ``len(encode(context))`` tokens; so a
    continuation is tokenized as it reads after its context, and a chat template's final
    newline is scored with it. lighteval's one addition: when the continuation merged into
    the context's last token, that token is the continuation.
    """
    context, special = _prompt_text(tokenizer, prompt)
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    if not continuation:
        return list(tokenizer(context, add_special_tokens=special).input_ids), []
    whole = list(tokenizer(context + continuation, add_special_tokens=special).input_ids)
    cut = len(tokenizer(context, add_special_tokens=special).input_ids)
    if cut >= len(whole):
        cut = len(whole) - 1
    return whole[:cut], whole[cut:]


class TransformersBackend(Backend):
    """This module's batched engine over a loaded Hugging Face model (and peft adapter)."""

    name = "transformers"

    def __init__(self, model: torch.nn.Module, tokenizer: Any, batch_size: int | str = "auto"):
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size

    def info(self) -> EngineInfo:
        import transformers

        dtype = next(self.model.parameters()).dtype
        return EngineInfo(
            backend=self.name,
            device=str(_model_device(self.model)),
            dtype=str(dtype).removeprefix("torch."),
            version=f"transformers {transformers.__version__}",
        )

    def generate(
        self,
        prompts: Sequence[Prompt],
        *,
        max_new_tokens: int,
        stop: Sequence[str] = (),
        on_result: Callable[[int, str], None] | None = None,
    ) -> list[str]:
        return generate(
            self.model,
            self.tokenizer,
            [encode_prompt(self.tokenizer, p) for p in prompts],
            max_new_tokens=max_new_tokens,
            stop=stop,
            batch_size=self.batch_size,
            on_result=on_result,
        )

    def loglikelihood(self, requests: Sequence[tuple[Prompt, str]]) -> list[tuple[float, bool]]:
        encoded = [encode_pair(self.tokenizer, prompt, cont) for prompt, cont in requests]
        return loglikelihood(self.model, self.tokenizer, encoded, batch_size=self.batch_size)

    def token_nll(self, texts: Sequence[str]) -> list[tuple[float, int]]:
        ids = [list(self.tokenizer(text).input_ids) for text in texts]
        return token_nll(self.model, self.tokenizer, ids, batch_size=self.batch_size)

    def token_topk(self, texts: Sequence[str], k: int) -> list[TokenTopK]:
        ids = [list(self.tokenizer(text).input_ids) for text in texts]
        return token_topk(self.model, self.tokenizer, ids, k, batch_size=self.batch_size)
