"""The job's zip, streamed member by member with ``stream-zip`` (never built whole in memory).

The same job gives the same bytes on every download: members come in a fixed order, every member is
dated by the job's ``created_at`` (never the clock), and ``job.json`` holds only what no longer changes
once the job is decided (so the zip written at decision equals one streamed later).
"""

from __future__ import annotations

import stat
from collections.abc import Callable, Iterable, Iterator
from datetime import UTC, datetime
from typing import Any

from stream_zip import NO_COMPRESSION_32, NO_COMPRESSION_64, ZIP_32, ZIP_64, stream_zip

from app.exports import (
    GENERATOR,
    Entry,
    ExportFormat,
    Labels,
    describe,
    encode_json,
    index_file,
    layout,
    mask_member,
)
from app.layout import image_key, manifest_csv, manifest_key, mask_key
from app.storage import Storage

MODE = stat.S_IFREG | 0o644
# The record's fields in the zip's job.json: fixed from decision on (not completed_at, progress, ...).
ZIP_RECORD_FIELDS = ("id", "owner", "status", "error", "created_at", "started_at", "input", "params")


def zip_record(rec: dict[str, Any]) -> dict[str, Any]:
    return {k: rec.get(k) for k in ZIP_RECORD_FIELDS}


def zip_time(rec: dict[str, Any]) -> datetime:
    """Every member's date: the job's creation (UTC-aware, so the zip's Unix time needs no local zone)."""
    created = datetime.fromisoformat(str(rec["created_at"]).replace("Z", "+00:00"))
    return created.astimezone(UTC) if created.tzinfo else created.replace(tzinfo=UTC)


def provenance(rec: dict[str, Any]) -> dict[str, Any]:
    """What made the pairs, for dataset.json / datalist.json."""
    return {
        "synthetic": True,
        "generator": GENERATOR,
        "job": rec["id"],
        "created_at": rec["created_at"],
        "model": rec["params"]["model"],
        "params": rec["params"],
    }


def job_zip(
    storage: Storage,
    rec: dict[str, Any],
    rows: list[dict[str, Any]],
    *,
    final: bool,
    fmt: str = ExportFormat.PLAIN,
    labels: Labels | None = None,
    on_member: Callable[[int], None] | None = None,
) -> Iterator[bytes]:
    """The pairs of ``rows`` in format ``fmt`` (``app.exports``), with ``manifest.csv`` and ``job.json``.

    ``final`` streams the stored manifest; otherwise (a partial zip) one is written for ``rows``.
    ``labels`` (the model's, ``Labels.from_bundle``) names the index file's labels and says K.
    Order: the format's index file, ``manifest.csv``, ``job.json``, then each row's image and mask.
    """
    job_id, params = rec["id"], rec["params"]
    lay = layout(fmt)
    big = 2 * len(rows) + 3 > 65_000
    deflate, store = (ZIP_64, NO_COMPRESSION_64) if big else (ZIP_32, NO_COMPRESSION_32)
    when = zip_time(rec)

    labels = labels or Labels()
    binarise = lay.labels and labels.num_classes <= 2  # K-class masks are stored as their labels already

    def members() -> Iterable[tuple[str, datetime, int, Any, Iterable[bytes]]]:
        index = index_file(
            fmt,
            [Entry(str(row["name"])) for row in rows],
            labels,
            provenance(rec),
            describe(len(rows), str(params["model"]), f"job {job_id}"),
        )
        if index is not None:
            yield index[0], when, MODE, deflate, iter([index[1]])
        manifest = storage.iter_chunks(manifest_key(job_id)) if final else iter([manifest_csv(rows, params)])
        yield "manifest.csv", when, MODE, deflate, manifest
        yield "job.json", when, MODE, deflate, iter([encode_json(zip_record(rec))])
        for i, row in enumerate(rows):  # PNGs are compressed already
            if on_member is not None:
                on_member(i)
            name = str(row["name"])
            yield lay.image(name), when, MODE, store, storage.iter_chunks(image_key(job_id, name))
            if binarise:  # 0/255 -> 0/1: read whole (a mask is a few kB)
                chunks: Iterable[bytes] = iter([mask_member(lay, storage.get(mask_key(job_id, name)))])
            else:
                chunks = storage.iter_chunks(mask_key(job_id, name))
            yield lay.mask(name), when, MODE, store, chunks

    return iter(stream_zip(members()))
