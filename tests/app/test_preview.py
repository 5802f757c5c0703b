"""app.preview: the overlay of a pair, a pure function of its two PNGs."""

from __future__ import annotations

import io
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from app.preview import CLASS_RGB, OUTLINE_RGB, outline, overlay


def png(array: np.ndarray, mode: str = "L") -> bytes:
    out = io.BytesIO()
    Image.fromarray(array.astype(np.uint8), mode).save(out, format="PNG")
    return out.getvalue()


def rgb_of(data: bytes) -> np.ndarray:
    img = Image.open(io.BytesIO(data))
    assert img.mode == "RGB"
    return np.asarray(img)


def test_outline_is_the_ring_of_mask_pixels_next_to_the_outside() -> None:
    mask = np.zeros((8, 8), bool)
    mask[2:6, 1:7] = True
    ring = mask.copy()
    ring[3:5, 2:6] = False
    assert np.array_equal(outline(mask), ring)
    assert not outline(np.zeros((5, 5), bool)).any()
    full = outline(np.ones((4, 4), bool))  # the image's border counts as outside: a closed outline
    assert full.sum() == 12 and not full[1:3, 1:3].any()
    dot = np.zeros((3, 3), bool)
    dot[1, 1] = True
    assert np.array_equal(outline(dot), dot)


def test_overlay_draws_the_outline_on_the_grey_image() -> None:
    image = np.arange(64 * 64, dtype=np.uint32).reshape(64, 64) % 251
    mask = np.zeros((64, 64), np.uint8)
    mask[10:40, 20:50] = 255
    out = rgb_of(overlay(png(image), png(mask)))
    edge = outline(mask > 0)
    assert out.shape == (64, 64, 3)
    assert (out[edge] == OUTLINE_RGB).all()
    for channel in range(3):
        assert np.array_equal(out[..., channel][~edge], image[~edge].astype(np.uint8))


def test_a_k_class_label_map_has_one_outline_colour_per_class() -> None:
    image = np.full((24, 24), 90, np.uint8)
    mask = np.zeros((24, 24), np.uint8)
    mask[4:20, 2:10], mask[4:20, 12:22] = 1, 2  # K = 3: labels 1 and 2 as a K-class model stores them
    out = rgb_of(overlay(png(image), png(mask)))
    for label in (1, 2):
        assert (out[outline(mask == label)] == CLASS_RGB[label - 1]).all()
    assert CLASS_RGB[0] == OUTLINE_RGB and CLASS_RGB[1] != OUTLINE_RGB
    assert (out[mask == 0] == 90).all()


def test_overlay_takes_colour_images_and_masks_of_another_size() -> None:
    image = np.zeros((32, 32, 3), np.uint8)
    image[..., 0] = 200  # a colour image comes out grey (PIL's luma)
    mask = np.zeros((16, 16), np.uint8)
    mask[4:12, 4:12] = 1  # any non-zero value is inside
    out = rgb_of(overlay(png(image, "RGB"), png(mask)))
    big = np.zeros((32, 32), bool)
    big[8:24, 8:24] = True
    edge = outline(big)
    assert (out[edge] == OUTLINE_RGB).all()
    grey = out[~edge]
    assert (grey[:, 0] == grey[:, 1]).all() and (grey[:, 1] == grey[:, 2]).all()


def test_overlay_is_deterministic_and_refuses_what_is_not_an_image() -> None:
    image, mask = png(np.full((8, 8), 90)), png(np.eye(8) * 255)
    assert overlay(image, mask) == overlay(image, mask)
    with pytest.raises(ValueError):
        overlay(b"not a png", mask)
    with pytest.raises(ValueError):
        overlay(image, image[:20])


def test_preview_module_needs_no_torch() -> None:
    code = "import sys, app.preview, app.pairs\nassert 'torch' not in sys.modules"
    subprocess.run(
        [sys.executable, "-c", code], check=True, env={"PATH": "", "DIFFEXP_STORAGE_DIR": "/tmp/x"}
    )
