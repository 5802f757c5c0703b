"""One 2D image or mask file read into a grey array, without torch: the formats, the header checks
that come before any pixel is decoded, the DICOM window, and the rule that says what a mask is.

The API's dataset check (``app.dataset_check``) reads every format here: the API image has no torch,
so no MONAI. ``models.data`` reads PNG, JPEG, TIFF and BMP here too (MONAI's ``PILReader`` is PIL as
well) but DICOM and NIfTI through MONAI's ``LoadImage`` readers, whose arrays it hands to
``grey_from_array``: the same rescale, window and axes, so the two agree on every pixel
(tests/models/test_pixels.py checks it).

Formats: PNG, JPEG, TIFF (8/16-bit, one frame), BMP through PIL; DICOM (``.dcm``) through pydicom,
``RescaleSlope``/``RescaleIntercept`` applied (as MONAI's ``PydicomReader`` does, in float32) and, for
images only, the first ``WindowCenter``/``WindowWidth`` as the grey range (the linear VOI window of
PS3.3 C.11.2.1.2.1), inverted for ``MONOCHROME1``; NIfTI (``.nii``, ``.nii.gz``) through nibabel,
``scl_slope``/``scl_inter`` applied. DICOM and NIfTI must be one frame of one channel: a 2D image.

Axes: arrays are ``[rows, columns]``, as a viewer shows a PNG. DICOM stores pixels so; a NIfTI's
first axis is x (the columns), so its array is transposed — MONAI's readers give every format as
``(x, y)``, which ``models.data`` transposes the same way.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

# suffix (lower case) -> reader
FORMATS = {
    ".png": "pil",
    ".jpg": "pil",
    ".jpeg": "pil",
    ".tif": "pil",
    ".tiff": "pil",
    ".bmp": "pil",
    ".dcm": "dicom",
    ".nii": "nifti",
    ".nii.gz": "nifti",
}
# A mask is a label map: whole numbers >= 0, at most this many distinct values, one channel. 0 is
# background, every other value foreground (the method segments one class: labels are merged).
# 16 holds every 2D label set in common use (multi-organ CT has 14); a photo, or a mask that was
# anti-aliased or saved as JPEG, has dozens to hundreds of grey levels and is refused.
MAX_MASK_LABELS = 16


class PixelsError(ValueError):
    """A file that cannot be used; ``kind`` is ``unreadable``, ``too_many_pixels`` or ``not_2d``."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def split_suffix(filename: str) -> tuple[str, str] | None:
    """``(stem, suffix)`` of a file name in a supported format (``a.nii.gz`` -> ``("a", ".nii.gz")``)."""
    lower = filename.lower()
    for suffix in sorted(FORMATS, key=len, reverse=True):
        if lower.endswith(suffix) and len(filename) > len(suffix):
            return filename[: -len(suffix)], suffix
    return None


def format_of(path: str | Path) -> str:
    parts = split_suffix(Path(path).name)
    if parts is None:
        raise PixelsError("unreadable", f"unsupported format (supported: {', '.join(FORMATS)})")
    return FORMATS[parts[1]]


@dataclass(frozen=True)
class Grey:
    """A file's pixels as float64 ``[rows, columns]``, with the values that stand for black and white.

    ``lo``/``hi`` map to 0/1 (``lo > hi`` for an inverted DICOM): 0..255 for 8-bit files, the
    DICOM window when there is one, else the file's minimum and maximum (16-bit and deeper ranges
    vary by scanner). ``full`` is a grey-level mask's full-scale value (255 for 8-bit, else the
    maximum). ``colour``: the file had colour channels that differ (a mask must not).
    """

    values: np.ndarray
    lo: float
    hi: float
    full: float
    colour: bool = False

    @property
    def size(self) -> tuple[int, int]:
        """``(width, height)``."""
        return int(self.values.shape[1]), int(self.values.shape[0])


def to_unit(grey: Grey) -> np.ndarray:
    """The image in [0, 1]: ``lo`` -> 0, ``hi`` -> 1, clipped outside (a DICOM window)."""
    span = grey.hi - grey.lo
    if span == 0:
        return np.zeros_like(grey.values)
    return np.clip((grey.values - grey.lo) / span, 0.0, 1.0)


def grey_from_array(
    values: np.ndarray, *, window: tuple[float, float] | None = None, invert: bool = False
) -> Grey:
    """A DICOM's or NIfTI's 2D array (already rescaled) as ``Grey``: the window, else min-max."""
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        raise PixelsError("unreadable", "empty image")
    vmin, vmax = float(v.min()), float(v.max())
    lo, hi = vmin, vmax
    if window is not None and window[1] > 1:
        center, width = window
        lo, hi = center - 0.5 - (width - 1) / 2, center - 0.5 + (width - 1) / 2
    if invert:
        lo, hi = hi, lo
    return Grey(v, lo, hi, vmax if vmax > 0 else 1.0)


