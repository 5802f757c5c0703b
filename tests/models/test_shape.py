"""Any image shape: padding to a square on loading, the crop box, restore_shape, the size rule."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from app.params import MAX_SIDE, SIZE_PATTERN
from app.pixels import foreground, to_unit
from models.data import image_from_grey, load_folder, mask_from_grey, read_grey
from models.shape import Padding, crop_box, pad_to_square, parse_size, restore_shape, square_padding
from tests.utils.tiny import make_nonsquare_dataset


@pytest.mark.parametrize(
    "w,h,expected",
    [
        (32, 24, (4, 4, 0, 0)),  # even difference: split equally
        (32, 25, (3, 4, 0, 0)),  # odd: the extra row at the bottom
        (24, 32, (0, 0, 4, 4)),
        (25, 32, (0, 0, 3, 4)),  # odd: the extra column on the right
        (16, 16, (0, 0, 0, 0)),
        (5, 1, (2, 2, 0, 0)),
    ],
)
def test_square_padding_amounts(w: int, h: int, expected: tuple[int, int, int, int]) -> None:
    pad = square_padding(w, h)
    assert (pad.top, pad.bottom, pad.left, pad.right) == expected
    assert (pad.width, pad.height, pad.side) == (w, h, max(w, h))
    assert Padding.from_dict(pad.to_dict()) == pad


def test_pad_to_square_centres_the_content() -> None:
    values = np.arange(3 * 6, dtype=np.float32).reshape(3, 6) + 1  # H=3, W=6
    out, pad = pad_to_square(values, -7.0)
    assert out.shape == (6, 6) and pad == Padding(1, 2, 0, 0, 6, 3)
    np.testing.assert_array_equal(out[1:4], values)
    assert (out[0] == -7).all() and (out[4:] == -7).all()
    square = np.ones((4, 4), np.uint8)
    assert pad_to_square(square, 0)[0] is square  # a square array is not copied, let alone changed


@pytest.mark.parametrize(
    "res,size,box",
    [
        (16, (32, 24), (0, 2, 16, 14)),
        (16, (24, 32), (2, 0, 14, 16)),
        (16, (16, 16), (0, 0, 16, 16)),
        (16, (20, 5), (0, 6, 16, 10)),
        (16, (4096, 1), (0, 7, 16, 8)),  # never an empty crop
        (10, (4, 3), (0, 1, 10, 9)),  # 7.5 rows: rounded half up to 8
    ],
)
def test_crop_box(res: int, size: tuple[int, int], box: tuple[int, int, int, int]) -> None:
    assert crop_box(res, size) == box


def test_restore_shape_inverts_the_padding_at_full_resolution() -> None:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (24, 32), dtype=np.uint8)
    labels = rng.integers(0, 3, (24, 32), dtype=np.uint8)  # a K = 3 label map
    sq_image, _ = pad_to_square(image, 0)
    sq_mask, _ = pad_to_square(labels, 0)
    out_image, out_mask = restore_shape(sq_image, sq_mask, (32, 24))
    np.testing.assert_array_equal(out_image, image)
    np.testing.assert_array_equal(out_mask, labels)


def test_restore_shape_masks_nearest_images_antialiased() -> None:
    stripes = np.zeros((16, 16), np.uint8)
    stripes[:, ::2] = 255
    for values in ([0, 255], [0, 1, 2, 3]):
        mask = np.resize(np.array(values, np.uint8), (16, 16))
        image, out = restore_shape(stripes, mask, (6, 5))
        assert image.shape == out.shape == (5, 6) and out.dtype == np.uint8 and image.dtype == np.uint8
        assert set(np.unique(out).tolist()) <= set(values)  # no value invented at a boundary
    # the 1-pixel stripes average out to grey (nearest would keep only 0 and 255)
    assert 60 < float(image.mean()) < 200 and not set(np.unique(image).tolist()) <= {0, 255}
    big_image, big_mask = restore_shape(stripes, mask, (40, 20))
    assert big_image.shape == big_mask.shape == (20, 40)
    assert set(np.unique(big_mask).tolist()) <= {0, 1, 2, 3}
    with pytest.raises(ValueError, match="square"):
        restore_shape(stripes[:8], mask[:8], (4, 4))


@pytest.mark.parametrize(
    "text,message",
    [
        ("256×192", "'256×192' is not WIDTHxHEIGHT"),  # the multiplication sign, not an ASCII x
        ("256X192", "is not WIDTHxHEIGHT"),
        ("256 x 192", "is not WIDTHxHEIGHT"),
        ("abc", "'abc' is not WIDTHxHEIGHT"),
        ("-5x10", "is not WIDTHxHEIGHT"),
        ("1.5x10", "is not WIDTHxHEIGHT"),
        ("２５６x192", "is not WIDTHxHEIGHT"),  # full-width digits are not ASCII
        ("0x10", "'0x10': sides must be whole numbers from 1"),
        ("010x10", "no leading 0"),
        ("4097x10", "'4097x10': sides must be at most 4096"),
        ("10x99999999999999999999", "at most 4096"),
        ("", "is not WIDTHxHEIGHT"),
    ],
)
def test_parse_size_errors_name_the_value(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_size(text)
    assert re.fullmatch(SIZE_PATTERN.strip("^$"), text) is None  # the OpenAPI pattern agrees


def test_parse_size_accepts_whole_sides_and_agrees_with_the_pattern() -> None:
    assert parse_size("256x192") == (256, 192)
    for w in (1, 9, 10, 99, 100, 999, 1000, 3999, 4000, 4089, 4090, 4095, MAX_SIDE):
        assert parse_size(f"{w}x{w}") == (w, w)
        assert re.fullmatch(SIZE_PATTERN.strip("^$"), f"{w}x1")
    for w in (4097, 4100, 5000, 10000):
        assert re.fullmatch(SIZE_PATTERN.strip("^$"), f"{w}x1") is None


def test_a_nonsquare_pair_is_padded_centred_with_background(tmp_path: Path) -> None:
    root = tmp_path / "d"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    Image.fromarray(np.full((24, 32), 255, np.uint8)).save(root / "images" / "a.png")  # W=32, H=24
    Image.fromarray(np.full((24, 32), 255, np.uint8)).save(root / "masks" / "a.png")
    for res, lo, hi in ((32, 4, 28), (16, 2, 14)):
        ds = load_folder(root, res)
        assert ds.paddings == [Padding(4, 4, 0, 0, 32, 24)] and ds.shapes() == {"32x24": 1}
        image, mask = ds.images[0, 0].numpy(), ds.masks[0, 0].numpy()
        assert (image[lo:hi] == 1).all() and (mask[lo:hi] == 1).all()  # the content, centred
        for pad in (slice(0, lo), slice(hi, res)):
            assert (image[pad] == -1).all() and (mask[pad] == -1).all()  # black, background
    assert ds.subset(["a"]).paddings == ds.paddings


def _old_image(grey, resolution):  # type: ignore[no-untyped-def]
    """image_from_grey before padding (the squash to R x R), for the bit-for-bit check."""
    unit = to_unit(grey)
    h, w = unit.shape
    pil = Image.fromarray(unit.astype(np.float32), mode="F")
    shrinking = resolution < min(h, w)
    pil = pil.resize(
        (resolution, resolution), Image.Resampling.BOX if shrinking else Image.Resampling.BILINEAR
    )
    return np.clip(np.asarray(pil, dtype=np.float32), 0.0, 1.0) * 2.0 - 1.0


def _old_mask(grey, resolution):  # type: ignore[no-untyped-def]
    binary = foreground(grey).astype(np.uint8) * 255
    pil = Image.fromarray(binary, mode="L").resize((resolution, resolution), Image.Resampling.NEAREST)
    return np.where(np.asarray(pil) > 127, 1.0, -1.0).astype(np.float32)


@pytest.mark.parametrize("res", [16, 24, 48])
def test_square_files_load_exactly_as_before(tmp_path: Path, res: int) -> None:
    root = make_nonsquare_dataset(tmp_path / "sq", n=2, width=32, height=32)
    ds = load_folder(root, res)
    for i, name in enumerate(ds.names):
        image = read_grey(root / "images" / f"{name}.png")
        mask = read_grey(root / "masks" / f"{name}.png", as_image=False)
        assert np.array_equal(image_from_grey(image, res), _old_image(image, res))
        assert np.array_equal(ds.images[i, 0].numpy(), _old_image(image, res))
        assert np.array_equal(mask_from_grey(mask, res, root), _old_mask(mask, res))
        assert np.array_equal(ds.masks[i, 0].numpy(), _old_mask(mask, res))
    assert ds.paddings == [Padding(0, 0, 0, 0, 32, 32)] * 2
