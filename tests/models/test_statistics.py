from __future__ import annotations

import numpy as np
import pytest
import torch

from models.augment import Augmenter, AugmentRecipe
from models.memorisation import memorisation_report, nearest_image_ssim, nearest_mask_dice
from models.statistics import paired_difference, summarise


def test_summarise_uses_the_sample_std() -> None:
    s = summarise([0.8, 0.9, 1.0])
    assert s["mean"] == pytest.approx(0.9) and s["std"] == pytest.approx(0.1)
    assert summarise([0.5])["std"] == 0.0


def test_paired_difference_averages_runs_per_image_then_bootstraps_images() -> None:
    ref = np.array([[0.5, 0.6, 0.7, 0.8], [0.5, 0.6, 0.7, 0.8]])
    row = ref + 0.05  # every image gains exactly 0.05: the interval collapses on it
    p = paired_difference(row, ref)
    assert p["mean"] == pytest.approx(0.05) and p["ci_low"] == pytest.approx(0.05)
    assert p["ci_high"] == pytest.approx(0.05) and p["images_better"] == 4
    # runs are averaged before differencing: 2 row runs against 3 reference runs
    row2 = np.array([[1.0, 0.0], [0.0, 1.0]])
    ref2 = np.array([[0.5, 0.5], [0.4, 0.6], [0.6, 0.4]])
    assert paired_difference(row2, ref2)["mean"] == pytest.approx(0.0)
    noisy = paired_difference(ref + np.array([0.1, -0.1, 0.2, -0.05]), ref, resamples=4000)
    assert noisy["ci_low"] < noisy["mean"] < noisy["ci_high"]
    assert noisy["mean"] == pytest.approx(0.0375)
    with pytest.raises(ValueError, match="different test sets"):
        paired_difference(np.zeros((1, 3)), np.zeros((1, 4)))


def _disc(cx: float, r: float, size: int = 16) -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    return torch.where((xx - cx) ** 2 + (yy - 8) ** 2 < r**2, 1.0, -1.0)[None]


def test_nearest_mask_dice_finds_copies_and_computes_dice_exactly() -> None:
    train = torch.stack([_disc(5, 3), _disc(10, 4)])
    query = torch.stack([_disc(10, 4), torch.where(torch.arange(256).view(1, 16, 16) < 128, 1.0, -1.0)])
    best = nearest_mask_dice(query, train)
    assert best[0] == pytest.approx(1.0)  # a copy of a training mask
    q, t = (query[1] > 0).float().flatten(), (train > 0).float().flatten(1)
    expected = max(float(2 * (q * ti).sum() / (q.sum() + ti.sum())) for ti in t)
    assert best[1] == pytest.approx(expected)


def test_memorisation_report_puts_copies_above_the_threshold() -> None:
    g = torch.Generator().manual_seed(0)
    train_i = torch.rand(4, 1, 16, 16, generator=g) * 2 - 1
    train_m = torch.stack([_disc(4 + 2 * i, 3) for i in range(4)])
    copies_i, copies_m = train_i[:2].clone(), train_m[:2].clone()
    real_i = torch.rand(3, 1, 16, 16, generator=g) * 2 - 1
    real_m = torch.stack([_disc(8, 6)] * 3)
    rep = memorisation_report(copies_i, copies_m, real_i, real_m, train_i, train_m)
    assert rep["synthetic_share_over_0.95"] == 1.0 and rep["real_share_over_0.95"] == 0.0
    assert nearest_image_ssim(copies_i, train_i) == pytest.approx([1.0, 1.0], abs=1e-5)
    assert rep["real_image_ssim"]["mean"] < 0.5


def test_augmentation_moves_image_and_mask_together_and_keeps_masks_binary() -> None:
    mask = torch.stack([_disc(6 + i, 4) for i in range(4)])
    image = mask * 0.8  # the image is the mask: any misalignment after augmentation shows
    aug = Augmenter(AugmentRecipe(intensity=False), 16)
    xi, xm = aug.batch(image, mask, seed=3)
    assert set(xm.unique().tolist()) <= {-1.0, 1.0}
    agree = ((xi > 0) == (xm > 0)).float().mean()
    assert agree > 0.95
    again = aug.batch(image, mask, seed=3)
    assert torch.equal(again[0], xi) and torch.equal(again[1], xm)
    assert not torch.equal(aug.batch(image, mask, seed=4)[1], xm)
    # without flips, a disc on the left stays on the left half after many draws
    left = torch.stack([_disc(3, 2)] * 8)
    _, moved = Augmenter(AugmentRecipe(), 16).batch(left * 0.5, left, seed=0)
    assert float((moved[..., 10:] > 0).sum()) == 0.0
