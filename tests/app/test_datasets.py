"""POST/GET/DELETE /v1/datasets against real Redis and real (local) storage.

The bad uploads are one table: each is a 4xx problem naming what is wrong, and leaves nothing behind
(no object, no Redis key, no temporary folder)."""

from __future__ import annotations

import asyncio
import gzip
import io
import stat
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from app.core.config import Settings
from app.dataset_check import fingerprint
from app.datasets import DatasetStore
from app.decodes import DecodeSlots
from app.main import create_app
from tests.app.conftest import Enqueued
from tests.conftest import ADMIN_HEADERS
from tests.utils.archives import (
    bomb_tar_gz,
    bomb_zip,
    folder_members,
    png,
    png_claiming,
    shapes_members,
    tar_gz_bytes,
    zip_bytes,
    zip_patched,
    zip_with,
)
from tests.utils.medical import (
    disc_mask,
    ramp,
    write_deflated_dicom,
    write_dicom,
    write_nifti,
    write_nifti_bomb,
    write_tiff16,
)

ROOT = Path(__file__).resolve().parents[2]
CXR = ROOT / "examples" / "cxr-mini"
PROBLEM = "application/problem+json"


def upload(client: TestClient, data: bytes, filename: str = "data.zip", **form: str) -> Any:
    return client.post(
        "/v1/datasets", files={"file": (filename, data, "application/octet-stream")}, data=form or None
    )


def temp_dirs() -> set[str]:
    return {p.name for p in Path(tempfile.gettempdir()).glob("diffexp-dataset-*")}


def assert_nothing_stored(client: TestClient, settings: Settings) -> None:
    store: DatasetStore = client.app.state.datasets  # type: ignore[attr-defined]
    assert store.r.keys(f"{settings.redis_prefix}:*") == []
    objects = settings.storage_dir / "datasets"
    assert not objects.exists() or not [p for p in objects.rglob("*") if p.is_file()]


@pytest.fixture()
def make_client(
    settings_factory: Callable[..., Settings],
) -> Iterator[Callable[..., tuple[TestClient, Settings]]]:
    opened: list[TestClient] = []

    def make(**overrides: Any) -> tuple[TestClient, Settings]:
        settings = settings_factory(**overrides)
        client = TestClient(create_app(settings, enqueue=Enqueued()), headers=ADMIN_HEADERS)
        client.__enter__()
        opened.append(client)
        return client, settings

    yield make
    for c in opened:
        c.__exit__(None, None, None)


# ---- builders of bad archives: each returns the bytes to upload


def good(**kw: Any) -> dict[str, bytes]:
    return shapes_members(8, **kw)


def replaced(name: str, data: bytes | None, **extra: bytes) -> dict[str, bytes]:
    members = good()
    if data is None:
        del members[name]
    else:
        members[name] = data
    return {**members, **extra}


def medical(tmp: Path, name: str, write: Callable[[Path], Path]) -> bytes:
    return write(tmp / name).read_bytes()


def _ellipse(size: int = 32) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size]
    return ((((xx - 16) / 9) ** 2 + ((yy - 16) / 7) ** 2) < 1).astype(np.uint8) * 255


