"""Unpacking refuses archives whose members would land outside the destination folder."""

from __future__ import annotations

import stat
import zipfile
from pathlib import Path

import pytest

from diffuseexpand import Client, UnsafeArchive
from diffuseexpand.unpack import safe_extract
from tests.client.scripted import Scripted, raw


def make_zip(path: Path, members: dict[str, bytes], link: str | None = None) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
        if link is not None:
            info = zipfile.ZipInfo(link)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            zf.writestr(info, "/etc/passwd")
    return path


GOOD = {"manifest.csv": b"name\n", "images/a.png": b"png", "masks/a.png": b"png"}


@pytest.mark.parametrize(
    "bad",
    ["../evil.txt", "images/../../evil.txt", "/tmp/evil.txt", "C:/evil.txt", "..\\evil.txt", "a\\b.png"],
)
def test_unsafe_member_names_are_refused_before_anything_is_written(tmp_path: Path, bad: str) -> None:
    archive = make_zip(tmp_path / "x.zip", {**GOOD, bad: b"owned"})
    dest = tmp_path / "out"
    with pytest.raises(UnsafeArchive, match="unsafe member name"):
        safe_extract(archive, dest)
    assert list(dest.rglob("*")) == []
    assert not (tmp_path / "evil.txt").exists()


def test_links_are_refused(tmp_path: Path) -> None:
    archive = make_zip(tmp_path / "x.zip", GOOD, link="images/b.png")
    with pytest.raises(UnsafeArchive, match="not a regular file"):
        safe_extract(archive, tmp_path / "out")


def test_a_link_already_in_the_folder_is_not_followed_out(tmp_path: Path) -> None:
    dest, outside = tmp_path / "out", tmp_path / "elsewhere"
    dest.mkdir()
    outside.mkdir()
    (dest / "images").symlink_to(outside)
    with pytest.raises(UnsafeArchive, match="outside"):
        safe_extract(make_zip(tmp_path / "x.zip", GOOD), dest)
    assert list(outside.iterdir()) == []


def test_safe_archive_extracts(tmp_path: Path) -> None:
    written = safe_extract(make_zip(tmp_path / "x.zip", GOOD), tmp_path / "out")
    assert sorted(p.relative_to(tmp_path / "out").as_posix() for p in written) == sorted(GOOD)
    assert (tmp_path / "out" / "images" / "a.png").read_bytes() == b"png"


def test_download_with_unpack_refuses_an_unsafe_zip_from_the_server(
    tmp_path: Path, scripted: Scripted
) -> None:
    job_id = "b" * 32
    body = make_zip(tmp_path / "x.zip", {**GOOD, "../../evil.txt": b"owned"}).read_bytes()
    scripted.on("GET", f"/v1/jobs/{job_id}/pairs.zip", raw(200, body, "application/zip"))
    dest = tmp_path / "out"
    with Client(scripted.url, api_key="k") as client, pytest.raises(UnsafeArchive):
        client.download(job_id, dest, unpack=True)
    assert list(dest.iterdir()) == []  # nothing extracted, the downloaded zip removed
    assert not (tmp_path / "evil.txt").exists()
