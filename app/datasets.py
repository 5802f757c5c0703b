"""Uploaded datasets: stored, listed per key, deleted unless a training uses them.

Storage (the durable side), written in this order, ``dataset.json`` last so that it marks a complete
dataset: ``datasets/ID/images/FILE``, ``datasets/ID/masks/FILE`` and ``datasets/ID/unlabelled/FILE``
(images without masks, when the upload had an ``unlabelled/`` folder) (the files as uploaded: their
bytes are what the fingerprint covers, and a 16-bit TIFF or a DICOM keeps its depth and window tags
for the training's readers), ``datasets/ID/pairs.csv`` and the notes when present, then
``datasets/ID/dataset.json`` (the record plus ``files`` — each pair's name, files and size — the
``groups`` from pairs.csv and ``unlabelled_files``). Nothing is written before the whole upload passed ``app.dataset_check``.

Redis (``P`` = settings.redis_prefix), written after storage, rebuilt from it when lost:
    P:dataset:ID          the record (JSON: what GET shows, without files and groups)
    P:datasets            zset of every dataset id by creation time
    P:owner:ID:datasets   zset of the ids of the datasets of the key of id ID (``app.auth``)
    P:dataset:ID:users    set of the ids of the trainings that use the dataset: DELETE answers 409
                          while it is not empty. Trainings add themselves with ``use`` and remove
                          themselves with ``release``, both under the dataset's lock
    P:dataset:ID:lock     serialises delete, use and release
    P:datasets:loaded     set once the index holds what storage holds; missing = Redis lost it
    P:datasets:lock       held while the index is rebuilt, and by delete
"""

from __future__ import annotations

import json
import logging
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import redis

from app.dataset_check import CheckedDataset
from app.layout import as_str, owner_id_of
from app.locks import renewed_lock
from app.storage import ObjectNotFound, Storage, StorageUnavailable

log = logging.getLogger(__name__)

LOCK_TTL_S = 30
CONTENT_TYPES = {
    ".png": "image/png",
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".tif": "image/tiff",
    ".tiff": "image/tiff",
    ".bmp": "image/bmp",
    ".dcm": "application/dicom",
    ".csv": "text/csv",
    ".md": "text/markdown",
}


class DatasetNotFound(LookupError):
    pass


class DatasetInUse(Exception):
    """A training uses the dataset: it cannot be deleted (409)."""


def dataset_prefix(dataset_id: str) -> str:
    return f"datasets/{dataset_id}/"


def record_key(dataset_id: str) -> str:
    return f"datasets/{dataset_id}/dataset.json"


def _content_type(filename: str) -> str:
    return CONTENT_TYPES.get(Path(filename).suffix.lower(), "application/octet-stream")


