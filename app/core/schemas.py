"""Request and response bodies of the HTTP API."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any, Generic, Literal, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    field_serializer,
    model_validator,
)

from app.suites.kinds import SuiteDefinition
from forgetguard.status import JobStatus

T = TypeVar("T")
# The status names are the client package's (forgetguard.status); the schema lists them as an
# enum of strings.
Status = Literal[
    JobStatus.QUEUED, JobStatus.RUNNING, JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED
]
PathStr = Annotated[str, Field(min_length=1, max_length=4096)]
SuiteRef = Annotated[
    str, Field(pattern=r"^[a-z0-9][a-z0-9._-]{0,99}(@[a-z0-9][a-z0-9=,._-]{0,199})?$")
]  # name[@version][,option=value…] (app.suites.references)


def _suite_entry_tag(value: Any) -> str:
    return "ref" if isinstance(value, str) else "inline"


# A suite entry is a name ("general-qa", "general-qa@2") or an inline suite object; the
# callable discriminator keeps validation errors about the one the client meant.
SuiteEntry = Annotated[
    Annotated[SuiteRef, Tag("ref")] | Annotated[SuiteDefinition, Tag("inline")],
    Discriminator(_suite_entry_tag),
]


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


# Which engine computes an evaluation. "transformers": the worker's own batched engine;
# "vllm": an in-process vLLM engine in the worker; "openai": a model already served by an
# OpenAI-compatible server on an allow-listed endpoint (FORGETGUARD_ENDPOINTS).
BackendName = Literal["transformers", "vllm", "openai"]
LOCAL_BACKENDS: tuple[str, ...] = ("transformers", "vllm")
EndpointStr = Annotated[str, Field(min_length=1, max_length=2048)]
ServedModelName = Annotated[str, Field(min_length=1, max_length=256)]
# Adapters of one base evaluated by one request (checkpoints, sweep points): one evaluation
# each, all queued at once, so a worker loads the base once and switches adapters.
MAX_ADAPTERS = 32
# Shard jobs one evaluation may be split into (``"shards": N``), each claimed by any worker.
MAX_SHARDS = 64


class ModelRef(_Request):
    """A local model directory (+ one adapter, or several to evaluate each), or a model served
    at an allow-listed endpoint."""

    backend: BackendName = "transformers"
    path: PathStr | None = None
    adapter_path: PathStr | None = None
    adapters: list[PathStr] | None = Field(None, min_length=1, max_length=MAX_ADAPTERS)
    endpoint: EndpointStr | None = None
    model: ServedModelName | None = None

    @model_validator(mode="after")
    def _fields_fit_backend(self) -> ModelRef:
        if self.backend == "openai":
            if self.endpoint is None or self.model is None:
                raise ValueError(
                    'backend "openai" needs "endpoint" (the server\'s base URL, e.g. '
                    'http://host:8000/v1) and "model" (the name the server serves)'
                )
            if self.path is not None or self.adapter_path is not None or self.adapters:
                raise ValueError(
                    'backend "openai" evaluates the served model: "path", "adapter_path" and '
                    '"adapters" do not apply (serve the adapter on the server and name it in '
                    '"model")'
                )
        else:
            if self.path is None:
                raise ValueError(f'backend "{self.backend}" needs "path" (a local model directory)')
            if self.endpoint is not None or self.model is not None:
                raise ValueError(
                    '"endpoint" and "model" are only for backend "openai" (a served model)'
                )
        if self.adapters is not None:
            if self.adapter_path is not None:
                raise ValueError(
                    'give "adapter_path" (one adapter) or "adapters" (one evaluation per '
                    "adapter), not both"
                )
            repeated = sorted({a for a in self.adapters if self.adapters.count(a) > 1})
            if repeated:
                raise ValueError(
                    f'"adapters" lists {", ".join(map(repr, repeated))} more than once'
                )
        return self

    def one_per_adapter(self) -> list[ModelRef]:
        """The model of each evaluation this names: one per adapter of ``adapters``, else itself."""
        if self.adapters is None:
            return [self]
        return [
            self.model_copy(update={"adapter_path": adapter, "adapters": None})
            for adapter in self.adapters
        ]


class GenerationSettings(_Request):
    """Greedy decoding settings; part of what makes two runs comparable."""

    max_new_tokens: int = Field(50, ge=1, le=512)
    stop: list[Annotated[str, Field(min_length=1, max_length=100)]] = Field(
        default_factory=list, max_length=8
    )
    # Rows decoded together (default: the engine's choice). It decides batch composition, not
    # what is asked, so runs that differ only here stay comparable: the noise floor is a rerun
    # of the base at another batch size.
    batch_size: int | None = Field(None, ge=1, le=256)


DEFAULT_SUITES = ("general-qa", "forgetting-checklist")


class EvaluationCreate(_Request):
    model: ModelRef
    suites: list[SuiteEntry] = Field(
        default_factory=lambda: list[SuiteEntry](DEFAULT_SUITES), min_length=1, max_length=20
    )
    prompt_format: Literal["chat", "plain"] | None = None
    generation: GenerationSettings = Field(default_factory=GenerationSettings)
    label: Annotated[str, Field(max_length=200)] | None = None
    cache: bool = True
    # Split the run into this many shard jobs of the same queue (1: not sharded); each scores
    # every N-th block of items, and the results are computed once from all of them.
    shards: int = Field(
        1,
        ge=1,
        le=MAX_SHARDS,
        description="shard jobs to split the evaluation into, claimed by any workers "
        "(1: not sharded; at most one per block of 32 items); the items and results are "
        "those of an unsharded run",
    )

    def one_per_adapter(self) -> list[EvaluationCreate]:
        """The evaluations this request asks for: one per adapter of ``model.adapters``, else
        itself (see :meth:`ModelRef.one_per_adapter`)."""
        if self.model.adapters is None:
            return [self]
        return [self.model_copy(update={"model": m}) for m in self.model.one_per_adapter()]


class Progress(BaseModel):
    """Where a job is: its current stage's ``done`` of ``total``, and, once a worker runs
    it, the whole job's ``percent`` and ``eta_seconds`` (null until the rates of the work
    ahead are measured) across all its stages."""

    done: int
    total: int
    stage: str
    percent: float | None = None
    eta_seconds: float | None = None


class EnginePublic(BaseModel):
    """What computed an evaluation: recorded by the worker, compared by ``/compare``."""

    backend: str
    device: str | None = None
    dtype: str | None = None
    version: str | None = None
    # False for a served model: its fingerprint comes from what the server reports and a
    # probe of fixed prompts, because the weights are not here to hash.
    weights_hashed: bool = True
    fingerprint_basis: str | None = None
    # True when the worker already had the base model loaded (an earlier evaluation of the same
    # base, such as another adapter of the same request) and only switched adapters; None for
    # a served model, or one recorded before this was.
    base_reused: bool | None = None


class ModelPublic(BaseModel):
    path: str
    adapter_path: str | None
    fingerprint: str | None
    backend: str = "transformers"
    endpoint: str | None = None
    engine: EnginePublic | None = None


class SuiteRun(BaseModel):
    name: str
    version: int
    kind: str
    content_hash: str
    item_count: int
    reused_from: str | None = Field(
        default=None,
        description="the earlier run of the same model, suite content and settings whose "
        "answers to this suite were copied instead of generated again (the per-suite cache)",
    )


def iso_utc(value: datetime | None) -> str | None:
    """ISO 8601 in UTC with a Z, as every timestamp of the API is written.

    Stored timestamps are naive UTC; an aware one (parsed back from this very format, say) is
    converted, so the result never carries two zone designators (``+00:00Z``).
    """
    if value is None:
        return None
    if value.tzinfo is not None:
        value = value.astimezone(UTC).replace(tzinfo=None)
    return value.isoformat(timespec="milliseconds") + "Z"


class JobTimestamps(BaseModel):
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None

    @field_serializer("created_at", "started_at", "finished_at")
    def _z(self, value: datetime | None) -> str | None:
        return iso_utc(value)


class ShardPublic(BaseModel):
    """One shard job of a sharded evaluation: its own status, attempts and progress."""

    index: int
    id: str
    status: Status
    attempts: int
    progress: Progress
    worker_id: str | None
    error: str | None


class ShardsPublic(BaseModel):
    """A sharded evaluation's shard jobs: how many, how many succeeded, each one."""

    total: int
    done: int
    data: list[ShardPublic]