# ---- masks


def label_problem(values: np.ndarray) -> str | None:
    """Why ``values`` is not a label map (see MAX_MASK_LABELS), or None."""
    if float(values.min()) < 0:
        return f"has negative values ({float(values.min()):g}); labels are whole numbers from 0"
    if not np.array_equal(values, np.floor(values)):
        return "has values that are not whole numbers; labels are whole numbers from 0"
    levels = np.unique(values)
    if levels.size > MAX_MASK_LABELS:
        return (
            f"has {levels.size} grey levels; a label map has at most {MAX_MASK_LABELS} (0 = background, "
            "other values foreground): a photo, an anti-aliased or a JPEG mask is not one"
        )
    return None


def mask_problem(grey: Grey) -> str | None:
    """Why a mask is refused by the API (not a label map, or no foreground), or None."""
    if grey.colour:
        return "has colour (its channels differ); a mask is one channel of labels (grey levels, or a palette PNG)"
    problem = label_problem(grey.values)
    if problem is not None:
        return problem
    if not (grey.values > 0).any():
        return "has no foreground (every value is 0)"
    return None


def foreground(grey: Grey) -> np.ndarray:
    """A mask's foreground: values > 0 for a label map; for any other mask (the CLI still takes
    grey-level masks) values from half the full scale up (0/1 masks: from 0.5)."""
    if label_problem(grey.values) is None:
        return np.asarray(grey.values > 0)
    full = 1.0 if float(grey.values.max()) <= 1.0 else grey.full
    return np.asarray(grey.values >= full / 2.0)


# ---- readers


def read_grey(path: str | Path, *, max_pixels: int | None = None, as_image: bool = True) -> Grey:
    """Read one file; ``max_pixels`` is checked on the header, before any pixel is decoded.

    ``as_image`` applies what is for display only (the DICOM window, MONOCHROME1); a mask is read
    without it. Raises ``PixelsError``.
    """
    path = Path(path)
    kind = format_of(path)
    if kind == "pil":
        return _read_pil(path, max_pixels, as_image)
    if kind == "dicom":
        return _read_dicom(path, max_pixels, as_image)
    return _read_nifti(path, max_pixels)


def _check_pixels(width: int, height: int, max_pixels: int | None) -> None:
    if width <= 0 or height <= 0:
        raise PixelsError("unreadable", f"header gives an empty size {width}x{height}")
    if max_pixels is not None and width * height > max_pixels:
        raise PixelsError(
            "too_many_pixels",
            f"{width}x{height} = {width * height} pixels, over DIFFEXP_MAX_IMAGE_PIXELS ({max_pixels})",
        )


def _channels_differ(rgb: Image.Image) -> bool:
    a = np.asarray(rgb)
    return bool((a[..., 0] != a[..., 1]).any() or (a[..., 1] != a[..., 2]).any())


def _open_pil(path: Path, max_pixels: int | None) -> Image.Image:
    """The image with its header read (no pixels yet), or PixelsError."""
    try:
        return Image.open(path)  # reads the header only
    except Image.DecompressionBombError as exc:  # PIL's own limit, far above ours
        raise PixelsError("too_many_pixels", f"{exc} (DIFFEXP_MAX_IMAGE_PIXELS: {max_pixels})") from None
    except Exception as exc:  # a broken file can raise nearly anything from a decoder
        raise PixelsError("unreadable", f"unreadable image file ({exc})") from None


def _read_pil(path: Path, max_pixels: int | None, as_image: bool = True) -> Grey:
    img = _open_pil(path, max_pixels)
    with img:
        width, height = img.size
        _check_pixels(width, height, max_pixels)
        frames = int(getattr(img, "n_frames", 1))
        if frames > 1:
            raise PixelsError("not_2d", f"has {frames} frames; one 2D image per file")
        try:
            img.load()
            if not as_image and img.mode == "P":
                # a palette mask's pixels are its labels, whatever colours the palette shows them in
                return _palette_labels(img)
            return _pil_grey(img)
        except PixelsError:
            raise
        except Exception as exc:
            raise PixelsError("unreadable", f"unreadable or truncated image file ({exc})") from None


def _palette_labels(img: Image.Image) -> Grey:
    values = np.asarray(img).astype(np.float64)
    if values.size == 0:
        raise PixelsError("unreadable", "empty image")
    top = float(values.max())
    return Grey(values, 0.0, top, top if top > 0 else 1.0)


