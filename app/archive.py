"""Unpacking an uploaded zip or tar.gz without trusting it.

Before a byte is extracted, what the archive declares is checked: the member count, every name
(no ``..``, no absolute path), every type (regular files and folders only: no links, devices or
FIFOs), the total uncompressed size and the compression ratio. A zip declares all of this in its
central directory, which is read first; a tar.gz declares it member by member, so each tar header
is checked before that member's data is read, and the gzip trailer's size (ISIZE) is checked first.

Headers can lie, so extraction is a stream with a running count: a member that grows past its
declared size, or a total past ``max_bytes``, stops the extraction there. The compression ratio
(uncompressed / compressed) catches a zip bomb early: deflate tops out near 1032:1 while images and
scans compress 1.5-10:1 and sparse masks a few hundred to one, so past ``max_ratio`` (with more than
RATIO_FLOOR bytes at stake; a small archive harms nobody at any ratio) the upload is refused. Zip
members whose compressed extents add up to more than the archive overlap: the trick of the
non-recursive zip bombs, refused as such.

Files whose path has a part starting with ``.`` or named ``__MACOSX`` (what archivers add on macOS)
are skipped, as are folders; a leading ``./`` is dropped.
"""

from __future__ import annotations

import errno
import gzip
import re
import stat
import tarfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from app.dataset_check import DatasetInvalid, Issue, fail

CHUNK = 1 << 16
RATIO_FLOOR = 16 << 20
TAR_BLOCK = 512
GZIP_MAGIC = b"\x1f\x8b"
_DRIVE = re.compile(r"^[A-Za-z]:")
# Errors of a member's own making while it is written out (a name too long, a file where the path
# needs a folder); any other OSError is the server's (disk full) and propagates.
_NAME_ERRNOS = {errno.ENAMETOOLONG, errno.EISDIR, errno.ENOTDIR, errno.EEXIST, errno.EINVAL}


@dataclass(frozen=True)
class Limits:
    max_bytes: int  # uncompressed size of all members together
    max_members: int  # entries of any kind, folders included
    max_ratio: float


def normalise(name: str) -> str:
    """The member's path with ``/`` separators and no ``.`` or empty parts."""
    return "/".join(p for p in name.replace("\\", "/").split("/") if p not in ("", "."))


def name_problem(name: str) -> str | None:
    """Why a member name is refused, or None."""
    if "\x00" in name:
        return "a NUL byte in the name"
    unified = name.replace("\\", "/")
    if unified.startswith("/") or _DRIVE.match(unified):
        return "an absolute path"
    if ".." in unified.split("/"):
        return "a '..' path part, which would write outside the dataset"
    if not normalise(name):
        return "an empty name"
    return None


def is_skipped(name: str) -> bool:
    """Hidden files and macOS metadata (``.DS_Store``, ``._x.png``, ``__MACOSX/``)."""
    return any(p.startswith(".") or p == "__MACOSX" for p in normalise(name).split("/"))


def extract(fileobj: IO[bytes], size: int, dest: Path, limits: Limits) -> list[str]:
    """Unpack the zip or tar.gz ``fileobj`` (``size`` bytes, seekable) into ``dest``; returns the
    normalised paths of the regular files written. Raises ``DatasetInvalid``."""
    fileobj.seek(0)
    head = fileobj.read(4)
    fileobj.seek(0)
    if head[:2] == GZIP_MAGIC:
        return _extract_tar_gz(fileobj, size, dest, limits)
    try:
        is_zip = zipfile.is_zipfile(fileobj)
    finally:
        fileobj.seek(0)
    if is_zip:
        return _extract_zip(fileobj, size, dest, limits)
    if size == 0:
        raise fail("not_archive", "the file is empty; send a .zip or .tar.gz")
    kind = "a plain tar (gzip it)" if _is_plain_tar(fileobj) else f"starts with {head!r}"
    raise fail("not_archive", f"not a zip or tar.gz archive ({kind})")


def _is_plain_tar(fileobj: IO[bytes]) -> bool:
    fileobj.seek(257)
    magic = fileobj.read(5)
    fileobj.seek(0)
    return magic == b"ustar"