def _jpeg(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _colour_mask() -> bytes:
    rgb = np.zeros((32, 32, 3), np.uint8)
    rgb[..., 0] = _ellipse()  # red foreground
    return png(rgb)


def _multi_frame_tiff() -> bytes:
    frames = [Image.fromarray(np.full((32, 32), v, np.uint8)) for v in (10, 200)]
    buf = io.BytesIO()
    frames[0].save(buf, format="TIFF", save_all=True, append_images=frames[1:])
    return buf.getvalue()


def _big_dicom(tmp: Path) -> bytes:
    import pydicom

    path = write_dicom(tmp / "small.dcm", ramp(32, 32))
    ds = pydicom.dcmread(path)
    ds.Rows = ds.Columns = 60_000  # the header claims 3.6 G pixels; the data is 2 KB
    ds.save_as(path)
    return path.read_bytes()


def _deflated_bomb(tmp: Path) -> bytes:
    return write_deflated_dicom(tmp / "bomb.dcm", ramp(32, 32), padding=24 << 20).read_bytes()


def _nifti_bomb(tmp: Path) -> bytes:
    return write_nifti_bomb(tmp / "bomb.nii.gz", disc_mask(32, 32), extension=24 << 20).read_bytes()


def _nifti_volume(tmp: Path) -> bytes:
    return write_nifti(tmp / "v.nii", np.zeros((32, 32, 3), np.int16)).read_bytes()


def _float_nifti_mask(tmp: Path) -> bytes:
    mask = (_ellipse() / 255.0 * 0.5).astype(np.float32)  # 0 and 0.5
    return write_nifti(tmp / "m.nii.gz", mask).read_bytes()


def _truncated_dicom(tmp: Path) -> bytes:
    data = write_dicom(tmp / "t.dcm", ramp(32, 32)).read_bytes()
    return data[:-300]


def _link_tar(kind: bytes, target: str) -> bytes:
    return tar_gz_bytes(good(), links={"images/link.png": (kind, target)})


def _random_member(nbytes: int) -> bytes:
    return np.random.default_rng(0).integers(0, 256, nbytes, dtype=np.uint8).tobytes()


Builder = Callable[[Path], bytes]
# id, builder, settings, status, problem type, the member that must be named (or None)
BAD_UPLOADS: list[tuple[str, Builder, dict[str, Any], int, str | None, str | None]] = [
    ("random-bytes", lambda t: b"hello, not an archive", {}, 422, "not_archive", None),
    ("empty-file", lambda t: b"", {}, 422, "not_archive", None),
    ("plain-tar", lambda t: tar_gz_bytes(good(), gz=False), {}, 422, "not_archive", None),
    ("gzip-of-text", lambda t: gzip.compress(b"just text, no tar inside"), {}, 422, "not_archive", None),
    ("truncated-zip", lambda t: zip_bytes(good())[:-100], {}, 422, "not_archive", None),
    (
        "upload-over-limit",
        lambda t: zip_bytes({"images/x.png": _random_member(1_200_000)}),
        {"max_upload_mb": 1},
        413,
        None,
        None,
    ),
    (
        "uncompressed-over-limit-zip",
        lambda t: zip_bytes({**good(), "images/big.png": _random_member(1_100_000)}),
        {"max_dataset_mb": 1},
        422,
        "archive_too_large",
        None,
    ),
    (
        "uncompressed-over-limit-tar",
        lambda t: tar_gz_bytes({**good(), "images/big.png": _random_member(1_100_000)}),
        {"max_dataset_mb": 1},
        422,
        "archive_too_large",
        None,
    ),
    (
        "too-many-members-zip",
        lambda t: zip_bytes(good()),
        {"max_dataset_members": 10},
        422,
        "too_many_members",
        None,
    ),
    (
        "too-many-members-tar",
        lambda t: tar_gz_bytes(good()),
        {"max_dataset_members": 10},
        422,
        "too_many_members",
        None,
    ),
    ("zip-bomb", lambda t: bomb_zip(), {}, 422, "zip_bomb", "images/bomb.png"),
    ("tar-bomb-lying-gzip-size", lambda t: bomb_tar_gz(), {}, 422, "zip_bomb", None),
    (
        "zip-overlapping-members",
        lambda t: zip_patched(good(), ["images/s00.png"], compress_size=10**8),
        {},
        422,
        "zip_bomb",
        None,
    ),
    (
        "zip-lying-member-size",
        lambda t: zip_patched(good(), ["images/s00.png"], file_size=10),
        {},
        422,
        "unreadable_archive",
        "images/s00.png",
    ),
    (
        "dotdot-zip",
        lambda t: zip_bytes({**good(), "../evil.png": b"x"}),
        {},
        422,
        "unsafe_name",
        "../evil.png",
    ),
    (
        "dotdot-tar",
        lambda t: tar_gz_bytes({**good(), "images/../../evil.png": b"x"}),
        {},
        422,
        "unsafe_name",
        "images/../../evil.png",
    ),
    (
        "absolute-zip",
        lambda t: zip_bytes({**good(), "/etc/evil.png": b"x"}),
        {},
        422,
        "unsafe_name",
        "/etc/evil.png",
    ),
    (
        "absolute-tar",
        lambda t: tar_gz_bytes({**good(), "/tmp/evil.png": b"x"}),
        {},
        422,
        "unsafe_name",
        "/tmp/evil.png",
    ),
    (
        "drive-letter-zip",
        lambda t: zip_bytes({**good(), "C:/evil.png": b"x"}),
        {},
        422,
        "unsafe_name",
        "C:/evil.png",
    ),
    (
        "symlink-zip",
        lambda t: zip_with(good(), {"images/link.png": (stat.S_IFLNK, b"/etc/passwd")}),
        {},
        422,
        "link",
        "images/link.png",
    ),
    (
        "fifo-zip",
        lambda t: zip_with(good(), {"images/fifo.png": (stat.S_IFIFO, b"")}),
        {},
        422,
        "link",
        "images/fifo.png",
    ),
    ("symlink-tar", lambda t: _link_tar(tarfile.SYMTYPE, "/etc/passwd"), {}, 422, "link", "images/link.png"),
    (
        "hardlink-tar",
        lambda t: _link_tar(tarfile.LNKTYPE, "images/s00.png"),
        {},
        422,
        "link",
        "images/link.png",
    ),
    ("device-tar", lambda t: _link_tar(tarfile.CHRTYPE, ""), {}, 422, "link", "images/link.png"),
    (
        "encrypted-zip",
        lambda t: zip_with(good(), {"images/x.png": (stat.S_IFREG, b"x")}, flag_bits=1),
        {},
        422,
        "unreadable_archive",
        "images/x.png",
    ),
    (
        "png-header-bomb",
        lambda t: zip_bytes(replaced("images/s00.png", png_claiming(50_000, 50_000))),
        {},
        422,
        "too_many_pixels",
        "images/s00.png",
    ),
    (
        "png-over-max-pixels",
        lambda t: zip_bytes(replaced("images/s00.png", png_claiming(200, 200))),
        {"max_image_pixels": 32 * 32},
        422,
        "too_many_pixels",
        "images/s00.png",
    ),
    (
        "dicom-header-bomb",
        lambda t: zip_bytes(replaced("images/s00.png", None, **{"images/s00.dcm": _big_dicom(t)})),
        {},
        422,
        "too_many_pixels",
        "images/s00.dcm",
    ),
    (
        # a 25 KB deflated DICOM whose dataset inflates to 24 MB (a valid image beside the padding)
        "deflated-dicom-bomb",
        lambda t: zip_bytes(replaced("images/s00.png", None, **{"images/s00.dcm": _deflated_bomb(t)})),
        {"decode_memory_mb": 16},
        422,
        "decode_too_large",
        "images/s00.dcm",
    ),
    (
        "nifti-gz-bomb",
        lambda t: zip_bytes(replaced("masks/s00.png", None, **{"masks/s00.nii.gz": _nifti_bomb(t)})),
        {"decode_memory_mb": 16},
        422,
        "decode_too_large",
        "masks/s00.nii.gz",
    ),
    (
        "png-over-decode-budget",
        lambda t: zip_bytes(replaced("images/s00.png", png(np.zeros((1500, 1500, 3), np.uint8)))),
        {"decode_memory_mb": 8},
        422,
        "decode_too_large",
        "images/s00.png",
    ),
    (
        # an unlabelled image is decoded in the same bounded way as a pair's (it was a NameError: 500)
        "deflated-dicom-bomb-unlabelled",
        lambda t: zip_bytes({**good(), "unlabelled/extra.dcm": _deflated_bomb(t)}),
        {"decode_memory_mb": 16},
        422,
        "decode_too_large",
        "unlabelled/extra.dcm",
    ),
    (
        "unreadable-image",
        lambda t: zip_bytes(replaced("images/s00.png", b"not a png")),
        {},
        422,
        "unreadable_image",
        "images/s00.png",
    ),
    (
        "truncated-png",
        lambda t: zip_bytes(replaced("images/s00.png", good()["images/s00.png"][:200])),
        {},
        422,
        "unreadable_image",
        "images/s00.png",
    ),
    (
        "truncated-dicom",
        lambda t: zip_bytes(replaced("images/s00.png", None, **{"images/s00.dcm": _truncated_dicom(t)})),
        {},
        422,
        "unreadable_image",
        "images/s00.dcm",
    ),
    (
        "image-without-mask",
        lambda t: zip_bytes(replaced("masks/s03.png", None)),
        {},
        422,
        "image_without_mask",
        "images/s03.png",
    ),
    (
        "mask-without-image",
        lambda t: zip_bytes(replaced("images/s03.png", None)),
        {},
        422,
        "mask_without_image",
        "masks/s03.png",
    ),
    (
        "size-mismatch",
        lambda t: zip_bytes(replaced("masks/s00.png", png(np.zeros((40, 40), np.uint8)))),
        {},
        422,
        "size_mismatch",
        "masks/s00.png",
    ),
    (
        "photo-mask",
        lambda t: zip_bytes(replaced("masks/s00.png", good()["images/s00.png"])),
        {},
        422,
        "not_label_map",
        "masks/s00.png",
    ),
    (
        "jpeg-mask",
        lambda t: zip_bytes(replaced("masks/s00.png", None, **{"masks/s00.jpg": _jpeg(_ellipse())})),
        {},
        422,
        "not_label_map",
        "masks/s00.jpg",
    ),
    (
        "colour-mask",
        lambda t: zip_bytes(replaced("masks/s00.png", _colour_mask())),
        {},
        422,
        "not_label_map",
        "masks/s00.png",
    ),
    (
        "float-mask",
        lambda t: zip_bytes(replaced("masks/s00.png", None, **{"masks/s00.nii.gz": _float_nifti_mask(t)})),
        {},
        422,
        "not_label_map",
        "masks/s00.nii.gz",
    ),
    (
        "empty-mask",
        lambda t: zip_bytes(replaced("masks/s00.png", png(np.zeros((32, 32), np.uint8)))),
        {},
        422,
        "empty_mask",
        "masks/s00.png",
    ),
    (
        "multi-frame-tiff",
        lambda t: zip_bytes(replaced("images/s00.png", None, **{"images/s00.tif": _multi_frame_tiff()})),
        {},
        422,
        "not_2d",
        "images/s00.tif",
    ),
    (
        "nifti-volume",
        lambda t: zip_bytes(replaced("images/s00.png", None, **{"images/s00.nii": _nifti_volume(t)})),
        {},
        422,
        "not_2d",
        "images/s00.nii",
    ),
    ("too-few-pairs", lambda t: zip_bytes(shapes_members(5)), {}, 422, "too_few_pairs", None),
    ("no-pairs-at-all", lambda t: zip_bytes({"notes.txt": b"hello"}), {}, 422, "too_few_pairs", None),
    (
        "unexpected-member",
        lambda t: zip_bytes({**good(), "extra/notes.txt": b"x"}),
        {},
        422,
        "unexpected_member",
        "extra/notes.txt",
    ),
    (
        "nested-folder",
        lambda t: zip_bytes({**good(), "images/sub/s99.png": b"x"}),
        {},
        422,
        "unexpected_member",
        "images/sub/s99.png",
    ),
    (
        "unsupported-format",
        lambda t: zip_bytes({**good(), "images/s99.gif": b"GIF89a"}),
        {},
        422,
        "unsupported_format",
        "images/s99.gif",
    ),
    (
        "duplicate-name",
        lambda t: zip_bytes({**good(), "images/s00.jpg": _jpeg(np.zeros((32, 32), np.uint8))}),
        {},
        422,
        "duplicate_name",
        "images/s00.png",
    ),
    (
        "unreadable-unlabelled-image",
        lambda t: zip_bytes({**good(), "unlabelled/u0.png": b"not a png"}),
        {},
        422,
        "unreadable_image",
        "unlabelled/u0.png",
    ),
    (
        "unlabelled-nifti-volume",
        lambda t: zip_bytes({**good(), "unlabelled/u0.nii": _nifti_volume(t)}),
        {},
        422,
        "not_2d",
        "unlabelled/u0.nii",
    ),
    (
        "unlabelled-name-of-a-pair",
        lambda t: zip_bytes({**good(), "unlabelled/s00.png": png(np.zeros((32, 32), np.uint8))}),
        {},
        422,
        "duplicate_name",
        "unlabelled/s00.png",
    ),
    (
        "unlabelled-over-the-size-limit",
        lambda t: zip_bytes(
            {**good(), **{f"unlabelled/u{i}.png": _random_member(1 << 19) for i in range(3)}}
        ),
        {"max_dataset_mb": 1},
        422,
        "archive_too_large",
        None,
    ),
    (
        "pairs-csv-without-name",
        lambda t: zip_bytes({**good(), "pairs.csv": b"file,group\ns00,a\n"}),
        {},
        422,
        "pairs_csv",
        "pairs.csv",
    ),
    (
        "pairs-csv-missing-groups",
        lambda t: zip_bytes({**good(), "pairs.csv": b"name,group\ns00,a\ns01,a\n"}),
        {},
        422,
        "pairs_csv",
        "pairs.csv",
    ),
]


@pytest.mark.parametrize(
    ("build", "overrides", "status", "kind", "member"),
    [pytest.param(*row[1:], id=row[0]) for row in BAD_UPLOADS],
)
def test_a_bad_upload_is_a_4xx_naming_the_problem_and_stores_nothing(
    make_client: Callable[..., tuple[TestClient, Settings]],
    tmp_path: Path,
    build: Builder,
    overrides: dict[str, Any],
    status: int,
    kind: str | None,
    member: str | None,
) -> None:
    client, settings = make_client(**overrides)
    before = temp_dirs()
    resp = upload(client, build(tmp_path))
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"] == PROBLEM
    body = resp.json()
    assert body["status"] == status and body["instance"] == "/v1/datasets" and body["detail"]
    if kind is not None:
        kinds = {e["type"] for e in body["errors"]}
        assert kind in kinds, body
        if member is not None:
            named = [e for e in body["errors"] if e["type"] == kind]
            assert any(e.get("member") == member for e in named), body
            assert member in body["detail"] or len(body["errors"]) > 5
    assert_nothing_stored(client, settings)
    assert temp_dirs() <= before  # the unpacked files are gone too


# ---- how many uploads are checked at once


def test_an_upload_past_the_concurrent_decodes_is_429_with_retry_after(
    make_client: Callable[..., tuple[TestClient, Settings]],
) -> None:
    client, settings = make_client(max_concurrent_decodes=1, decode_wait_s=0)
    decodes: DecodeSlots = client.app.state.decodes  # type: ignore[attr-defined]
    assert client.portal is not None
    client.portal.call(decodes.semaphore.acquire)  # another upload is being checked
    try:
        resp = upload(client, zip_bytes(good()))
        assert resp.status_code == 429, resp.text
        assert resp.headers["content-type"] == PROBLEM and int(resp.headers["Retry-After"]) >= 1
        assert "DIFFEXP_MAX_CONCURRENT_DECODES" in resp.json()["detail"]
        assert_nothing_stored(client, settings)
    finally:
        client.portal.call(decodes.semaphore.release)
    assert upload(client, zip_bytes(good())).status_code == 201
    assert decodes.busy == 0


def test_an_upload_waits_for_a_decode_slot(make_client: Callable[..., tuple[TestClient, Settings]]) -> None:
    """Within DIFFEXP_DECODE_WAIT_S an upload queues (on the event loop) rather than being refused."""
    client, _ = make_client(max_concurrent_decodes=1, decode_wait_s=60)
    decodes: DecodeSlots = client.app.state.decodes  # type: ignore[attr-defined]
    assert client.portal is not None
    client.portal.call(decodes.semaphore.acquire)
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(upload, client, zip_bytes(good()))
        deadline = time.monotonic() + 30
        while decodes.semaphore.statistics().tasks_waiting == 0:  # the upload reached the queue
            assert time.monotonic() < deadline and not pending.done()
            time.sleep(0.01)
        client.portal.call(decodes.semaphore.release)
        assert pending.result(timeout=60).status_code == 201


def test_every_problem_of_an_upload_is_listed_at_once(
    make_client: Callable[..., tuple[TestClient, Settings]],
) -> None:
    client, settings = make_client(min_dataset_pairs=8)
    members = good()
    del members["masks/s01.png"], members["images/s02.png"]
    members["masks/s03.png"] = png(np.zeros((40, 40), np.uint8))
    body = upload(client, zip_bytes(members)).json()
    by_kind = {e["type"]: e["member"] for e in body["errors"] if "member" in e}
    assert by_kind == {
        "image_without_mask": "images/s01.png",
        "mask_without_image": "masks/s02.png",
        "size_mismatch": "masks/s03.png",
    }
    assert body["detail"].startswith("4 problems")  # and too few pairs (5 < 8)
    assert_nothing_stored(client, settings)


def test_an_upload_over_the_limit_is_413_without_content_length(
    make_client: Callable[..., tuple[TestClient, Settings]],
) -> None:
    """A chunked body has no Content-Length: the count of the bytes received stops it."""
    client, settings = make_client(max_upload_mb=1)
    boundary = "b0undary"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="d.zip"\r\n'
        "Content-Type: application/zip\r\n\r\n"
    ).encode()
    sent = 0

    def chunks() -> Iterator[bytes]:
        nonlocal sent
        yield head
        for _ in range(64):  # 4 MB offered, 1 MB allowed
            sent += 1
            yield b"\0" * 65536
        yield f"\r\n--{boundary}--\r\n".encode()

    resp = client.post(
        "/v1/datasets",
        content=chunks(),
        headers={"content-type": f"multipart/form-data; boundary={boundary}"},
    )
    assert "content-length" not in resp.request.headers
    assert resp.status_code == 413 and resp.headers["content-type"] == PROBLEM
    assert "DIFFEXP_MAX_UPLOAD_MB" in resp.json()["detail"]
    assert_nothing_stored(client, settings)


