"""K-class masks: the label encoding, the softmax guidance (exact against autograd), Stage IV per class."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from models.filtering import class_dice_losses, empty_masks, score_pairs, score_pairs_by_class
from models.guidance import (
    GuidanceMode,
    categorical_log_prob,
    categorical_log_prob_grad,
    guidance_log_prob,
    mask_log_prob,
    sharpened_log_prob,
)
from models.labels import decode, encode, infer_num_classes, mask_channels, mask_to_uint8, snap


def _labels(k: int, seed: int = 0, shape: tuple[int, ...] = (3, 1, 5, 6)) -> torch.Tensor:
    return torch.randint(0, k, shape, generator=torch.Generator().manual_seed(seed))


def test_binary_encoding_is_the_single_minus_one_plus_one_channel() -> None:
    labels = _labels(2)
    x = encode(labels, 2)
    assert mask_channels(2) == 1 and x.shape == labels.shape
    assert torch.equal(x, torch.where(labels > 0, 1.0, -1.0))
    assert torch.equal(decode(x, 2), labels)
    assert mask_to_uint8(labels.numpy(), 2).max() == 255  # binary masks are still written 0/255


@pytest.mark.parametrize("k", [3, 4])
def test_k_class_encoding_is_one_hot_in_minus_one_plus_one_and_round_trips(k: int) -> None:
    labels = _labels(k)
    x = encode(labels, k)
    assert x.shape == (3, k, 5, 6) and set(x.unique().tolist()) == {-1.0, 1.0}
    assert torch.equal((x > 0).sum(dim=1), torch.ones(3, 5, 6, dtype=torch.long))  # one class per pixel
    assert torch.equal(decode(x, k), labels)
    noisy = x + 0.3 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    assert torch.equal(snap(noisy, k), encode(decode(noisy, k), k))
    assert set(np.unique(mask_to_uint8(labels.numpy(), k)).tolist()) <= set(
        range(k)
    )  # label values, not 0/255
    with pytest.raises(ValueError, match="labels must be in 0..2"):
        encode(torch.full((1, 1, 2, 2), 3), 3)


@pytest.mark.parametrize(
    ("levels", "k"),
    [({0, 255}, 2), ({0, 1}, 2), ({0, 128, 255}, 2), ({0, 1, 2}, 3), ({0, 1, 2, 3}, 4), (set(range(256)), 2)],
)
def test_the_number_of_classes_is_inferred_from_the_mask_values(levels: set[int], k: int) -> None:
    assert infer_num_classes(levels) == k


@pytest.mark.parametrize("k", [3, 4])
@pytest.mark.parametrize("tau", [0.3, 1.0, 2.5])
def test_softmax_log_prob_gradient_in_closed_form_equals_autograd(k: int, tau: float) -> None:
    g = torch.Generator().manual_seed(k * 10 + int(tau * 10))
    logits = (3 * torch.randn(2, k, 4, 4, generator=g, dtype=torch.float64)).requires_grad_(True)
    target = encode(_labels(k, seed=k, shape=(2, 1, 4, 4)), k).gt(0).double()
    (auto,) = torch.autograd.grad(categorical_log_prob(logits, target, tau).sum(), logits)
    assert torch.allclose(categorical_log_prob_grad(logits.detach(), target, tau), auto, atol=1e-12, rtol=0)
    # every logit gets gradient, not only the target's: the full softmax, whatever Lemma 3's ordering
    assert (auto.abs() > 0).all()


@pytest.mark.parametrize("k", [3, 4])
def test_temperature_and_scale_modes_for_k_classes(k: int) -> None:
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, k, 3, 3, generator=g, dtype=torch.float64)
    target = encode(_labels(k, seed=5, shape=(2, 1, 3, 3)), k).gt(0).double()
    tau = mask_log_prob(logits, target, GuidanceMode.TAU, 0.5)
    by_hand = (target * torch.log_softmax(logits / 0.5, dim=1)).sum(dim=(1, 2, 3))
    assert torch.allclose(tau, by_hand)
    scale = mask_log_prob(logits, target, GuidanceMode.SCALE, 2.0)
    assert torch.allclose(scale, 2.0 * (target * torch.log_softmax(logits, dim=1)).sum(dim=(1, 2, 3)))
    assert torch.allclose(
        mask_log_prob(logits, target, "tau", 1.0), mask_log_prob(logits, target, "scale", 1.0)
    )


def test_one_channel_mask_term_is_still_bernoulli() -> None:
    logits = torch.randn(2, 1, 3, 3, generator=torch.Generator().manual_seed(0))
    target = (torch.rand(2, 1, 3, 3, generator=torch.Generator().manual_seed(1)) > 0.5).float()
    expected = sharpened_log_prob(logits, target, "tau", 0.7).flatten(1).sum(dim=1)
    assert torch.equal(mask_log_prob(logits, target, "tau", 0.7), expected)


@pytest.mark.parametrize("k", [3, 4])
def test_guidance_gradient_through_a_k_class_segmenter_is_the_exact_chain_rule(k: int) -> None:
    """The gradient sampling uses (autograd through f_ψ) equals J^T of the closed-form logit gradient."""
    from models.denoisers import ClassifierGuided, MaskDenoiser
    from models.networks import NoisySegmenter

    torch.manual_seed(0)
    seg = NoisySegmenter(sample_size=16, block_out_channels=(8, 16), head_features=4, num_classes=k).double()
    seg.requires_grad_(False)
    x = torch.randn(2, k, 16, 16, dtype=torch.float64)
    t = torch.tensor([500, 500])
    mask01 = encode(_labels(k, seed=2, shape=(2, 1, 16, 16)), k).gt(0).double()
    tau = 0.5
    guided = ClassifierGuided(MaskDenoiser(None), seg, 1.0, True, GuidanceMode.TAU, tau, mask01)
    grad = guided.grad(x, t)

    x_in = x.clone().requires_grad_(True)
    out = seg(x_in, t)
    d_mask = categorical_log_prob_grad(out.mask_logits.detach(), mask01, tau)
    d_y1 = torch.sigmoid(-out.y1_logit.detach() / tau) / tau  # ∂/∂z log σ(z/τ)
    (expected,) = torch.autograd.grad([out.mask_logits, out.y1_logit], x_in, grad_outputs=[d_mask, d_y1])
    assert torch.allclose(grad, expected, atol=1e-10, rtol=1e-8)
    total = guidance_log_prob(
        out.y1_logit, out.mask_logits, want_image=True, mask=mask01, mode="tau", strength=tau
    )
    assert total.shape == (2,)


def test_class_dice_losses_score_a_lost_class_as_one_and_an_absent_class_as_agreement() -> None:
    labels = torch.zeros(1, 1, 4, 4, dtype=torch.long)
    labels[..., :2, :2] = 1
    labels[..., 2:, 2:] = 2
    pred = labels.clone()
    pred[..., 2:, 2:] = 0  # class 2 lost
    losses = class_dice_losses(pred, labels, 4)  # class 3: in neither
    assert losses.tolist() == [[0.0, 1.0, 0.0]]
    half = labels.clone()
    half[..., 0, :2] = 0  # class 1: 2 of 4 pixels
    assert class_dice_losses(half, labels, 3)[0, 0].item() == pytest.approx(1 - 2 * 2 / (2 + 4))


class _Fixed(torch.nn.Module):
    """A 'filter' that predicts fixed logits, to score pairs exactly."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = logits

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.logits


