"""Extract a zip into a folder without letting any member land outside it."""

from __future__ import annotations

import shutil
import stat
import zipfile
from pathlib import Path, PurePosixPath

from diffuseexpand.errors import UnsafeArchive


def check_member(name: str, mode: int) -> PurePosixPath:
    """The member's relative path, or ``UnsafeArchive`` for names that escape the folder (absolute,
    a drive, ``..``, backslashes, which are separators on Windows) and for links and devices."""
    path = PurePosixPath(name)
    if (
        not name
        or "\\" in name
        or "\0" in name
        or path.is_absolute()
        or ".." in path.parts
        or (path.parts and ":" in path.parts[0])
    ):
        raise UnsafeArchive(f"unsafe member name in archive: {name!r}")
    kind = stat.S_IFMT(mode)
    if kind not in (0, stat.S_IFREG, stat.S_IFDIR):  # 0: written by a tool that sets no Unix mode
        raise UnsafeArchive(f"archive member {name!r} is not a regular file (mode {oct(mode)})")
    return path


def safe_extract(archive: Path, dest: Path) -> list[Path]:
    """Extract ``archive`` into ``dest`` (created), streaming each member; returns the files written.
    Every member is checked before anything is written, so a refused archive leaves ``dest`` as it was."""
    dest.mkdir(parents=True, exist_ok=True)
    root = dest.resolve()
    written = []
    with zipfile.ZipFile(archive) as zf:
        members = [(info, check_member(info.filename, info.external_attr >> 16)) for info in zf.infolist()]
        for info, rel in members:
            target = root.joinpath(*rel.parts)
            if not target.resolve().is_relative_to(root):  # e.g. through a link already in dest
                raise UnsafeArchive(f"archive member {info.filename!r} would be written outside {dest}")
        for info, rel in members:
            target = root.joinpath(*rel.parts)
            if info.is_dir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(info) as src, target.open("wb") as out:
                shutil.copyfileobj(src, out, 1 << 20)
            written.append(target)
    return written
