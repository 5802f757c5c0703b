"""Where a job's state lives: its object keys in storage, its Redis keys, and the manifest format.

Storage (the durable side): ``jobs/ID/job.json`` (the record, rewritten at every state change),
``jobs/ID/images/NAME.png`` + ``jobs/ID/masks/NAME.png`` (kept pairs), ``jobs/ID/manifest.csv`` and
``jobs/ID/pairs.zip`` (written when the job is decided), ``jobs/ID/previews/NAME.png`` (a pair's preview,
made on first request: ``app.pairs``).

Redis (the live side; ``P`` = settings.redis_prefix, ``J`` = ``P:job:ID``):
    J               the record (JSON)          J:prog      shard -> "generated,kept,phase,position,at"
    J:ver           the job's version: incremented by every state change and progress report
                    (the ids of its event stream, app.events)
    J:pairs         index -> kept pair (JSON)  J:done      shard -> {"generated", "kept": [indices]}
    J:attempts      shard -> runs that crashed J:lease:k   token of the worker running shard k
    J:next          next shard to enqueue      J:stop      why workers must stop (set once decided)
    J:pending       shard -> time it was enqueued and no worker has taken it yet
    J:lock          the per-job lock           J:final     token of the process writing the result
    J:hook          held by the process making a webhook attempt (app.webhooks)
    P:webhooks      zset of ids of ended jobs whose webhook is due, by when the next attempt is due
    P:jobs          zset of ids by creation    P:active    set of ids that are queued or running
    P:owner:ID:jobs     zset of the ids of owner ID's jobs (an API key's stable id; see app.auth), by creation
    P:owner:ID:active   set of the ids of owner ID's queued or running jobs
    P:idem:H        {"job_id", "body"} of an Idempotency-Key whose SHA-256 is H
    P:alive         set once Redis holds the job list; missing = Redis lost its data
    P:stalled:Q     since when no live worker has served queue Q
    P:metrics       the service-wide counters of /metrics (field -> count; see app.counters)
"""

from __future__ import annotations

import csv
import io
from typing import Any


def owner_id_of(rec: Any) -> str | None:
    """The stable id of the key that owns a record (job, dataset, training, model version): its
    ``owner_id``; a record from before key ids has only ``owner`` (the key's name), and the key of
    that time has its name as its id (``app.auth``), so the old record stays its key's, and never
    becomes the property of a new key given the same name."""
    if not isinstance(rec, dict):
        return None
    value = rec.get("owner_id") or rec.get("owner")
    return str(value) if value else None


MANIFEST_FIELDS = ["name", "index", "seed", "dice_loss", "model", "eta"]
SAMPLING_FIELDS = [
    "steps", "order", "w_cf", "w_cg", "guidance", "tau", "scale", "clip_x0", "solver", "karras", "early_reject",
]  # fmt: skip
OUTPUT_FIELDS = ["size"]  # the job's output WxH (app.params.Size), only when it asked for one
# Every row is a generated pair: said in the row, so it stays said once rows are mixed with real ones.
PROVENANCE_FIELDS = ["synthetic"]
# Where the pair's mask came from (``generated`` or ``real:TRAINING_PAIR``, app.params.MaskSource) and
# whether the generated mask was cleaned (0/1): in every manifest, the service's and the CLI's.
MASK_FIELDS = ["mask_source", "cleaned"]
DEFAULT_MASK_SOURCE = "generated"
# Per-job Redis hashes/strings that DELETE removes (leases and the lock expire by themselves).
VERSION = "ver"
SUMMARY = "sum"  # running totals of "done" (app.scheduler.Summary), kept by JobStore.finish_shard
JOB_PARTS = ("prog", "pairs", "done", SUMMARY, "attempts", "next", "pending", "final", VERSION)


def as_str(value: Any) -> str:
    """A Redis reply (bytes) as text."""
    return value.decode() if isinstance(value, bytes) else str(value)


def job_prefix(job_id: str) -> str:
    return f"jobs/{job_id}/"


def image_key(job_id: str, name: str) -> str:
    return f"jobs/{job_id}/images/{name}.png"


def mask_key(job_id: str, name: str) -> str:
    return f"jobs/{job_id}/masks/{name}.png"


def preview_key(job_id: str, name: str) -> str:
    return f"jobs/{job_id}/previews/{name}.png"


def record_key(job_id: str) -> str:
    return f"jobs/{job_id}/job.json"


def manifest_key(job_id: str) -> str:
    return f"jobs/{job_id}/manifest.csv"


def zip_key(job_id: str) -> str:
    return f"jobs/{job_id}/pairs.zip"