def test_the_upload_limit_applies_only_to_multipart_uploads(client: TestClient, settings: Settings) -> None:
    """Another content type keeps the 64 KB body limit: a urlencoded form would be parsed in memory."""
    resp = client.post(
        "/v1/datasets",
        content=b"a=" + b"x" * 100_000,
        headers={"content-type": "application/x-www-form-urlencoded"},
    )
    assert resp.status_code == 413
    resp = client.post(
        "/v1/jobs", content=b"x" * 100_000, headers={"content-type": "multipart/form-data; boundary=x"}
    )
    assert resp.status_code == 413  # other routes too
    assert_nothing_stored(client, settings)


@pytest.mark.parametrize("content_type", ["application/json", "application/zip", None])
def test_a_body_that_is_not_multipart_is_415(
    client: TestClient, settings: Settings, content_type: str | None
) -> None:
    headers = {"content-type": content_type} if content_type else {}
    resp = client.post("/v1/datasets", content=zip_bytes(good()), headers=headers)
    assert resp.status_code == 415 and resp.headers["accept-post"] == "multipart/form-data"
    assert_nothing_stored(client, settings)


def test_a_malformed_form_is_refused(client: TestClient, settings: Settings) -> None:
    data = zip_bytes(good())
    two = client.post("/v1/datasets", files=[("file", ("a.zip", data)), ("file", ("b.zip", data))])
    assert two.status_code == 400 and "files" in two.json()["detail"].lower()
    missing = client.post("/v1/datasets", data={"name": "x"}, files={"archive": ("a.zip", data)})
    assert missing.status_code == 422 and missing.json()["errors"][0]["pointer"] == "#/archive"
    text = client.post("/v1/datasets", data={"file": "not a file"}, files={"other": ("a.txt", b"")})
    assert text.status_code == 422
    field = client.post("/v1/datasets", files={"file": ("a.zip", data)}, data={"colour": "red"})
    assert field.status_code == 422 and field.json()["errors"][0]["type"] == "extra_forbidden"
    bad_name = upload(client, data, name="two\nlines")
    assert bad_name.status_code == 422 and bad_name.json()["errors"][0]["pointer"] == "#/name"
    long_name = upload(client, data, name="x" * 129)
    assert long_name.status_code == 422
    assert_nothing_stored(client, settings)


