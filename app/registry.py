"""The bundle registry: trained bundles as numbered, immutable versions in the object store.

Storage (the durable side), written in this order, ``manifest.json`` last so that it marks a
complete version (a version without it is never listed):
    models/NAME/VERSION/FILE...       the bundle's files as published (bundle.json, dpm/, segmenter/,
                                      filter/, licence notes; never .checkpoints/ or hidden files)
    models/NAME/VERSION/digest        "sha256:HEX" over the sorted relative paths and file bytes
    models/NAME/VERSION/manifest.json the version's record: name, version, digest, owner, created_at,
                                      files [{path, size}], meta (bundle.json), extra (metrics...)

Redis (``P`` = settings.redis_prefix), an index rebuilt from storage when lost:
    P:models           hash "NAME/VERSION" -> the manifest (JSON)
    P:models:loaded    set once the index holds what storage holds; missing = Redis lost it
    P:models:lock      held while the index is rebuilt
    P:model:NAME:seq   the last version number handed out (never below what storage holds)
    P:model:NAME:lock  serialises publish and delete of a name

Versions are the integers 1, 2, ... as strings; "latest" is the highest. Bundles under
``DIFFEXP_BUNDLES_DIR`` are a read-only *local* source beside the registry (version ``"local"``):
a name published to the registry hides its local folder from listings and "latest", but
``NAME@local`` still names the folder. That keeps a machine without object storage content (the
tests, an offline demo) working, while workers elsewhere only ever need the registry.

Ownership (docs/registry.md "Owners and visibility"). A name has one owner:
- the admin for a *reserved* name: DIFFEXP_DEFAULT_MODEL and every folder of the local source;
- else whoever published its first (lowest) stored version.
Only the owner (or the admin) publishes versions of a name (anyone else: ``NameTaken``); a version
the admin pushes into a key's name belongs to that key. Owners are key *ids* (``app.auth``: stable,
never reused; a record from before ids has only ``owner``, which then is the id). A version whose
owner is not its name's owner (a *stray*: pushed into a name before it was reserved) is never
listed nor taken as the latest, for anyone: it is reached by number only, by its owner or the
admin. So a key's private names never shadow a shared one. A key sees its own models and the
admin's (the shared ones, like the demo and local folders); the admin sees every model.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import redis

from app.auth import ADMIN
from app.bundles import META_FILE, list_bundles, usable_meta
from app.core.config import Settings
from app.layout import RedisKeys, as_str, owner_id_of
from app.params import TRAINING_MASKS_FILE
from app.storage import ObjectNotFound, Storage, StorageUnavailable

log = logging.getLogger(__name__)

NAME_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,63}$"
VERSION_PATTERN = r"^(?:[1-9][0-9]{0,8}|local)$"
_NAME = re.compile(NAME_PATTERN)
_VERSION = re.compile(VERSION_PATTERN)
LOCAL = "local"
MANIFEST = "manifest.json"
DIGEST = "digest"
RESERVED = {MANIFEST, DIGEST}  # top-level names the registry writes itself
PARTS = ("dpm", "segmenter", "filter")  # each a config.json and *.safetensors
BUNDLE_FORMAT = 1  # models.bundle.BUNDLE_FORMAT (not imported: that module pulls in torch)
LOCK_TTL_S = 600  # a publish uploads a bundle of some MB: the lock must outlive it
CHUNK = 1 << 20

# Next version of a name: one past the larger of the counter and the highest version in storage
# (ARGV[1]), so that a Redis that lost its data never hands out a number twice.
_NEXT_VERSION = """
local c = tonumber(redis.call('get', KEYS[1]) or '0')
local floor = tonumber(ARGV[1])
if c < floor then c = floor end
c = c + 1
redis.call('set', KEYS[1], c)
return c
"""


class ModelNotFound(LookupError):
    """No such model name or version (or not one the caller may see)."""


class ModelInUse(Exception):
    """Queued or running jobs use the version(s): they cannot be deleted (409)."""


class NameTaken(Exception):
    """The name belongs to another key (409)."""


class InvalidBundle(ValueError):
    """A folder that is not a publishable bundle; the message says what is missing."""


class DigestMismatch(ValueError):
    """The files fetched are not the ones published (corrupted or tampered with)."""


GRID_FILE = "sample-grid.png"  # drawn by a training at publication (worker/training.py)


def valid_name(name: str) -> bool:
    return bool(_NAME.match(name))


def valid_version(version: str) -> bool:
    return bool(_VERSION.match(version))


def parse_ref(ref: str) -> tuple[str, str | None]:
    """``"NAME"`` or ``"NAME@VERSION"`` -> ``(name, version or None)``; raises ``ModelNotFound`` for a
    malformed reference (it can name no model)."""
    name, sep, version = ref.partition("@")
    if not valid_name(name) or (sep and not valid_version(version)):
        raise ModelNotFound(ref)
    return name, (version if sep else None)


def format_ref(name: str, version: str | None) -> str:
    return f"{name}@{version}" if version else name


def version_prefix(name: str, version: str) -> str:
    return f"models/{name}/{version}/"


def owner_id(rec: dict[str, Any]) -> str:
    """The id of the key that owns a version (``owner``, the key's name, in records from before ids)."""
    return owner_id_of(rec) or ADMIN


def visible(rec: dict[str, Any], viewer: str | None) -> bool:
    """Whether ``viewer`` (a key's id; None: the admin) may see the model."""
    return viewer is None or viewer == ADMIN or owner_id(rec) in (viewer, ADMIN)


# ---- bundle folders (pure functions of the files)


def bundle_files(bundle_dir: Path) -> list[str]:
    """The relative paths (``/``-separated, sorted) a publish uploads: every regular file but those
    with a hidden part (``.checkpoints/``, temporaries) and the names the registry writes."""
    root = Path(bundle_dir)
    if not (root / META_FILE).is_file():
        raise InvalidBundle(f"{root}: not a bundle (no {META_FILE})")
    out = []
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if any(p.startswith(".") for p in rel.parts) or rel.as_posix() in RESERVED:
            continue
        if path.is_symlink():
            raise InvalidBundle(f"{rel.as_posix()}: a link; a bundle holds regular files only")
        if path.is_file():
            out.append(rel.as_posix())
    return sorted(out)


def check_bundle(bundle_dir: Path, files: Iterable[str]) -> dict[str, Any]:
    """``bundle.json`` of a complete bundle; raises ``InvalidBundle`` naming what is wrong."""
    names = set(files)
    for part in PARTS:
        if f"{part}/config.json" not in names:
            raise InvalidBundle(f"{part}/config.json is missing")
        if not any(n.startswith(f"{part}/") and n.endswith(".safetensors") for n in names):
            raise InvalidBundle(f"{part}/ holds no .safetensors weights")
    meta_file = Path(bundle_dir) / META_FILE
    try:
        meta = json.loads(meta_file.read_text())
    except (OSError, ValueError) as exc:
        raise InvalidBundle(f"{META_FILE}: unreadable ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != BUNDLE_FORMAT:
        raise InvalidBundle(f"{META_FILE}: bundle format must be {BUNDLE_FORMAT}")
    if not usable_meta(meta_file, meta):
        raise InvalidBundle(f"{META_FILE}: no resolution, or sampling defaults out of range")
    return meta


def digest_stream(items: Iterable[tuple[str, bytes]]) -> str:
    """sha256 over ``(relative path, bytes)`` in the order given (sorted by path): each path, a NUL,
    the byte count and the bytes, so no two different bundles hash alike by shifting a boundary."""
    h = hashlib.sha256()
    for rel, data in items:
        h.update(rel.encode() + b"\0" + len(data).to_bytes(8, "big"))
        h.update(data)
    return "sha256:" + h.hexdigest()


def folder_digest(root: Path, files: Iterable[str]) -> str:
    return digest_stream((rel, (root / rel).read_bytes()) for rel in sorted(files))


# ---- the registry


class Registry:
    def __init__(self, storage: Storage, r: redis.Redis, settings: Settings) -> None:
        self.storage = storage
        self.r = r
        self.settings = settings
        self.prefix = settings.redis_prefix
        self.index = f"{self.prefix}:models"
        self.loaded = f"{self.prefix}:models:loaded"
        self.jobs = RedisKeys(self.prefix)

    @classmethod
    def from_settings(cls, settings: Settings) -> Registry:
        from app.storage import make_storage

        r = redis.Redis.from_url(settings.redis_url, socket_timeout=30, socket_connect_timeout=5)
        return cls(make_storage(settings), r, settings)

    # ---- keys
    def _lock(self, name: str) -> Any:
        return self.r.lock(
            f"{self.prefix}:model:{name}:lock", timeout=LOCK_TTL_S, blocking_timeout=LOCK_TTL_S
        )

    def _seq(self, name: str) -> str:
        return f"{self.prefix}:model:{name}:seq"

    # ---- storage helpers (every backend error is StorageUnavailable: the API answers 503)
    def _put(self, key: str, data: bytes, content_type: str = "application/json") -> None:
        try:
            self.storage.put(key, data, content_type)
        except Exception as exc:
            raise StorageUnavailable(str(exc)) from exc

    def _put_file(self, key: str, path: Path) -> None:
        try:
            with path.open("rb") as f:
                self.storage.put_stream(key, iter(lambda: f.read(CHUNK), b""))
        except OSError:
            raise
        except Exception as exc:
            raise StorageUnavailable(str(exc)) from exc

    def _stored_manifest(self, name: str, version: str) -> dict[str, Any] | None:
        try:
            rec: dict[str, Any] = json.loads(self.storage.get(version_prefix(name, version) + MANIFEST))
        except (ObjectNotFound, ValueError):
            return None
        return rec

    def _stored_versions(self, name: str) -> list[str]:
        """Versions of ``name`` with any object in storage (complete or not), ascending."""
        found = set()
        for key in self.storage.list_keys(f"models/{name}/"):
            parts = key.split("/")
            if len(parts) >= 4 and parts[2].isdigit():
                found.add(parts[2])
        return sorted(found, key=int)

    # ---- index
    def rebuild(self) -> int:
        """Re-index every manifest in storage (Redis lost its data); returns how many versions.

        An empty registry takes no lock and sets no marker (one LIST of an empty prefix per call): a
        request that stores nothing leaves no Redis key, and no process waits on another's lock."""
        keys = [k for k in self.storage.list_keys("models/") if _is_manifest(k)]
        if not keys:
            return 0
        with self.r.lock(f"{self.prefix}:models:lock", timeout=60, blocking_timeout=60):
            if self.r.exists(self.loaded):
                return 0
            n = 0
            for key in keys:
                _, name, version, _ = key.split("/")
                rec = self._stored_manifest(name, version)
                if rec is None:
                    continue
                self.r.hset(self.index, f"{name}/{version}", json.dumps(rec, sort_keys=True))
                n += 1
            self.r.set(self.loaded, "1")
        return n

    def _all(self) -> dict[str, list[dict[str, Any]]]:
        """name -> its published versions, ascending."""
        if not self.r.exists(self.loaded):
            self.rebuild()
        out: dict[str, list[dict[str, Any]]] = {}
        for raw in self.r.hvals(self.index):
            rec = json.loads(raw)
            out.setdefault(rec["name"], []).append(rec)
        for versions in out.values():
            versions.sort(key=lambda v: int(v["version"]))
        return out

    def _local(self) -> dict[str, dict[str, Any]]:
        """The read-only local source: ``DIFFEXP_BUNDLES_DIR``'s bundles as version "local" records."""
        out = {}
        for name, meta in list_bundles(self.settings).items():
            if valid_name(name):
                folder = Path(self.settings.bundles_dir) / name
                out[name] = {
                    **local_record(name, meta),
                    "training_masks": (folder / TRAINING_MASKS_FILE).is_file(),
                }
        return out

    # ---- owners
    def reserved(self, name: str, local: dict[str, dict[str, Any]] | None = None) -> bool:
        """Whether ``name`` is kept for the admin: the default model, or a folder of the local source."""
        return name == self.settings.default_model or name in (self._local() if local is None else local)

    def _owner(
        self, name: str, versions: list[dict[str, Any]], local: dict[str, dict[str, Any]]
    ) -> str | None:
        if self.reserved(name, local):
            return ADMIN
        return owner_id(versions[0]) if versions else None

    def owner_of(self, name: str) -> str | None:
        """The id of the key that owns ``name`` (ADMIN for a reserved name), or None: nobody yet."""
        return self._owner(name, self._all().get(name, []), self._local())

    def _owned(
        self, name: str, versions: list[dict[str, Any]], local: dict[str, dict[str, Any]]
    ) -> list[dict[str, Any]]:
        """The versions of ``name`` that belong to its owner (strays left out), ascending."""
        owner = self._owner(name, versions, local)
        return [v for v in versions if owner_id(v) == owner]

    # ---- reading
    def list_models(self, viewer: str | None = None) -> list[dict[str, Any]]:
        """The latest version of every model ``viewer`` may see (None: every model), by name, each
        with ``versions`` (ascending) — local folders for names the registry does not hold."""
        published = self._all()
        local = self._local()
        out = {}
        for name, versions in published.items():
            owned = self._owned(name, versions, local)
            if owned:
                out[name] = {**owned[-1], "versions": [v["version"] for v in owned]}
        for name, rec in local.items():
            if name not in out:
                out[name] = {**rec, "versions": [LOCAL]}
        return [out[n] for n in sorted(out) if visible(out[n], viewer)]

    def get(self, name: str, version: str | None = None, viewer: str | None = None) -> dict[str, Any]:
        """A version's record with ``versions`` (the latest when ``version`` is None); raises
        ``ModelNotFound``."""
        if not valid_name(name) or (version is not None and not valid_version(version)):
            raise ModelNotFound(format_ref(name, version))
        all_versions = self._all().get(name, [])
        locals_ = self._local()
        local = locals_.get(name)
        versions = self._owned(name, all_versions, locals_)
        numbers = [v["version"] for v in versions] or ([LOCAL] if local else [])
        rec: dict[str, Any] | None
        if version is None:
            rec = versions[-1] if versions else local
        elif version == LOCAL:
            rec = local
        else:  # by number: a stray version too (its owner's or the admin's, by visibility)
            rec = next((v for v in all_versions if v["version"] == version), None)
        if rec is None or not visible(rec, viewer):
            raise ModelNotFound(format_ref(name, version))
        return {**rec, "versions": numbers}

    def resolve(self, ref: str, viewer: str | None = None) -> tuple[str, str, dict[str, Any]]:
        """``"NAME"`` (the latest) or ``"NAME@VERSION"`` -> ``(name, version, record)``."""
        name, version = parse_ref(ref)
        rec = self.get(name, version, viewer)
        return name, str(rec["version"]), rec

    # ---- publishing
    def publish(
        self,
        bundle_dir: Path,
        name: str,
        *,
        owner: str,
        extra: dict[str, Any] | None = None,
        owner_name: str | None = None,
    ) -> dict[str, Any]:
        """Upload the bundle at ``bundle_dir`` as the next version of ``name``; returns its record.
        ``owner`` is the publishing key's id (ADMIN for the admin), ``owner_name`` its name (shown;
        default: ``owner``).

        Raises ``InvalidBundle`` (not a complete bundle, or a bad name) and ``NameTaken``."""
        rec, _ = self._publish(bundle_dir, name, owner=owner, owner_name=owner_name, extra=extra, reuse=False)
        return rec

    def ensure(self, bundle_dir: Path, name: str, *, owner: str) -> tuple[dict[str, Any], bool]:
        """Publish the bundle unless a version of ``name`` already has its digest: ``(record, whether
        published now)``. Idempotent, also when several processes start at once (the name's lock)."""
        return self._publish(bundle_dir, name, owner=owner, owner_name=None, extra=None, reuse=True)

    def _publish(
        self,
        bundle_dir: Path,
        name: str,
        *,
        owner: str,
        owner_name: str | None,
        extra: dict[str, Any] | None,
        reuse: bool,
    ) -> tuple[dict[str, Any], bool]:
        if not valid_name(name):
            raise InvalidBundle(f"model name {name!r} must match {NAME_PATTERN}")
        root = Path(bundle_dir)
        files = bundle_files(root)
        meta = check_bundle(root, files)
        digest = folder_digest(root, files)
        with self._lock(name):
            if reuse and (found := self.find_by_digest(name, digest)) is not None:
                return found, False
            publisher, publisher_name = owner, owner_name or owner
            local = self._local()
            versions = self._all().get(name, [])
            current = self._owner(name, versions, local)
            if current is not None and current != owner:
                if owner != ADMIN:
                    if current == ADMIN and self.reserved(name, local):
                        raise NameTaken(
                            f"model name {name!r} is reserved for the admin (the default model or a "
                            "bundle of the local source); choose another name"
                        )
                    raise NameTaken(f"model name {name!r} belongs to another key; choose another name")
                # the admin pushes a version into a key's name: it belongs to the name's owner
                first = self._owned(name, versions, local)[0]
                owner, owner_name = current, str(first.get("owner") or current)
            stored = self._stored_versions(name)
            floor = int(stored[-1]) if stored else 0
            version = str(self.r.eval(_NEXT_VERSION, 1, self._seq(name), floor))
            base = version_prefix(name, version)
            try:
                for rel in files:
                    self._put_file(base + rel, root / rel)
                self._put(base + DIGEST, digest.encode(), "text/plain")
                rec: dict[str, Any] = {
                    "name": name,
                    "version": version,
                    "digest": digest,
                    "owner": owner_name or owner,
                    "owner_id": owner,
                    "published_by": publisher_name,
                    "created_at": datetime.now(UTC).isoformat(),
                    "source": "registry",
                    "files": [{"path": rel, "size": (root / rel).stat().st_size} for rel in files],
                    "meta": meta,
                    "extra": dict(extra or {}),
                }
                self._put(base + MANIFEST, json.dumps(rec, sort_keys=True).encode())  # last: now it exists
                if not self.r.exists(self.loaded):
                    self.rebuild()  # index what storage already held before adding to it
                self.r.hset(self.index, f"{name}/{version}", json.dumps(rec, sort_keys=True))
                self.r.set(self.loaded, "1")
            except BaseException:
                self._undo(base)
                raise
        log.info("published %s@%s (%s) for %s by %s", name, version, digest, owner, publisher)
        return rec, True

    def _undo(self, base: str) -> None:
        try:
            self.storage.delete_prefix(base)
        except Exception:
            log.warning("%s: could not remove a failed publish", base, exc_info=True)

    def find_by_digest(self, name: str, digest: str) -> dict[str, Any] | None:
        """The newest published version of ``name`` with this digest (publish once, not at every start)."""
        for rec in reversed(self._owned(name, self._all().get(name, []), self._local())):
            if rec.get("digest") == digest:
                return rec
        return None

    # ---- deleting
    def users(self, name: str, version: str | None = None) -> list[str]:
        """Ids of the queued or running jobs that use ``name`` (any version, or ``version``).

        A job records the version it resolved (``params.model_version``); one from before the
        registry (no version) counts for every version of its name."""
        ids = sorted(as_str(i) for i in self.r.smembers(self.jobs.active))
        if not ids:
            return []
        raws = self.r.mget([self.jobs.job(i) for i in ids])
        out = []
        for job_id, raw in zip(ids, raws, strict=True):
            if not raw:
                continue
            params = json.loads(raw).get("params") or {}
            if params.get("model") != name:
                continue
            used = params.get("model_version")
            if version is None or used is None or str(used) == version:
                out.append(job_id)
        return out

    def delete(self, name: str, version: str | None = None, viewer: str | None = None) -> int:
        """Delete one version, or every published version of ``name``; returns how many. Raises
        ``ModelNotFound``, ``ModelInUse`` (queued or running jobs use it) and ``InvalidBundle`` for the
        read-only local source."""
        if version == LOCAL:
            raise ModelInUse(f"{name}@local is a folder under DIFFEXP_BUNDLES_DIR: read-only here")
        with self._lock(name):
            versions = self._all().get(name, [])
            targets = [v for v in versions if version is None or v["version"] == version]
            if version is None and viewer not in (None, ADMIN):
                targets = [v for v in targets if owner_id(v) == viewer]  # a key deletes its own versions
            if not targets or not all(visible(v, viewer) for v in targets):
                if version is None and not versions and name in self._local():
                    raise ModelInUse(f"{name} is a folder under DIFFEXP_BUNDLES_DIR: read-only here")
                raise ModelNotFound(format_ref(name, version))
            users = sorted({u for rec in targets for u in self.users(name, str(rec["version"]))})
            if users:
                raise ModelInUse(
                    f"model {format_ref(name, version)} is used by {len(users)} queued or running job(s) "
                    f"({', '.join(users[:5])}); delete it once they have finished"
                )
            for rec in targets:
                # The index entry first: from then on no new job resolves to the version.
                self.r.hdel(self.index, f"{name}/{rec['version']}")
                try:
                    self.storage.delete_prefix(version_prefix(name, rec["version"]))
                except Exception as exc:
                    raise StorageUnavailable(str(exc)) from exc
        return len(targets)

    # ---- fetching (workers)
    def fetch(self, name: str, version: str, cache_dir: Path) -> Path:
        """A local folder holding ``name@version``, its digest verified: the cached copy when its
        files still hash to the digest, else downloaded into a temporary folder, verified, and renamed
        into place (atomic: a concurrent fetch or a crash never leaves a half folder in the cache).

        ``version`` "local" is the folder under ``DIFFEXP_BUNDLES_DIR``, used as it is. Raises
        ``ModelNotFound`` and ``DigestMismatch``."""
        if version == LOCAL:
            if name not in self._local():
                raise ModelNotFound(format_ref(name, version))
            return Path(self.settings.bundles_dir) / name
        rec = self.get(name, version)
        digest = str(rec["digest"])
        files = [str(f["path"]) for f in rec["files"]]
        for rel in files:  # the manifest names where files go: never outside the folder
            if rel.startswith("/") or ".." in rel.split("/") or rel in RESERVED:
                raise DigestMismatch(f"{name}@{version}: manifest names a bad path {rel!r}")
        folder = Path(cache_dir) / name / f"{version}-{digest.removeprefix('sha256:')[:16]}"
        if folder.is_dir():
            if _verify(folder, files, digest):
                return folder
            log.warning("%s: cached copy does not match its digest; fetching again", folder)
            shutil.rmtree(folder, ignore_errors=True)
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".tmp-"))
        try:
            base = version_prefix(name, version)
            for rel in files:
                target = tmp / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                with target.open("wb") as f:
                    for chunk in self.storage.iter_chunks(base + rel):
                        f.write(chunk)
            if not _verify(tmp, files, digest):
                raise DigestMismatch(
                    f"{name}@{version}: the files in storage do not match the published digest {digest}; "
                    "the bundle was changed or corrupted after it was published"
                )
            try:
                os.rename(tmp, folder)
            except OSError:  # another process renamed its copy first: use that one
                if not _verify(folder, files, digest):
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return folder


def _is_manifest(key: str) -> bool:
    parts = key.split("/")
    return len(parts) == 4 and parts[3] == MANIFEST


def _verify(folder: Path, files: list[str], digest: str) -> bool:
    try:
        return folder_digest(folder, files) == digest
    except OSError:
        return False


def local_record(name: str, meta: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": name,
        "version": LOCAL,
        "digest": None,
        "owner": ADMIN,
        "created_at": None,
        "source": "local",
        "files": [],
        "meta": meta,
        "extra": {},
    }


def metrics_of(rec: dict[str, Any]) -> dict[str, Any]:
    """The bundle's metrics with what the publisher added (``extra["metrics"]``) over them."""
    merged = dict(rec.get("meta", {}).get("metrics") or {})
    merged.update((rec.get("extra") or {}).get("metrics") or {})
    return merged
