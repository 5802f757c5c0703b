"""Request and response models of the API, and the job state enum (Cog's states, our names)."""

from __future__ import annotations

import re
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StringConstraints

from app.params import (
    Count,
    Eta,
    GuidanceMode,
    MaskSource,
    MaxAttempts,
    RealShare,
    Seed,
    Size,
    Solver,
    Steps,
    Tau,
    WCf,
    WCg,
)
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

    model_config = ConfigDict(
        extra="forbid",
        allow_inf_nan=False,
        json_schema_extra={
            "dependentRequired": {"callback_secret": ["callback_url"]},
            # real_share (a number) only with mask_source mixed: the service refuses it otherwise
            "dependentSchemas": {
                "real_share": {
                    "anyOf": [
                        {"properties": {"real_share": {"type": "null"}}},
                        {"properties": {"mask_source": {"const": "mixed"}}, "required": ["mask_source"]},
                    ]
                }
            },
        },
    )

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
    solver: Solver | None = Field(
        default=None, description="dpmpp (DPM-Solver++) or unipc; default: the bundle's"
    )
    karras: StrictBool | None = Field(default=None, description="Karras sigmas; default: the bundle's")
    early_reject: StrictBool | None = Field(
        default=None,
        description="drop pairs predicted to fail Stage IV part-way through (the bundle's calibrated rule, "
        "applied only at the settings it was calibrated for); default: true",
    )
    seed: Seed | None = Field(
        default=None, description="request seed, 0 to 2^53-1; default: drawn and recorded"
    )
    max_attempts: MaxAttempts | None = Field(
        default=None,
        description="most pairs generated, count to DIFFEXP_MAX_ATTEMPTS_FACTOR x DIFFEXP_MAX_COUNT; "
        "default: DIFFEXP_MAX_ATTEMPTS_FACTOR x count",
    )
    size: Size | None = None
    mask_source: MaskSource | None = Field(
        default=None,
        description="where masks come from: generated (the mask phase; default), real (a training mask of "
        "the model, deformed by a seeded affine + elastic transform) or mixed (real_share of the pairs "
        "real); real and mixed need a model with training masks (GET /v1/models: training_masks)",
    )
    real_share: RealShare | None = Field(
        default=None,
        description="with mask_source mixed only: the share of pairs on real masks, 0 to 1; default 0.5",
    )
    clean_masks: StrictBool | None = Field(
        default=None,
        description="clean generated masks before the image phase (drop specks far smaller than the "
        "training masks' components, fill holes); needs a model with training masks; default: false",
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


Phase = Literal["mask", "image", "filter"]  # what a batch does: sample masks, then images, then filter


class Progress(BaseModel):
    """Counts over every shard that ran (``app.progress``), and estimates from them."""

    target: int = Field(description="pairs to keep: the job's count")
    generated: int = Field(
        default=0, description="pairs generated by every shard, whether the result needs them"
    )
    kept: int = Field(default=0, description="generated pairs that Stage IV kept (may exceed target)")
    discarded: int = Field(default=0, description="generated - kept")
    pairs_per_second: float | None = Field(
        default=None, description="generated pairs per second of the job's running time; null before it runs"
    )
    eta_seconds: float | None = Field(
        default=None,
        description="seconds until the result is expected, from the rate pairs were kept so far; null "
        "until a pair is kept and once the job failed or was canceled, 0 once it succeeded",
    )
    phase: Phase | None = Field(
        default=None,
        description="what the shard furthest along is doing: sampling masks, images, or filtering "
        "(Stage IV) its batch; null while no shard runs",
    )


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
    preview: str = Field(
        description="the image in grey with the mask's outline drawn in red (K classes: one colour per class)"
    )


class PairPublic(BaseModel):
    name: str = Field(description="s<seed>-<index>, the file name (without .png) in pairs.zip")
    index: int = Field(description="the pair's index within the job: pair i draws from (seed, i)")
    seed: int
    dice_loss: float = Field(description="Stage IV: the filter's Dice loss against the mask (kept ≤ η)")
    class_dice_losses: list[float] | None = Field(
        default=None,
        description="a K-class model's (K > 2) Stage IV Dice loss per foreground class 1..K-1 (dice_loss is "
        "their mean; the manifest's dice_loss_1...); null for a binary model",
    )
    mask_source: str = Field(
        default="generated",
        description="where the mask came from: generated (the mask phase) or real:NAME (the model's "
        "training pair NAME's mask, deformed); the manifest's mask_source",
    )
    cleaned: bool = Field(default=False, description="whether the generated mask was cleaned (clean_masks)")
    links: PairLinks


class PairsPublic(BaseModel):
    data: list[PairPublic]
    count: int = Field(description="kept pairs in all")
    offset: int
    limit: int
    final: bool = Field(description="true: the final result's pairs; false: those kept so far")


class ModelPublic(BaseModel):
    """A model version (``GET /v1/models/{name}[/{version}]``; the latest in ``GET /v1/models``)."""

    name: str
    resolution: int
    num_classes: int = Field(
        default=2,
        ge=2,
        description="mask classes K, background included: 2 = binary (masks 0/255), K > 2 = label maps 0..K-1",
    )
    sampling_defaults: SamplingSettings
    eta_default: Eta
    metrics: dict[str, Any] = {}
    training: dict[str, Any] = {}
    data: dict[str, Any] = {}
    status: Literal["ready"] = Field(
        default="ready", description="ready: published, jobs may use it (a training in progress: training)"
    )
    version: str = Field(
        description="1, 2, ... in the registry; 'local': a folder under DIFFEXP_BUNDLES_DIR on this host"
    )
    versions: list[str] = Field(description="every published version of the name, oldest first")
    digest: str | None = Field(
        default=None, description="sha256 over the bundle's files, checked by workers; null for 'local'"
    )
    owner: str = Field(description="the key that published it ('admin': shared with every key)")
    created_at: datetime | None = None
    source: Literal["registry", "local"] = "registry"
    extra: dict[str, Any] = Field(default={}, description="what the publisher recorded (training id...)")
    links: dict[str, str] = Field(
        default={}, description="sample_grid: the PNG of generated pairs a training drew (image/png)"
    )
    training_masks: bool = Field(
        default=False,
        description="whether the bundle carries the masks Stage I learned from (masks.npz): jobs with "
        "mask_source real or mixed, or clean_masks, need them",
    )


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
    id: str = Field(
        description="the key's stable id: what it creates belongs to it, never to the name (a key made "
        "later under the same name owns none of it); a key from before ids has its name as id"
    )
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
    unlabelled: int = Field(
        default=0,
        description="images without masks (unlabelled/): Stage I learns appearance from them; not in pairs",
    )
    sizes: list[DatasetSize] = Field(description="image sizes (each mask has its image's), most common first")
    fingerprint: str = Field(description="sha256 over every pair's name and file bytes")
    bytes: int = Field(description="bytes of the image, mask and unlabelled files stored")
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