def test_names_the_schema_allows_are_accepted(client: TestClient) -> None:
    data = zip_bytes(good())
    for name in ("x", "Lungs – Montgomery set, 2024 (v2) 🫁", "n" * 128):
        resp = upload(client, data, name=name)
        assert resp.status_code == 201 and resp.json()["name"] == name


def test_an_upload_without_a_key_is_not_read(settings: Settings) -> None:
    """The key is checked before the body is read: a client without one cannot make the API spool
    DIFFEXP_MAX_UPLOAD_MB (FastAPI reads File/Form parameters before any dependency)."""
    app = create_app(settings, enqueue=Enqueued())
    chunks = 0
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        nonlocal chunks
        chunks += 1
        return {"type": "http.request", "body": b"\0" * 65536, "more_body": True}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/datasets",
        "raw_path": b"/v1/datasets",
        "root_path": "",
        "query_string": b"",
        "headers": [
            (b"content-type", b"multipart/form-data; boundary=x"),
            (b"transfer-encoding", b"chunked"),
        ],
        "client": ("127.0.0.1", 1),
        "server": ("testserver", 80),
    }
    asyncio.run(asyncio.wait_for(app(scope, receive, send), timeout=10))
    assert sent[0]["status"] == 401 and chunks == 0


# ---- good uploads


