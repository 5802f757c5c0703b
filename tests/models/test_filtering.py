"""Dice loss and the Stage IV keep rule: hand-computed tables, empty masks, η boundaries."""

from __future__ import annotations

import pytest
import torch

from models.bundle import Bundle
from models.data import PairDataset
from models.filtering import dice_loss, dice_score, empty_masks, keep, score_pairs

# rows: pred (2x2), mask (2x2), expected loss = 1 - 2|P∩M| / (|P| + |M|)
TEST_CASES = [
    ([[1, 1], [0, 0]], [[1, 1], [0, 0]], 0.0),  # identical
    ([[1, 0], [0, 0]], [[0, 1], [0, 0]], 1.0),  # disjoint
    ([[1, 1], [0, 0]], [[1, 0], [0, 0]], 1 - 2 * 1 / 3),  # 2/3 Dice
    ([[1, 1], [1, 1]], [[1, 0], [0, 0]], 1 - 2 * 1 / 5),
    ([[0, 0], [0, 0]], [[0, 0], [0, 0]], 0.0),  # both empty: perfect agreement
    ([[0, 0], [0, 0]], [[1, 0], [0, 0]], 1.0),  # empty prediction
    ([[1, 0], [0, 0]], [[0, 0], [0, 0]], 1.0),  # empty mask
    ([[0.5, 0.5], [0, 0]], [[1, 1], [0, 0]], 1 - 2 * 1 / 3),  # soft predictions
]


@pytest.mark.parametrize("pred,mask,expected", TEST_CASES)
def test_dice_loss_table(pred: list[list[float]], mask: list[list[float]], expected: float) -> None:
    p = torch.tensor(pred, dtype=torch.float32).view(1, 1, 2, 2)
    m = torch.tensor(mask, dtype=torch.float32).view(1, 1, 2, 2)
    torch.testing.assert_close(dice_loss(p, m), torch.tensor([expected]), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(dice_score(p, m), torch.tensor([1 - expected]), rtol=1e-6, atol=1e-7)


def test_dice_loss_is_per_sample() -> None:
    p = torch.tensor([[[[1.0, 1.0], [0.0, 0.0]]], [[[0.0, 0.0], [0.0, 0.0]]]])
    m = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]], [[[0.0, 0.0], [0.0, 0.0]]]])
    torch.testing.assert_close(dice_loss(p, m), torch.tensor([1 / 3, 0.0]))


def test_dice_loss_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match="shapes differ"):
        dice_loss(torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 3))
    with pytest.raises(ValueError, match=r"\[B, \.\.\.\]"):
        dice_loss(torch.zeros(4), torch.zeros(4))


@pytest.mark.parametrize(
    "loss,eta,kept",
    [
        (0.0, 0.065, True),
        (0.065, 0.065, True),  # the boundary is kept ("discard above η")
        (0.0650001, 0.065, False),
        (0.5, 1.0, True),
        (1.0, 1.0, True),
        (0.2, 0.1, False),
    ],
)
def test_keep_rule(loss: float, eta: float, kept: bool) -> None:
    assert bool(keep(torch.tensor([loss], dtype=torch.float64), eta)[0]) is kept


@pytest.mark.parametrize("eta", [0.0, -0.1, 1.5])
def test_keep_rejects_eta_outside_unit_interval(eta: float) -> None:
    with pytest.raises(ValueError, match="eta"):
        keep(torch.zeros(1), eta)


def test_an_empty_synthetic_mask_never_passes_unless_the_training_data_had_some() -> None:
    """A black image with an empty mask: the filter predicts nothing, Dice loss 0, yet no pair."""
    masks = -torch.ones(3, 1, 4, 4)  # -1/+1 masks as sampled: pair 0 and 2 all background
    masks[1, 0, 1, 1] = 1.0
    empty = empty_masks(masks)
    assert empty.tolist() == [True, False, True]
    black = -torch.ones(3, 1, 4, 4)
    loss = score_pairs(ThresholdFilter(), black, masks)
    assert loss.tolist() == [0.0, 1.0, 0.0]  # both empty: a perfect score
    assert keep(loss, 1.0, empty=empty).tolist() == [False, True, False]
    assert keep(loss, 1.0, empty=empty, allow_empty=True).tolist() == [True, True, True]
    assert keep(loss, 1.0).tolist() == [True, True, True]  # without masks: the loss rule alone


def test_bundles_allow_empty_masks_only_when_their_data_had_some() -> None:
    images = torch.zeros(3, 1, 4, 4)
    masks = -torch.ones(3, 1, 4, 4)
    masks[0, 0, 0, 0] = 1.0
    assert PairDataset(["a", "b", "c"], images, masks, 4).empty_masks == 2
    assert PairDataset(["a"], images[:1], masks[:1], 4).empty_masks == 0

    def bundle(meta: dict[str, object]) -> Bundle:
        return Bundle(path=None, meta=meta, dpm=None, segmenter=None, filter=None)  # type: ignore[arg-type]

    assert not bundle({}).allows_empty_masks  # bundles trained before the count was recorded
    assert not bundle({"data": {"pairs": 3, "empty_masks": 0}}).allows_empty_masks
    assert bundle({"data": {"pairs": 3, "empty_masks": 2}}).allows_empty_masks


class ThresholdFilter(torch.nn.Module):
    """Predicts foreground wherever the image is bright: a filter whose answers are known."""

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return (image - 0.0) * 100


def test_score_pairs_uses_thresholded_filter_prediction() -> None:
    image = torch.tensor([[[[1.0, 1.0], [-1.0, -1.0]]], [[[1.0, -1.0], [-1.0, -1.0]]]])
    mask = torch.tensor([[[[1.0, 1.0], [-1.0, -1.0]]], [[[1.0, 1.0], [-1.0, -1.0]]]])
    torch.testing.assert_close(score_pairs(ThresholdFilter(), image, mask), torch.tensor([0.0, 1 / 3]))
