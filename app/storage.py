"""Object storage: one interface, two backends (a local directory and S3 through boto3).

Keys are ``/``-separated relative paths such as ``jobs/ID/images/NAME.png``. Writes replace whole
objects, so a re-run shard overwrites what an earlier attempt wrote and never duplicates it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from app.core.config import Settings

CHUNK = 1 << 16


class ObjectNotFound(KeyError):
    """The key names no object."""


class StorageUnavailable(RuntimeError):
    """The backend failed (down, timing out, refusing): worth retrying later, not the caller's fault."""


def check_key(key: str) -> str:
    parts = key.split("/")
    if not key or key.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"invalid storage key {key!r}")
    return key


class Storage(ABC):
    @abstractmethod
    def put(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> None: ...

    @abstractmethod
    def get(self, key: str) -> bytes:
        """The whole object; raises ``ObjectNotFound``."""

    @abstractmethod
    def iter_chunks(self, key: str, chunk_size: int = CHUNK) -> Iterator[bytes]:
        """The object in chunks, never whole in memory; raises ``ObjectNotFound`` before the first chunk."""

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def list_keys(self, prefix: str) -> Iterator[str]:
        """Keys under ``prefix`` (a folder, ending in ``/``), in lexicographic order."""

    @abstractmethod
    def delete_prefix(self, prefix: str) -> int:
        """Delete every object under ``prefix``; returns how many were deleted."""

    @abstractmethod
    def ping(self) -> None:
        """Raise if the backend cannot be reached or written."""

    def presigned_url(self, key: str, expires_s: int) -> str | None:
        """A URL that downloads ``key`` without credentials, or None when the backend has none."""
        return None

    @abstractmethod
    def put_stream(
        self, key: str, chunks: Iterator[bytes], content_type: str = "application/octet-stream"
    ) -> None:
        """Write an object from a stream of chunks (a big zip), never holding it whole."""


class LocalStorage(Storage):
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).resolve()

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    def put(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        self.put_stream(key, iter([data]), content_type)

    def put_stream(
        self, key: str, chunks: Iterator[bytes], content_type: str = "application/octet-stream"
    ) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as f:
                for chunk in chunks:
                    f.write(chunk)
            os.replace(tmp, path)  # atomic: readers see the old object or the new one
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def get(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as exc:
            raise ObjectNotFound(key) from exc

    def iter_chunks(self, key: str, chunk_size: int = CHUNK) -> Iterator[bytes]:
        try:
            f = self._path(key).open("rb")
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as exc:
            raise ObjectNotFound(key) from exc
        return self._read(f, chunk_size)

    @staticmethod
    def _read(f: Any, chunk_size: int) -> Iterator[bytes]:
        with f:
            while chunk := f.read(chunk_size):
                yield chunk

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list_keys(self, prefix: str) -> Iterator[str]:
        base = self._path(prefix.rstrip("/"))
        if not base.is_dir():
            return iter(())
        keys = sorted(
            p.relative_to(self.root).as_posix()
            for p in base.rglob("*")
            if p.is_file() and not p.name.startswith(".tmp-")
        )
        return iter(keys)

    def delete_prefix(self, prefix: str) -> int:
        base = self._path(prefix.rstrip("/"))
        if not base.is_dir():
            return 0
        n = sum(1 for p in base.rglob("*") if p.is_file())
        shutil.rmtree(base, ignore_errors=True)
        return n

    def ping(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        probe = self.root / ".ping"
        probe.write_bytes(b"ok")
        probe.unlink()


class S3Storage(Storage):
    """S3 through boto3 (AWS, MinIO, SeaweedFS): SigV4, path-style addressing, explicit timeouts."""

    def __init__(
        self,
        bucket: str,
        *,
        endpoint_url: str | None = None,
        public_endpoint_url: str | None = None,
        region: str = "us-east-1",
        access_key_id: str | None = None,
        secret_access_key: str | None = None,
    ) -> None:
        import boto3
        from botocore.config import Config

        self.bucket = bucket
        config = Config(
            signature_version="s3v4",
            s3={"addressing_style": "path"},
            connect_timeout=5,
            read_timeout=60,
            retries={"max_attempts": 3, "mode": "standard"},
        )
        kwargs: dict[str, Any] = {
            "region_name": region,
            "aws_access_key_id": access_key_id,
            "aws_secret_access_key": secret_access_key,
            "config": config,
        }
        self.client = boto3.client("s3", endpoint_url=endpoint_url, **kwargs)
        # Presigned URLs must name a host the client can reach (compose: localhost, not "seaweedfs").
        self.presign_client = (
            boto3.client("s3", endpoint_url=public_endpoint_url, **kwargs)
            if public_endpoint_url
            else self.client
        )

    def _missing(self, exc: Exception) -> bool:
        code = getattr(exc, "response", {}).get("Error", {}).get("Code", "")
        return code in ("NoSuchKey", "404", "NotFound")

    def ensure_bucket(self) -> None:
        from botocore.exceptions import ClientError

        try:
            self.client.head_bucket(Bucket=self.bucket)
        except ClientError:
            self.client.create_bucket(Bucket=self.bucket)

    def put(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        self.client.put_object(Bucket=self.bucket, Key=check_key(key), Body=data, ContentType=content_type)

    def put_stream(
        self, key: str, chunks: Iterator[bytes], content_type: str = "application/octet-stream"
    ) -> None:
        self.client.upload_fileobj(
            _ChunkReader(chunks), self.bucket, check_key(key), ExtraArgs={"ContentType": content_type}
        )

    def _get_body(self, key: str) -> Any:
        from botocore.exceptions import ClientError

        try:
            return self.client.get_object(Bucket=self.bucket, Key=check_key(key))["Body"]
        except ClientError as exc:
            if self._missing(exc):
                raise ObjectNotFound(key) from exc
            raise

    def get(self, key: str) -> bytes:
        body = self._get_body(key)
        try:
            data: bytes = body.read()
        finally:
            body.close()
        return data

    def iter_chunks(self, key: str, chunk_size: int = CHUNK) -> Iterator[bytes]:
        body = self._get_body(key)
        return self._read(body, chunk_size)

    @staticmethod
    def _read(body: Any, chunk_size: int) -> Iterator[bytes]:
        try:
            yield from body.iter_chunks(chunk_size)
        finally:
            body.close()

    def exists(self, key: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client.head_object(Bucket=self.bucket, Key=check_key(key))
        except ClientError as exc:
            if self._missing(exc):
                return False
            raise
        return True

    def list_keys(self, prefix: str) -> Iterator[str]:
        paginator = self.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix):
            for obj in page.get("Contents", []):
                yield obj["Key"]

    def delete_prefix(self, prefix: str) -> int:
        n = 0
        batch: list[dict[str, str]] = []
        for key in list(self.list_keys(prefix)):
            batch.append({"Key": key})
            if len(batch) == 1000:
                self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})
                n += len(batch)
                batch = []
        if batch:
            self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})
            n += len(batch)
        return n

    def ping(self) -> None:
        self.client.head_bucket(Bucket=self.bucket)

    def presigned_url(self, key: str, expires_s: int) -> str | None:
        url: str = self.presign_client.generate_presigned_url(
            "get_object", Params={"Bucket": self.bucket, "Key": check_key(key)}, ExpiresIn=expires_s
        )
        return url


class _ChunkReader:
    """A read-only file object over an iterator of byte chunks (what ``upload_fileobj`` wants)."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._chunks = chunks
        self._buf = bytearray()

    def read(self, size: int = -1) -> bytes:
        while size < 0 or len(self._buf) < size:
            try:
                self._buf.extend(next(self._chunks))
            except StopIteration:
                break
        n = len(self._buf) if size < 0 else min(size, len(self._buf))
        out = bytes(self._buf[:n])
        del self._buf[:n]
        return out


def make_storage(settings: Settings) -> Storage:
    if settings.storage_backend == "s3":
        secret = settings.s3_secret_access_key
        return S3Storage(
            settings.s3_bucket,
            endpoint_url=settings.s3_endpoint_url,
            public_endpoint_url=settings.s3_public_endpoint_url,
            region=settings.s3_region,
            access_key_id=settings.s3_access_key_id,
            secret_access_key=secret.get_secret_value() if secret else None,
        )
    return LocalStorage(settings.storage_dir)
