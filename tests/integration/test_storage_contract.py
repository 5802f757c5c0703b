"""One contract, two backends: LocalStorage and S3Storage (SeaweedFS with authentication on)."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from app.storage import LocalStorage, ObjectNotFound, S3Storage, Storage
from tests.integration.servers import SeaweedS3

pytestmark = pytest.mark.integration


@pytest.fixture(params=["local", "s3"])
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Storage]:
    if request.param == "local":
        yield LocalStorage(tmp_path / "objects")
        return
    s3: SeaweedS3 = request.getfixturevalue("seaweed")
    bucket = f"contract-{os.urandom(4).hex()}"
    store = S3Storage(
        bucket, endpoint_url=s3.endpoint, access_key_id=s3.access_key, secret_access_key=s3.secret_key
    )
    store.ensure_bucket()
    yield store
    store.delete_prefix("")


def test_put_get_overwrite_exists(storage: Storage) -> None:
    assert not storage.exists("jobs/a/x.png")
    storage.put("jobs/a/x.png", b"first", "image/png")
    assert storage.exists("jobs/a/x.png") and storage.get("jobs/a/x.png") == b"first"
    storage.put("jobs/a/x.png", b"second")
    assert storage.get("jobs/a/x.png") == b"second"
    assert list(storage.list_keys("jobs/a/")) == ["jobs/a/x.png"]  # replaced, not duplicated


def test_missing_objects_raise_object_not_found(storage: Storage) -> None:
    with pytest.raises(ObjectNotFound):
        storage.get("jobs/none/x")
    with pytest.raises(ObjectNotFound):
        storage.iter_chunks("jobs/none/x")


def test_list_is_sorted_and_limited_to_the_prefix(storage: Storage) -> None:
    for key in ["jobs/b/2", "jobs/b/1", "jobs/b/sub/3", "jobs/bb/4", "other/5"]:
        storage.put(key, key.encode())
    assert list(storage.list_keys("jobs/b/")) == ["jobs/b/1", "jobs/b/2", "jobs/b/sub/3"]
    assert list(storage.list_keys("jobs/zzz/")) == []


def test_delete_prefix_removes_only_that_prefix(storage: Storage) -> None:
    for key in ["jobs/c/1", "jobs/c/d/2", "jobs/cc/3"]:
        storage.put(key, b"x")
    assert storage.delete_prefix("jobs/c/") == 2
    assert list(storage.list_keys("jobs/c/")) == [] and storage.exists("jobs/cc/3")
    assert storage.delete_prefix("jobs/c/") == 0


def test_streams_in_and_out_without_whole_objects(storage: Storage) -> None:
    chunk = os.urandom(1 << 20)
    n = 9  # 9 MiB: past boto3's 8 MiB multipart threshold
    storage.put_stream("jobs/big/blob.zip", iter([chunk] * n), "application/zip")
    sizes, digest = [], hashlib.sha256()
    for part in storage.iter_chunks("jobs/big/blob.zip", chunk_size=1 << 16):
        sizes.append(len(part))
        digest.update(part)
    assert sum(sizes) == n * len(chunk) and max(sizes) <= 1 << 16
    assert digest.hexdigest() == hashlib.sha256(chunk * n).hexdigest()


@pytest.mark.parametrize("key", ["", "/abs", "a/../b", "a//b", "./a"])
def test_invalid_keys_are_refused(storage: Storage, key: str) -> None:
    with pytest.raises(ValueError, match="invalid storage key"):
        storage.put(key, b"x")


def test_ping_and_presigned_urls(storage: Storage) -> None:
    storage.ping()
    storage.put("jobs/p/file.bin", b"payload")
    url = storage.presigned_url("jobs/p/file.bin", 60)
    if isinstance(storage, LocalStorage):
        assert url is None
    else:
        assert url is not None and "X-Amz-Signature" in url
        assert httpx.get(url).content == b"payload"
        assert httpx.get(url.replace("X-Amz-Signature=", "X-Amz-Signature=0")).status_code == 403


def test_s3_refuses_wrong_credentials(seaweed: SeaweedS3) -> None:
    wrong = S3Storage(
        seaweed.bucket, endpoint_url=seaweed.endpoint, access_key_id="nobody", secret_access_key="nope"
    )
    with pytest.raises(Exception, match="InvalidAccessKeyId|403|Forbidden"):
        wrong.put("jobs/x/y", b"z")
