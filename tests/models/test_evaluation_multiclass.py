"""``evaluate`` on K-class masks: per-class test Dice (exact on hand-made label maps) and a tiny
K = 3 train → expand → evaluate run with per-class results."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from models import downstream
from models.cli import app
from models.data import PairDataset
from models.expand import GeneratedPair
from models.labels import encode
from models.memorisation import nearest_mask_dice
from models.synthetic import pairs_to_tensors
from tests.utils.tiny import make_multiclass_dataset, make_nonsquare_dataset

torch.set_num_threads(1)
runner = CliRunner()


class _Fixed(torch.nn.Module):
    """A 'segmenter' that predicts fixed logits, so the test Dice can be checked by hand."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = logits
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # test_dice reads the device from a parameter

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.logits[: len(image)]


def test_per_class_test_dice_on_hand_made_label_maps() -> None:
    truth = torch.zeros(3, 1, 4, 4, dtype=torch.long)
    truth[:, :, :2, :2] = 1  # class 1: 4 pixels in every image
    truth[0, :, 2:, 2:] = 2  # class 2: 4 pixels in image 0 only
    pred = truth.clone()
    pred[0, :, 3, 2:] = 0  # image 0: 2 of the 4 class-2 pixels found
    pred[2, :, 3, 3] = 2  # image 2: one class-2 pixel where the mask has none
    data = PairDataset(
        [f"p{i}" for i in range(3)], torch.zeros(3, 1, 4, 4), encode(truth, 3), 4, num_classes=3
    )
    model = _Fixed(encode(pred, 3) * 4)
    by_class = downstream.test_dice_by_class(model, data, batch_size=2)
    # image 0: class 2 Dice 2*2/(2+4); image 1: class 2 in neither (agreement, 1); image 2: 2*0/(1+0)
    assert by_class.shape == (3, 2)
    assert np.allclose(by_class, [[1.0, 2 / 3], [1.0, 1.0], [1.0, 0.0]], atol=1e-7, rtol=0)
    assert np.allclose(
        downstream.test_dice(model, data), by_class.mean(axis=1), atol=1e-6
    )  # mean foreground Dice

    binary = PairDataset(["a"], torch.zeros(1, 1, 4, 4), encode(truth[:1], 2), 4)
    half = torch.full((1, 1, 4, 4), -5.0)
    half[..., :2, :2] = 5.0  # 4 of the 8 foreground pixels
    assert downstream.test_dice_by_class(_Fixed(half), binary).tolist() == [[pytest.approx(2 * 4 / (4 + 8))]]


def test_k_class_synthetic_pairs_and_memorisation_use_label_maps() -> None:
    labels = np.zeros((4, 4), dtype=np.uint8)
    labels[:2, :2], labels[2:, 2:] = 1, 2
    pair = GeneratedPair(0, 0, np.zeros((4, 4), np.uint8), labels, 0.0, True, class_losses=[0.0, 0.0])
    _, masks = pairs_to_tensors([pair], 8, num_classes=3)  # enlarged nearest: labels kept
    assert masks.shape == (1, 3, 8, 8)
    assert torch.equal(
        masks.argmax(dim=1)[0],
        torch.from_numpy(labels).repeat_interleave(2, 0).repeat_interleave(2, 1).long(),
    )
    swapped = torch.from_numpy(np.where(labels > 0, 3 - labels, 0))[None, None]
    ref = encode(torch.from_numpy(labels)[None, None].long(), 3)
    # same foreground, classes swapped: no pixel has the same class, so the pooled Dice is 0
    assert nearest_mask_dice(encode(swapped.long(), 3), ref).tolist() == [0.0]
    assert nearest_mask_dice(ref, ref).tolist() == [1.0]