class DatasetStore:
    def __init__(self, r: redis.Redis, storage: Storage, prefix: str) -> None:
        self.r = r
        self.storage = storage
        self.prefix = prefix
        self.index = f"{prefix}:datasets"
        self.loaded = f"{prefix}:datasets:loaded"

    # ---- keys
    def _k(self, dataset_id: str, *parts: str) -> str:
        return ":".join((self.prefix, "dataset", dataset_id, *parts))

    def owner_index(self, owner: str) -> str:
        return f"{self.prefix}:owner:{owner}:datasets"

    def users_key(self, dataset_id: str) -> str:
        return self._k(dataset_id, "users")

    def _lock(self, dataset_id: str) -> Any:
        return self.r.lock(self._k(dataset_id, "lock"), timeout=LOCK_TTL_S, blocking_timeout=LOCK_TTL_S)

    def _index_lock(self) -> Any:
        return self.r.lock(f"{self.prefix}:datasets:lock", timeout=120, blocking_timeout=120)

    def _put_file(self, key: str, path: Path) -> None:
        try:
            with path.open("rb") as f:
                self.storage.put_stream(key, iter(lambda: f.read(1 << 20), b""), _content_type(path.name))
        except Exception as exc:  # every backend error: the API answers 503
            raise StorageUnavailable(str(exc)) from exc

    def _put(self, key: str, data: bytes) -> None:
        try:
            self.storage.put(key, data, "application/json")
        except Exception as exc:
            raise StorageUnavailable(str(exc)) from exc

    # ---- create
    def create(
        self,
        checked: CheckedDataset,
        root: Path,
        *,
        owner: str,
        name: str | None = None,
        owner_id: str | None = None,
    ) -> dict[str, Any]:
        """Store a checked dataset unpacked at ``root``; returns its record. ``owner`` is the key's
        name (shown), ``owner_id`` its stable id (default: ``owner``), which owns the dataset. A create
        that fails half-way (storage or Redis down) removes what it wrote."""
        owner_id = owner_id or owner
        dataset_id = uuid.uuid4().hex
        base = dataset_prefix(dataset_id)
        nbytes = 0
        try:
            for p in checked.pairs:
                for folder, filename in (("images", p.image), ("masks", p.mask)):
                    path = root / folder / filename
                    nbytes += path.stat().st_size
                    self._put_file(f"{base}{folder}/{filename}", path)
            for filename in checked.unlabelled:
                path = root / "unlabelled" / filename
                nbytes += path.stat().st_size
                self._put_file(f"{base}unlabelled/{filename}", path)
            for note in checked.notes:
                self._put_file(base + note, root / note)
            now = datetime.now(UTC)
            rec: dict[str, Any] = {
                "id": dataset_id,
                "name": name,
                "owner": owner,
                "owner_id": owner_id,
                "pairs": len(checked.pairs),
                "unlabelled": len(checked.unlabelled),
                "sizes": checked.sizes(),
                "fingerprint": checked.fingerprint,
                "bytes": nbytes,
                "groups": len(set(checked.groups.values())) if checked.groups is not None else None,
                "notes": checked.notes,
                "created_at": now.isoformat(),
            }
            manifest = {
                **rec,
                "files": [
                    {
                        "name": p.name,
                        "image": f"images/{p.image}",
                        "mask": f"masks/{p.mask}",
                        "width": p.width,
                        "height": p.height,
                    }
                    for p in checked.pairs
                ],
                "group_by": checked.groups,
                "unlabelled_files": [f"unlabelled/{f}" for f in checked.unlabelled],
            }
            self._put(record_key(dataset_id), json.dumps(manifest, sort_keys=True).encode())
            score = now.timestamp()
            pipe = self.r.pipeline(transaction=True)
            pipe.set(self._k(dataset_id), json.dumps(rec, sort_keys=True))
            pipe.zadd(self.index, {dataset_id: score})
            pipe.zadd(self.owner_index(owner_id), {dataset_id: score})
            pipe.execute()
        except BaseException:
            self._undo_create(dataset_id, owner_id)
            raise
        return rec

    def _undo_create(self, dataset_id: str, owner: str) -> None:
        for undo in (
            lambda: self.storage.delete_prefix(dataset_prefix(dataset_id)),
            lambda: self.r.delete(self._k(dataset_id)),
            lambda: self.r.zrem(self.index, dataset_id),
            lambda: self.r.zrem(self.owner_index(owner), dataset_id),
        ):
            try:
                undo()
            except Exception:
                log.warning("dataset %s: could not undo a failed create", dataset_id, exc_info=True)

    # ---- read
    def _stored(self, dataset_id: str) -> dict[str, Any] | None:
        try:
            manifest: dict[str, Any] = json.loads(self.storage.get(record_key(dataset_id)))
        except (ObjectNotFound, ValueError):
            return None
        return manifest

    @staticmethod
    def _summary(manifest: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in manifest.items() if k not in ("files", "group_by", "unlabelled_files")}

    def get(self, dataset_id: str) -> dict[str, Any]:
        """The record; from storage when Redis lost it. Raises ``DatasetNotFound``."""
        raw = self.r.get(self._k(dataset_id))
        if raw:
            rec: dict[str, Any] = json.loads(raw)
            return rec
        manifest = self._stored(dataset_id)
        if manifest is None:
            raise DatasetNotFound(dataset_id)
        return self._summary(manifest)

    def manifest(self, dataset_id: str) -> dict[str, Any]:
        """``dataset.json``: the record with ``files`` and ``group_by`` (what a training reads)."""
        manifest = self._stored(dataset_id)
        if manifest is None:
            raise DatasetNotFound(dataset_id)
        return manifest

    def page(self, *, owner: str | None, limit: int, offset: int) -> tuple[list[dict[str, Any]], int]:
        """A page of datasets, newest first (``owner``'s, or every one): ``(records, total)``."""
        if not self.r.exists(self.loaded):
            self.rebuild()
        key = self.index if owner is None else self.owner_index(owner)
        ids = [as_str(i) for i in self.r.zrevrange(key, offset, offset + limit - 1)]
        total = int(self.r.zcard(key))
        if not ids:
            return [], total
        raws = self.r.mget([self._k(i) for i in ids])
        out = []
        for dataset_id, raw in zip(ids, raws, strict=True):
            if raw:
                out.append(json.loads(raw))
                continue
            manifest = self._stored(dataset_id)  # Redis lost the record, not the index entry
            if manifest is not None:
                out.append(self._summary(manifest))
        return out, total

    def rebuild(self) -> int:
        """Re-index every ``dataset.json`` in storage (Redis lost its data); returns how many."""
        with self._index_lock():
            if self.r.exists(self.loaded):
                return 0
            n = 0
            for key in self.storage.list_keys("datasets/"):
                parts = key.split("/")
                if len(parts) != 3 or parts[2] != "dataset.json":
                    continue
                manifest = self._stored(parts[1])
                if manifest is None:
                    continue
                rec = self._summary(manifest)
                score = datetime.fromisoformat(rec["created_at"]).timestamp()
                pipe = self.r.pipeline(transaction=True)
                pipe.set(self._k(rec["id"]), json.dumps(rec, sort_keys=True))
                pipe.zadd(self.index, {rec["id"]: score})
                pipe.zadd(self.owner_index(owner_id_of(rec) or ""), {rec["id"]: score})
                pipe.execute()
                n += 1
            self.r.set(self.loaded, "1")
        return n

    # ---- in use by trainings (section 2 of issue 11 calls these)
    def users(self, dataset_id: str) -> list[str]:
        return sorted(as_str(u) for u in self.r.smembers(self.users_key(dataset_id)))

    def use(self, dataset_id: str, user: str) -> None:
        """Record that ``user`` (a training's id) reads the dataset; raises ``DatasetNotFound``."""
        with self._lock(dataset_id):
            self.get(dataset_id)
            self.r.sadd(self.users_key(dataset_id), user)

    def release(self, dataset_id: str, user: str) -> None:
        with self._lock(dataset_id):
            self.r.srem(self.users_key(dataset_id), user)

    # ---- delete
    def delete(self, dataset_id: str) -> None:
        """Remove the dataset's objects and keys; raises ``DatasetInUse`` while a training uses it."""
        # deleting 10 000 pairs outlasts LOCK_TTL_S: the lock is renewed while it runs, and the
        # index lock (which every create and list waits for) is held only for the final writes
        lock = self._k(dataset_id, "lock")
        with renewed_lock(self.r, lock, ttl_s=LOCK_TTL_S, blocking_timeout=LOCK_TTL_S):
            rec = self.get(dataset_id)
            users = self.users(dataset_id)
            if users:
                raise DatasetInUse(
                    f"dataset {dataset_id} is used by {len(users)} training(s) ({', '.join(users[:5])}); "
                    "delete it once they have finished"
                )
            try:
                self.storage.delete_prefix(dataset_prefix(dataset_id))
            except Exception as exc:
                raise StorageUnavailable(str(exc)) from exc
            with self._index_lock():
                pipe = self.r.pipeline(transaction=True)
                pipe.delete(self._k(dataset_id), self.users_key(dataset_id))
                pipe.zrem(self.index, dataset_id)
                pipe.zrem(self.owner_index(owner_id_of(rec) or ""), dataset_id)
                pipe.execute()
