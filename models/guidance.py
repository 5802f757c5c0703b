"""Guidance math of Stage III (Eq. 3, Lemma 3) as pure functions.

Conventions: the segmenter's head gives a logit z for "x_t is an image" (y1 = 1); its per-pixel
logits are those of the mask (y2). Probabilities are Bernoulli: p(y=1) = sigmoid(z / τ).

Two ways to sharpen the classifier (``GuidanceMode``):
- ``tau`` (the paper): log p_τ(y|x) = log sigmoid(±z/τ), a proper distribution for every τ.
- ``scale`` (Dhariwal & Nichol, kept for Fig. 2's comparison): s · log sigmoid(±z).
At τ = s = 1 both are the same function. Lemma 3 compares their gradients for s = 1/τ.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from app.params import GuidanceMode as GuidanceMode  # the one definition, shared with the API


def bernoulli_log_prob(logits: torch.Tensor, target: torch.Tensor, tau: float = 1.0) -> torch.Tensor:
    """Elementwise log p_τ(target | logits) = t·log σ(z/τ) + (1-t)·log σ(-z/τ); target in {0, 1}."""
    if tau <= 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    z = logits / tau
    return target * F.logsigmoid(z) + (1.0 - target) * F.logsigmoid(-z)


def sharpened_log_prob(
    logits: torch.Tensor, target: torch.Tensor, mode: GuidanceMode | str, strength: float
) -> torch.Tensor:
    """log p_τ (mode ``tau``, strength = τ) or s · log p (mode ``scale``, strength = s), elementwise."""
    mode = GuidanceMode(mode)
    if strength <= 0:
        raise ValueError(f"guidance strength ({'tau' if mode is GuidanceMode.TAU else 's'}) must be > 0")
    if mode is GuidanceMode.TAU:
        return bernoulli_log_prob(logits, target, tau=strength)
    return strength * bernoulli_log_prob(logits, target, tau=1.0)


def guidance_log_prob(
    y1_logit: torch.Tensor,
    mask_logits: torch.Tensor | None,
    *,
    want_image: bool,
    mask: torch.Tensor | None,
    mode: GuidanceMode | str,
    strength: float,
) -> torch.Tensor:
    """Per-sample log p(y1 | x_t) [+ log p(y2 = mask | x_t, y1)], shape ``[B]`` (Lemma 2's sum).

    ``mask`` is the phase-1 mask in {0, 1}; its term is the sum of per-pixel log-likelihoods.
    """
    target = torch.full_like(y1_logit, 1.0 if want_image else 0.0)
    total = sharpened_log_prob(y1_logit, target, mode, strength)
    if mask is not None:
        if mask_logits is None:
            raise ValueError("a mask term needs the segmenter's mask logits")
        total = total + sharpened_log_prob(mask_logits, mask, mode, strength).flatten(1).sum(dim=1)
    return total


def classifier_free(eps_uncond: torch.Tensor, eps_cond: torch.Tensor, w_cf: float) -> torch.Tensor:
    """ε_∅ + w_cf (ε_m - ε_∅): w_cf = 1 is the conditional model alone, 0 the unconditional one."""
    return eps_uncond + w_cf * (eps_cond - eps_uncond)


def classifier_guided(
    eps: torch.Tensor, grad_log_prob: torch.Tensor, sigma: torch.Tensor, w_cg: float
) -> torch.Tensor:
    """ε̂ = ε - w_cg · σ_t · ∇ₓ log p(y | x_t): the score of p(x|y) written as a noise prediction."""
    return eps - w_cg * sigma * grad_log_prob


def lemma3_gradient_factors(
    logits: torch.Tensor, index: int, tau: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """∂/∂y_i of s·log softmax(y)_i and of log softmax(y/τ)_i with s = 1/τ (Lemma 3, Eqs. 6-7).

    Returns ``(s·(1 - p_i), (1/τ)·(1 - p_i^τ))`` for logits ``[..., C]``.
    """
    s = 1.0 / tau
    p = torch.softmax(logits, dim=-1)[..., index]
    p_tau = torch.softmax(logits / tau, dim=-1)[..., index]
    return s * (1.0 - p), s * (1.0 - p_tau)


def lemma3_pivot(logits: torch.Tensor, index: int) -> torch.Tensor:
    """The value y_m with Σ_j (y_m - y_j) e^(y_m - y_j) = 0 (Lemma 3), found by bisection.

    The paper claims the scale gradient's magnitude is at least the temperature gradient's when
    y_i ≥ y_m, and at most when y_i ≤ y_m (for s = 1/τ ≥ 1).
    """
    del index  # y_m depends on the logits only; kept for a signature parallel to the factors
    lo = logits.min(dim=-1).values.clone()
    hi = logits.max(dim=-1).values.clone()
    for _ in range(100):
        mid = (lo + hi) / 2
        d = mid.unsqueeze(-1) - logits
        g = (d * torch.exp(d)).sum(dim=-1)
        lo = torch.where(g < 0, mid, lo)
        hi = torch.where(g < 0, hi, mid)
    return (lo + hi) / 2