def test_stage_iv_scores_the_mean_over_foreground_classes() -> None:
    labels = torch.zeros(2, 1, 4, 4, dtype=torch.long)
    labels[:, :, :2, :2] = 1
    labels[:, :, 2:, 2:] = 2
    masks = encode(labels, 3)
    pred = labels.clone()
    pred[1, :, 2:, 2:] = 0  # the second pair's prediction loses class 2
    logits = encode(pred, 3) * 5
    by_class = score_pairs_by_class(_Fixed(logits), torch.zeros(2, 1, 4, 4), masks)
    assert by_class.tolist() == [[0.0, 0.0], [0.0, 1.0]]
    assert score_pairs(_Fixed(logits), torch.zeros(2, 1, 4, 4), masks).tolist() == [0.0, 0.5]
    assert empty_masks(masks).tolist() == [False, False]
    assert empty_masks(encode(torch.zeros(1, 1, 4, 4, dtype=torch.long), 3)).tolist() == [True]


def test_the_binary_demo_bundle_makes_the_same_pairs_as_before_multiclass_support() -> None:
    """Pairs 0-1 of seed 13 at 3 steps, saved by the code before K-class support (commit 83e96a8).

    Bit-identical on the machine that saved them; other CPUs may round a few pixels differently,
    so the comparison allows what kernel rounding can do and no more.
    """
    from models.bundle import Bundle
    from models.expand import generate_pairs

    golden = np.load(Path(__file__).parent / "golden" / "demo-binary-seed13.npz")
    bundle = Bundle.load(Path(__file__).parents[2] / "models" / "bundles" / "cxr-lung-64")
    assert bundle.num_classes == 2 and "num_classes" not in bundle.meta
    params = bundle.default_params().updated(steps=3)
    pairs = list(generate_pairs(bundle, [0, 1], seed=13, params=params, eta=1.0, batch_size=2))
    masks = np.stack([p.mask for p in pairs])
    images = np.stack([p.image for p in pairs]).astype(float)
    assert set(np.unique(masks).tolist()) <= {0, 255}
    assert (masks == golden["masks"]).mean() > 0.995
    assert np.abs(images - golden["images"]).mean() < 0.5
    assert np.allclose([p.dice_loss for p in pairs], golden["losses"], atol=0.02)


def test_num_classes_errors_name_the_file_and_the_value(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from models.cli import app
    from tests.utils.tiny import make_multiclass_dataset, make_shapes_dataset

    runner = CliRunner()
    binary = make_shapes_dataset(tmp_path / "binary", n=4, size=16)
    res = runner.invoke(app, ["train-filter", str(binary), "--out", str(tmp_path / "b1"), "--num-classes", "3",
                              "--train-steps", "1"])  # fmt: skip
    assert res.exit_code == 2 and "mask value 255" in res.output and "shape000.png" in res.output
    res = runner.invoke(
        app, ["train-filter", str(binary), "--out", str(tmp_path / "b2"), "--num-classes", "1"]
    )
    assert res.exit_code == 2 and "--num-classes" in res.output
    three = make_multiclass_dataset(tmp_path / "three", n=4, size=16, classes=3)
    bundle = tmp_path / "b3"
    res = runner.invoke(app, ["train-filter", str(three), "--out", str(bundle), "--train-steps", "1",
                              "--resolution", "16"])  # fmt: skip
    assert res.exit_code == 0, res.output
    assert json.loads((bundle / "bundle.json").read_text())["num_classes"] == 3  # inferred
    res = runner.invoke(app, ["train-segmenter", str(three), "--out", str(bundle), "--num-classes", "4"])
    assert res.exit_code == 2 and "--num-classes 4 differs from the bundle's 3" in res.output
