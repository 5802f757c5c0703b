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


def _read_pil(path: Path, max_pixels: int | None, as_image: bool = True) -> Grey:
    try:
        img = Image.open(path)  # reads the header only
    except Image.DecompressionBombError as exc:  # PIL's own limit, far above ours
        raise PixelsError("too_many_pixels", f"{exc} (DIFFEXP_MAX_IMAGE_PIXELS: {max_pixels})") from None
    except Exception as exc:  # a broken file can raise nearly anything from a decoder
        raise PixelsError("unreadable", f"unreadable image file ({exc})") from None
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