class EvaluationPublic(JobTimestamps):
    id: str
    status: Status
    label: str | None
    progress: Progress
    model: ModelPublic
    suites: list[SuiteRun]
    prompt_format: str | None
    generation: dict[str, Any]
    results: dict[str, Any] | None
    cached_from: str | None
    attempts: int
    error: str | None
    # The request that queued it with others: one evaluation per adapter of ``model.adapters``
    # (``GET /evaluations?group=`` lists them); None for an evaluation queued alone.
    group: str | None = None
    # A sharded evaluation (``"shards": N``): its shard jobs; None when not sharded.
    shards: ShardsPublic | None = None
    # A shard job itself (``GET /evaluations/{id}`` of one): the evaluation it is a slice of.
    shard_of: str | None = None


class EvaluationGroupPublic(BaseModel):
    """What ``POST /evaluations`` with ``model.adapters`` queued: one evaluation per adapter,
    in the order the adapters were listed, each with its own id, status, cache and items."""

    group: str
    data: list[EvaluationPublic]


class ItemPublic(BaseModel):
    item_id: str
    suite: str
    prompt: str
    response: str | None
    passed: bool | None
    score: float | None
    category: str | None
    severity: str | None
    details: dict[str, Any] | None
    # The response is cut to FORGETGUARD_MAX_STORED_RESPONSE_CHARS; it was scored whole.
    truncated: bool = False


class Page(BaseModel, Generic[T]):
    data: list[T]
    next_cursor: str | None
    has_more: bool


class SuiteSummary(BaseModel):
    name: str
    version: int
    kind: str
    content_hash: str
    description: str | None
    source: str
    item_count: int
    created_at: datetime

    @field_serializer("created_at")
    def _z(self, value: datetime) -> str | None:
        return iso_utc(value)


class SuitePublic(SuiteSummary):
    definition: dict[str, Any]


class Health(BaseModel):
    status: str
    database: str


class WorkerPublic(BaseModel):
    id: str
    host: str
    pid: int
    device: str
    kinds: list[str]
    backend: str
    dtype: str | None
    engine_version: str | None
    # How many training processes it runs a fine-tune job in, at most.
    processes: int = 1
    # idle | busy; for a slot of `forgetguard serve` whose worker cannot start: failing
    # (restarted with backoff) or stopped (serve gave up), with the reason in ``error``.
    status: str
    current_job: dict[str, str] | None
    started_at: datetime
    last_heartbeat: datetime
    error: str | None = None

    @field_serializer("started_at", "last_heartbeat")
    def _z(self, value: datetime) -> str | None:
        return iso_utc(value)