def _pil_grey(img: Image.Image) -> Grey:
    """Greyscale: RGB through luminance, alpha composited on black; 8-bit is 0..255, deeper min-max."""
    colour = False
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        composite = Image.alpha_composite(black, rgba)
        colour = _channels_differ(composite.convert("RGB"))
        img = composite.convert("L")
    elif img.mode in ("RGB", "CMYK", "YCbCr", "P", "1"):
        if img.mode != "1":
            colour = _channels_differ(img.convert("RGB"))
        img = img.convert("L")
    arr = np.asarray(img)
    if arr.ndim == 3:  # multi-channel 16-bit arrays that PIL keeps as they are
        colour = bool((arr[..., 0] != arr[..., 1]).any() or (arr[..., 1] != arr[..., 2]).any())
        arr = arr[..., :3].astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    values = arr.astype(np.float64)
    if values.size == 0:
        raise PixelsError("unreadable", "empty image")
    if img.mode == "L":
        return Grey(values, 0.0, 255.0, 255.0, colour)
    vmin, vmax = float(values.min()), float(values.max())
    return Grey(values, vmin, vmax, vmax if vmax > 0 else 1.0, colour)


def _first(value: Any) -> Any:
    if value is None or isinstance(value, str | bytes | int | float):
        return value
    try:
        return value[0]  # a multi-valued tag (pydicom's MultiValue, MONAI's JSON list)
    except (TypeError, IndexError, KeyError):
        return None


def dicom_window(center: Any, width: Any) -> tuple[float, float] | None:
    """The first WindowCenter/WindowWidth pair (the tags may hold several), or None."""
    try:
        return float(_first(center)), float(_first(width))
    except (TypeError, ValueError):
        return None


def _read_dicom(path: Path, max_pixels: int | None, as_image: bool) -> Grey:
    import pydicom

    try:
        head = pydicom.dcmread(path, stop_before_pixels=True)
        width, height = int(head.Columns), int(head.Rows)
        frames = int(head.get("NumberOfFrames") or 1)
        samples = int(head.get("SamplesPerPixel") or 1)
    except Exception as exc:
        raise PixelsError("unreadable", f"unreadable DICOM file ({exc})") from None
    _check_pixels(width, height, max_pixels)
    if frames != 1 or samples != 1:
        raise PixelsError(
            "not_2d", f"has {frames} frame(s) of {samples} channel(s); one 2D grey frame per file"
        )
    try:
        ds = pydicom.dcmread(path)
        raw = np.asarray(ds.pixel_array)
    except Exception as exc:
        raise PixelsError("unreadable", f"unreadable or truncated DICOM pixel data ({exc})") from None
    if raw.shape != (height, width):
        raise PixelsError("unreadable", f"pixel data of shape {raw.shape}, not {height}x{width}")
    values = raw.astype(np.float32)
    slope, intercept = ds.get("RescaleSlope"), ds.get("RescaleIntercept")
    if slope is not None or intercept is not None:  # in float32, as MONAI's PydicomReader
        values = values * float(slope if slope is not None else 1.0) + float(intercept or 0.0)
    if not as_image:
        return grey_from_array(values)
    return grey_from_array(
        values,
        window=dicom_window(ds.get("WindowCenter"), ds.get("WindowWidth")),
        invert=str(ds.get("PhotometricInterpretation", "")).strip() == "MONOCHROME1",
    )


def squeeze_2d(arr: np.ndarray) -> np.ndarray:
    """A ``(x, y, 1, ...)`` array as ``(x, y)``; PixelsError for a volume or several channels."""
    if arr.ndim < 2 or any(d != 1 for d in arr.shape[2:]):
        raise PixelsError("not_2d", f"has shape {tuple(arr.shape)}; one 2D slice per file")
    return arr.reshape(arr.shape[:2])


def _read_nifti(path: Path, max_pixels: int | None) -> Grey:
    import nibabel as nib

    try:
        img: Any = nib.load(str(path))  # the header; the data stays on disk until asked for
        shape = tuple(int(d) for d in img.header.get_data_shape())
    except Exception as exc:
        raise PixelsError("unreadable", f"unreadable NIfTI file ({exc})") from None
    if len(shape) < 2 or any(d != 1 for d in shape[2:]):
        raise PixelsError("not_2d", f"has shape {shape}; one 2D slice per file")
    _check_pixels(shape[0], shape[1], max_pixels)
    try:
        data = np.asanyarray(img.dataobj)
    except Exception as exc:
        raise PixelsError("unreadable", f"unreadable or truncated NIfTI data ({exc})") from None
    if not (np.issubdtype(data.dtype, np.integer) or np.issubdtype(data.dtype, np.floating)):
        raise PixelsError("unreadable", f"NIfTI data of type {data.dtype}; one grey value per pixel")
    return grey_from_array(squeeze_2d(data).T.astype(np.float32))


# ---- the API's check of an uploaded file, in bounded memory
#
# ``read_grey`` holds a file's pixels as float64 (8 bytes a pixel, and more in the copies on the way):
# fine for the CLI and the training, not for an API that takes files from strangers. ``check_file``
# gives the same verdict (size, readability, the mask rule) holding at most about ``max_bytes`` for
# one file: the file itself, a compressed container's inflated stream and the decoded pixel array are
# each checked against it *before* they are read, and a mask is judged strip by strip.

