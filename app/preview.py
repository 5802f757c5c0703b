"""The preview of a pair: the image in grey with the outline of its mask drawn in colour (one colour
per class for a K-class label map).

A pure function of the two PNGs (PIL and numpy only: the API image has no torch). The outline is
drawn at the pair's own resolution, one pixel wide, on the mask's side of the boundary, so every
coloured pixel is a mask pixel and the image under the rest of the mask stays visible; the page
scales the small images up without smoothing.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

OUTLINE_RGB = (255, 40, 40)  # red reads on any grey level, dark lung or bright bone
# A K-class mask's label k is outlined in CLASS_RGB[(k - 1) % len]: label 1 in the binary red, then
# colours far apart in hue (and from grey) so neighbouring classes read apart.
CLASS_RGB = (
    OUTLINE_RGB, (40, 200, 255), (255, 210, 0), (60, 230, 60), (230, 60, 230), (255, 140, 0), (140, 110, 255),
)  # fmt: skip
MAX_LABEL = 15  # app.pixels.MAX_MASK_LABELS - 1: masks whose top value is at most this are label maps


def outline(mask: np.ndarray) -> np.ndarray:
    """The mask's pixels with a 4-neighbour outside it (the image's border counts as outside)."""
    inside = np.pad(mask.astype(bool), 1, constant_values=False)
    core = inside[1:-1, 1:-1]
    interior = core & inside[:-2, 1:-1] & inside[2:, 1:-1] & inside[1:-1, :-2] & inside[1:-1, 2:]
    return core & ~interior


def overlay(image_png: bytes, mask_png: bytes) -> bytes:
    """An RGB PNG: the image in grey, the mask's outline in ``OUTLINE_RGB``.

    A mask of another size than the image is resized to it (nearest). A binary mask (0/255): any
    non-zero value counts as inside. A K-class label map (values 0..K-1, K > 2, as a K-class model's
    masks are stored): each label's own outline in its ``CLASS_RGB`` colour. Raises ``ValueError`` when
    either is not a readable image.
    """
    try:
        image = Image.open(io.BytesIO(image_png))
        image.load()
        mask = Image.open(io.BytesIO(mask_png))
        mask.load()
    except (OSError, SyntaxError) as exc:  # PIL raises both for bad data
        raise ValueError(f"not an image: {exc}") from exc
    grey = np.asarray(image.convert("L"))
    inside = mask.convert("L")
    if inside.size != image.size:
        inside = inside.resize(image.size, Image.Resampling.NEAREST)
    values = np.asarray(inside)
    rgb = np.repeat(grey[:, :, None], 3, axis=2)
    top = int(values.max()) if values.size else 0
    if 2 <= top <= MAX_LABEL:  # a label map: one outline per class
        for label in np.unique(values[values > 0]).tolist():
            rgb[outline(values == label)] = CLASS_RGB[(int(label) - 1) % len(CLASS_RGB)]
    else:
        rgb[outline(values > 0)] = OUTLINE_RGB
    out = io.BytesIO()
    Image.fromarray(rgb, "RGB").save(out, format="PNG", optimize=True)
    return out.getvalue()