class RedisKeys:
    """Names of the Redis keys of one deployment (its prefix)."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.jobs = f"{prefix}:jobs"
        self.active = f"{prefix}:active"
        self.alive = f"{prefix}:alive"
        self.reconciler = f"{prefix}:reconciler"
        self.webhooks = f"{prefix}:webhooks"
        self.metrics = f"{prefix}:metrics"

    def job(self, job_id: str, *parts: str) -> str:
        return ":".join((self.prefix, "job", job_id, *parts))

    def owner_jobs(self, owner: str) -> str:
        return f"{self.prefix}:owner:{owner}:jobs"

    def owner_active(self, owner: str) -> str:
        return f"{self.prefix}:owner:{owner}:active"

    def idem(self, digest: str) -> str:
        return f"{self.prefix}:idem:{digest}"

    def worker(self, hostname: str) -> str:
        return f"{self.prefix}:worker:{hostname}"

    def workers_pattern(self) -> str:
        return f"{self.prefix}:worker:*"


def class_loss_fields(num_classes: int) -> list[str]:
    """The manifest's per-class Dice loss columns: ``dice_loss_1`` ... ``dice_loss_{K-1}`` for K > 2;
    none for a binary model (its one class loss is ``dice_loss``), so binary manifests stay as they were."""
    return [f"dice_loss_{c}" for c in range(1, num_classes)] if num_classes > 2 else []


def pair_meta(
    name: str,
    index: int,
    seed: int,
    dice_loss: float,
    class_losses: list[float] | None = None,
    mask_source: str = DEFAULT_MASK_SOURCE,
    cleaned: bool = False,
) -> dict[str, Any]:
    """A kept pair's entry (Redis ``J:pairs``); ``class_losses`` (one per foreground class) only for
    K > 2, ``mask_source`` only when not generated and ``cleaned`` only when true: a binary pair of
    the paper's pipeline has the entry it always had."""
    meta: dict[str, Any] = {"name": name, "index": index, "seed": seed, "dice_loss": dice_loss}
    if class_losses is not None and len(class_losses) > 1:
        meta["class_losses"] = [float(v) for v in class_losses]
    if mask_source != DEFAULT_MASK_SOURCE:
        meta["mask_source"] = mask_source
    if cleaned:
        meta["cleaned"] = True
    return meta


def row_mask_source(row: dict[str, Any]) -> tuple[str, bool]:
    """A pair's mask source and whether its mask was cleaned, from its Redis entry or manifest row."""
    cleaned = row.get("cleaned")
    return str(row.get("mask_source") or DEFAULT_MASK_SOURCE), cleaned in (True, 1, "1", "true", "True")


def row_class_losses(row: dict[str, Any]) -> list[float] | None:
    """A pair's per-class Dice losses from its Redis entry or its manifest row (CSV text); None: binary."""
    if row.get("class_losses"):
        return [float(v) for v in row["class_losses"]]
    values: list[float] = []
    while (value := row.get(f"dice_loss_{len(values) + 1}")) not in (None, ""):
        values.append(float(value))
    return values or None


def rows_num_classes(rows: list[dict[str, Any]]) -> int:
    """K of a job's pairs as their entries say it (2 when none says more): every pair of a job has K - 1
    class losses, so the first that has them tells."""
    for row in rows:
        losses = row_class_losses(row)
        if losses is not None:
            return len(losses) + 1
    return 2


def manifest_csv(rows: list[dict[str, Any]], params: dict[str, Any], num_classes: int | None = None) -> bytes:
    """One row per pair: name, index, seed, dice_loss (then ``dice_loss_1``... for K > 2), the parameters
    that produced it, ``mask_source`` and ``cleaned`` (MASK_FIELDS), ``synthetic`` (1). K is ``num_classes``, else what the rows say. A job with an
    output ``size`` has a ``size`` column after the sampling fields (a square job's manifest is as before)."""
    out = io.StringIO()
    size = params.get("size")
    per_class = class_loss_fields(num_classes or rows_num_classes(rows))
    at = MANIFEST_FIELDS.index("dice_loss") + 1
    fields = (
        MANIFEST_FIELDS[:at] + per_class + MANIFEST_FIELDS[at:] + SAMPLING_FIELDS
        + (OUTPUT_FIELDS if size else []) + MASK_FIELDS + PROVENANCE_FIELDS
    )  # fmt: skip
    writer = csv.DictWriter(out, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    sampling = params["sampling"]
    for row in rows:
        losses = row_class_losses(row) or []
        writer.writerow(
            {
                **{k: row[k] for k in ("name", "index", "seed")},
                "dice_loss": repr(float(row["dice_loss"])),
                **{field: repr(float(v)) for field, v in zip(per_class, losses, strict=False)},
                "model": params["model"],
                "eta": params["eta"],
                **{k: sampling.get(k) for k in SAMPLING_FIELDS},
                **({"size": size} if size else {}),
                **dict(zip(MASK_FIELDS, _mask_cells(row), strict=True)),
                "synthetic": 1,
            }
        )
    return out.getvalue().encode()


def _mask_cells(row: dict[str, Any]) -> tuple[str, int]:
    source, cleaned = row_mask_source(row)
    return source, int(cleaned)


def read_manifest(data: bytes) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(data.decode())))
