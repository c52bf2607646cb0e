"""What the service will load: checks on a model or adapter directory, without torch."""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path
from typing import Any

from app.core.clientfiles import (
    MAX_FILE_BYTES_SETTING,
    ReadBudget,
    open_client_file,
    read_client_file,
)
from app.core.config import Settings
from app.core.errors import Problem
from app.core.paths import resolve_under

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
# Every JSON file transformers or peft may read to pick classes; any of them may carry auto_map.
CONFIG_FILES = (
    "config.json",
    "tokenizer_config.json",
    "adapter_config.json",
    "generation_config.json",
    "processor_config.json",
    "preprocessor_config.json",
)
# Every other file transformers, tokenizers or peft read from a model or adapter folder by
# name (besides the weights): each must be a regular file within the metadata budget
# (FORGETGUARD_MAX_MODEL_FILE_BYTES), or a loader could be handed a FIFO or gigabytes.
LOADER_FILES = (
    *CONFIG_FILES,
    "tokenizer.json",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "model.safetensors.index.json",
)
CHAT_TEMPLATE_DIR = "additional_chat_templates"
_MAX_SCAN_DEPTH = 32


def _has_auto_map(data: object, depth: int = 0) -> bool:
    # Nested too: composite configs (text_config, vision_config, …) are configs of their own.
    if depth > _MAX_SCAN_DEPTH:
        return True  # absurdly deep: refuse rather than guess
    if isinstance(data, dict):
        return "auto_map" in data or any(_has_auto_map(v, depth + 1) for v in data.values())
    if isinstance(data, list):
        return any(_has_auto_map(v, depth + 1) for v in data)
    return False


def read_config(path: Path, shown: str, budget: ReadBudget) -> Any:
    """A JSON config of a client's model folder, read safely (422 naming it when unreadable)."""
    raw = read_client_file(path, shown, budget)
    try:
        return json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as exc:
        reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
        raise Problem(
            422, "Unreadable model config", f"{shown} is not valid JSON: {reason}"
        ) from None


def _check_loader_files(directory: Path, shown: str, budget: ReadBudget) -> None:
    """Each file a loader reads by name is a regular file, without holes, within the budget.

    Nothing is read here: opening checks type, size and holes (see app.core.clientfiles).
    """
    names = [name for name in LOADER_FILES if os.path.lexists(directory / name)]
    templates = directory / CHAT_TEMPLATE_DIR
    if templates.is_dir():
        names += [f"{CHAT_TEMPLATE_DIR}/{p.name}" for p in sorted(templates.glob("*.jinja"))]
    for name in names:
        with open_client_file(
            directory / name,
            f"{shown}/{name}",
            budget,
            max_bytes=budget.max_file_bytes,
            setting=MAX_FILE_BYTES_SETTING,
        ):
            pass


def _refuse_auto_map(directory: Path, shown: str, budget: ReadBudget) -> None:
    for name in CONFIG_FILES:
        path = directory / name
        if not os.path.lexists(path):
            continue
        data = read_config(path, f"{shown}/{name}", budget)
        if _has_auto_map(data):
            raise Problem(
                422,
                "Remote code refused",
                f"{shown}/{name} declares auto_map (custom modelling code); forgetguard never "
                "runs code from a model directory. Use a model whose architecture is built into "
                "transformers.",
            )


_CONVERT = {
    "model": "AutoModelForCausalLM.from_pretrained(dir).save_pretrained(dir, "
    "safe_serialization=True)",
    "adapter": "PeftModel.from_pretrained(base_model, dir).save_pretrained(dir, "
    "safe_serialization=True)",
}


