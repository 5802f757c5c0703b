"""STAND-IN for ``app.registry`` (issue 11 section 3, built on another branch): REPLACE AT MERGE.

Only the contract the trainings use: ``Registry(storage, r, settings)``, ``publish(bundle_dir, name,
*, owner, extra) -> {name, version, digest, ...}`` and ``get(name, version=None)`` raising
``ModelNotFound``. Bundles go to ``models/NAME/VERSION/`` with ``registry.json`` beside the files.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import redis

from app.core.config import Settings
from app.storage import ObjectNotFound, Storage


class ModelNotFound(LookupError):
    pass


class Registry:
    def __init__(self, storage: Storage, r: redis.Redis, settings: Settings) -> None:
        self.storage = storage
        self.r = r
        self.settings = settings

    def _versions(self, name: str) -> list[int]:
        found = set()
        for key in self.storage.list_keys(f"models/{name}/"):
            parts = key.split("/")
            if len(parts) >= 4 and parts[2].isdigit() and parts[3] == "registry.json":
                found.add(int(parts[2]))
        return sorted(found)

    def get(self, name: str, version: int | None = None) -> dict[str, Any]:
        versions = self._versions(name)
        if not versions or (version is not None and version not in versions):
            raise ModelNotFound(name)
        v = versions[-1] if version is None else version
        try:
            rec: dict[str, Any] = json.loads(self.storage.get(f"models/{name}/{v}/registry.json"))
        except ObjectNotFound:
            raise ModelNotFound(name) from None
        return rec

    def publish(
        self, bundle_dir: Path, name: str, *, owner: str, extra: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        with self.r.lock(f"{self.settings.redis_prefix}:registry:{name}", timeout=60):
            version = (self._versions(name) or [0])[-1] + 1
            digest = hashlib.sha256()
            files = sorted(p for p in bundle_dir.rglob("*") if p.is_file())
            for p in files:
                rel = p.relative_to(bundle_dir).as_posix()
                data = p.read_bytes()
                digest.update(rel.encode() + b"\0" + hashlib.sha256(data).digest())
                self.storage.put(f"models/{name}/{version}/{rel}", data)
            rec = {
                "name": name,
                "version": version,
                "digest": digest.hexdigest(),
                "owner": owner,
                **(extra or {}),
            }
            self.storage.put(f"models/{name}/{version}/registry.json", json.dumps(rec).encode())
        return rec