def stored_objects(settings: Settings, dataset_id: str) -> list[str]:
    base = settings.storage_dir / "datasets" / dataset_id
    return sorted(p.relative_to(base).as_posix() for p in base.rglob("*") if p.is_file())


@pytest.mark.parametrize("packing", ["zip", "tar.gz"])
def test_cxr_mini_round_trip(make_client: Callable[..., tuple[TestClient, Settings]], packing: str) -> None:
    """examples/cxr-mini has 6 pairs: the minimum (8 by default) is a setting, lowered here."""
    client, settings = make_client(min_dataset_pairs=6)
    members = folder_members(CXR, prefix="cxr-mini/")  # zipped as a folder: the top folder is dropped
    data = zip_bytes(members) if packing == "zip" else tar_gz_bytes({"./" + k: v for k, v in members.items()})
    resp = upload(client, data, filename=f"cxr.{packing}", name="chest x-rays")
    assert resp.status_code == 201, resp.text
    ds = resp.json()
    assert resp.headers["location"] == f"/v1/datasets/{ds['id']}" == ds["links"]["self"]
    pairs = [
        (p.stem, CXR / "images" / p.name, CXR / "masks" / p.name)
        for p in sorted((CXR / "images").glob("*.png"))
    ]
    assert ds["pairs"] == 6 and ds["sizes"] == [{"width": 256, "height": 256, "pairs": 6}]
    assert ds["fingerprint"] == fingerprint(pairs)  # what `diffuseexpand train` records for the folder
    assert ds["name"] == "chest x-rays" and ds["owner"] == "admin" and ds["groups"] is None
    assert ds["notes"] == ["SOURCE.md", "pairs.csv"] and ds["unlabelled"] == 0
    assert ds["bytes"] == sum(p.stat().st_size for _, ip, mp in pairs for p in (ip, mp))
    # stored as uploaded, dataset.json last and complete
    objects = stored_objects(settings, ds["id"])
    assert objects == sorted(
        ["SOURCE.md", "dataset.json", "pairs.csv"]
        + [f"{d}/{p.name}" for d in ("images", "masks") for p in sorted((CXR / d).glob("*.png"))]
    )
    base = settings.storage_dir / "datasets" / ds["id"]
    assert (base / "masks" / pairs[0][2].name).read_bytes() == pairs[0][2].read_bytes()
    store: DatasetStore = client.app.state.datasets  # type: ignore[attr-defined]
    manifest = store.manifest(ds["id"])
    assert [f["name"] for f in manifest["files"]] == [p[0] for p in pairs]
    assert (
        manifest["files"][0]["image"] == f"images/{pairs[0][1].name}" and manifest["files"][0]["width"] == 256
    )
    # list, get, delete
    listed = client.get("/v1/datasets").json()
    assert listed["count"] == 1 and [d["id"] for d in listed["data"]] == [ds["id"]]
    assert client.get(f"/v1/datasets/{ds['id']}").json() == ds
    assert client.delete(f"/v1/datasets/{ds['id']}").status_code == 204
    assert client.get(f"/v1/datasets/{ds['id']}").status_code == 404
    assert client.delete(f"/v1/datasets/{ds['id']}").status_code == 404
    assert client.get("/v1/datasets").json()["count"] == 0
    assert stored_objects(settings, ds["id"]) == []
    leftover = [k for k in store.r.keys(f"{settings.redis_prefix}:*") if not k.endswith(b":datasets:loaded")]
    assert leftover == []