# A deflated DICOM's dataset and a gzipped NIfTI are inflated in chunks of this many bytes.
INFLATE_CHUNK = 1 << 20
# A mask is judged in strips of rows of about this many pixels (float64: 8 MB a strip).
STRIP_PIXELS = 1 << 20
# Distinct values a mask scan keeps track of; a mask with more is a photo (see MAX_MASK_LABELS).
MAX_TRACKED_LEVELS = 1024
DEFLATED_DICOM = "1.2.840.10008.1.2.1.99"
# A deflated DICOM's elements before its pixel data must lie in its first 8 MB once inflated (Rows,
# Columns, BitsAllocated are read there: they bound the rest), and those after it in 1 MB.
DICOM_HEADER_BYTES = 8 << 20
DICOM_TRAILER_BYTES = 1 << 20
# bytes a pixel takes in PIL's memory once decoded (every multi-band mode is stored 4 bytes a pixel)
_PIL_PIXEL_BYTES = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16L": 2, "I;16B": 2, "I;16N": 2}


@dataclass(frozen=True)
class FileCheck:
    """What the API needs of one file: its ``(width, height)`` and, for a mask, why it is no usable
    mask (``mask_problem``'s words) or None."""

    width: int
    height: int
    mask_problem: str | None = None


def _over_budget(what: str, nbytes: int, max_bytes: int) -> PixelsError:
    return PixelsError(
        "decode_too_large",
        f"{what} {nbytes} bytes, over DIFFEXP_DECODE_MEMORY_MB ({max_bytes >> 20} MB): "
        "the memory one file may take while it is checked",
    )


def check_file(path: str | Path, *, max_pixels: int, max_bytes: int, as_mask: bool) -> FileCheck:
    """Check one uploaded file as ``read_grey`` + ``mask_problem`` would judge it, holding at most
    about ``max_bytes``: a file larger than that, a DICOM or NIfTI whose stream inflates past it, or
    pixels (rows x columns x frames x samples x bytes, from the header) that would take more, are
    refused before they are read. Raises ``PixelsError``."""
    path = Path(path)
    kind = format_of(path)
    size = path.stat().st_size
    if size > max_bytes:
        raise _over_budget("the file is", size, max_bytes)
    if kind == "pil":
        return _check_pil(path, max_pixels, max_bytes, as_mask)
    if kind == "dicom":
        return _check_dicom(path, max_pixels, max_bytes, as_mask)
    return _check_nifti(path, max_pixels, max_bytes, as_mask)


class _MaskScan:
    """The mask rule (``mask_problem``) over a mask read in strips."""

    def __init__(self) -> None:
        self.colour = False
        self.minimum = float("inf")
        self.fractions = False
        self.levels: set[float] = set()
        self.foreground = False

    def add(self, grey: Grey) -> None:
        v = grey.values
        self.colour = self.colour or grey.colour
        self.minimum = min(self.minimum, float(v.min()))
        self.fractions = self.fractions or not np.array_equal(v, np.floor(v))
        if len(self.levels) <= MAX_TRACKED_LEVELS:
            self.levels.update(np.unique(v).tolist())
        self.foreground = self.foreground or bool((v > 0).any())

    def problem(self) -> str | None:
        if self.colour:
            return "has colour (its channels differ); a mask is one channel of labels (grey levels, or a palette PNG)"
        if self.minimum < 0:
            return f"has negative values ({self.minimum:g}); labels are whole numbers from 0"
        if self.fractions:
            return "has values that are not whole numbers; labels are whole numbers from 0"
        if len(self.levels) > MAX_MASK_LABELS:
            count = (
                str(len(self.levels))
                if len(self.levels) <= MAX_TRACKED_LEVELS
                else f"over {MAX_TRACKED_LEVELS}"
            )
            return (
                f"has {count} grey levels; a label map has at most {MAX_MASK_LABELS} (0 = background, "
                "other values foreground): a photo, an anti-aliased or a JPEG mask is not one"
            )
        if not self.foreground:
            return "has no foreground (every value is 0)"
        return None