def _ratio_issue(what: str, uncompressed: int, compressed: int, limits: Limits) -> Issue | None:
    if uncompressed > RATIO_FLOOR and uncompressed > limits.max_ratio * max(compressed, 1):
        ratio = uncompressed / max(compressed, 1)
        return Issue(
            "zip_bomb",
            what if what != "archive" else None,
            f"compression ratio {ratio:.0f}:1 over DIFFEXP_MAX_COMPRESSION_RATIO ({limits.max_ratio:g}:1) "
            f"({uncompressed} bytes from {compressed})",
        )
    return None


def _too_large(total: int, limits: Limits, declared: bool) -> DatasetInvalid:
    how = "declares" if declared else "unpacks to more than"
    return fail(
        "archive_too_large",
        f"the archive {how} {total} bytes uncompressed, over DIFFEXP_MAX_DATASET_MB ({limits.max_bytes} bytes)",
    )


def _too_many(count: int, limits: Limits) -> DatasetInvalid:
    return fail(
        "too_many_members",
        f"the archive holds {count}+ members, over DIFFEXP_MAX_DATASET_MEMBERS ({limits.max_members})",
    )


def _target(dest: Path, name: str) -> Path:
    target = dest / name
    # belt and braces: names were checked, and nothing extracted is ever a link
    if not target.resolve().is_relative_to(dest.resolve()):
        raise fail("unsafe_name", "a path outside the dataset", name)
    target.parent.mkdir(parents=True, exist_ok=True)
    return target


def _copy(src: IO[bytes], target: Path, member: str, *, budget: int, declared: int, limits: Limits) -> int:
    """Stream ``src`` into ``target``; stop past ``declared`` bytes (a lying header) or ``budget``
    (what is left of max_bytes). Returns the bytes written."""
    written = 0
    with target.open("wb") as out:
        while chunk := src.read(CHUNK):
            written += len(chunk)
            if written > declared:
                raise fail(
                    "zip_bomb",
                    f"member unpacks to more than the {declared} bytes its header declares",
                    member,
                )
            if written > budget:
                raise _too_large(limits.max_bytes - budget + written, limits, declared=False)
            out.write(chunk)
    return written


def _write(src: IO[bytes], dest: Path, name: str, **kwargs: Any) -> int:
    try:
        return _copy(src, _target(dest, name), name, **kwargs)
    except OSError as exc:
        if exc.errno in _NAME_ERRNOS:
            raise fail("unexpected_member", f"cannot be written as a file ({exc.strerror})", name) from None
        raise


# ---- zip


def _extract_zip(fileobj: IO[bytes], size: int, dest: Path, limits: Limits) -> list[str]:
    try:
        zf = zipfile.ZipFile(fileobj)
        infos = zf.infolist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
        raise fail("not_archive", f"a broken zip archive ({exc})") from None
    if len(infos) > limits.max_members:
        raise _too_many(len(infos), limits)
    declared = sum(i.file_size for i in infos)
    if declared > limits.max_bytes:
        raise _too_large(declared, limits, declared=True)
    issues: list[Issue] = []
    if sum(i.compress_size for i in infos) > size:
        issues.append(
            Issue("zip_bomb", None, "members overlap: their compressed sizes add up to more than the archive")
        )
    total_ratio = _ratio_issue("archive", declared, size, limits)
    if total_ratio is not None:
        issues.append(total_ratio)
    seen: set[str] = set()
    for info in infos:
        name = info.filename
        problem = name_problem(name)
        if problem is not None:
            issues.append(Issue("unsafe_name", name, f"refused: {problem}"))
            continue
        kind = stat.S_IFMT(info.external_attr >> 16)
        if kind and kind not in (stat.S_IFREG, stat.S_IFDIR):
            what = (
                "a symbolic link" if kind == stat.S_IFLNK else "not a regular file (a device, FIFO or socket)"
            )
            issues.append(Issue("link", name, f"refused: {what}"))
            continue
        if info.is_dir():
            continue
        if info.flag_bits & 0x1:
            issues.append(Issue("unreadable_archive", name, "encrypted; send the archive without a password"))
            continue
        ratio = _ratio_issue(name, info.file_size, info.compress_size, limits)
        if ratio is not None:
            issues.append(ratio)
        norm = normalise(name)
        if norm in seen:
            issues.append(Issue("duplicate_name", name, "the archive holds this name twice"))
        seen.add(norm)
    if issues:
        raise DatasetInvalid(issues, total=len(issues))
    written: list[str] = []
    budget = limits.max_bytes
    for info in infos:
        if info.is_dir() or is_skipped(info.filename):
            continue
        name = normalise(info.filename)
        try:
            with zf.open(info) as src:
                budget -= _write(src, dest, name, budget=budget, declared=info.file_size, limits=limits)
        except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, RuntimeError) as exc:
            raise fail("unreadable_archive", f"cannot be unpacked ({exc})", info.filename) from None
        written.append(name)
    return written


