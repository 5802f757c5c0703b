"""Images of any shape at a square working resolution: pad to a square on loading, crop back on output.

Training pads each image (and its mask) to a square, centred, before the resize to R x R, so the
anatomy keeps its aspect ratio instead of being squashed; the padding is recorded per pair
(``PairDataset.paddings``). Outputs are square; ``restore_shape`` crops the centred W:H region and
resizes it to W x H: images with antialiasing (Lanczos), masks nearest, so a mask keeps exactly the
label values it had (0/255 binary, 0..K-1 label maps) and never gains one at a boundary.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from PIL import Image

# The size rule lives with the other job parameters (the API validates it without numpy or torch).
from app.params import MAX_SIDE as MAX_SIDE
from app.params import parse_size as parse_size


@dataclass(frozen=True)
class Padding:
    """Rows and columns added around an image to make it square, in its original pixels."""

    top: int
    bottom: int
    left: int
    right: int
    width: int  # the original width and height
    height: int

    @property
    def side(self) -> int:
        return max(self.width, self.height)

    def to_dict(self) -> dict[str, int]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Padding:
        return cls(**{k: int(d[k]) for k in ("top", "bottom", "left", "right", "width", "height")})


def square_padding(width: int, height: int) -> Padding:
    """The padding that centres a ``width`` x ``height`` image in a square; an odd difference puts the
    extra row (column) at the bottom (right)."""
    rows, cols = max(width - height, 0), max(height - width, 0)
    return Padding(rows // 2, rows - rows // 2, cols // 2, cols - cols // 2, width, height)


def pad_to_square(values: np.ndarray, fill: float) -> tuple[np.ndarray, Padding]:
    """``values`` ``[H, W]`` centred in a square of side max(H, W), the rest ``fill`` (an image's black
    level, a mask's background 0). A square array comes back as it is (the same object)."""
    h, w = values.shape[:2]
    pad = square_padding(w, h)
    if h == w:
        return values, pad
    widths = [(pad.top, pad.bottom), (pad.left, pad.right)] + [(0, 0)] * (values.ndim - 2)
    return np.pad(values, widths, mode="constant", constant_values=fill), pad


def crop_box(resolution: int, size: tuple[int, int]) -> tuple[int, int, int, int]:
    """``(left, top, right, bottom)`` of the centred W:H region of an R x R square (PIL's box order),
    rounded as ``square_padding`` centres: what a W x H image padded to a square fills of it."""
    w, h = size
    if w >= h:
        inner = min(resolution, max(1, int(resolution * h / w + 0.5)))  # half up, not to even
        top = (resolution - inner) // 2
        return 0, top, resolution, top + inner
    inner = min(resolution, max(1, int(resolution * w / h + 0.5)))
    left = (resolution - inner) // 2
    return left, 0, left + inner, resolution


def restore_shape(
    image_u8: np.ndarray, mask_u8: np.ndarray, size: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """A square uint8 pair ``[R, R]`` cropped to the W:H aspect and resized to ``size`` = (W, H): the
    image with Lanczos (antialiased when shrinking), the mask nearest (its values unchanged in kind)."""
    r = image_u8.shape[0]
    if image_u8.shape[:2] != (r, r) or mask_u8.shape[:2] != (r, r):
        raise ValueError(f"restore_shape needs square R x R arrays, got {image_u8.shape} and {mask_u8.shape}")
    box = crop_box(r, size)
    image = Image.fromarray(np.ascontiguousarray(image_u8)).crop(box).resize(size, Image.Resampling.LANCZOS)
    mask = Image.fromarray(np.ascontiguousarray(mask_u8)).crop(box).resize(size, Image.Resampling.NEAREST)
    return np.asarray(image, dtype=np.uint8), np.asarray(mask, dtype=np.uint8)
