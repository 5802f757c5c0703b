"""Loading image/mask folders: formats, resizing, binarisation, errors that name the file, the split."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from models.data import DatasetError, Split, find_pairs, load_folder, make_split


def write_pair(root: Path, name: str, image: Image.Image, mask: Image.Image, ext: str = ".png") -> None:
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    image.save(root / "images" / f"{name}{ext}")
    mask.save(root / "masks" / f"{name}{ext if ext != '.jpg' else '.png'}")


def square_mask(size: int = 32, lo: int = 8, hi: int = 24, value: int = 255) -> Image.Image:
    m = np.zeros((size, size), np.uint8)
    m[lo:hi, lo:hi] = value
    return Image.fromarray(m)


def test_loads_8bit_grey_to_minus_one_one(tmp_path: Path) -> None:
    img = np.full((32, 32), 255, np.uint8)
    img[:, :16] = 0
    write_pair(tmp_path, "a", Image.fromarray(img), square_mask())
    ds = load_folder(tmp_path, 16)
    assert ds.images.shape == (1, 1, 16, 16) and ds.masks.shape == (1, 1, 16, 16)
    assert ds.images.min() == -1.0 and ds.images.max() == 1.0
    assert set(ds.masks.unique().tolist()) == {-1.0, 1.0}
    # 8..24 of 32 is 4..12 of 16 after nearest resizing
    assert (ds.masks[0, 0, 4:12, 4:12] == 1).all() and ds.masks[0, 0].eq(1).sum() == 64


@pytest.mark.parametrize(
    "make_image",
    [
        lambda: Image.fromarray(
            np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8), "RGB"
        ),
        lambda: Image.fromarray(
            np.random.default_rng(0).integers(0, 255, (32, 32, 4), dtype=np.uint8), "RGBA"
        ),
        lambda: Image.fromarray(np.random.default_rng(0).integers(0, 4095, (32, 32), dtype=np.uint16)),
    ],
    ids=["rgb", "rgba", "16bit"],
)
def test_loads_colour_alpha_and_16bit_images(tmp_path: Path, make_image) -> None:  # type: ignore[no-untyped-def]
    write_pair(tmp_path, "a", make_image(), square_mask())
    ds = load_folder(tmp_path, 32)
    assert ds.images.shape == (1, 1, 32, 32)
    assert -1.0 <= float(ds.images.min()) and float(ds.images.max()) <= 1.0
    assert float(ds.images.max() - ds.images.min()) > 1.0  # real contrast survived


def test_16bit_is_min_max_scaled(tmp_path: Path) -> None:
    arr = np.full((32, 32), 1000, np.uint16)
    arr[:16] = 3000
    write_pair(tmp_path, "a", Image.fromarray(arr), square_mask())
    ds = load_folder(tmp_path, 32)
    assert float(ds.images.min()) == -1.0 and float(ds.images.max()) == 1.0


def test_jpeg_and_tiff_images(tmp_path: Path) -> None:
    img = Image.fromarray(np.random.default_rng(1).integers(0, 255, (32, 32), dtype=np.uint8))
    write_pair(tmp_path, "j", img, square_mask(), ext=".jpg")
    write_pair(tmp_path, "t", img, square_mask(), ext=".tif")
    ds = load_folder(tmp_path, 16)
    assert ds.names == ["j", "t"]


def test_binary_masks_saved_as_zero_one_and_mask_boundaries_kept(tmp_path: Path) -> None:
    write_pair(tmp_path, "a", Image.fromarray(np.zeros((32, 32), np.uint8)), square_mask(value=1))
    ds = load_folder(tmp_path, 32)
    assert int(ds.masks.eq(1).sum()) == 16 * 16


def test_area_filtering_when_shrinking(tmp_path: Path) -> None:
    img = np.zeros((32, 32), np.uint8)
    img[::2] = 255  # stripes average to grey under area filtering, not to black or white
    write_pair(tmp_path, "a", Image.fromarray(img), square_mask())
    ds = load_folder(tmp_path, 16)
    np.testing.assert_allclose(ds.images.numpy(), 0.0, atol=1e-5)


@pytest.mark.parametrize(
    "setup,message",
    [
        ("missing_mask", "missing mask"),
        ("unreadable", "unreadable image file"),
        ("size_mismatch", "size mismatch"),
        ("no_foreground", "mask with no foreground"),
        ("empty", "empty folder"),
        ("no_masks_dir", "missing the 'masks/' folder"),
    ],
)
def test_errors_name_the_file_and_the_problem(tmp_path: Path, setup: str, message: str) -> None:
    grey = Image.fromarray(np.zeros((32, 32), np.uint8))
    if setup == "empty":
        (tmp_path / "images").mkdir()
        (tmp_path / "masks").mkdir()
        culprit = "images"
    elif setup == "no_masks_dir":
        (tmp_path / "images").mkdir()
        culprit = str(tmp_path)
    else:
        write_pair(tmp_path, "ok", grey, square_mask())
        write_pair(tmp_path, "bad", grey, square_mask())
        culprit = "bad"
        if setup == "missing_mask":
            (tmp_path / "masks" / "bad.png").unlink()
        elif setup == "unreadable":
            (tmp_path / "images" / "bad.png").write_bytes(b"not a png")
        elif setup == "size_mismatch":
            square_mask(size=40).save(tmp_path / "masks" / "bad.png")
        elif setup == "no_foreground":
            square_mask(value=0).save(tmp_path / "masks" / "bad.png")
    with pytest.raises(DatasetError, match=message) as info:
        load_folder(tmp_path, 16)
    assert culprit in str(info.value)


def test_split_is_seeded_disjoint_and_complete() -> None:
    names = [f"n{i}" for i in range(50)]
    a = make_split(names, test_fraction=0.2, seed=7)
    b = make_split(list(reversed(names)), test_fraction=0.2, seed=7)
    assert a == b
    assert len(a.test) == 10 and not set(a.train) & set(a.test)
    assert sorted(a.train + a.test) == sorted(names)
    assert make_split(names, test_fraction=0.2, seed=8).test != a.test


def test_fingerprint_changes_with_content(tmp_path: Path) -> None:
    grey = Image.fromarray(np.zeros((32, 32), np.uint8))
    write_pair(tmp_path, "a", grey, square_mask())
    f1 = load_folder(tmp_path, 16).fingerprint
    assert f1 == load_folder(tmp_path, 16).fingerprint
    square_mask(lo=4).save(tmp_path / "masks" / "a.png")
    assert load_folder(tmp_path, 16).fingerprint != f1


def test_loads_the_bundled_chest_xray_example() -> None:
    root = Path(__file__).resolve().parents[2] / "examples" / "cxr-mini"
    ds = load_folder(root, 32)
    assert len(ds) == 6 and ds.images.shape == (6, 1, 32, 32)
    foreground = ds.masks.eq(1).float().mean(dim=(1, 2, 3))
    assert bool(((foreground > 0.1) & (foreground < 0.6)).all())  # two lungs, not the whole film


def test_group_aware_split_never_straddles_a_group(tmp_path: Path) -> None:
    from models.data import groups_from_regex, groups_straddling, pair_groups

    names = [f"fig{i // 3}-{'abc'[i % 3]}" for i in range(30)] + [f"single{i}" for i in range(10)]
    groups = groups_from_regex(names, r"^(fig\d+)-[a-c]$")
    assert groups["fig2-b"] == "fig2" and groups["single3"] == "single3"  # no match: its own group
    split = make_split(
        names, test_fraction=0.2, seed=1, groups=groups, grouping={"by": "regex", "value": "x"}
    )
    assert not groups_straddling(split, groups) and len(split.test) == 8
    assert sorted(split.train + split.test) == sorted(names)
    assert split == make_split(list(reversed(names)), test_fraction=0.2, seed=1, groups=groups,
                               grouping={"by": "regex", "value": "x"})  # fmt: skip
    plain = make_split(names, test_fraction=0.2, seed=1)
    assert groups_straddling(plain, groups)  # what the grouping prevents
    assert Split.from_dict(split.to_dict()) == split and split.to_dict()["grouping"] == {
        "by": "regex",
        "value": "x",
    }
    with pytest.raises(ValueError, match="not a valid regular expression"):
        groups_from_regex(names, "fig(")
    with pytest.raises(ValueError, match="one group holds every pair"):
        make_split(names, test_fraction=0.2, seed=0, groups=dict.fromkeys(names, "all"))
    # a pairs.csv 'group' column is used without any option; a missing row is an error naming it
    (tmp_path / "pairs.csv").write_text("name,group\n" + "".join(f"{n},{groups[n]}\n" for n in names))
    g, info = pair_groups(tmp_path, names)
    assert g == groups and info == {"by": "column", "value": "group"}
    with pytest.raises(DatasetError, match="no row for 1 pairs"):
        pair_groups(tmp_path, [*names, "stray"])
    assert pair_groups(tmp_path / "none", names) == (None, None)


def test_an_orphan_mask_is_an_error_naming_every_orphan(tmp_path: Path) -> None:
    """A mask without an image used to be skipped silently: the pair count shrank with no word."""
    grey = Image.fromarray(np.zeros((32, 32), np.uint8))
    for name in ("a", "b"):
        write_pair(tmp_path, name, grey, square_mask())
    square_mask().save(tmp_path / "masks" / "lost1.png")
    square_mask().save(tmp_path / "masks" / "lost2.png")
    with pytest.raises(DatasetError) as info:
        load_folder(tmp_path, 16)
    message = str(info.value)
    assert "masks/lost1.png" in message and "masks/lost2.png" in message and "orphan mask" in message
    # with an image without a mask too, both kinds are named in one error
    grey.save(tmp_path / "images" / "alone.png")
    with pytest.raises(DatasetError) as info:
        find_pairs(tmp_path)
    message = str(info.value)
    assert "masks/lost1.png" in message and "images/alone.png" in message and "missing mask" in message


# ---- DICOM and NIfTI through MONAI's readers agree with the API's torch-free readers (app.pixels)


def _medical_files(root: Path) -> dict[str, tuple[Path, bool]]:
    from tests.utils.medical import disc_mask, ramp, write_dicom, write_nifti

    raw = ramp()
    signed = (raw.astype(np.int32) - 2000).astype(np.int16)
    return {
        "dicom-rescale-window": (
            write_dicom(root / "a.dcm", raw, slope=2, intercept=-1024, center=40, width=400),
            True,
        ),
        "dicom-plain": (write_dicom(root / "b.dcm", raw), True),
        "dicom-monochrome1-windows": (
            write_dicom(root / "c.dcm", raw, center=[900, 50], width=[1200, 10], photometric="MONOCHROME1"),
            True,
        ),
        "dicom-signed": (write_dicom(root / "d.dcm", signed, slope=0.5, intercept=3), True),
        "dicom-mask": (write_dicom(root / "e.dcm", disc_mask(label=2), center=1, width=2), False),
        "nifti-scaled": (write_nifti(root / "f.nii", raw.astype(np.int16), slope=0.5, inter=10), True),
        "nifti-gz": (write_nifti(root / "g.nii.gz", signed), True),
        "nifti-float-mask": (write_nifti(root / "h.nii.gz", disc_mask().astype(np.float32)), False),
    }


def test_monai_readers_agree_with_the_api_readers_on_every_pixel(tmp_path: Path) -> None:
    from app import pixels
    from models.data import read_grey

    for case, (path, as_image) in _medical_files(tmp_path).items():
        ours, api = read_grey(path, as_image=as_image), pixels.read_grey(path, as_image=as_image)
        assert ours.values.shape == api.values.shape, case
        np.testing.assert_array_equal(ours.values, api.values, err_msg=case)
        assert (ours.lo, ours.hi, ours.full) == (api.lo, api.hi, api.full), case
        np.testing.assert_array_equal(pixels.to_unit(ours), pixels.to_unit(api), err_msg=case)


def test_loads_dicom_images_with_nifti_label_map_masks(tmp_path: Path) -> None:
    """Label maps (0, 1, 2) read as three classes; read as binary (``num_classes=2``) they are
    foreground wherever the label is above 0 (they used to be binarised at half of 255, which left them empty)."""
    from tests.utils.medical import disc_mask, write_dicom, write_nifti

    gradient = np.tile(np.linspace(0, 1600, 32), (32, 1)).astype(np.uint16)  # -100..1500 after the intercept
    for i in range(2):
        write_dicom(
            tmp_path / "images" / f"p{i}.dcm", gradient, slope=1, intercept=-100, center=500, width=800
        )
        labels = disc_mask(32, 32, 1) + (disc_mask(32, 32, 1) * (np.arange(32)[None, :] > 16))
        write_nifti(tmp_path / "masks" / f"p{i}.nii.gz", labels.astype(np.uint8))
    ds = load_folder(tmp_path, 16, num_classes=2)
    assert ds.names == ["p0", "p1"] and ds.images.shape == (2, 1, 16, 16)
    full = Image.fromarray((disc_mask(32, 32, 1) * 255).astype(np.uint8)).resize(
        (16, 16), Image.Resampling.NEAREST
    )
    assert ds.masks[0, 0].eq(1).numpy().tolist() == (np.asarray(full) > 0).tolist()  # labels 1 and 2 alike
    three = load_folder(tmp_path, 16)  # K inferred from the values 0, 1, 2
    assert three.num_classes == 3 and three.masks.shape == (2, 3, 16, 16)
    assert three.labels.unique().tolist() == [0, 1, 2]
    assert (three.labels[0, 0] > 0).numpy().tolist() == (np.asarray(full) > 0).tolist()
    assert float(ds.images.min()) == -1.0 and float(ds.images.max()) == 1.0  # the window clips both ends


def test_unlabelled_folder_is_read_beside_the_pairs(tmp_path: Path) -> None:
    from models.data import find_unlabelled, load_unlabelled
    from tests.utils.tiny import make_shapes_dataset, make_unlabelled_images

    make_shapes_dataset(tmp_path, n=4, size=32)
    assert find_unlabelled(tmp_path) == [] and load_unlabelled(tmp_path, 16)[1].shape == (0, 1, 16, 16)
    make_unlabelled_images(tmp_path, n=3, size=32)
    names, images = load_unlabelled(tmp_path, 16)
    assert names == ["extra000", "extra001", "extra002"]
    assert images.shape == (3, 1, 16, 16) and images.min() >= -1 and images.max() <= 1
    assert len(load_folder(tmp_path, 16)) == 4  # the pairs are unchanged by the extra folder
    # an image in images/ without its mask stays an error: unlabelled images are explicit
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(tmp_path / "images" / "alone.png")
    with pytest.raises(DatasetError, match="missing mask"):
        load_folder(tmp_path, 16)
