"""examples/lung_labels.py: binary lung masks split into 0 background, 1 left lung (image right), 2 right."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from examples.lung_labels import LEFT, RIGHT, main, split_lungs
from tests.utils.tiny import make_multiclass_dataset

CXR_MINI = Path(__file__).resolve().parents[2] / "examples" / "cxr-mini"


def ellipse(size: int, cx: float, cy: float, rx: float, ry: float) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size]
    return ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 < 1


def lungs(size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """(image-left blob, image-right blob): the patient's right and left lung."""
    return ellipse(size, 18, 32, 10, 22), ellipse(size, 46, 32, 10, 22)


def test_two_components_by_centroid_side() -> None:
    img_left, img_right = lungs()
    labels, case = split_lungs((img_left | img_right).astype(np.uint8) * 255)
    assert case == "two" and labels.dtype == np.uint8
    assert (labels[img_right] == LEFT).all() and (labels[img_left] == RIGHT).all()
    assert (labels[~(img_left | img_right)] == 0).all()


def test_merged_blob_is_cut_at_the_valley() -> None:
    img_left, img_right = lungs()
    bridge = np.zeros_like(img_left)
    bridge[30:34, 18:47] = True  # the lungs touch across the mediastinum
    labels, case = split_lungs(img_left | img_right | bridge)
    assert case == "merged"
    assert (labels[img_right] == LEFT).all() and (labels[img_left] == RIGHT).all()
    assert set(np.unique(labels[bridge])) == {LEFT, RIGHT}


def test_merged_blob_without_valley_is_cut_at_the_midline() -> None:
    mask = np.zeros((64, 64), dtype=bool)
    mask[10:50, 12:52] = True
    labels, case = split_lungs(mask)
    assert case == "merged-midline"
    assert (labels[10:50, 12:32] == RIGHT).all() and (labels[10:50, 32:52] == LEFT).all()


def test_fragments_go_to_the_side_of_their_centroid_and_specks_are_dropped() -> None:
    img_left, img_right = lungs()
    piece = ellipse(64, 56, 60, 4, 2)  # a detached costophrenic tip on the image right
    labels, case = split_lungs(img_left | img_right | piece)
    assert case == "fragments" and (labels[piece] == LEFT).all()

    speck = np.zeros_like(img_left)
    speck[2, 2] = True  # far under 0.5% of the foreground
    labels, case = split_lungs(img_left | img_right | speck)
    assert case == "specks" and labels[2, 2] == 0
    assert (labels[img_right] == LEFT).all() and (labels[img_left] == RIGHT).all()


def test_one_lung_in_stacked_pieces_stays_on_its_side() -> None:
    # two pieces one above the other are one lung in pieces, not a left and a right lung
    upper, lower = ellipse(64, 44, 18, 8, 8), ellipse(64, 46, 44, 9, 10)
    labels, case = split_lungs(upper | lower)
    assert case == "one-sided" and (labels[upper | lower] == LEFT).all()


def test_empty_mask_and_bad_shape() -> None:
    labels, case = split_lungs(np.zeros((16, 16), dtype=np.uint8))
    assert case == "empty" and not labels.any()
    with pytest.raises(ValueError, match="2D"):
        split_lungs(np.zeros((2, 16, 16)))


def test_multiclass_fixture_round_trips_through_split(tmp_path: Path) -> None:
    root = make_multiclass_dataset(tmp_path / "multi", n=3, size=32, classes=3)
    for path in sorted((root / "masks").glob("*.png")):
        truth = np.asarray(Image.open(path))
        assert set(np.unique(truth)) == {0, 1, 2}
        assert Image.open(root / "images" / path.name).size == (32, 32)
        labels, case = split_lungs(truth > 0)
        # the fixture's class 1 is the image-left ellipse, i.e. split_lungs's RIGHT
        assert case == "two"
        np.testing.assert_array_equal(labels, np.choose(truth, [0, RIGHT, LEFT]))


def test_cli_on_cxr_mini(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = shutil.copytree(CXR_MINI, tmp_path / "cxr-mini")
    dst = tmp_path / "cxr3"
    assert main([str(src), str(dst)]) == 0
    assert "6 of 6 pairs written" in capsys.readouterr().out
    names = sorted(p.name for p in (src / "masks").glob("*.png"))
    assert sorted(p.name for p in (dst / "masks").glob("*.png")) == names
    assert sorted(p.name for p in (dst / "images").glob("*.png")) == names
    cols = np.arange(256)[None, :]
    for name in names:
        labels = np.asarray(Image.open(dst / "masks" / name))
        assert labels.dtype == np.uint8 and set(np.unique(labels)) == {0, 1, 2}
        np.testing.assert_array_equal(labels > 0, np.asarray(Image.open(src / "masks" / name)) > 0)
        # label 1 (the patient's left lung) lies on the image right
        assert (cols * (labels == LEFT)).sum() / (labels == LEFT).sum() > 128
        assert (cols * (labels == RIGHT)).sum() / (labels == RIGHT).sum() < 128
    with open(dst / "pairs.csv", newline="") as f:
        assert sorted(r["name"] + ".png" for r in csv.DictReader(f)) == names
    source = (dst / "SOURCE.md").read_text()
    assert "| two | 6 |" in source and "IMAGE RIGHT" in source and "CC BY 4.0" in source


def test_cli_limit_size_and_bad_values(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dst = tmp_path / "small"
    assert main([str(CXR_MINI), str(dst), "--limit", "2", "--size", "32"]) == 0
    masks = sorted((dst / "masks").glob("*.png"))
    assert len(masks) == 2
    for path in masks:
        assert np.asarray(Image.open(path)).shape == (32, 32)
        assert Image.open(dst / "images" / path.name).size == (32, 32)
    capsys.readouterr()
    for argv, named in [
        ([str(CXR_MINI), str(dst)], str(dst)),  # not empty
        ([str(tmp_path / "nowhere"), str(tmp_path / "x")], "nowhere"),
        ([str(CXR_MINI), str(tmp_path / "x"), "--size", "0"], "--size"),
    ]:
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2 and named in capsys.readouterr().err
