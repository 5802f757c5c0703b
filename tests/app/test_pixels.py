"""app.pixels: the torch-free readers (PIL, pydicom, nibabel), their header checks and the mask rule."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import app.pixels
from app.pixels import (
    MAX_MASK_LABELS,
    FileCheck,
    Grey,
    PixelsError,
    check_file,
    foreground,
    label_problem,
    mask_problem,
    read_grey,
    split_suffix,
    to_unit,
)
from tests.utils.archives import png_claiming
from tests.utils.medical import (
    disc_mask,
    ramp,
    write_deflated_dicom,
    write_dicom,
    write_nifti,
    write_nifti_bomb,
    write_tiff16,
)

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    ("filename", "expected"),
    [
        ("a.png", ("a", ".png")),
        ("A.PNG", ("A", ".png")),
        ("scan.nii.gz", ("scan", ".nii.gz")),
        ("scan.nii", ("scan", ".nii")),
        ("x.y.dcm", ("x.y", ".dcm")),
        (".png", None),
        ("notes.txt", None),
        ("a.gz", None),
    ],
)
def test_split_suffix(filename: str, expected: tuple[str, str] | None) -> None:
    assert split_suffix(filename) == expected


# ---- DICOM: rescale, then the window; MONOCHROME1 inverted; masks without either


def test_dicom_rescale_and_window(tmp_path: Path) -> None:
    raw = ramp()
    path = write_dicom(tmp_path / "a.dcm", raw, slope=2, intercept=-1024, center=40, width=400)
    grey = read_grey(path)
    np.testing.assert_array_equal(grey.values, raw.astype(np.float32) * 2 - 1024)
    assert (grey.lo, grey.hi) == (40 - 0.5 - 399 / 2, 40 - 0.5 + 399 / 2)  # PS3.3 C.11.2.1.2.1
    unit = to_unit(grey)
    assert unit[grey.values <= grey.lo].max() == 0 and unit[grey.values >= grey.hi].min() == 1
    inside = (grey.values > grey.lo) & (grey.values < grey.hi)
    assert inside.any() and 0 < unit[inside].min() <= unit[inside].max() < 1
    assert grey.size == (20, 24)  # (width, height): rows x columns as stored


def test_dicom_without_window_is_min_max_and_a_mask_ignores_the_window(tmp_path: Path) -> None:
    raw = ramp()
    plain = read_grey(write_dicom(tmp_path / "a.dcm", raw))
    assert (plain.lo, plain.hi) == (float(raw.min()), float(raw.max()))
    windowed = write_dicom(tmp_path / "m.dcm", disc_mask(label=3), center=1, width=2)
    mask = read_grey(windowed, as_image=False)
    assert (mask.lo, mask.hi) == (0.0, 3.0) and set(np.unique(mask.values)) == {0.0, 3.0}


def test_dicom_monochrome1_is_inverted_and_the_first_of_several_windows_is_used(tmp_path: Path) -> None:
    raw = ramp()
    path = write_dicom(
        tmp_path / "a.dcm", raw, center=[2000.0, 100.0], width=[4000.0, 50.0], photometric="MONOCHROME1"
    )
    grey = read_grey(path)
    assert grey.lo > grey.hi and grey.lo == 2000 - 0.5 + 3999 / 2
    unit = to_unit(grey)
    assert unit.flat[np.argmax(raw)] < 0.1 and unit.flat[np.argmin(raw)] > 0.9  # bright is dark


def test_signed_dicom(tmp_path: Path) -> None:
    raw = (ramp().astype(np.int32) - 2000).astype(np.int16)
    grey = read_grey(write_dicom(tmp_path / "s.dcm", raw, slope=1, intercept=0))
    np.testing.assert_array_equal(grey.values, raw.astype(np.float32))


# ---- NIfTI: scl_slope/scl_inter applied, (x, y) transposed to rows x columns


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_nifti_axes_and_scaling(tmp_path: Path, suffix: str) -> None:
    raw = ramp().astype(np.int16)
    grey = read_grey(write_nifti(tmp_path / f"a{suffix}", raw, slope=0.5, inter=10))
    np.testing.assert_allclose(grey.values, raw * 0.5 + 10, rtol=0, atol=1e-4)
    assert grey.size == (20, 24)
    squeezed = read_grey(write_nifti(tmp_path / f"b{suffix}", raw.T[:, :, None]))  # (x, y, 1)
    np.testing.assert_array_equal(squeezed.values, raw)


def test_16bit_tiff_is_exact_and_min_max(tmp_path: Path) -> None:
    raw = ramp() * 16
    grey = read_grey(write_tiff16(tmp_path / "a.tif", raw))
    np.testing.assert_array_equal(grey.values, raw)
    assert (grey.lo, grey.hi) == (float(raw.min()), float(raw.max()))


# ---- header checks come before any decoding


def test_sizes_are_checked_on_the_header_before_decoding(tmp_path: Path) -> None:
    """Each file claims a size its data does not have: decoding would fail (or allocate the claim),
    so a refusal for its pixel count proves the header was read alone."""
    claim = tmp_path / "claim.png"
    claim.write_bytes(png_claiming(300, 200))
    with pytest.raises(PixelsError) as info:
        read_grey(claim, max_pixels=50_000)
    assert info.value.kind == "too_many_pixels" and "300x200 = 60000 pixels" in str(info.value)
    with pytest.raises(PixelsError, match="truncated"):
        read_grey(claim)  # without the limit it is decoded, and its data is missing

    import nibabel as nib
    import pydicom

    dcm = write_dicom(tmp_path / "a.dcm", ramp(8, 8))
    ds = pydicom.dcmread(dcm)
    ds.Rows = ds.Columns = 60_000
    ds.save_as(dcm)
    with pytest.raises(PixelsError) as info:
        read_grey(dcm, max_pixels=25_000_000)
    assert info.value.kind == "too_many_pixels"

    nii = write_nifti(tmp_path / "a.nii", ramp(8, 8).astype(np.int16))
    img = nib.load(str(nii))
    img.header.set_data_shape((30_000, 30_000))
    raw = bytearray(nii.read_bytes())
    raw[: img.header.sizeof_hdr] = img.header.binaryblock  # the header claims 0.9 G pixels
    nii.write_bytes(bytes(raw))
    with pytest.raises(PixelsError) as info:
        read_grey(nii, max_pixels=25_000_000)
    assert info.value.kind == "too_many_pixels"


@pytest.mark.parametrize("fmt", ["png", "dcm", "nii.gz"])
def test_truncated_files_are_unreadable(tmp_path: Path, fmt: str) -> None:
    raw = ramp(64, 64)
    if fmt == "png":
        path = tmp_path / "a.png"
        Image.fromarray((raw % 256).astype(np.uint8)).save(path)
    elif fmt == "dcm":
        path = write_dicom(tmp_path / "a.dcm", raw)
    else:
        path = write_nifti(tmp_path / "a.nii.gz", raw.astype(np.int16))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(PixelsError) as info:
        read_grey(path)
    assert info.value.kind == "unreadable"


def test_only_2d_files(tmp_path: Path) -> None:
    frames = [Image.fromarray(np.full((8, 8), v, np.uint8)) for v in (1, 2, 3)]
    frames[0].save(tmp_path / "a.tif", save_all=True, append_images=frames[1:])
    write_dicom(tmp_path / "b.dcm", ramp(8, 8), frames=2)
    write_nifti(tmp_path / "c.nii", np.zeros((8, 8, 4), np.int16))
    for name in ("a.tif", "b.dcm", "c.nii"):
        with pytest.raises(PixelsError) as info:
            read_grey(tmp_path / name)
        assert info.value.kind == "not_2d", name


# ---- what a mask is


def grey(values: np.ndarray, colour: bool = False) -> Grey:
    v = values.astype(np.float64)
    return Grey(v, 0.0, 255.0, 255.0, colour)


LABELS = np.array([[0, 0], [1, 2]])
MASKS = [
    ("binary-255", np.array([[0, 255], [255, 0]]), None),
    ("binary-1", np.array([[0, 1], [1, 0]]), None),
    ("three-labels", LABELS, None),
    (f"{MAX_MASK_LABELS}-labels", np.arange(MAX_MASK_LABELS).reshape(4, -1), None),
    (f"{MAX_MASK_LABELS + 1}-labels", np.arange(MAX_MASK_LABELS + 1)[None], "grey levels"),
    ("photo", np.arange(256).reshape(16, 16), "grey levels"),
    ("fractions", np.array([[0, 0.5], [1, 0]]), "whole numbers"),
    ("negative", np.array([[-1, 0], [1, 0]]), "negative"),
    ("empty", np.zeros((2, 2)), "no foreground"),
]


@pytest.mark.parametrize(("values", "problem"), [pytest.param(v, p, id=i) for i, v, p in MASKS])
def test_the_label_map_rule(values: np.ndarray, problem: str | None) -> None:
    found = mask_problem(grey(values))
    assert (found is None) if problem is None else (problem in (found or "")), found


def test_a_colour_mask_is_refused(tmp_path: Path) -> None:
    rgb = np.zeros((8, 8, 3), np.uint8)
    rgb[2:6, 2:6, 0] = 255
    Image.fromarray(rgb).save(tmp_path / "red.png")
    Image.fromarray(np.repeat(disc_mask(8, 8, 255)[..., None], 3, axis=2).astype(np.uint8)).save(
        tmp_path / "grey.png"
    )
    assert "colour" in (mask_problem(read_grey(tmp_path / "red.png", as_image=False)) or "")
    assert mask_problem(read_grey(tmp_path / "grey.png", as_image=False)) is None  # grey saved as RGB


def test_foreground_of_label_maps_and_of_grey_masks() -> None:
    assert foreground(grey(LABELS)).tolist() == [[False, False], [True, True]]
    assert foreground(grey(np.array([[0, 100], [255, 0]]))).tolist() == [[False, True], [True, False]]
    ramp_mask = grey(np.arange(256).reshape(16, 16))  # not a label map: half of the full scale
    assert label_problem(ramp_mask.values) is not None
    assert int(foreground(ramp_mask).sum()) == 128


def test_reading_dicom_and_nifti_imports_no_torch(tmp_path: Path) -> None:
    """The API image has no torch: the readers it uses must not reach for MONAI."""
    dcm = write_dicom(tmp_path / "a.dcm", ramp(), center=40, width=400)
    nii = write_nifti(tmp_path / "a.nii.gz", disc_mask())
    code = (
        "import sys\n"
        "from app.pixels import read_grey\n"
        f"read_grey({str(dcm)!r}); read_grey({str(nii)!r}, as_image=False)\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'monai', 'models')]\n"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_a_palette_label_map_is_a_k_class_mask_whatever_its_colours(tmp_path: Path) -> None:
    labels = np.zeros((8, 8), np.uint8)
    labels[1:4, 1:4], labels[5:7, 2:6] = 1, 2
    img = Image.fromarray(labels, "P")
    img.putpalette([0, 0, 0, 255, 0, 0, 0, 200, 0])  # background black, class 1 red, class 2 green
    img.save(tmp_path / "m.png")
    mask = read_grey(tmp_path / "m.png", as_image=False)
    assert np.array_equal(mask.values, labels) and mask_problem(mask) is None


# ---- check_file: the API's verdict in bounded memory, the same as read_grey's

MB = 1 << 20


def _checked_as_read(path: Path, as_mask: bool) -> FileCheck:
    grey = read_grey(path, as_image=not as_mask)
    return FileCheck(*grey.size, mask_problem(grey) if as_mask else None)


def _palette(path: Path) -> Path:
    labels = np.zeros((8, 8), np.uint8)
    labels[1:4, 1:4] = 3
    img = Image.fromarray(labels, "P")
    img.putpalette([0, 0, 0, 255, 0, 0, 0, 200, 0, 0, 0, 255])
    img.save(path)
    return path


def _png(path: Path, values: np.ndarray) -> Path:
    Image.fromarray(values).save(path)
    return path


def _rgba(path: Path) -> Path:
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[2:6, 2:6] = (255, 255, 255, 255)
    Image.fromarray(rgba, "RGBA").save(path)
    return path


FILES = {
    "png-ramp": lambda t: _png(t / "a.png", (ramp() % 256).astype(np.uint8)),
    "png-mask": lambda t: _png(t / "m.png", disc_mask(label=255).astype(np.uint8)),
    "palette": lambda t: _palette(t / "p.png"),
    "rgba": lambda t: _rgba(t / "r.png"),
    "tiff16": lambda t: write_tiff16(t / "a.tif", ramp() * 16),
    "dicom": lambda t: write_dicom(t / "a.dcm", ramp(), slope=2, intercept=-1024, center=40, width=400),
    "dicom-mask": lambda t: write_dicom(t / "m.dcm", disc_mask(label=3)),
    "dicom-deflated": lambda t: write_deflated_dicom(t / "d.dcm", disc_mask(label=2)),
    "dicom-deflated-sequences": lambda t: write_deflated_dicom(t / "s.dcm", ramp(), sequences=True),
    "nifti": lambda t: write_nifti(t / "a.nii", ramp().astype(np.int16)),
    "nifti-gz-mask": lambda t: write_nifti(t / "m.nii.gz", disc_mask()),
    "nifti-float-mask": lambda t: write_nifti(t / "f.nii.gz", disc_mask().astype(np.float32) * 0.5),
    "nifti-scaled": lambda t: write_nifti(t / "s.nii", disc_mask().astype(np.int16), slope=2.0, inter=-1.0),
}


@pytest.mark.parametrize("as_mask", [False, True])
@pytest.mark.parametrize("name", sorted(FILES))
def test_check_file_agrees_with_read_grey(tmp_path: Path, name: str, as_mask: bool) -> None:
    path = FILES[name](tmp_path)
    assert check_file(path, max_pixels=10**6, max_bytes=16 * MB, as_mask=as_mask) == _checked_as_read(
        path, as_mask
    )


def test_a_mask_is_judged_strip_by_strip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Labels and foreground spread over strips add up as if the mask were read whole."""
    monkeypatch.setattr(app.pixels, "STRIP_PIXELS", 64)  # 2 rows of 32 a strip
    values = np.zeros((32, 32), np.uint16)
    values[30, :17] = np.arange(1, 18)  # 18 values, all in the last strip
    for fmt, path in (
        ("png", tmp_path / "m.png"),
        ("dcm", tmp_path / "m.dcm"),
        ("nii", tmp_path / "m.nii.gz"),
    ):
        if fmt == "png":
            Image.fromarray(values.astype(np.uint8)).save(path)
        elif fmt == "dcm":
            write_dicom(path, values)
        else:
            write_nifti(path, values.astype(np.int16))
        found = check_file(path, max_pixels=10**6, max_bytes=MB, as_mask=True)
        assert found == _checked_as_read(path, True) and "18 grey levels" in (found.mask_problem or ""), fmt
        values[30, 2:] = 0
        assert check_file(path, max_pixels=10**6, max_bytes=MB, as_mask=True).mask_problem is not None
        values[30, :17] = np.arange(1, 18)


