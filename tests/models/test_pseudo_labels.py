"""Pseudo-labels (the semi-supervised baseline) and the real-pair equivalence: pure rules, checked exactly."""

from __future__ import annotations

import pytest
import torch

from models.fewshot import equivalence
from models.pseudo_labels import predict_labels, select_confident


class Constant(torch.nn.Module):
    """A 'segmenter' whose logits are given: lets the confidence rule be checked by hand."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = logits
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits[: len(x)]


def test_binary_pseudo_labels_and_confidence() -> None:
    logits = torch.zeros(2, 1, 2, 2)
    logits[0] = torch.tensor([[4.0, -4.0], [4.0, -4.0]])  # sure everywhere
    logits[1] = torch.tensor([[0.1, -0.1], [4.0, -4.0]])  # unsure on the top row
    masks, conf = predict_labels(Constant(logits), torch.zeros(2, 1, 2, 2), 2)
    assert masks[0, 0].tolist() == [[1.0, -1.0], [1.0, -1.0]]
    s4, s01 = float(torch.sigmoid(torch.tensor(4.0))), float(torch.sigmoid(torch.tensor(0.1)))
    assert conf[0] == pytest.approx(s4) and conf[1] == pytest.approx((2 * s01 + 2 * s4) / 4)


def test_k_class_pseudo_labels_are_one_hot_argmax() -> None:
    logits = torch.zeros(1, 3, 1, 2)
    logits[0, 2, 0, 0] = 5.0
    logits[0, 1, 0, 1] = 5.0
    masks, conf = predict_labels(Constant(logits), torch.zeros(1, 1, 1, 2), 3)
    assert masks.shape == (1, 3, 1, 2)
    assert masks[0, :, 0, 0].tolist() == [-1.0, -1.0, 1.0] and masks[0, :, 0, 1].tolist() == [-1.0, 1.0, -1.0]
    top = float(torch.softmax(torch.tensor([0.0, 0.0, 5.0]), 0)[2])
    assert conf[0] == pytest.approx(top)


def test_select_confident_keeps_the_n_surest_above_the_floor() -> None:
    conf = torch.tensor([0.95, 0.80, 0.99, 0.95, 0.91])
    assert select_confident(conf, 3) == [2, 0, 3]  # ties by row
    assert select_confident(conf, 10) == [2, 0, 3, 4]  # 0.80 is below the 0.9 floor
    assert select_confident(conf, 10, min_confidence=0.99) == [2]


def test_equivalence_is_the_ratio_of_gains_and_undefined_without_a_ceiling() -> None:
    assert equivalence({"mean": 0.006}, {"mean": 0.009}) == pytest.approx(2 / 3)
    assert equivalence({"mean": -0.003}, {"mean": 0.01}) == pytest.approx(-0.3)
    assert equivalence({"mean": 0.006}, {"mean": 0.0}) is None
    assert equivalence(None, {"mean": 0.01}) is None and equivalence({"mean": 0.01}, None) is None
