"""Request and response models of the API, and the job state enum (Cog's states, our names)."""

from __future__ import annotations

import re
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from app.params import Count, Eta, GuidanceMode, MaxAttempts, Seed, Steps, Tau, WCf, WCg
from app.params import JobParams as JobParams  # re-exported: the store uses it from here
from app.params import SamplingSettings as SamplingSettings

# Job ids are ``uuid.uuid4().hex``: 32 lowercase hex digits. Any other string names no job (404).
JOB_ID_PATTERN = "^[0-9a-f]{32}$"
JobId = Annotated[str, StringConstraints(pattern=JOB_ID_PATTERN)]
_JOB_ID = re.compile(JOB_ID_PATTERN.strip("^$"))


def is_job_id(value: str) -> bool:
    return _JOB_ID.fullmatch(value) is not None


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

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    model: str | None = Field(
        default=None,
        min_length=1,
        max_length=128,
        description="bundle name (GET /v1/models); default: DIFFEXP_DEFAULT_MODEL",
    )
    count: Count = Field(description="pairs to keep (Stage IV), 1 to DIFFEXP_MAX_COUNT")
    tau: Tau | None = None
    eta: Eta | None = Field(
        default=None, description="Stage IV threshold η, 0 < η ≤ 1; default: the bundle's"
    )
    steps: Steps | None = Field(default=None, description="solver steps per phase, 1 to DIFFEXP_MAX_STEPS")
    w_cf: WCf | None = None
    w_cg: WCg | None = None
    guidance: GuidanceMode | None = None
    seed: Seed | None = Field(
        default=None, description="request seed, 0 to 2^53-1; default: drawn and recorded"
    )
    max_attempts: MaxAttempts | None = Field(
        default=None,
        description="most pairs generated, count to DIFFEXP_MAX_ATTEMPTS_FACTOR x DIFFEXP_MAX_COUNT; "
        "default: DIFFEXP_MAX_ATTEMPTS_FACTOR x count",
    )
    callback_url: str | None = Field(
        default=None,
        min_length=1,
        max_length=2048,
        description="http(s) URL POSTed the job's JSON when it ends (signed: X-DiffuseExpand-Signature); "
        "public addresses only unless DIFFEXP_WEBHOOK_ALLOW_PRIVATE",
    )
    callback_secret: str | None = Field(
        default=None,
        min_length=16,
        max_length=256,
        description="HMAC-SHA256 key of the webhook's signature; default: drawn and shown once, in the answer",
    )


class Progress(BaseModel):
    target: int
    generated: int = 0
    kept: int = 0
    discarded: int = 0


class WebhookAttempt(BaseModel):
    at: float = Field(description="Unix time of the attempt")
    status_code: int | None = Field(description="the receiver's HTTP status; null: no answer")
    error: str | None = Field(description="why the attempt failed; null: delivered")
    duration_ms: float | None = None


class WebhookPublic(BaseModel):
    """The job's webhook (never its secret): ``waiting`` for the job to end, ``pending`` (an attempt is
    due at ``next_attempt_at``), ``delivered`` or ``failed`` (retried for DIFFEXP_WEBHOOK_RETRY_S)."""

    url: str
    status: str
    attempt_count: int = 0
    attempts: list[WebhookAttempt] = Field(default=[], description="the latest attempts, oldest first")
    next_attempt_at: float | None = None


class JobLinks(BaseModel):
    self: str
    pairs_zip: str
    download: str


class JobPublic(BaseModel):
    id: JobId
    owner: str | None = Field(default=None, description="name of the API key that created the job")
    status: JobStatus
    input: dict[str, Any]
    params: JobParams
    progress: Progress
    error: str | None = None
    created_at: datetime
    started_at: datetime | None = None
    completed_at: datetime | None = None
    webhook: WebhookPublic | None = None
    links: JobLinks


class JobCreated(JobPublic):
    """The answer to ``POST /v1/jobs``: the job, and the webhook secret that signs its callback."""

    callback_secret: str | None = Field(
        default=None, description="the key of the webhook's HMAC signature (only in this answer)"
    )


def job_public(rec: dict[str, Any], api_prefix: str) -> JobPublic:
    """A stored record as the API shows it (the webhook's secret left out by the model)."""
    base = f"{api_prefix}/jobs/{rec['id']}"
    links = {"self": base, "pairs_zip": f"{base}/pairs.zip", "download": f"{base}/download"}
    return JobPublic.model_validate({**rec, "links": links})


class JobsPublic(BaseModel):
    data: list[JobPublic]
    count: int
    limit: int
    offset: int
    next_cursor: str | None = None


class PairLinks(BaseModel):
    image: str
    mask: str
    preview: str = Field(description="the image in grey with the mask's outline drawn in red")


class PairPublic(BaseModel):
    name: str = Field(description="s<seed>-<index>, the file name (without .png) in pairs.zip")
    index: int = Field(description="the pair's index within the job: pair i draws from (seed, i)")
    seed: int
    dice_loss: float = Field(description="Stage IV: the filter's Dice loss against the mask (kept ≤ η)")
    links: PairLinks


class PairsPublic(BaseModel):
    data: list[PairPublic]
    count: int = Field(description="kept pairs in all")
    offset: int
    limit: int
    final: bool = Field(description="true: the final result's pairs; false: those kept so far")


class ModelPublic(BaseModel):
    name: str
    resolution: int
    sampling_defaults: SamplingSettings
    eta_default: Eta
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


# ---- datasets (POST /v1/datasets; app.datasets)


class DatasetSize(BaseModel):
    width: int
    height: int
    pairs: int = Field(description="how many pairs have this size")


class DatasetLinks(BaseModel):
    self: str


class DatasetPublic(BaseModel):
    id: JobId = Field(description="32 lowercase hex digits")
    name: str | None = Field(default=None, description="the name given at upload, if any")
    owner: str = Field(description="name of the API key that uploaded it")
    pairs: int = Field(description="image/mask pairs")
    sizes: list[DatasetSize] = Field(description="image sizes (each mask has its image's), most common first")
    fingerprint: str = Field(description="sha256 over every pair's name and file bytes")
    bytes: int = Field(description="bytes of the image and mask files stored")
    groups: int | None = Field(
        default=None, description="distinct groups of pairs.csv's `group` column; null without one"
    )
    notes: list[str] = Field(default=[], description="pairs.csv and licence/source notes stored with it")
    created_at: datetime
    links: DatasetLinks


def dataset_public(rec: dict[str, Any], api_prefix: str) -> DatasetPublic:
    return DatasetPublic.model_validate({**rec, "links": {"self": f"{api_prefix}/datasets/{rec['id']}"}})


class DatasetsPublic(BaseModel):
    data: list[DatasetPublic]
    count: int
    limit: int
    offset: int