def test_a_deflated_dicom_is_inflated_in_chunks_up_to_what_its_header_needs(tmp_path: Path) -> None:
    """24 MB of padding deflate to a 25 KB file; pydicom would inflate all of it before reading a
    tag. Its first 8 MB (inflated) give Rows x Columns x bits: 8x8 pixels need far less than 24 MB."""
    bomb = write_deflated_dicom(tmp_path / "bomb.dcm", ramp(8, 8), padding=24 * MB)
    assert bomb.stat().st_size < 100_000
    with pytest.raises(PixelsError) as info:
        check_file(bomb, max_pixels=10**6, max_bytes=64 * MB, as_mask=False)
    assert info.value.kind == "decode_too_large" and "8x8 pixels of 16 bits" in str(info.value)
    padded = write_deflated_dicom(tmp_path / "padded.dcm", ramp(8, 8), padding=MB // 2)  # within 1 MB
    assert check_file(padded, max_pixels=10**6, max_bytes=16 * MB, as_mask=False) == FileCheck(8, 8)

    big = write_deflated_dicom(tmp_path / "big.dcm", np.zeros((2048, 2048), np.uint16))  # 8 MB inflated
    with pytest.raises(PixelsError) as info:
        check_file(big, max_pixels=10**7, max_bytes=4 * MB, as_mask=False)
    assert info.value.kind == "decode_too_large" and "DIFFEXP_DECODE_MEMORY_MB" in str(info.value)
    assert check_file(big, max_pixels=10**7, max_bytes=32 * MB, as_mask=False) == FileCheck(2048, 2048)

    broken = tmp_path / "broken.dcm"
    broken.write_bytes(padded.read_bytes()[:-200])
    with pytest.raises(PixelsError) as info:
        check_file(broken, max_pixels=10**6, max_bytes=32 * MB, as_mask=False)
    assert info.value.kind == "unreadable"


def test_a_deflated_dicom_of_zeros_is_refused_after_its_first_megabytes(tmp_path: Path) -> None:
    """A deflated dataset of zeros is no DICOM dataset: refused at its first bytes."""
    import zlib

    from app.pixels import _dicom_meta_end

    plain = write_deflated_dicom(tmp_path / "d.dcm", ramp(8, 8))
    end = _dicom_meta_end(plain)
    assert end is not None
    comp = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    zeros = tmp_path / "zeros.dcm"
    zeros.write_bytes(plain.read_bytes()[: end[0]] + comp.compress(bytes(64 * MB)) + comp.flush())
    with pytest.raises(PixelsError) as info:
        check_file(zeros, max_pixels=10**6, max_bytes=128 * MB, as_mask=False)
    assert info.value.kind == "unreadable" and "not a DICOM dataset" in str(info.value)


def test_a_gzipped_nifti_is_inflated_up_to_the_budget(tmp_path: Path) -> None:
    bomb = write_nifti_bomb(tmp_path / "bomb.nii.gz", disc_mask(8, 8), extension=24 * MB)
    assert bomb.stat().st_size < 200_000
    with pytest.raises(PixelsError) as info:
        check_file(bomb, max_pixels=10**6, max_bytes=16 * MB, as_mask=True)
    assert info.value.kind == "decode_too_large"
    assert check_file(bomb, max_pixels=10**6, max_bytes=32 * MB, as_mask=True) == FileCheck(8, 8)
    # bytes past what the header says a reader needs are never inflated, so cost nothing
    import gzip

    plain = write_nifti(tmp_path / "m.nii", disc_mask(8, 8)).read_bytes()
    trailing = tmp_path / "trailing.nii.gz"
    trailing.write_bytes(gzip.compress(plain + bytes(64 * MB), compresslevel=1))
    assert check_file(trailing, max_pixels=10**6, max_bytes=MB, as_mask=True) == FileCheck(8, 8)


def test_decoded_and_file_sizes_are_checked_before_decoding(tmp_path: Path) -> None:
    """Pixels x bytes a pixel (PIL keeps RGB in 4 bytes) from the header, and the file's own size."""
    rgb = tmp_path / "rgb.png"
    Image.fromarray(np.zeros((1500, 1500, 3), np.uint8)).save(rgb)  # 9 MB decoded, 7 KB on disk
    grey_png = tmp_path / "grey.png"
    Image.fromarray(np.zeros((1500, 1500), np.uint8)).save(grey_png)  # 2.25 MB decoded
    with pytest.raises(PixelsError) as info:
        check_file(rgb, max_pixels=10**7, max_bytes=8 * MB, as_mask=False)
    assert info.value.kind == "decode_too_large" and "1500x1500 pixels in mode RGB" in str(info.value)
    assert check_file(grey_png, max_pixels=10**7, max_bytes=8 * MB, as_mask=False) == FileCheck(1500, 1500)
    dcm = write_dicom(tmp_path / "big.dcm", np.zeros((1024, 1024), np.uint16))  # 2 MB file + 2 MB array
    with pytest.raises(PixelsError) as info:
        check_file(dcm, max_pixels=10**7, max_bytes=3 * MB, as_mask=False)
    assert info.value.kind == "decode_too_large"
    nii = write_nifti(tmp_path / "big.nii.gz", np.zeros((1024, 1024), np.float64))  # 8 MB of voxels
    with pytest.raises(PixelsError) as info:
        check_file(nii, max_pixels=10**7, max_bytes=6 * MB, as_mask=False)
    assert info.value.kind == "decode_too_large"
    with pytest.raises(PixelsError) as info:
        check_file(grey_png, max_pixels=10**7, max_bytes=1000, as_mask=False)  # the file is larger
    assert info.value.kind == "decode_too_large" and "the file is" in str(info.value)


def test_check_file_refuses_what_read_grey_refuses(tmp_path: Path) -> None:
    frames = [Image.fromarray(np.full((8, 8), v, np.uint8)) for v in (1, 2, 3)]
    frames[0].save(tmp_path / "a.tif", save_all=True, append_images=frames[1:])
    write_dicom(tmp_path / "b.dcm", ramp(8, 8), frames=2)
    write_nifti(tmp_path / "c.nii", np.zeros((8, 8, 4), np.int16))
    for name in ("a.tif", "b.dcm", "c.nii"):
        with pytest.raises(PixelsError) as info:
            check_file(tmp_path / name, max_pixels=10**6, max_bytes=MB, as_mask=False)
        assert info.value.kind == "not_2d", name
    claim = tmp_path / "claim.png"
    claim.write_bytes(png_claiming(50_000, 50_000))
    with pytest.raises(PixelsError) as info:
        check_file(claim, max_pixels=25_000_000, max_bytes=100 * MB, as_mask=False)
    assert info.value.kind == "too_many_pixels"
    for fmt in ("png", "dcm", "nii.gz"):
        path = tmp_path / f"t.{fmt}"
        if fmt == "png":
            Image.fromarray((ramp(64, 64) % 256).astype(np.uint8)).save(path)
        elif fmt == "dcm":
            write_dicom(path, ramp(64, 64))
        else:
            write_nifti(path, ramp(64, 64).astype(np.int16))
        data = path.read_bytes()
        path.write_bytes(data[: len(data) * 2 // 3])
        with pytest.raises(PixelsError) as info:
            check_file(path, max_pixels=10**6, max_bytes=MB, as_mask=True)
        assert info.value.kind == "unreadable", fmt