def _row_strips(height: int, width: int) -> list[tuple[int, int]]:
    rows = max(1, STRIP_PIXELS // max(width, 1))
    return [(y, min(height, y + rows)) for y in range(0, height, rows)]


def _check_pil(path: Path, max_pixels: int, max_bytes: int, as_mask: bool) -> FileCheck:
    img = _open_pil(path, max_pixels)
    with img:
        width, height = img.size
        _check_pixels(width, height, max_pixels)
        decoded = width * height * _PIL_PIXEL_BYTES.get(img.mode, 4)
        if decoded > max_bytes:
            raise _over_budget(f"{width}x{height} pixels in mode {img.mode} decode to", decoded, max_bytes)
        # a second frame, looked for without counting them all (a TIFF can chain a million IFDs)
        try:
            img.seek(1)
        except EOFError:
            pass
        except Exception as exc:
            raise PixelsError("unreadable", f"unreadable image file ({exc})") from None
        else:
            raise PixelsError("not_2d", "has more than one frame; one 2D image per file")
        try:
            img.load()
            if not as_mask:
                return FileCheck(width, height)
            scan = _MaskScan()
            for y0, y1 in _row_strips(height, width):
                strip = img.crop((0, y0, width, y1))
                scan.add(_palette_labels(strip) if img.mode == "P" else _pil_grey(strip))
            return FileCheck(width, height, scan.problem())
        except PixelsError:
            raise
        except Exception as exc:
            raise PixelsError("unreadable", f"unreadable or truncated image file ({exc})") from None


def _dicom_meta_end(path: Path) -> tuple[int, str] | None:
    """``(offset of the dataset, transfer syntax UID)`` from a DICOM file's meta group (Part 10:
    128-byte preamble, ``DICM``, group 0002 in explicit VR little endian), or None without one."""
    with path.open("rb") as f:
        if f.read(132)[128:] != b"DICM":
            return None
        syntax = ""
        while True:
            start = f.tell()
            head = f.read(8)
            if len(head) < 8 or int.from_bytes(head[:2], "little") != 2:
                return start, syntax
            vr = head[4:6]
            if vr in (
                b"OB",
                b"OD",
                b"OF",
                b"OL",
                b"OV",
                b"OW",
                b"SQ",
                b"SV",
                b"UC",
                b"UN",
                b"UR",
                b"UT",
                b"UV",
            ):
                length = int.from_bytes(f.read(4), "little")
            else:
                length = int.from_bytes(head[6:8], "little")
            value = f.read(length)
            if head[:4] == b"\x02\x00\x10\x00":  # (0002,0010) TransferSyntaxUID
                syntax = value.rstrip(b"\x00 ").decode("ascii", "replace")


def _raw_chunks(path: Path, offset: int) -> Iterator[bytes]:
    """The raw deflate stream of ``path`` from ``offset``, inflated a chunk at a time (zlib's
    ``max_length``: no chunk is larger than INFLATE_CHUNK, whatever the ratio)."""
    import zlib

    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    with path.open("rb") as src:
        src.seek(offset)
        pending = b""
        while not inflater.eof:
            # with no input, zlib hands out what it still holds from earlier input
            chunk = inflater.decompress(pending, INFLATE_CHUNK)
            pending = inflater.unconsumed_tail
            if chunk:
                yield chunk
            elif not pending:
                pending = src.read(INFLATE_CHUNK)
                if not pending:
                    raise PixelsError(
                        "unreadable", "the deflated dataset is truncated (its stream has no end)"
                    )


def _inflate_raw(
    path: Path, offset: int, cap: int, write: Callable[[bytes], object] | None, why: str
) -> None:
    """Inflate into ``write`` (or only count); refused past ``cap`` bytes (``why`` says why)."""
    total = 0
    for chunk in _raw_chunks(path, offset):
        total += len(chunk)
        if total > cap:
            raise PixelsError(
                "decode_too_large", f"the deflated dataset inflates to more than {cap} bytes{why}"
            )
        if write is not None:
            write(chunk)


def _explicit_meta(path: Path) -> bytes:
    """The preamble and meta group of ``path`` with the transfer syntax made explicit VR little
    endian: what comes before an inflated dataset in a file pydicom reads as is."""
    from pydicom.filebase import DicomBytesIO
    from pydicom.filereader import read_file_meta_info
    from pydicom.filewriter import write_file_meta_info
    from pydicom.uid import ExplicitVRLittleEndian

    meta = read_file_meta_info(path)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    out = DicomBytesIO()
    write_file_meta_info(out, meta, enforce_standard=False)
    return b"\x00" * 128 + b"DICM" + out.getvalue()


_VRS = {
    b"AE",
    b"AS",
    b"AT",
    b"CS",
    b"DA",
    b"DS",
    b"DT",
    b"FD",
    b"FL",
    b"IS",
    b"LO",
    b"LT",
    b"OB",
    b"OD",
    b"OF",
    b"OL",
    b"OV",
    b"OW",
    b"PN",
    b"SH",
    b"SL",
    b"SQ",
    b"SS",
    b"ST",
    b"SV",
    b"TM",
    b"UC",
    b"UI",
    b"UL",
    b"UN",
    b"UR",
    b"US",
    b"UT",
    b"UV",
}
_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
_UNDEFINED = 0xFFFFFFFF
_PIXEL_DATA = 0x7FE00010
# Rows, Columns, SamplesPerPixel, NumberOfFrames, BitsAllocated
_IMAGE_TAGS = {0x00280010, 0x00280011, 0x00280002, 0x00280008, 0x00280100}
# Elements (nested ones included) a deflated DICOM's header may have before its pixel data: real
# headers have hundreds to a few thousand.
MAX_HEADER_ELEMENTS = 50_000


class _Short(Exception):
    """The bytes so far end inside the header: inflate more."""


class _HeaderWalk:
    """Walks the elements of a dataset in explicit VR little endian, as its bytes arrive, to the
    Pixel Data element, without reading values: the top-level elements must ascend (as DICOM
    requires), sequences of undefined length are skipped item by item. ``found``: the values of
    the image tags (``_IMAGE_TAGS``); ``pixel_offset``: where Pixel Data starts, once reached."""

    def __init__(self) -> None:
        self.found: dict[int, bytes] = {}
        self.pos = 0  # the start of the first top-level element not yet walked
        self.last = -1
        self.elements = 0
        self.pixel_offset: int | None = None

    def _element(self, data: bytearray, pos: int) -> tuple[int, bytes, int, int]:
        """``(tag, VR, value offset, value length)`` of the element at ``pos``."""
        if pos + 8 > len(data):
            raise _Short
        self.elements += 1
        if self.elements > MAX_HEADER_ELEMENTS:
            raise PixelsError("unreadable", f"more than {MAX_HEADER_ELEMENTS} elements before the pixel data")
        tag = int.from_bytes(data[pos : pos + 2], "little") << 16 | int.from_bytes(
            data[pos + 2 : pos + 4], "little"
        )
        if tag >> 16 == 0xFFFE:  # item and delimitation tags have no VR
            return tag, b"", pos + 8, int.from_bytes(data[pos + 4 : pos + 8], "little")
        vr = bytes(data[pos + 4 : pos + 6])
        if vr not in _VRS:
            raise PixelsError("unreadable", f"not a DICOM dataset: no value representation at byte {pos}")
        if vr in _LONG_VRS:
            if pos + 12 > len(data):
                raise _Short
            return tag, vr, pos + 12, int.from_bytes(data[pos + 8 : pos + 12], "little")
        return tag, vr, pos + 8, int.from_bytes(data[pos + 6 : pos + 8], "little")

    def _skip_sequence(self, data: bytearray, pos: int, depth: int) -> int:
        """Past a sequence of undefined length whose first item starts at ``pos``."""
        if depth > 32:
            raise PixelsError("unreadable", "sequences nested more than 32 deep")
        while True:
            tag, _, start, length = self._element(data, pos)
            if tag == 0xFFFEE0DD:  # sequence delimitation
                return start
            if tag != 0xFFFEE000:
                raise PixelsError("unreadable", f"not a sequence item at byte {pos}")
            if length != _UNDEFINED:
                pos = start + length
                continue
            pos = start
            while True:  # an item of undefined length: its elements, then an item delimitation
                tag, vr, start, length = self._element(data, pos)
                if tag == 0xFFFEE00D:
                    pos = start
                    break
                pos = self._past(data, vr, start, length, pos, depth + 1)

    def _past(self, data: bytearray, vr: bytes, start: int, length: int, pos: int, depth: int) -> int:
        if length != _UNDEFINED:
            return start + length
        if vr != b"SQ":
            raise PixelsError(
                "unreadable", f"an element of undefined length that is no sequence at byte {pos}"
            )
        return self._skip_sequence(data, start, depth)

    def feed(self, data: bytearray) -> bool:
        """Walk on through ``data`` (all the bytes so far); True once Pixel Data is reached."""
        while self.pixel_offset is None:
            elements = self.elements
            try:
                tag, vr, start, length = self._element(data, self.pos)
                if tag <= self.last:
                    raise PixelsError(
                        "unreadable", f"not a DICOM dataset: elements out of order at byte {self.pos}"
                    )
                if tag == _PIXEL_DATA:
                    self.pixel_offset = self.pos
                    break
                end = self._past(data, vr, start, length, self.pos, 0)
                if tag in _IMAGE_TAGS:
                    if end > len(data):
                        raise _Short
                    self.found[tag] = bytes(data[start:end])
            except _Short:
                self.elements = elements  # the element is walked again once more bytes are in
                return False
            self.last, self.pos = tag, end
        return True


def _image_bytes(found: dict[int, bytes]) -> tuple[str, int]:
    """``("COLSxROWS pixels of BITS bits", bytes)`` of the pixel data the image tags describe."""

    def us(tag: int, default: int | None) -> int:
        value = found.get(tag)
        if value is None or len(value) < 2:
            if default is None:
                raise PixelsError("unreadable", "no Rows or Columns before the pixel data")
            return default
        return int.from_bytes(value[:2], "little")

    rows, cols = us(0x00280010, None), us(0x00280011, None)
    samples, bits = us(0x00280002, 1), us(0x00280100, 16)
    try:
        frames = int(found.get(0x00280008, b"1").strip(b" \x00") or b"1")
    except ValueError:
        raise PixelsError("unreadable", "a NumberOfFrames that is no number") from None
    nbytes = rows * cols * max(frames, 1) * max(samples, 1) * max(1, (bits + 7) // 8)
    return f"{cols}x{rows} pixels of {bits} bits", nbytes


def _inflate_dicom(path: Path, offset: int, out: Path, max_bytes: int) -> None:
    """Write ``path`` as explicit VR little endian to ``out``: its meta group with the transfer
    syntax changed, then the dataset inflated. The dataset is first inflated as far as its Pixel
    Data element (within DICOM_HEADER_BYTES), whose offset and the image tags before it (Rows x
    Columns x frames x samples x BitsAllocated) bound the whole, as ``max_bytes`` does; the stream
    is then inflated once without being kept, to refuse a bomb without writing it, and once more
    into ``out``."""
    prefix = bytearray()
    walk = _HeaderWalk()
    for chunk in _raw_chunks(path, offset):
        prefix += chunk
        if walk.feed(prefix) or len(prefix) >= DICOM_HEADER_BYTES:
            break
    del prefix
    if walk.pixel_offset is None:
        raise PixelsError(
            "unreadable", f"no pixel data in the first {DICOM_HEADER_BYTES >> 20} MB of the inflated dataset"
        )
    what, pixels = _image_bytes(walk.found)
    needed = walk.pixel_offset + 12 + pixels + DICOM_TRAILER_BYTES
    cap, why = max_bytes, f", over DIFFEXP_DECODE_MEMORY_MB ({max_bytes >> 20} MB)"
    if needed < max_bytes:
        cap = needed
        why = (
            f": its {what}, {walk.pixel_offset} bytes of elements before them and "
            f"{DICOM_TRAILER_BYTES >> 20} MB after need at most {needed}"
        )
    _inflate_raw(path, offset, cap, None, why)
    meta = _explicit_meta(path)
    with out.open("wb") as dst:
        dst.write(meta)
        _inflate_raw(path, offset, cap, dst.write, why)


def _check_dicom(path: Path, max_pixels: int, max_bytes: int, as_mask: bool) -> FileCheck:
    import tempfile

    meta = _dicom_meta_end(path)
    if meta is not None and meta[1] == DEFLATED_DICOM:
        # pydicom inflates a deflated dataset whole, in memory, before reading a tag of it
        with tempfile.TemporaryDirectory(prefix="diffexp-dicom-") as tmp:
            inflated = Path(tmp) / "inflated.dcm"
            try:
                _inflate_dicom(path, meta[0], inflated, max_bytes)
            except (PixelsError, OSError):  # an OSError here is the server's (a full disk)
                raise
            except Exception as exc:  # zlib.error, a meta group pydicom cannot read
                raise PixelsError("unreadable", f"unreadable deflated DICOM file ({exc})") from None
            return _check_dicom_plain(inflated, max_pixels, max_bytes, as_mask)
    return _check_dicom_plain(path, max_pixels, max_bytes, as_mask)


def _check_dicom_plain(path: Path, max_pixels: int, max_bytes: int, as_mask: bool) -> FileCheck:
    import pydicom

    try:
        head = pydicom.dcmread(path, stop_before_pixels=True)
        width, height = int(head.Columns), int(head.Rows)
        frames = int(head.get("NumberOfFrames") or 1)
        samples = int(head.get("SamplesPerPixel") or 1)
        bits = int(head.get("BitsAllocated") or 16)
    except Exception as exc:
        raise PixelsError("unreadable", f"unreadable DICOM file ({exc})") from None
    _check_pixels(width, height, max_pixels)
    if frames != 1 or samples != 1:
        raise PixelsError(
            "not_2d", f"has {frames} frame(s) of {samples} channel(s); one 2D grey frame per file"
        )
    # pydicom holds the pixel data as read (at most the file) and the decoded array at once
    decoded = width * height * frames * samples * max(1, (bits + 7) // 8)
    if decoded + path.stat().st_size > max_bytes:
        raise _over_budget(
            f"{width}x{height} pixels of {bits} bits (and the file beside them) take",
            decoded + path.stat().st_size,
            max_bytes,
        )
    try:
        ds = pydicom.dcmread(path)
        raw = np.asarray(ds.pixel_array)
        slope, intercept = ds.get("RescaleSlope"), ds.get("RescaleIntercept")
        slope = float(slope if slope is not None else 1.0)
        intercept = float(intercept or 0.0)
        rescale = ds.get("RescaleSlope") is not None or ds.get("RescaleIntercept") is not None
    except Exception as exc:
        raise PixelsError("unreadable", f"unreadable or truncated DICOM pixel data ({exc})") from None
    if raw.shape != (height, width):
        raise PixelsError("unreadable", f"pixel data of shape {raw.shape}, not {height}x{width}")
    if not as_mask:
        return FileCheck(width, height)
    del ds  # the pixel data as read: only the array is needed from here
    scan = _MaskScan()
    for y0, y1 in _row_strips(height, width):
        values = raw[y0:y1].astype(np.float32)
        if rescale:  # in float32, as _read_dicom (and MONAI's PydicomReader)
            values = values * slope + intercept
        scan.add(grey_from_array(values))
    return FileCheck(width, height, scan.problem())


def _nifti_extent(head: bytes) -> int:
    """The bytes a NIfTI file's reader uses, from its header alone: the offset of the data (after
    the header and its extensions) plus the data, the dims times the stored type's size."""
    import nibabel as nib

    sizes = {int.from_bytes(head[:4], "little"), int.from_bytes(head[:4], "big")}
    try:
        if 348 in sizes:
            hdr: Any = nib.Nifti1Header(head[:348])
        elif 540 in sizes:
            hdr = nib.Nifti2Header(head[:540])
        else:
            raise ValueError("neither a NIfTI-1 nor a NIfTI-2 header")
        shape = tuple(int(d) for d in hdr.get_data_shape())
        itemsize = int(hdr.get_data_dtype().itemsize)
        offset = max(int(hdr.get_data_offset()), int(hdr.sizeof_hdr) + 4)
    except Exception as exc:
        raise PixelsError("unreadable", f"unreadable NIfTI file ({exc})") from None
    return offset + int(np.prod(shape, dtype=np.int64)) * itemsize


def _inflate_gzip(path: Path, out: Path, max_bytes: int) -> None:
    """``path`` inflated into ``out`` as far as its header says a reader needs (the bytes past that
    are never read, so never inflated), refused when that is past ``max_bytes``."""
    import gzip

    with gzip.open(path, "rb") as src, out.open("wb") as dst:
        head = src.read(540)
        need = _nifti_extent(head)
        if need > max_bytes:
            raise _over_budget("its header (data offset and dims) says a reader needs", need, max_bytes)
        dst.write(head[:need])
        left = need - len(head)
        while left > 0 and (chunk := src.read(min(INFLATE_CHUNK, left))):
            dst.write(chunk)
            left -= len(chunk)


def _check_nifti(path: Path, max_pixels: int, max_bytes: int, as_mask: bool) -> FileCheck:
    import tempfile

    if path.name.lower().endswith(".gz"):
        # nibabel would inflate the stream as far as the header says; inflate it here, bounded
        with tempfile.TemporaryDirectory(prefix="diffexp-nifti-") as tmp:
            inflated = Path(tmp) / "inflated.nii"
            try:
                _inflate_gzip(path, inflated, max_bytes)
            except PixelsError:
                raise
            except (OSError, EOFError, ValueError) as exc:  # gzip.BadGzipFile and zlib.error included
                raise PixelsError("unreadable", f"unreadable NIfTI file ({exc})") from None
            return _check_nifti_plain(inflated, max_pixels, max_bytes, as_mask)
    return _check_nifti_plain(path, max_pixels, max_bytes, as_mask)


def _check_nifti_plain(path: Path, max_pixels: int, max_bytes: int, as_mask: bool) -> FileCheck:
    import nibabel as nib

    try:
        img: Any = nib.load(str(path), mmap=False)  # the header; the data is read a slab at a time
        shape = tuple(int(d) for d in img.header.get_data_shape())
        itemsize = int(img.header.get_data_dtype().itemsize)
    except Exception as exc:
        raise PixelsError("unreadable", f"unreadable NIfTI file ({exc})") from None
    if len(shape) < 2 or any(d != 1 for d in shape[2:]):
        raise PixelsError("not_2d", f"has shape {shape}; one 2D slice per file")
    _check_pixels(shape[0], shape[1], max_pixels)
    if shape[0] * shape[1] * itemsize > max_bytes:
        raise _over_budget(
            f"{shape[0]}x{shape[1]} voxels of {itemsize} bytes take",
            shape[0] * shape[1] * itemsize,
            max_bytes,
        )
    scan = _MaskScan()
    # slabs of y (the file's slowest axis of a 2D slice): each is one contiguous run of the file
    for y0, y1 in _row_strips(shape[1], shape[0]):
        try:
            data = np.asanyarray(img.dataobj[:, y0:y1])
        except Exception as exc:
            raise PixelsError("unreadable", f"unreadable or truncated NIfTI data ({exc})") from None
        if not (np.issubdtype(data.dtype, np.integer) or np.issubdtype(data.dtype, np.floating)):
            raise PixelsError("unreadable", f"NIfTI data of type {data.dtype}; one grey value per pixel")
        if as_mask:
            scan.add(grey_from_array(data.reshape(data.shape[:2]).astype(np.float32)))
    return FileCheck(shape[0], shape[1], scan.problem() if as_mask else None)  # (x, y): (columns, rows)
