"""One ``Settings`` object for the API and the workers, read from ``DIFFEXP_*`` environment variables.

Every field is documented in ``.env.example``; a test checks that the two (and docker-compose.yml) agree.
"""

from __future__ import annotations

import ipaddress
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from app.params import DEFAULT_MAX_ATTEMPTS_FACTOR, MAX_SOLVER_STEPS

PLACEHOLDER_SECRET = "changethis"
MIN_ADMIN_KEY_LEN = 16


def is_loopback(host: str) -> bool:
    """``localhost`` or a loopback address (127.0.0.0/8, ::1)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="DIFFEXP_", env_file=".env", env_ignore_empty=True, extra="ignore"
    )

    environment: Literal["local", "production"] = "local"
    api_v1_str: str = "/v1"
    log_level: str = "INFO"
    max_body_bytes: int = Field(default=65_536, ge=1)

    # Who may call /v1: "required" (a bearer key on every /v1 request) or "off" (anyone; refused
    # unless `host` is a loopback address). /healthz and /readyz are always open.
    auth: Literal["required", "off"] = "required"
    # The admin key (manages API keys, sees every job), given as is or as a file holding it.
    admin_key: SecretStr | None = None
    admin_key_file: Path | None = None
    # The address the API binds to (uvicorn --host); checked against `auth` at start-up.
    host: str = "127.0.0.1"
    # Failed authentication per client address (app/authlimit.py): a burst of this many 401s, then
    # auth_fail_rate per second; beyond, the address's requests get 429 before any work is done.
    auth_fail_burst: int = Field(default=20, ge=1)
    auth_fail_rate: float = Field(default=0.2, gt=0)
    # How long such a 429 is held before it is sent (no CPU: a client that ignores Retry-After then
    # sends one request per hold and connection, not as many as the API can answer).
    auth_fail_hold_s: float = Field(default=1.0, ge=0, le=30)
    # Comma-separated browser origins allowed by CORS; unset = no CORS headers at all.
    cors_origins: str | None = None

    # Redis: job records, progress, cancel flags, and the Celery broker.
    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_prefix: str = "diffexp"

    # Bundles: published to the registry in object storage (models/NAME/VERSION/, app/registry.py);
    # every subfolder of bundles_dir holding a bundle.json is also a read-only "local" model on this
    # host. Workers fetch registry bundles into bundle_cache_dir (digest checked) and keep at most
    # max_loaded_bundles in memory, the least recently used going first.
    bundles_dir: Path = Path("models/bundles")
    default_model: str = "cxr-lung-64"
    device: str = "auto"
    bundle_cache_dir: Path = Path("var/bundle-cache")
    max_loaded_bundles: int = Field(default=2, ge=1)
    # torch.compile a bundle's networks when a worker loads it (minutes on a CPU, then ~1.3x faster
    # sampling there; see docs/speed.md). Pairs are bit-reproducible per batch size, device and this setting.
    compile: bool = False

    # Storage backend.
    storage_backend: Literal["local", "s3"] = "local"
    storage_dir: Path = Path("var/storage")
    s3_endpoint_url: str | None = None
    s3_public_endpoint_url: str | None = None
    s3_bucket: str = "diffuseexpand"
    s3_region: str = "us-east-1"
    s3_access_key_id: str | None = None
    s3_secret_access_key: SecretStr | None = None
    s3_presign_expiry_s: int = Field(default=300, ge=1, le=3600)

    # Jobs and shards.
    shard_size: int = Field(default=16, ge=1)
    batch_size: int = Field(default=8, ge=1)
    max_count: int = Field(default=10_000, ge=1)
    max_steps: int = Field(default=200, ge=1, le=MAX_SOLVER_STEPS)
    max_attempts_factor: int = Field(default=DEFAULT_MAX_ATTEMPTS_FACTOR, ge=1)
    shard_max_tries: int = Field(default=3, ge=1)
    lease_ttl_s: float = Field(default=30.0, gt=0)
    # How long a shard keeps retrying through a storage or Redis outage before its job fails.
    outage_limit_s: float = Field(default=600.0, gt=0)

    # The reconciler (app/reconciler.py): sweep interval (0 = off in this process), how long a shard
    # marked as queued may be missing from an empty queue, and how long a job may wait for a worker.
    reconcile_interval_s: float = Field(default=10.0, ge=0)
    reconcile_grace_s: float = Field(default=20.0, gt=0)
    stall_timeout_s: float = Field(default=900.0, gt=0)

    # Webhooks (app/webhooks.py): whether callback URLs may point to private or loopback addresses
    # (tests, on-premise receivers), how long after a job ends failed deliveries are retried, and how
    # often the API looks for due deliveries (0 = not in this process).
    webhook_allow_private: bool = False
    webhook_retry_s: float = Field(default=3600.0, gt=0)
    webhook_interval_s: float = Field(default=1.0, ge=0)

    # Dataset uploads (POST /v1/datasets, docs/datasets.md): the request body, what the archive may
    # unpack to (bytes, entries, compression ratio), pixels per image (checked on the header, before
    # decoding) and the fewest image/mask pairs a dataset may have.
    max_upload_mb: int = Field(default=512, ge=1)
    max_dataset_mb: int = Field(default=2048, ge=1)
    max_dataset_members: int = Field(default=20_000, ge=1)
    max_compression_ratio: float = Field(default=250.0, gt=1)
    max_image_pixels: int = Field(default=25_000_000, ge=1)
    # the shipped examples/cxr-mini (6 pairs) is the smallest dataset the README's journey uploads
    min_dataset_pairs: int = Field(default=6, ge=1)
    # Decoding an upload's images (docs/datasets.md#memory-and-concurrency): the memory one file may
    # take while it is checked (the file, an inflated DICOM or NIfTI stream, the decoded pixels: each
    # is checked against it before it is read; one file is decoded at a time), how many uploads are
    # unpacked and checked at once, and how long an upload waits for its turn before a 429.
    decode_memory_mb: int = Field(default=100, ge=1)
    max_concurrent_decodes: int = Field(default=2, ge=1)
    decode_wait_s: float = Field(default=30.0, ge=0)

    # The event stream (GET /v1/jobs/{id}/events): how often it looks for a change of the job, how
    # often it sends a keep-alive comment, and how long it stays open at most (the client then
    # reconnects with Last-Event-ID, which also suits proxies that cut long responses).
    events_poll_s: float = Field(default=0.5, gt=0, le=60)
    events_ping_s: float = Field(default=15.0, gt=0, le=3600)
    events_max_s: float = Field(default=300.0, gt=0)

    # Celery.
    celery_queue: str = "diffexp"
    # Trainings (POST /v1/models, docs/training.md): their own queue (`worker -Q train,diffexp` serves
    # both; a worker without -Q takes none), the most steps of a stage, how often a running training
    # uploads its checkpoints to storage (0 = at every checkpoint), the runs a training may start
    # before it fails, and the pairs of the sample grid published with the bundle.
    train_queue: str = "train"
    train_max_steps: int = Field(default=100_000, ge=1)
    train_checkpoint_s: float = Field(default=300.0, ge=0)
    train_max_tries: int = Field(default=3, ge=1)
    train_sample_pairs: int = Field(default=4, ge=0, le=16)
    # How many trainings a key (not the admin) may have queued or running at once (429 past it).
    train_max_active: int = Field(default=1, ge=1)
    visibility_timeout_s: int = Field(default=600, ge=1)

    # Metrics (docs/metrics.md). The API serves /metrics, without a key unless `metrics_key` is set
    # (then "Authorization: Bearer KEY"; 16+ characters). Each worker process serves its own /metrics
    # on worker_metrics_host:worker_metrics_port (0 = none): one port per process on a host.
    metrics_key: SecretStr | None = None
    worker_metrics_host: str = "127.0.0.1"
    worker_metrics_port: int = Field(default=9808, ge=0, le=65535)

    @model_validator(mode="after")
    def _check(self) -> Settings:
        if self.shard_size % self.batch_size:
            raise ValueError(
                f"shard_size ({self.shard_size}) must be a multiple of batch_size ({self.batch_size}), "
                "so every pair is sampled in the same batch layout whatever shard runs it"
            )
        if self.storage_backend == "s3" and self.environment != "local":
            secret = self.s3_secret_access_key.get_secret_value() if self.s3_secret_access_key else ""
            if secret == PLACEHOLDER_SECRET:
                raise ValueError(f"DIFFEXP_S3_SECRET_ACCESS_KEY is {PLACEHOLDER_SECRET!r}; set a real one")
        if self.metrics_key is not None and len(self.metrics_key.get_secret_value()) < MIN_ADMIN_KEY_LEN:
            raise ValueError(f"DIFFEXP_METRICS_KEY must be at least {MIN_ADMIN_KEY_LEN} characters long")
        return self

    def admin_key_value(self) -> str | None:
        """The admin key from ``admin_key`` or ``admin_key_file`` (stripped), or None when neither is set."""
        if self.admin_key is not None and self.admin_key_file is not None:
            raise ValueError("set DIFFEXP_ADMIN_KEY or DIFFEXP_ADMIN_KEY_FILE, not both")
        if self.admin_key_file is not None:
            try:
                key = self.admin_key_file.read_text().strip()
            except OSError as exc:
                raise ValueError(f"DIFFEXP_ADMIN_KEY_FILE {self.admin_key_file}: {exc}") from exc
        elif self.admin_key is not None:
            key = self.admin_key.get_secret_value().strip()
        else:
            return None
        if len(key) < MIN_ADMIN_KEY_LEN:
            raise ValueError(f"the admin key must be at least {MIN_ADMIN_KEY_LEN} characters long")
        return key

    def cors_origin_list(self) -> list[str]:
        return [o.strip() for o in (self.cors_origins or "").split(",") if o.strip()]


@lru_cache
def get_settings() -> Settings:
    return Settings()
