"""Request and response bodies of the HTTP API."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, field_serializer

from app.suites.kinds import SuiteDefinition

T = TypeVar("T")
Status = Literal["queued", "running", "succeeded", "failed", "cancelled"]
PathStr = Annotated[str, Field(min_length=1, max_length=4096)]
SuiteRef = Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9._-]{0,99}(@[0-9]{1,9})?$")]


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


class ModelRef(_Request):
    path: PathStr
    adapter_path: PathStr | None = None


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


class Progress(BaseModel):
    done: int
    total: int
    stage: str


class ModelPublic(BaseModel):
    path: str
    adapter_path: str | None
    fingerprint: str | None


class SuiteRun(BaseModel):
    name: str
    version: int
    kind: str
    content_hash: str
    item_count: int


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
    status: str
    current_job: dict[str, str] | None
    started_at: datetime
    last_heartbeat: datetime

    @field_serializer("started_at", "last_heartbeat")
    def _z(self, value: datetime) -> str | None:
        return iso_utc(value)