def test_dicom_nifti_and_16bit_tiff_upload(client: TestClient, tmp_path: Path) -> None:
    """Every reader in one dataset: DICOM images with NIfTI masks, 16-bit TIFFs with DICOM label maps."""
    members: dict[str, bytes] = {}
    for i in range(4):
        members[f"images/d{i}.dcm"] = medical(
            tmp_path,
            f"d{i}.dcm",
            lambda p: write_dicom(p, ramp(), slope=2, intercept=-1024, center=40, width=400),
        )
        members[f"masks/d{i}.nii.gz"] = medical(
            tmp_path, f"d{i}.nii.gz", lambda p: write_nifti(p, disc_mask())
        )
        members[f"images/t{i}.tiff"] = medical(
            tmp_path, f"t{i}.tiff", lambda p: write_tiff16(p, ramp(30, 26) * 16)
        )
        members[f"masks/t{i}.dcm"] = medical(
            tmp_path, f"m{i}.dcm", lambda p: write_dicom(p, disc_mask(30, 26, 2))
        )
    members["pairs.csv"] = (
        "name,group\n" + "".join(f"{k}{i},g{i}\n" for k in "dt" for i in range(4))
    ).encode()
    # images without masks, in every reader's format: counted apart, never paired
    members["unlabelled/u0.dcm"] = medical(tmp_path, "u0.dcm", lambda p: write_dicom(p, ramp()))
    members["unlabelled/u1.nii.gz"] = medical(tmp_path, "u1.nii.gz", lambda p: write_nifti(p, ramp()))
    members["unlabelled/u2.tiff"] = medical(tmp_path, "u2.tiff", lambda p: write_tiff16(p, ramp() * 16))
    resp = upload(client, tar_gz_bytes(members), filename="mixed.tar.gz")
    assert resp.status_code == 201, resp.text
    ds = resp.json()
    assert ds["pairs"] == 8 and ds["groups"] == 4 and ds["unlabelled"] == 3
    assert ds["bytes"] == sum(len(v) for k, v in members.items() if k != "pairs.csv")
    assert client.get(f"/v1/datasets/{ds['id']}").json()["unlabelled"] == 3
    assert ds["sizes"] == [{"width": 20, "height": 24, "pairs": 4}, {"width": 26, "height": 30, "pairs": 4}]
    store: DatasetStore = client.app.state.datasets  # type: ignore[attr-defined]
    manifest = store.manifest(ds["id"])
    assert manifest["group_by"]["d0"] == "g0"
    assert manifest["unlabelled_files"] == ["unlabelled/u0.dcm", "unlabelled/u1.nii.gz", "unlabelled/u2.tiff"]