# ---- tar.gz


class _Counted:
    """The decompressed tar stream, counted as it is read: stops past ``limit`` bytes, or when the
    bytes so far over the compressed bytes consumed pass the ratio limit."""

    def __init__(self, gz: gzip.GzipFile, raw: IO[bytes], limit: int, limits: Limits) -> None:
        self.gz, self.raw, self.limit, self.limits = gz, raw, limit, limits
        self.count = 0

    def read(self, n: int = -1) -> bytes:
        data = self.gz.read(n if n >= 0 else CHUNK)
        self.count += len(data)
        if self.count > self.limit:
            raise _too_large(self.count, self.limits, declared=False)
        ratio = _ratio_issue("archive", self.count, self.raw.tell(), self.limits)
        if ratio is not None:
            raise DatasetInvalid([ratio])
        return data


def _extract_tar_gz(fileobj: IO[bytes], size: int, dest: Path, limits: Limits) -> list[str]:
    # Tar headers and padding: at most 3 blocks per member (header, long-name header, padding), plus the end.
    stream_limit = limits.max_bytes + 3 * TAR_BLOCK * limits.max_members + 20 * TAR_BLOCK
    if size >= 18:
        fileobj.seek(size - 4)
        isize = int.from_bytes(fileobj.read(4), "little")  # uncompressed size mod 2^32: can only lie low
        fileobj.seek(0)
        if isize > stream_limit:
            raise _too_large(isize, limits, declared=True)
        ratio = _ratio_issue("archive", isize, size, limits)
        if ratio is not None:
            raise DatasetInvalid([ratio])
    counted = _Counted(gzip.GzipFile(fileobj=fileobj, mode="rb"), fileobj, stream_limit, limits)
    issues: list[Issue] = []
    written: list[str] = []
    seen: set[str] = set()
    members = declared = used = 0
    try:
        with tarfile.open(fileobj=counted, mode="r|") as tf:  # type: ignore[call-overload]
            for member in tf:  # one header at a time, checked before its data is read
                members += 1
                if members > limits.max_members:
                    raise _too_many(members, limits)
                declared += member.size
                if declared > limits.max_bytes:
                    raise _too_large(declared, limits, declared=True)
                problem = name_problem(member.name)
                if problem is not None:
                    issues.append(Issue("unsafe_name", member.name, f"refused: {problem}"))
                    continue
                if member.issym() or member.islnk():
                    issues.append(Issue("link", member.name, f"refused: a link (to {member.linkname!r})"))
                    continue
                if member.isdir():
                    continue
                if not member.isreg() or member.issparse():
                    issues.append(
                        Issue(
                            "link", member.name, "refused: not a regular file (a device, FIFO or sparse file)"
                        )
                    )
                    continue
                name = normalise(member.name)
                if name in seen:
                    issues.append(Issue("duplicate_name", member.name, "the archive holds this name twice"))
                    continue
                seen.add(name)
                if issues or is_skipped(member.name):
                    continue  # already refused: read on only to name every bad member
                src = tf.extractfile(member)
                if src is None:
                    continue
                with src:
                    used += _write(
                        src, dest, name, budget=limits.max_bytes - used, declared=member.size, limits=limits
                    )
                written.append(name)
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile, OSError) as exc:
        if isinstance(exc, OSError) and exc.errno not in (None, *_NAME_ERRNOS):
            raise
        if members == 0:
            raise fail("not_archive", f"not a tar.gz archive ({exc})") from None
        issues.append(Issue("unreadable_archive", None, f"the archive is broken or truncated ({exc})"))
    if issues:
        raise DatasetInvalid(issues, total=len(issues))
    return written
