"""A job's kept pairs as the API shows them one by one: the list, the lookup of one by name, its preview.

The pairs are those of the final result once the job is decided (its manifest), else those stored so
far (Redis), the same rows ``pairs.zip`` holds. A name is looked up among them before any storage key
is built from it, so a request can only ever reach a listed pair's objects.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any

import redis

from app.layout import (
    image_key,
    job_prefix,
    mask_key,
    preview_key,
    record_key,
    row_class_losses,
    row_mask_source,
)
from app.preview import overlay
from app.storage import ObjectNotFound
from app.store import DELETED, JobNotFound, JobStore

# models.expand.pair_name: "s{seed}-{index:06d}", seed < 2^63, index < max_attempts (a test checks both)
PAIR_NAME_PATTERN = r"^s[0-9]{1,19}-[0-9]{6,12}$"
_PAIR_NAME = re.compile(PAIR_NAME_PATTERN.strip("^$"))
FILES = ("image.png", "mask.png", "preview.png")


class PairNotFound(LookupError):
    """The job has no kept pair of that name (or the name is not one a pair can have)."""


def is_pair_name(value: str) -> bool:
    return _PAIR_NAME.fullmatch(value) is not None


def _row(raw: dict[str, Any]) -> dict[str, Any]:
    """A pair's fields typed: manifest rows are CSV text, Redis rows JSON."""
    return {
        "name": str(raw["name"]),
        "index": int(raw["index"]),
        "seed": int(raw["seed"]),
        "dice_loss": float(raw["dice_loss"]),
        "class_dice_losses": row_class_losses(raw),
        **dict(zip(("mask_source", "cleaned"), row_mask_source(raw), strict=True)),
    }


def pair_rows(store: JobStore, job_id: str) -> tuple[list[dict[str, Any]], bool]:
    """``(rows by index, final)``: the final result's pairs, or those kept so far."""
    result = store.result_rows(job_id, partial=True)
    rows, final = result if result is not None else ([], False)
    return sorted((_row(r) for r in rows), key=lambda r: r["index"]), final


def find_pair(store: JobStore, job_id: str, name: str) -> dict[str, Any]:
    if not is_pair_name(name):
        raise PairNotFound(name)
    for row in pair_rows(store, job_id)[0]:
        if row["name"] == name:
            return row
    raise PairNotFound(name)


def etag(data: bytes) -> str:
    """A strong validator of the bytes: pair objects never change, but hashing them costs nothing here."""
    return '"' + hashlib.sha256(data).hexdigest()[:32] + '"'


def _deleted(store: JobStore, job_id: str) -> bool:
    """Whether DELETE has begun: its stop flag is set before it lists the job's objects."""
    try:
        return store.stop_reason(job_id) == DELETED
    except redis.RedisError:  # a finished job is served without Redis: storage keeps the record
        return not store.storage.exists(record_key(job_id))


def pair_file(store: JobStore, job_id: str, name: str, file: str) -> bytes:
    """The PNG ``file`` (one of ``FILES``) of the job's kept pair ``name``.

    The preview is made on first request and cached in storage under the job, so DELETE removes it;
    one written while the job was being deleted is removed again. Raises ``PairNotFound``, or
    ``JobNotFound`` when the job went meanwhile.
    """
    find_pair(store, job_id, name)
    try:
        if file == "image.png":
            return store.storage.get(image_key(job_id, name))
        if file == "mask.png":
            return store.storage.get(mask_key(job_id, name))
        if file != "preview.png":
            raise PairNotFound(f"{name}/{file}")
        try:
            return store.storage.get(preview_key(job_id, name))
        except ObjectNotFound:
            pass
        data = overlay(store.storage.get(image_key(job_id, name)), store.storage.get(mask_key(job_id, name)))
    except ObjectNotFound:
        raise PairNotFound(name) from None  # listed, but its objects are gone: the job is being deleted
    store.storage.put(preview_key(job_id, name), data, "image/png")
    if _deleted(store, job_id):
        store.storage.delete_prefix(job_prefix(job_id))  # DELETE's listing may have missed the preview
        raise JobNotFound(job_id)
    return data