def test_a_dataset_belongs_to_its_key(client: TestClient, settings: Settings) -> None:
    keys = {name: client.post("/v1/keys", json={"name": name}).json()["key"] for name in ("lab-a", "lab-b")}
    a = {"Authorization": f"Bearer {keys['lab-a']}"}
    b = {"Authorization": f"Bearer {keys['lab-b']}"}
    data = zip_bytes(good())
    resp = client.post("/v1/datasets", files={"file": ("d.zip", data)}, headers=a)
    assert resp.status_code == 201, resp.text
    ds = resp.json()
    assert ds["owner"] == "lab-a"
    assert client.get(f"/v1/datasets/{ds['id']}", headers=a).status_code == 200
    assert [d["id"] for d in client.get("/v1/datasets", headers=a).json()["data"]] == [ds["id"]]
    # another key: the same 404 as a dataset that does not exist, and an empty list
    for method in ("GET", "DELETE"):
        resp = client.request(method, f"/v1/datasets/{ds['id']}", headers=b)
        assert resp.status_code == 404 and resp.json()["detail"] == f"dataset {ds['id']} not found"
    assert client.get("/v1/datasets", headers=b).json() == {"data": [], "count": 0, "limit": 20, "offset": 0}
    # the admin sees every dataset
    assert [d["id"] for d in client.get("/v1/datasets").json()["data"]] == [ds["id"]]
    assert client.get(f"/v1/datasets/{ds['id']}", headers=b).status_code == 404  # still not b's
    assert client.delete(f"/v1/datasets/{ds['id']}", headers=a).status_code == 204


