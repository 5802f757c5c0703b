"""Exact math of Stage III guidance: closed forms, τ vs s, Lemma 3, the CFG combination."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from models.denoisers import ClassifierGuided, MaskDenoiser
from models.guidance import (
    GuidanceMode,
    bernoulli_log_prob,
    classifier_free,
    classifier_guided,
    guidance_log_prob,
    lemma3_gradient_factors,
    lemma3_pivot,
    sharpened_log_prob,
)
from models.networks import SegmenterOutput
from models.sampling import SamplingParams


class LinearSegmenter(nn.Module):
    """mask_logits = a·x + b per pixel; y1_logit = Σ w·x + c: gradients have closed forms."""

    def __init__(self, size: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.a = torch.randn(1, 1, size, size, generator=g, dtype=torch.float64)
        self.b = torch.randn(1, 1, size, size, generator=g, dtype=torch.float64)
        self.w = torch.randn(1, 1, size, size, generator=g, dtype=torch.float64)
        self.c = 0.3

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> SegmenterOutput:
        return SegmenterOutput(
            mask_logits=self.a * x + self.b, y1_logit=(self.w * x).flatten(1).sum(1) + self.c
        )


@pytest.mark.parametrize(
    "mode,strength", [("tau", 1.0), ("tau", 0.5), ("tau", 1 / 3), ("scale", 2.0), ("scale", 3.0)]
)
@pytest.mark.parametrize("want_image", [True, False])
def test_guidance_gradient_matches_closed_form(mode: str, strength: float, want_image: bool) -> None:
    seg = LinearSegmenter(4)
    x = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    mask01 = (
        (torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(1)) > 0).double()
        if want_image
        else None
    )
    params = SamplingParams(guidance=GuidanceMode(mode), tau=strength if mode == "tau" else 1.0,
                            scale=strength if mode == "scale" else None)  # fmt: skip
    guided = ClassifierGuided(
        MaskDenoiser(None), seg, 1.0, want_image, params.guidance, params.strength, mask01
    )
    grad = guided.grad(x, torch.zeros(3))

    tau, s = (strength, 1.0) if mode == "tau" else (1.0, strength)
    z = (seg.w * x).flatten(1).sum(1) + seg.c
    y1 = 1.0 if want_image else 0.0
    # d/dz [y log σ(z/τ) + (1-y) log σ(-z/τ)] = (y - σ(z/τ)) / τ
    expected = s * ((y1 - torch.sigmoid(z / tau)) / tau).view(-1, 1, 1, 1) * seg.w
    if mask01 is not None:
        logits = seg.a * x + seg.b
        expected = expected + s * (mask01 - torch.sigmoid(logits / tau)) / tau * seg.a
    torch.testing.assert_close(grad, expected, rtol=1e-10, atol=1e-12)


def test_tau_one_equals_scale_one() -> None:
    z = torch.randn(50, 1, 8, 8)
    m = (torch.rand(50, 1, 8, 8) > 0.5).float()
    torch.testing.assert_close(sharpened_log_prob(z, m, "tau", 1.0), sharpened_log_prob(z, m, "scale", 1.0))
    y1 = torch.randn(50)
    a = guidance_log_prob(y1, z, want_image=True, mask=m, mode="tau", strength=1.0)
    b = guidance_log_prob(y1, z, want_image=True, mask=m, mode="scale", strength=1.0)
    torch.testing.assert_close(a, b)


def test_temperature_keeps_a_distribution_and_scale_does_not() -> None:
    z = torch.linspace(-6, 6, 101)
    for tau in (1.0, 0.5, 1 / 3):
        total = (
            bernoulli_log_prob(z, torch.ones_like(z), tau).exp()
            + bernoulli_log_prob(z, torch.zeros_like(z), tau).exp()
        )
        torch.testing.assert_close(total, torch.ones_like(z))
    s_total = (sharpened_log_prob(z, torch.ones_like(z), "scale", 3.0).exp()
               + sharpened_log_prob(z, torch.zeros_like(z), "scale", 3.0).exp())  # fmt: skip
    assert (s_total < 1 - 1e-3).any()


@pytest.mark.parametrize("tau", [1.0, 0.5, 1 / 3, 0.1])
def test_lemma3_holds_for_sigmoid_logits(tau: float) -> None:
    """Lemma 3 with p = sigmoid = softmax([0, z]) (the case the method uses), on random logits."""
    z = torch.randn(20_000, dtype=torch.float64) * 4
    logits = torch.stack([torch.zeros_like(z), z], dim=1)
    f_scale, f_tau = lemma3_gradient_factors(logits, 1, tau)
    y_m = lemma3_pivot(logits, 1)
    above = z >= y_m
    assert bool((f_scale >= f_tau - 1e-12)[above].all())
    assert bool((f_scale <= f_tau + 1e-12)[~above].all())
    # and the pivot of [0, z] separates exactly at z = 0
    assert bool((above == (z >= 0)).all())


def test_lemma3_pivot_condition_is_not_sufficient_for_more_classes() -> None:
    """Documented finding: for softmax over C > 2 classes the paper's y_m condition can fail."""
    logits = torch.tensor([[2.0, 2.5, -3.0]], dtype=torch.float64)
    f_scale, f_tau = lemma3_gradient_factors(logits, 0, 0.5)
    assert logits[0, 0] >= lemma3_pivot(logits, 0)[0]
    assert f_scale[0] < f_tau[0]  # the claimed ≥ does not hold


@pytest.mark.parametrize(
    "u,c,w,expected",
    [
        (1.0, 3.0, 0.0, 1.0),  # unconditional only
        (1.0, 3.0, 1.0, 3.0),  # conditional only
        (1.0, 3.0, 2.0, 5.0),  # extrapolate past the conditional
        (-2.0, 2.0, 1.5, 4.0),
    ],
)
def test_classifier_free_combination(u: float, c: float, w: float, expected: float) -> None:
    out = classifier_free(torch.tensor([u]), torch.tensor([c]), w)
    torch.testing.assert_close(out, torch.tensor([expected]))


def test_classifier_guided_is_eps_minus_weighted_sigma_grad() -> None:
    eps, grad = torch.tensor([1.0, -1.0]), torch.tensor([2.0, 4.0])
    out = classifier_guided(eps, grad, torch.tensor(0.5), 3.0)
    torch.testing.assert_close(out, torch.tensor([1.0 - 3.0, -1.0 - 6.0]))


@pytest.mark.parametrize("bad", [0.0, -1.0])
def test_non_positive_strength_is_rejected(bad: float) -> None:
    with pytest.raises(ValueError, match="> 0"):
        sharpened_log_prob(torch.zeros(1), torch.zeros(1), "tau", bad)
    with pytest.raises(ValueError, match="tau"):
        SamplingParams(tau=bad)
