"""app.archive: names, skipped files, and the running counts that stop a lying archive."""

from __future__ import annotations

import gzip
import io
from pathlib import Path

import numpy as np
import pytest

from app.archive import Limits, _copy, _Counted, extract, is_skipped, name_problem
from app.dataset_check import DatasetInvalid, common_folder
from tests.utils.archives import tar_gz_bytes, zip_bytes

LIMITS = Limits(max_bytes=1 << 20, max_members=100, max_ratio=250)


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        ("images/a.png", None),
        ("./images/a.png", None),
        ("data/images/a.png", None),
        ("images/a..b.png", None),  # dots inside a name are fine
        ("../a.png", "'..'"),
        ("images/../../a.png", "'..'"),
        ("images\\..\\..\\a.png", "'..'"),
        ("/etc/passwd", "absolute"),
        ("\\\\server\\share\\a.png", "absolute"),
        ("C:/a.png", "absolute"),
        ("c:a.png", "absolute"),
        ("images/a\x00.png", "NUL"),
        ("./", "empty"),
    ],
)
def test_member_names(name: str, problem: str | None) -> None:
    found = name_problem(name)
    assert (found is None) if problem is None else (problem in (found or "")), found


@pytest.mark.parametrize(
    ("name", "skipped"),
    [
        ("__MACOSX/images/._a.png", True),
        ("images/.DS_Store", True),
        (".hidden/a.png", True),
        ("./images/a.png", False),
        ("images/a.png", False),
    ],
)
def test_hidden_and_macos_files_are_skipped(name: str, skipped: bool) -> None:
    assert is_skipped(name) is skipped


@pytest.mark.parametrize("pack", [zip_bytes, tar_gz_bytes])
def test_extract_skips_junk_and_a_zipped_folder_is_unwrapped(tmp_path: Path, pack: object) -> None:
    members = {
        "data/images/a.png": b"1",
        "data/masks/a.png": b"2",
        "__MACOSX/data/images/._a.png": b"junk",
        "data/.DS_Store": b"junk",
    }
    data = pack(members)  # type: ignore[operator]
    written = extract(io.BytesIO(data), len(data), tmp_path, LIMITS)
    assert sorted(written) == ["data/images/a.png", "data/masks/a.png"]
    assert common_folder(written) == "data/"
    assert not (tmp_path / "__MACOSX").exists() and not (tmp_path / "data" / ".DS_Store").exists()
    assert common_folder(["images/a.png", "masks/a.png"]) == ""
    assert common_folder(["data/images/a.png", "pairs.csv"]) == ""


def test_a_member_growing_past_its_header_is_stopped(tmp_path: Path) -> None:
    """The guard behind zipfile's own: a member never writes more than its header declared."""
    with pytest.raises(DatasetInvalid) as info:
        _copy(
            io.BytesIO(b"x" * 200_000),
            tmp_path / "m",
            "images/m.png",
            budget=1 << 20,
            declared=100,
            limits=LIMITS,
        )
    assert info.value.issues[0].kind == "zip_bomb" and (tmp_path / "m").stat().st_size <= 100
    with pytest.raises(DatasetInvalid) as info:
        _copy(
            io.BytesIO(b"x" * 200_000),
            tmp_path / "n",
            "images/n.png",
            budget=1000,
            declared=10**9,
            limits=LIMITS,
        )
    assert info.value.issues[0].kind == "archive_too_large" and (tmp_path / "n").stat().st_size <= 1000


def test_the_decompressed_stream_is_counted_and_cut(tmp_path: Path) -> None:
    """A gzip stream is read through a count that stops at the limit, whatever its trailer says."""
    payload = np.random.default_rng(0).integers(0, 256, 3 << 20, dtype=np.uint8).tobytes()
    raw = io.BytesIO(gzip.compress(payload, compresslevel=1))
    counted = _Counted(gzip.GzipFile(fileobj=raw), raw, 1 << 20, LIMITS)
    read = 0
    with pytest.raises(DatasetInvalid) as info:
        while chunk := counted.read(65536):
            read += len(chunk)
    assert info.value.issues[0].kind == "archive_too_large" and read <= 1 << 20
    zeros = io.BytesIO(gzip.compress(bytes(40 << 20)))
    counted = _Counted(gzip.GzipFile(fileobj=zeros), zeros, 1 << 30, LIMITS)
    with pytest.raises(DatasetInvalid) as info:
        while counted.read(65536):
            pass
    assert info.value.issues[0].kind == "zip_bomb" and counted.count < 40 << 20  # stopped early