def test_a_dataset_in_use_by_a_training_is_not_deleted(client: TestClient, settings: Settings) -> None:
    ds = upload(client, zip_bytes(good())).json()
    store: DatasetStore = client.app.state.datasets  # type: ignore[attr-defined]
    store.use(ds["id"], "training-1")  # what a training job does first (issue 11, part 2)
    assert store.r.smembers(f"{settings.redis_prefix}:dataset:{ds['id']}:users") == {b"training-1"}
    resp = client.delete(f"/v1/datasets/{ds['id']}")
    assert resp.status_code == 409 and "training-1" in resp.json()["detail"]
    assert client.get(f"/v1/datasets/{ds['id']}").status_code == 200
    assert stored_objects(settings, ds["id"])
    store.release(ds["id"], "training-1")
    assert client.delete(f"/v1/datasets/{ds['id']}").status_code == 204
    assert stored_objects(settings, ds["id"]) == []


def test_datasets_survive_the_loss_of_redis(client: TestClient, settings: Settings) -> None:
    first = upload(client, zip_bytes(good(seed=1)), name="one").json()
    second = upload(client, zip_bytes(good(seed=2)), name="two").json()
    store: DatasetStore = client.app.state.datasets  # type: ignore[attr-defined]
    store.r.delete(*store.r.keys(f"{settings.redis_prefix}:*"))
    assert client.get(f"/v1/datasets/{first['id']}").json() == first  # from storage
    listed = client.get("/v1/datasets").json()
    assert [d["id"] for d in listed["data"]] == [second["id"], first["id"]] and listed["count"] == 2
    assert client.delete(f"/v1/datasets/{first['id']}").status_code == 204
    assert [d["id"] for d in client.get("/v1/datasets").json()["data"]] == [second["id"]]


def test_list_pages_newest_first(client: TestClient) -> None:
    ids = [upload(client, zip_bytes(good(seed=i))).json()["id"] for i in range(3)]
    page = client.get("/v1/datasets", params={"limit": 2}).json()
    assert [d["id"] for d in page["data"]] == ids[::-1][:2] and page["count"] == 3
    page = client.get("/v1/datasets", params={"limit": 2, "offset": 2}).json()
    assert [d["id"] for d in page["data"]] == [ids[0]]
    assert client.get("/v1/datasets", params={"limit": 0}).status_code == 422


@pytest.mark.parametrize("dataset_id", ["nope", "A" * 32, "0" * 32])
def test_an_unknown_dataset_id_is_404(client: TestClient, dataset_id: str) -> None:
    resp = client.get(f"/v1/datasets/{dataset_id}")
    assert resp.status_code == 404 and resp.headers["content-type"] == PROBLEM


def test_a_storage_failure_is_503_and_leaves_nothing(
    make_client: Callable[..., tuple[TestClient, Settings]], tmp_path: Path
) -> None:
    blocker = tmp_path / "blocked"
    blocker.write_text("a file where the storage folder should be")
    client, settings = make_client(storage_dir=blocker / "storage")
    resp = upload(client, zip_bytes(good()))
    assert resp.status_code == 503 and resp.headers["retry-after"]
    store: DatasetStore = client.app.state.datasets  # type: ignore[attr-defined]
    assert store.r.keys(f"{settings.redis_prefix}:*") == []


def test_openapi_documents_the_dataset_routes(client: TestClient) -> None:
    doc = client.get("/openapi.json").json()
    expected = {
        ("post", "/v1/datasets"): {"400", "413", "415", "422", "503"},
        ("get", "/v1/datasets"): {"422", "503"},
        ("get", "/v1/datasets/{dataset_id}"): {"404", "503"},
        ("delete", "/v1/datasets/{dataset_id}"): {"404", "409", "503"},
    }
    for (method, path), statuses in expected.items():
        responses = doc["paths"][path][method]["responses"]
        assert {s for s in responses if s >= "400"} == statuses | {"401", "429"}, (method, path)
    body = doc["paths"]["/v1/datasets"]["post"]["requestBody"]["content"]
    assert list(body) == ["multipart/form-data"]
    form = body["multipart/form-data"]["schema"]
    assert form["required"] == ["file"] and set(form["properties"]) == {"file", "name"}
    assert form["additionalProperties"] is False
    assert "member" in doc["components"]["schemas"]["ProblemError"]["properties"]