def _require_safetensors(directory: Path, shown: str, *, kind: str) -> None:
    if any(directory.glob("*.safetensors")):
        return
    pickles = sorted(p.name for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise Problem(
            422,
            "Pickle weights refused",
            f"{kind} {shown} holds only pickle weights ({', '.join(pickles[:3])}); loading a "
            "pickle can run code, so forgetguard loads *.safetensors only. Convert it once, on "
            f"a machine where you trust the file: {_CONVERT[kind]}",
        )
    raise Problem(422, "No weights found", f"{kind} {shown} has no *.safetensors weights")


def _unreadable(kind: str, shown: str, exc: OSError) -> Problem:
    # strerror only: str(exc) names the resolved path, which the client need not see.
    return Problem(
        422,
        "Unreadable model directory",
        f"{kind} path {shown!r} cannot be read: {exc.strerror or 'I/O error'}",
    )


def check_model_dir(directory: Path, shown: str, budget: ReadBudget | None = None) -> None:
    """Refuse a model directory that is missing, lacks safetensors, or asks for remote code,
    or whose loader files are not regular files within the budget."""
    budget = budget or ReadBudget()
    try:
        if not directory.is_dir():
            raise Problem(422, "Model not found", f"model path {shown!r} is not a directory")
        _check_loader_files(directory, shown, budget)
        if not (directory / "config.json").is_file():
            raise Problem(
                422,
                "Not a model directory",
                f"model path {shown!r} has no config.json (a Hugging Face model "
                "directory is expected)",
            )
        _refuse_auto_map(directory, shown, budget)
        _require_safetensors(directory, shown, kind="model")
    except OSError as exc:
        raise _unreadable("model", shown, exc) from None


def check_adapter_dir(directory: Path, shown: str, budget: ReadBudget | None = None) -> None:
    """Refuse an adapter directory that is not a safetensors peft adapter.

    Its ``adapter_config.json`` is data: ``base_model_name_or_path`` in it is ignored, the
    adapter is applied to the model the request names.
    """
    budget = budget or ReadBudget()
    try:
        if directory.is_dir():
            _check_loader_files(directory, shown, budget)
        if not directory.is_dir() or not (directory / "adapter_config.json").is_file():
            raise Problem(
                422,
                "Adapter not found",
                f"adapter path {shown!r} is not a peft adapter directory (no adapter_config.json)",
            )
        _refuse_auto_map(directory, shown, budget)
        _require_safetensors(directory, shown, kind="adapter")
        safetensors_params(directory, shown, budget)
    except OSError as exc:
        raise _unreadable("adapter", shown, exc) from None


# A safetensors header is JSON describing the tensors; real ones are a few MiB at most.
MAX_SAFETENSORS_HEADER_BYTES = 100 * 1024 * 1024
# A config may describe this many times more parameters than its weights hold (plus slack for
# buffers the estimate does not know) before it is refused: the loader would allocate the
# difference, and a config with a thousand layers over a few megabytes of weights asks for
# gigabytes of memory.
PARAM_MISMATCH_FACTOR = 2.0
PARAM_MISMATCH_SLACK = 1_000_000


def _safetensors_header(path: Path, shown: str, budget: ReadBudget) -> dict[str, Any]:
    """The header of a client's safetensors file, once its size is exactly what the header
    describes (as the loader requires): a weight file's size is bounded by its tensors, hence
    by the parameter budget, and nothing beyond the header is read here."""
    with open_client_file(path, shown, budget, max_bytes=None) as handle:
        head = handle.read(8)
        (length,) = struct.unpack("<Q", head) if len(head) == 8 else (-1,)
        if not 0 < length <= MAX_SAFETENSORS_HEADER_BYTES:
            raise ValueError("bad header length")
        header = json.loads(handle.read(length))
        if not isinstance(header, dict):
            raise ValueError("not an object")
        ends = [
            tensor["data_offsets"][1] for name, tensor in header.items() if name != "__metadata__"
        ]
        if not all(isinstance(end, int) and end >= 0 for end in ends):
            raise ValueError("bad offsets")
        if handle.size != 8 + length + max(ends, default=0):
            raise ValueError("size does not match the header")
    return header


def safetensors_params(directory: Path, shown: str, budget: ReadBudget | None = None) -> int:
    """Parameters stored in the directory's ``*.safetensors`` files, from their headers only."""
    budget = budget or ReadBudget()
    total = 0
    for path in sorted(directory.glob("*.safetensors")):
        try:
            header = _safetensors_header(path, f"{shown}/{path.name}", budget)
            for name, tensor in header.items():
                if name == "__metadata__":
                    continue
                shape = tensor["shape"]
                if not all(isinstance(d, int) and d >= 0 for d in shape):
                    raise ValueError("bad shape")
                total += math.prod(shape)
        except OSError as exc:
            raise Problem(
                422, "Unreadable weights", f"{shown}/{path.name} cannot be read: {exc.strerror}"
            ) from None
        except (ValueError, KeyError, TypeError, IndexError, struct.error, RecursionError):
            raise Problem(
                422,
                "Unreadable weights",
                f"{shown}/{path.name} is not a valid safetensors file (its header cannot be "
                "read, or the file's size is not what its header describes)",
            ) from None
    return total


def _int(config: dict[str, Any], *names: str) -> int | None:
    for name in names:
        value = config.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return value
    return None


def config_params(config: dict[str, Any]) -> int | None:
    """The parameter count a decoder config describes (embeddings, attention, MLP), or None.

    An estimate from ``num_hidden_layers``, ``hidden_size``, ``vocab_size`` and
    ``intermediate_size`` (and the attention heads): what the loader allocates before it reads
    a single weight. None when the config does not name these (an architecture we cannot size).
    """
    text = config.get("text_config")
    if isinstance(text, dict) and _int(config, "num_hidden_layers", "n_layer") is None:
        config = text
    layers = _int(config, "num_hidden_layers", "n_layer", "num_layers")
    hidden = _int(config, "hidden_size", "n_embd", "d_model")
    vocab = _int(config, "vocab_size")
    if layers is None or hidden is None or vocab is None:
        return None
    gated = "gpt2" not in str(config.get("model_type", ""))
    intermediate = _int(config, "intermediate_size", "n_inner") or 4 * hidden
    heads = _int(config, "num_attention_heads", "n_head") or 1
    kv_heads = _int(config, "num_key_value_heads") or heads
    head_dim = _int(config, "head_dim") or max(hidden // max(heads, 1), 1)
    experts = _int(config, "num_local_experts", "num_experts") or 1
    attention = 2 * hidden * heads * head_dim + 2 * hidden * kv_heads * head_dim
    mlp = (3 if gated else 2) * hidden * intermediate * max(experts, 1)
    embeddings = vocab * hidden * (1 if config.get("tie_word_embeddings", True) else 2)
    return layers * (attention + mlp) + embeddings


def check_model_size(
    directory: Path, shown: str, *, max_params: int, budget: ReadBudget | None = None
) -> None:
    """Decide the cost before the work: refuse a config that outgrows its weights or the budget.

    ``max_params`` is ``FORGETGUARD_MAX_MODEL_PARAMS`` (0: no budget).
    """
    budget = budget or ReadBudget()
    config = read_config(directory / "config.json", f"{shown}/config.json", budget)
    if not isinstance(config, dict):
        raise Problem(422, "Unreadable model config", f"{shown}/config.json is not a JSON object")
    stored = safetensors_params(directory, shown, budget)
    described = config_params(config)
    if described is not None and described > PARAM_MISMATCH_FACTOR * stored + PARAM_MISMATCH_SLACK:
        raise Problem(
            422,
            "Config does not match weights",
            f"model {shown}: config.json describes about {described:,} parameters (layers, "
            f"hidden size, vocabulary, intermediate size) but its weights hold {stored:,}; "
            "loading it would allocate what the weights do not have. Fix config.json.",
        )
    largest = max(stored, described or 0)
    if max_params and largest > max_params:
        raise Problem(
            422,
            "Model too large",
            f"model {shown} has about {largest:,} parameters; this service loads at most "
            f"{max_params:,} (set FORGETGUARD_MAX_MODEL_PARAMS)",
        )


def resolve_model(
    settings: Settings,
    model_path: str,
    adapter_path: str | None,
    budget: ReadBudget | None = None,
) -> tuple[Path, Path | None]:
    """Roots (403) and loadability (422) of a model and optional adapter; resolved directories.

    The API calls it before anything queues; the worker again right before loading, because
    the file system may have changed in between. ``budget``: the caller's reads so far (a
    fresh one from the settings by default).
    """
    budget = budget or settings.read_budget()
    # Reading only: the artifacts dir (fine-tune outputs) is a root here, never for writes.
    roots = settings.resolved_model_read_roots
    model_dir = resolve_under(model_path, roots, what="model", env_var="FORGETGUARD_MODEL_ROOTS")
    check_model_dir(model_dir, model_path, budget)
    check_model_size(model_dir, model_path, max_params=settings.max_model_params, budget=budget)
    adapter_dir = None
    if adapter_path is not None:
        adapter_dir = resolve_adapter(settings, adapter_path, budget)
    return model_dir, adapter_dir


def resolve_adapter(settings: Settings, adapter_path: str, budget: ReadBudget) -> Path:
    """Roots (403) and loadability (422) of one adapter directory; the resolved directory."""
    adapter_dir = resolve_under(
        adapter_path,
        settings.resolved_model_read_roots,
        what="adapter",
        env_var="FORGETGUARD_MODEL_ROOTS",
    )
    check_adapter_dir(adapter_dir, adapter_path, budget)
    return adapter_dir


def _tensor_names(directory: Path, budget: ReadBudget) -> list[str]:
    index = directory / "model.safetensors.index.json"
    if os.path.lexists(index):
        data = read_config(index, "model.safetensors.index.json", budget)
        return list((data.get("weight_map") or {}).keys())
    names: list[str] = []
    for path in sorted(directory.glob("*.safetensors")):
        header = _safetensors_header(path, path.name, budget)
        names += [name for name in header if name != "__metadata__"]
    return names


def weight_modules(model_dir: Path, budget: ReadBudget | None = None) -> set[str]:
    """Dotted names of the modules that own weights (``model.layers.0.self_attn.q_proj``),
    read from the safetensors index or headers: no torch, no weights loaded. Empty when the
    names cannot be read."""
    budget = budget or ReadBudget()
    try:
        names = _tensor_names(model_dir, budget)
        config = read_config(model_dir / "config.json", "config.json", budget)
    except (Problem, OSError, ValueError, AttributeError, KeyError, TypeError, IndexError):
        return set()
    modules = {name.rsplit(".", 1)[0] for name in names if "." in name}
    if isinstance(config, dict) and config.get("tie_word_embeddings"):
        modules.add("lm_head")  # tied: shares the embedding's weights, stored once under it
    return modules
