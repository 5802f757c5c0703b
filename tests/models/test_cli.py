"""The CLI end to end on a handful of pairs, as a new user would run it, and its exit codes."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from models.cli import app
from tests.utils.tiny import make_nonsquare_dataset, make_unlabelled_images

runner = CliRunner()


@pytest.mark.slow
def test_train_then_expand_then_inspect(tmp_path: Path, shapes_dir: Path) -> None:
    bundle = tmp_path / "bundle"
    res = runner.invoke(app, ["train", str(shapes_dir), "--out", str(bundle), "--resolution", "16",
                              "--train-steps", "20", "--batch-size", "4", "--device", "cpu"])  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "filter held-out Dice" in res.output
    meta = json.loads((bundle / "bundle.json").read_text())
    assert meta["resolution"] == 16 and len(meta["split"]["test"]) == 2 and len(meta["split"]["train"]) == 6
    assert set(meta["training"]) == {"dpm", "segmenter", "filter"}
    assert meta["data"]["fingerprint"].startswith("sha256:")
    assert meta["data"]["empty_masks"] == 0  # Stage IV keeps no synthetic pair with an empty mask

    out = tmp_path / "expanded"
    res = runner.invoke(app, ["expand", str(bundle), "--count", "3", "--out", str(out), "--steps", "3",
                              "--eta", "1.0", "--seed", "7", "--batch-size", "2", "--keep-rejected"])  # fmt: skip
    assert res.exit_code == 0, res.output
    rows = list(csv.DictReader((out / "manifest.csv").open()))
    assert [r["index"] for r in rows] == ["0", "1", "2"]
    assert all(r["seed"] == "7" and r["kept"] == "1" and 0 <= float(r["dice_loss"]) <= 1 for r in rows)
    for r in rows:
        img = np.asarray(Image.open(out / "images" / f"{r['name']}.png"))
        mask = np.asarray(Image.open(out / "masks" / f"{r['name']}.png"))
        assert img.shape == mask.shape == (16, 16)
        assert set(np.unique(mask).tolist()) <= {0, 255}
    assert json.loads((out / "run.json").read_text())["seed"] == 7

    # a strict eta rejects, --keep-rejected writes the rejected pairs, exit 1 says the count was not reached
    strict = tmp_path / "strict"
    res = runner.invoke(app, ["expand", str(bundle), "--count", "1", "--out", str(strict), "--steps", "2",
                              "--eta", "0.001", "--max-attempts", "2", "--keep-rejected"])  # fmt: skip
    assert res.exit_code == 1
    assert len(list((strict / "rejected" / "images").iterdir())) == 2
    assert len(list(csv.DictReader((strict / "manifest.csv").open()))) == 2

    res = runner.invoke(app, ["inspect", str(bundle)])
    assert res.exit_code == 0 and '"resolution": 16' in res.output

    # the same output folder is never overwritten
    res = runner.invoke(app, ["expand", str(bundle), "--count", "1", "--out", str(out)])
    assert res.exit_code == 2 and "already holds a manifest.csv" in res.output


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--count", "0"], "--count"),
        (["--count", "2", "--eta", "1.5"], "--eta"),
        (["--count", "2", "--eta", "0"], "--eta"),
        (["--count", "2", "--tau", "0"], "--tau"),
        (["--count", "2", "--steps", "-3"], "--steps"),
        (["--count", "2", "--guidance", "magic"], "--guidance"),
        (["--count", "2", "--order", "4"], "--order"),
        (["--count", "2", "--w-cg", "-1"], "--w-cg"),
        (["--count", "2", "--device", "quantum"], "--device"),
        (["--count", "2", "--size", "256×192"], "256×192"),
        (["--count", "2", "--size", "0x10"], "0x10"),
    ],
)
def test_bad_expand_values_exit_2_naming_the_value(
    tmp_path: Path, tiny_bundle: Path, args: list[str], needle: str
) -> None:
    res = runner.invoke(app, ["expand", str(tiny_bundle), "--out", str(tmp_path / "o"), *args])
    assert res.exit_code == 2, res.output
    assert needle in res.output


def test_missing_bundle_and_bad_data_exit_2(tmp_path: Path) -> None:
    res = runner.invoke(app, ["expand", str(tmp_path / "nope"), "--count", "1", "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "not a bundle" in res.output
    (tmp_path / "data" / "images").mkdir(parents=True)
    res = runner.invoke(app, ["train", str(tmp_path / "data"), "--out", str(tmp_path / "b")])
    assert res.exit_code == 2 and "missing the 'masks/' folder" in res.output


def test_training_on_other_data_into_an_existing_bundle_is_refused(
    tmp_path: Path, tiny_bundle: Path, shapes_dir: Path
) -> None:
    import shutil

    bundle = tmp_path / "b"
    shutil.copytree(tiny_bundle, bundle)
    res = runner.invoke(app, ["train-filter", str(shapes_dir), "--out", str(bundle), "--train-steps", "1"])
    assert res.exit_code == 2 and "fingerprint differs" in res.output


def test_train_with_group_by_makes_a_group_aware_split(tmp_path: Path, shapes_dir: Path) -> None:
    bundle = tmp_path / "bundle"
    # shape000..shape003 are one "patient": they must land on one side of the split together
    res = runner.invoke(app, ["train-segmenter", str(shapes_dir), "--out", str(bundle), "--resolution", "16",
                              "--train-steps", "1", "--batch-size", "2", "--group-by", "^(shape00)[0-3]",
                              "--seed", "3", "--device", "cpu"])  # fmt: skip
    assert res.exit_code == 0, res.output
    split = json.loads((bundle / "bundle.json").read_text())["split"]
    assert split["grouping"] == {"by": "regex", "value": "^(shape00)[0-3]"}
    group = {f"shape00{i}" for i in range(4)}
    assert group <= set(split["train"]) or group <= set(split["test"])
    res = runner.invoke(app, ["train-segmenter", str(shapes_dir), "--out", str(tmp_path / "b2"),
                              "--group-by", "shape(", "--device", "cpu"])  # fmt: skip
    assert res.exit_code == 2 and "not a valid regular expression" in res.output


@pytest.mark.slow
def test_nonsquare_train_then_expand_with_size(tmp_path: Path) -> None:
    """32x24 pairs train at 16x16 (padded, aspect kept); --size 32x24 brings the outputs back to that shape."""
    data = make_nonsquare_dataset(tmp_path / "wide", n=6, width=32, height=24)
    bundle = tmp_path / "bundle"
    res = runner.invoke(app, ["train", str(data), "--out", str(bundle), "--resolution", "16",
                              "--train-steps", "4", "--batch-size", "4", "--device", "cpu"])  # fmt: skip
    assert res.exit_code == 0, res.output
    assert json.loads((bundle / "bundle.json").read_text())["data"]["shapes"] == {"32x24": 6}

    out = tmp_path / "expanded"
    res = runner.invoke(app, ["expand", str(bundle), "--count", "2", "--out", str(out), "--steps", "2",
                              "--eta", "1.0", "--seed", "7", "--batch-size", "2", "--size", "32x24",
                              "--no-early-reject"])  # fmt: skip
    assert res.exit_code == 0, res.output
    rows = list(csv.DictReader((out / "manifest.csv").open()))
    assert len(rows) == 2
    for r in rows:
        img = np.asarray(Image.open(out / "images" / f"{r['name']}.png"))
        mask = np.asarray(Image.open(out / "masks" / f"{r['name']}.png"))
        assert img.shape == mask.shape == (24, 32)  # H x W
        assert set(np.unique(mask).tolist()) <= {0, 255}
    assert json.loads((out / "run.json").read_text())["size"] == "32x24"


def test_train_dpm_with_unlabelled_images_counts_them_in_bundle_json_and_inspect(
    tmp_path: Path, shapes_dir: Path
) -> None:
    make_unlabelled_images(shapes_dir, n=5, size=32)
    bundle = tmp_path / "bundle"
    res = runner.invoke(app, ["train-dpm", str(shapes_dir), "--out", str(bundle), "--resolution", "16",
                              "--train-steps", "2", "--batch-size", "2", "--unlabelled-share", "0.3",
                              "--device", "cpu"])  # fmt: skip
    assert res.exit_code == 0, res.output
    meta = json.loads((bundle / "bundle.json").read_text())
    assert meta["data"]["unlabelled"] == 5 and meta["data"]["pairs"] == 8
    assert meta["training"]["dpm"]["unlabelled"] == 5 and meta["training"]["dpm"]["unlabelled_share"] == 0.3
    res = runner.invoke(app, ["inspect", str(bundle)])
    assert res.exit_code == 0, res.output
    shown = json.loads(res.output)
    assert shown["data"]["unlabelled"] == 5 and shown["training"]["dpm"]["unlabelled"] == 5
    assert shown["training_masks"] is True  # train_dpm wrote masks.npz
    res = runner.invoke(app, ["train-dpm", str(shapes_dir), "--out", str(tmp_path / "b2"),
                              "--unlabelled-share", "1"])  # fmt: skip
    assert res.exit_code == 2 and "--unlabelled-share" in res.output
    # a labelled pair's image again in unlabelled/ is refused, naming it
    (shapes_dir / "unlabelled" / "shape003.png").write_bytes(
        (shapes_dir / "images" / "shape003.png").read_bytes()
    )
    res = runner.invoke(app, ["train-dpm", str(shapes_dir), "--out", str(tmp_path / "b4"),
                              "--resolution", "16", "--train-steps", "1", "--device", "cpu"])  # fmt: skip
    assert res.exit_code == 2 and "shape003" in res.output and "labelled or unlabelled" in res.output
    (shapes_dir / "unlabelled" / "shape003.png").unlink()
    # an image in unlabelled/ that is no image is named
    (shapes_dir / "unlabelled" / "broken.png").write_bytes(b"not a png")
    res = runner.invoke(app, ["train-dpm", str(shapes_dir), "--out", str(tmp_path / "b3"),
                              "--resolution", "16", "--train-steps", "1", "--device", "cpu"])  # fmt: skip
    assert res.exit_code != 0 and "broken.png" in res.output


def test_expand_with_real_and_mixed_masks_writes_the_mask_source_column(
    tmp_path: Path, tiny_bundle: Path
) -> None:
    out = tmp_path / "real"
    res = runner.invoke(app, ["expand", str(tiny_bundle), "--count", "2", "--out", str(out), "--steps", "2",
                              "--eta", "1.0", "--seed", "5", "--batch-size", "2", "--mask-source", "real",
                              "--device", "cpu"])  # fmt: skip
    assert res.exit_code == 0, res.output
    rows = list(csv.DictReader((out / "manifest.csv").open()))
    train = set(json.loads((tiny_bundle / "bundle.json").read_text())["split"]["train"])
    assert rows and all(r["mask_source"].startswith("real:") and r["cleaned"] == "0" for r in rows)
    assert {r["mask_source"].removeprefix("real:") for r in rows} <= train  # training masks, never test ones
    assert json.loads((out / "run.json").read_text())["masks"]["source"] == "real"

    cleaned = tmp_path / "cleaned"
    res = runner.invoke(app, ["expand", str(tiny_bundle), "--count", "2", "--out", str(cleaned), "--steps", "2",
                              "--eta", "1.0", "--seed", "5", "--batch-size", "2", "--clean-masks",
                              "--device", "cpu"])  # fmt: skip
    assert res.exit_code == 0, res.output
    rows = list(csv.DictReader((cleaned / "manifest.csv").open()))
    assert all(r["mask_source"] == "generated" and r["cleaned"] == "1" for r in rows)

    import shutil

    old = tmp_path / "old"
    shutil.copytree(tiny_bundle, old)
    (old / "masks.npz").unlink()  # a bundle trained before masks.npz
    res = runner.invoke(app, ["expand", str(old), "--count", "1", "--out", str(tmp_path / "o"), "--steps", "2",
                              "--mask-source", "real", "--device", "cpu"])  # fmt: skip
    assert res.exit_code == 2 and "carries no training masks" in res.output

    res = runner.invoke(app, ["expand", str(tiny_bundle), "--count", "2", "--out", str(tmp_path / "x"),
                              "--real-share", "0.5"])  # fmt: skip
    assert res.exit_code == 2 and "--real-share" in res.output
    res = runner.invoke(app, ["expand", str(tiny_bundle), "--count", "2", "--out", str(tmp_path / "y"),
                              "--mask-source", "mixed", "--real-share", "2"])  # fmt: skip
    assert res.exit_code == 2 and "--real-share" in res.output