def test_evaluate_end_to_end_on_a_three_class_bundle(tmp_path: Path) -> None:
    data = make_multiclass_dataset(tmp_path / "data", n=10, size=16, classes=3)
    bundle = tmp_path / "bundle"
    res = runner.invoke(app, ["train", str(data), "--out", str(bundle), "--resolution", "16", "--train-steps", "4",
                              "--segmenter-steps", "2", "--filter-steps", "2", "--batch-size", "4",
                              "--device", "cpu"])  # fmt: skip
    assert res.exit_code == 0, res.output
    assert json.loads((bundle / "bundle.json").read_text())["num_classes"] == 3  # inferred from the masks

    expanded = tmp_path / "expanded"
    res = runner.invoke(app, ["expand", str(bundle), "--count", "2", "--out", str(expanded), "--steps", "2",
                              "--eta", "1", "--seed", "0", "--batch-size", "2", "--device", "cpu"])  # fmt: skip
    assert res.exit_code == 0, res.output
    for mask in sorted((expanded / "masks").iterdir()):
        assert set(np.unique(np.asarray(Image.open(mask))).tolist()) <= {0, 1, 2}

    out = tmp_path / "eval"
    res = runner.invoke(app, ["evaluate", str(bundle), str(data), "--out", str(out), "--n-synthetic", "2",
                              "--seeds", "0", "--steps", "2", "--batch-size", "4", "--sample-steps", "2",
                              "--variants", "cf", "--fewshot", "none", "--no-inception-fid",
                              "--device", "cpu"])  # fmt: skip
    assert res.exit_code == 0, res.output
    r = json.loads((out / "results.json").read_text())
    assert r["data"]["num_classes"] == 3
    for key in ("origin", "cf"):
        d = r["variants"][key]["downstream"]
        assert d["train_pairs"] == (8 if key == "origin" else 10)  # cf: real + synthetic
        by_class = d["dice_by_class"]
        assert set(by_class) == {"1", "2"} and all(0.0 <= c["mean"] <= 1.0 for c in by_class.values())
        # one seed: the mean foreground Dice is the mean of the two classes' Dice
        assert d["dice"]["mean"] == pytest.approx((by_class["1"]["mean"] + by_class["2"]["mean"]) / 2)
    md = (out / "results.md").read_text()
    assert "Per-class Dice" in md and "mean foreground Dice" in md
    assert any(line.startswith("| 2 | ") for line in md.splitlines())


def test_evaluate_end_to_end_on_a_nonsquare_bundle(tmp_path: Path) -> None:
    """32x20 pairs: trained padded to a square (aspect kept), expanded back to 32x20, then evaluated."""
    data = make_nonsquare_dataset(tmp_path / "data", n=10, width=32, height=20)
    bundle = tmp_path / "bundle"
    res = runner.invoke(app, ["train", str(data), "--out", str(bundle), "--resolution", "16", "--train-steps", "4",
                              "--segmenter-steps", "2", "--filter-steps", "2", "--batch-size", "4",
                              "--device", "cpu"])  # fmt: skip
    assert res.exit_code == 0, res.output
    meta = json.loads((bundle / "bundle.json").read_text())
    assert meta["data"]["shapes"] == {"32x20": 10} and "num_classes" not in meta  # binary, as before

    expanded = tmp_path / "expanded"
    res = runner.invoke(app, ["expand", str(bundle), "--count", "2", "--out", str(expanded), "--steps", "2",
                              "--eta", "1", "--seed", "0", "--batch-size", "2", "--size", "32x20",
                              "--device", "cpu"])  # fmt: skip
    assert res.exit_code == 0, res.output
    for image, mask in zip(
        sorted((expanded / "images").iterdir()), sorted((expanded / "masks").iterdir()), strict=True
    ):
        assert Image.open(image).size == Image.open(mask).size == (32, 20)
        assert set(np.unique(np.asarray(Image.open(mask))).tolist()) <= {0, 255}

    out = tmp_path / "eval"
    res = runner.invoke(app, ["evaluate", str(bundle), str(data), "--out", str(out), "--n-synthetic", "2",
                              "--seeds", "0", "--steps", "2", "--batch-size", "4", "--sample-steps", "2",
                              "--variants", "cf", "--fewshot", "none", "--no-inception-fid",
                              "--device", "cpu"])  # fmt: skip
    assert res.exit_code == 0, res.output
    r = json.loads((out / "results.json").read_text())
    assert r["variants"]["cf"]["downstream"]["train_pairs"] == 10  # 8 real + 2 synthetic
    assert 0.0 <= r["variants"]["cf"]["downstream"]["dice"]["mean"] <= 1.0
