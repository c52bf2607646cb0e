"""Model fingerprints: what an evaluation ran on, and the key of the evaluation cache.

The fingerprint hashes the config, tokenizer files (chat template included) and each weight
file's sha256. Hashing 500 MB of weights takes seconds, so weight hashes are cached on disk
keyed by (path, size, mtime). The files are a client's: they are read through
:mod:`app.core.clientfiles` (regular files only, no holes, metadata within its budget, all
before the caller's deadline).
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
from pathlib import Path

from app.core.clientfiles import (
    MAX_FILE_BYTES_SETTING,
    ReadBudget,
    check_regular,
    hash_client_file,
    open_client_file,
)
from app.core.quantization import (
    BASE_QUANTIZATION_FILE,
    adapter_quantization,
    with_quantization,
)

HASHED_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
    "adapter_config.json",
    BASE_QUANTIZATION_FILE,
)


def _file_sha256(path: Path, shown: str, cache_dir: Path | None, budget: ReadBudget) -> str:
    stat = check_regular(path, shown)
    if not path.name.endswith(".safetensors"):
        # Metadata: within its budget (a weight file's size is bounded by its header).
        with open_client_file(
            path, shown, budget, max_bytes=budget.max_file_bytes, setting=MAX_FILE_BYTES_SETTING
        ):
            pass
    key = hashlib.sha256(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()
    cache_file = cache_dir / "hashes" / key if cache_dir else None
    if cache_file is not None and cache_file.is_file():
        return cache_file.read_text().strip()
    value = hash_client_file(path, shown, budget)
    if cache_file is not None:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        # Unique per writer: API request threads may hash the same file at the same moment.
        tmp = cache_file.with_suffix(f".{os.getpid()}.{secrets.token_hex(4)}.tmp")
        tmp.write_text(value)
        tmp.replace(cache_file)
    return value


def _directory_entries(
    directory: Path, cache_dir: Path | None, budget: ReadBudget
) -> dict[str, str]:
    entries = {}
    for path in sorted(directory.iterdir()):
        if path.name in HASHED_FILES or path.suffix == ".safetensors":
            if not os.path.lexists(path) or path.is_dir():
                continue
            entries[path.name] = _file_sha256(path, path.name, cache_dir, budget)
    return entries


def fingerprint(
    model_dir: Path,
    adapter_dir: Path | None = None,
    *,
    cache_dir: Path | None = None,
    budget: ReadBudget | None = None,
) -> str:
    """``sha256:…`` over the model's (and adapter's) config, tokenizer and weight hashes;
    ``sha256:…+nf4`` when the adapter's base is loaded quantized (``app.core.quantization``).

    ``budget``: the caller's reads of the client's files (a default one when None).
    """
    budget = budget or ReadBudget()
    content = {"model": _directory_entries(model_dir, cache_dir, budget)}
    if adapter_dir is not None:
        content["adapter"] = _directory_entries(adapter_dir, cache_dir, budget)
    canonical = json.dumps(content, sort_keys=True).encode()
    return with_quantization(
        "sha256:" + hashlib.sha256(canonical).hexdigest(),
        adapter_quantization(adapter_dir, budget),
    )
