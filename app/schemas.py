"""Request and response models of the API, and the job state enum (Cog's states, our names)."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

MAX_SEED = 2**63 - 1


class JobStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELED = "canceled"

    def is_terminal(self) -> bool:
        return self in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELED)


class JobCreate(BaseModel):
    """Body of ``POST /v1/jobs``; unset fields take the bundle's defaults. Unknown fields are rejected."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(default=None, min_length=1, description="bundle name; default: the demo bundle")
    count: int = Field(ge=1, description="pairs to keep (Stage IV); at most DIFFEXP_MAX_COUNT")
    tau: float | None = Field(default=None, gt=0, description="guidance temperature τ > 0")
    eta: float | None = Field(default=None, gt=0, le=1, description="Stage IV Dice-loss threshold, 0 < η ≤ 1")
    steps: int | None = Field(default=None, ge=1, description="solver steps per phase, ≤ DIFFEXP_MAX_STEPS")
    w_cf: float | None = Field(default=None, ge=0, description="classifier-free guidance weight")
    w_cg: float | None = Field(default=None, ge=0, description="classifier guidance weight")
    guidance: Literal["tau", "scale"] | None = None
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED)
    max_attempts: int | None = Field(default=None, ge=1, description="most pairs generated; ≥ count")


class Progress(BaseModel):
    target: int
    generated: int = 0
    kept: int = 0
    discarded: int = 0


class JobParams(BaseModel):
    """The values a job runs with: request fields merged over the bundle's defaults."""

    model: str
    count: int
    seed: int
    eta: float
    max_attempts: int
    sampling: dict[str, Any]
    batch_size: int
    shard_size: int


class JobLinks(BaseModel):
    self: str
    pairs_zip: str
    download: str


class JobPublic(BaseModel):
    id: str
    owner: str | None = Field(default=None, description="name of the API key that created the job")
    status: JobStatus
    input: dict[str, Any]
    params: JobParams
    progress: Progress
    error: str | None = None
    created_at: datetime
    started_at: datetime | None = None
    completed_at: datetime | None = None
    links: JobLinks


class JobsPublic(BaseModel):
    data: list[JobPublic]
    count: int
    limit: int
    offset: int
    next_cursor: str | None = None


class ModelPublic(BaseModel):
    name: str
    resolution: int
    sampling_defaults: dict[str, Any]
    eta_default: float
    metrics: dict[str, Any] = {}
    training: dict[str, Any] = {}
    data: dict[str, Any] = {}


class ModelsPublic(BaseModel):
    data: list[ModelPublic]
    default: str


class Check(BaseModel):
    ok: bool
    detail: str = ""


class Readiness(BaseModel):
    ready: bool
    checks: dict[str, Check]


KEY_NAME_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,63}$"


class KeyLimits(BaseModel):
    max_active_jobs: int = Field(default=2, ge=1, description="jobs queued or running at once")
    pairs_per_day: int = Field(default=1000, ge=1, description="sum of `count` over jobs created per UTC day")
    requests_per_second: int = Field(default=10, ge=1, description="requests to /v1 per second")


class KeyCreate(KeyLimits):
    """Body of ``POST /v1/keys`` (admin only)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=KEY_NAME_PATTERN, description="lowercase letters, digits, _ and -; not 'admin'")


class KeyPublic(KeyLimits):
    """A key as listed: never the key itself nor its hash."""

    name: str
    created_at: datetime


class KeyCreated(KeyPublic):
    key: str = Field(description="the bearer key; shown only in this answer")


class KeysPublic(BaseModel):
    data: list[KeyPublic]
