"""Service configuration: one ``Settings`` class, read from ``FORGETGUARD_*`` variables."""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Annotated

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from app.core.clientfiles import DEFAULT_MAX_FILE_BYTES, DEFAULT_READ_SECONDS, ReadBudget
from app.web.auth import parse_api_keys

DEFAULT_DATABASE_URL = "sqlite:///./var/forgetguard.db"
# Defaults read by the served-model backend too (workers.engine.openai_backend).
ENDPOINT_TIMEOUT_SECONDS = 300.0
ENDPOINT_MAX_RESPONSE_BYTES = 16 * 1024 * 1024
MAX_STORED_RESPONSE_CHARS = 16384


def _split_list(value: object) -> object:
    if isinstance(value, str):
        return [part.strip() for part in value.replace(";", ",").split(",") if part.strip()]
    return value


def normalise_endpoint(url: str) -> str:
    """A base URL as compared with the allow-list: trimmed, no trailing slash."""
    return url.strip().rstrip("/")


# The most training processes one fine-tune job may use: the bound of resources.processes,
# of FORGETGUARD_MAX_PROCESSES and of `forgetguard worker --processes`.
MAX_PROCESSES = 8


class Settings(BaseSettings):
    """Everything an operator can set; see the configuration table in README.md."""

    # hide_input_in_errors: a bad setting must not print its value (API keys, database passwords).
    model_config = SettingsConfigDict(
        env_prefix="FORGETGUARD_", extra="ignore", hide_input_in_errors=True
    )

    database_url: str = DEFAULT_DATABASE_URL
    model_roots: Annotated[list[Path], NoDecode] = Field(default_factory=lambda: [Path("models")])
    data_roots: Annotated[list[Path], NoDecode] = Field(default_factory=lambda: [Path("data")])
    artifacts_dir: Path = Path("var/artifacts")
    cache_dir: Path = Path("var/cache")
    # Suites made by `forgetguard benchmarks pull` (NAME.json each); their wheels are cached
    # under cache_dir/wheels.
    benchmarks_dir: Path = Path("var/benchmarks")
    api_keys: Annotated[list[str], NoDecode] = Field(default_factory=list)
    # OpenAI-compatible servers that evaluations may name (base URLs, e.g. http://host:8000/v1).
    # Clients never get to make the workers call an arbitrary URL (no SSRF).
    endpoints: Annotated[list[str], NoDecode] = Field(default_factory=list)
    # What a served model answers is bounded: one request, from connecting to its last byte,
    # within this many seconds (a server trickling a byte every few seconds is cut off) ...
    endpoint_timeout_seconds: float = Field(ENDPOINT_TIMEOUT_SECONDS, gt=0)
    # ... and its body read up to this many bytes, no further.
    endpoint_max_response_bytes: int = Field(ENDPOINT_MAX_RESPONSE_BYTES, ge=1024)
    # An item stores at most this many characters of a response (then marked ``truncated``);
    # it is scored on the whole response. Far above what max_new_tokens (≤ 512) produces.
    max_stored_response_chars: int = Field(MAX_STORED_RESPONSE_CHARS, ge=1)

    # vLLM backend (workers started with --backend vllm). dtype "auto": float32 on CPU (as
    # the transformers engine; answers then equal its answers), vLLM's choice on GPUs.
    vllm_tensor_parallel_size: int = 1
    vllm_data_parallel_size: int = 1
    # None: 0.9 on GPUs; on a CPU, what the engine needs (weights, VLLM_CPU_KVCACHE_SPACE and
    # a slack), refused with a message when not free (workers/engine/vllm_memory.py).
    vllm_gpu_memory_utilization: float | None = Field(None, gt=0, le=1)
    vllm_dtype: str = "auto"
    vllm_max_model_len: int | None = None
    vllm_max_lora_rank: int = 64

    # `forgetguard serve` restarts a local worker that failed to start after this many seconds,
    # doubling each time (to a minute), and leaves it stopped after this many failures in a row.
    worker_restart_backoff_seconds: float = Field(2.0, gt=0)
    worker_max_failed_starts: int = Field(5, ge=1)

    # The most processes a fine-tune job may ask for (resources.processes) while no live
    # worker is larger: the largest worker this deployment runs. A job beyond both is a 422.
    max_processes: int = Field(1, ge=1, le=MAX_PROCESSES)

    lease_seconds: float = 60.0
    heartbeat_seconds: float = 10.0
    # A running fine-tune job stores its progress (percent, ETA) at most this often between
    # its events; each store renews the lease.
    progress_seconds: float = Field(1.0, ge=0)
    max_attempts: int = 3
    poll_seconds: float = 1.0
    # A worker given SIGTERM finishes its current batch, releases the job and exits within this.
    shutdown_grace_seconds: float = 30.0

    # Requests the API runs at once in its thread pool; its database pool is sized from this.
    api_threads: int = Field(40, ge=1, le=1000)

    max_body_bytes: int = 8 * 1024 * 1024
    # A JSONL dataset named by path is read and checked at submission; this bounds that work.
    max_dataset_bytes: int = 256 * 1024 * 1024
    # Cost decided before work: a model (its config or its weights) with more parameters than
    # this is refused at submission and by the worker. 0: no budget.
    max_model_params: int = 20_000_000_000
    # Address-space cap (RLIMIT_AS) of each worker process, in bytes; 0: none. CPU workers:
    # a runaway allocation fails the job instead of the host. CUDA reserves far more address
    # space than it uses, so for GPU workers cap memory with the container instead.
    worker_max_memory_bytes: int = 0
    # Files a client names (model folders, datasets) are read within these (see
    # app.core.clientfiles): every config, tokenizer or template file up to this size ...
    max_model_file_bytes: int = Field(DEFAULT_MAX_FILE_BYTES, ge=1)
    # ... and all of one request's (or one job step's) reads, first weight hashes included,
    # within this many seconds.
    client_read_seconds: float = Field(DEFAULT_READ_SECONDS, gt=0)

    @field_validator("model_roots", "data_roots", "api_keys", "endpoints", mode="before")
    @classmethod
    def _comma_separated(cls, value: object) -> object:
        return _split_list(value)

    @field_validator("api_keys")
    @classmethod
    def _valid_api_keys(cls, value: list[str]) -> list[str]:
        # A key without a valid scope is a startup error, not a key that silently never matches.
        parse_api_keys(value)
        return value

    @field_validator("endpoints")
    @classmethod
    def _normalised_endpoints(cls, value: list[str]) -> list[str]:
        return [normalise_endpoint(v) for v in value]

    @cached_property
    def resolved_model_roots(self) -> list[Path]:
        """Model roots with symlinks resolved, for containment checks."""
        return [root.expanduser().resolve() for root in self.model_roots]

    @cached_property
    def resolved_model_read_roots(self) -> list[Path]:
        """Where models and adapters may be read from: the model roots and the artifacts dir.

        Fine-tune outputs land in the artifacts dir, so a client can evaluate or gate them
        where they are. Clients never name a path to write: outputs go where the server says.
        """
        return [*self.resolved_model_roots, self.artifacts_dir.expanduser().resolve()]

    @cached_property
    def resolved_data_roots(self) -> list[Path]:
        """Data roots with symlinks resolved, for containment checks."""
        return [root.expanduser().resolve() for root in self.data_roots]

    def read_budget(self) -> ReadBudget:
        """A fresh budget for reading a client's files; its deadline starts now."""
        return ReadBudget(
            max_file_bytes=self.max_model_file_bytes, seconds=self.client_read_seconds
        )

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")


def get_settings() -> Settings:
    """Settings from the environment (a fresh read, so tests can change variables)."""
    return Settings()
