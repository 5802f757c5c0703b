"""Archives for upload tests, good and bad: built in memory from ``{member name: bytes}``."""

from __future__ import annotations

import gzip
import io
import stat
import struct
import tarfile
import zipfile
import zlib
from pathlib import Path

import numpy as np
from PIL import Image


def png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def shapes_members(n: int = 8, size: int = 32, seed: int = 0, prefix: str = "") -> dict[str, bytes]:
    """``n`` pairs of a bright ellipse (mask 0/255) on noise, as PNG members."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    out = {}
    for i in range(n):
        cx, cy = rng.uniform(size * 0.3, size * 0.7, 2)
        rx, ry = rng.uniform(size * 0.15, size * 0.3, 2)
        mask = ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 < 1
        img = (rng.normal(70, 12, (size, size)) + mask * 110).clip(0, 255).astype(np.uint8)
        out[f"{prefix}images/s{i:02d}.png"] = png(img)
        out[f"{prefix}masks/s{i:02d}.png"] = png((mask * 255).astype(np.uint8))
    return out


def folder_members(root: Path, prefix: str = "") -> dict[str, bytes]:
    return {
        prefix + p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def zip_bytes(members: dict[str, bytes], *, compression: int = zipfile.ZIP_DEFLATED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=compression) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def zip_with(
    members: dict[str, bytes], special: dict[str, tuple[int, bytes]], *, flag_bits: int = 0
) -> bytes:
    """A zip whose ``special`` members carry a file type in their Unix mode (``stat.S_IFLNK`` ...);
    ``flag_bits`` is set on them too (1 = encrypted)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
        for name, (kind, data) in special.items():
            info = zipfile.ZipInfo(name)
            info.external_attr = (kind | 0o777) << 16
            zf.writestr(info, data)
    raw = buf.getvalue()
    if flag_bits:
        raw = _patch_central(raw, list(special), flag_bits=flag_bits)
    return raw


def _patch_central(raw: bytes, names: list[str], **fields: int) -> bytes:
    """Rewrite fields of the central directory entries of ``names``: ``flag_bits``,
    ``compress_size`` or ``file_size`` (what ``zipfile`` reads first, before any data)."""
    out = bytearray(raw)
    pos = 0
    while (pos := out.find(b"PK\x01\x02", pos)) >= 0:
        name_len = struct.unpack_from("<H", out, pos + 28)[0]
        name = bytes(out[pos + 46 : pos + 46 + name_len]).decode()
        if name in names:
            if "flag_bits" in fields:
                struct.pack_into("<H", out, pos + 8, fields["flag_bits"])
            if "compress_size" in fields:
                struct.pack_into("<I", out, pos + 20, fields["compress_size"])
            if "file_size" in fields:
                struct.pack_into("<I", out, pos + 24, fields["file_size"])
        pos += 46
    return bytes(out)


def zip_patched(members: dict[str, bytes], names: list[str], **fields: int) -> bytes:
    return _patch_central(zip_bytes(members), names, **fields)


def tar_gz_bytes(
    members: dict[str, bytes], *, links: dict[str, tuple[bytes, str]] | None = None, gz: bool = True
) -> bytes:
    """A tar.gz of ``members``; ``links`` adds ``{name: (tarfile type, link target)}`` entries
    (SYMTYPE, LNKTYPE, CHRTYPE ...)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz" if gz else "w") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            tf.addfile(info, io.BytesIO(data))
        for name, (kind, target) in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type = kind
            info.linkname = target
            tf.addfile(info)
    return buf.getvalue()


def with_isize(data: bytes, isize: int) -> bytes:
    """A gzip stream whose trailer lies about the uncompressed size."""
    return data[:-4] + struct.pack("<I", isize)


def bomb_zip(nbytes: int = 17 << 20) -> bytes:
    """One member of ``nbytes`` zeros: deflate packs it about 1000:1."""
    return zip_bytes({"images/bomb.png": bytes(nbytes)})


def bomb_tar_gz(nbytes: int = 17 << 20) -> bytes:
    """A tar.gz of ``nbytes`` zeros whose gzip trailer says 4 KB: only the running count sees it."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        info = tarfile.TarInfo("images/bomb.png")
        info.size = nbytes
        tf.addfile(info, io.BytesIO(bytes(nbytes)))
    return with_isize(gzip.compress(buf.getvalue(), compresslevel=9), 4096)


def png_claiming(width: int, height: int) -> bytes:
    """A 1x1 PNG whose header (IHDR) claims ``width`` x ``height``: decoding it would allocate the
    claimed size, so only a check on the header refuses it in time."""
    raw = bytearray(png(np.zeros((1, 1), np.uint8)))
    # signature (8) + length (4) + b"IHDR" (4), then width, height; the chunk's CRC follows 13 bytes of data
    struct.pack_into(">II", raw, 16, width, height)
    crc = zlib.crc32(bytes(raw[12:29]))
    struct.pack_into(">I", raw, 29, crc)
    return bytes(raw)


def unix_type(kind: str) -> int:
    return {"symlink": stat.S_IFLNK, "fifo": stat.S_IFIFO, "chardev": stat.S_IFCHR}[kind]
