"""Guidance math of Stage III (Eq. 3, Lemma 3) as pure functions.

Conventions: the segmenter's head gives a logit z for "x_t is an image" (y1 = 1); its per-pixel
logits are those of the mask (y2). For y1 and binary masks the probabilities are Bernoulli,
p(y=1) = sigmoid(z / τ); for K-class masks each pixel's K logits are a softmax, p_τ(k) =
softmax(z / τ)_k, the form Lemma 3 is stated in.

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


def categorical_log_prob(logits: torch.Tensor, target: torch.Tensor, tau: float = 1.0) -> torch.Tensor:
    """Per-pixel log p_τ(target | logits) = Σ_k target_k · log softmax(z/τ)_k for ``[B, K, ...]``
    logits and one-hot ``target`` over dim 1; returns ``[B, ...]``."""
    if tau <= 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    return (target * torch.log_softmax(logits / tau, dim=1)).sum(dim=1)


def categorical_log_prob_grad(logits: torch.Tensor, target: torch.Tensor, tau: float = 1.0) -> torch.Tensor:
    """∂/∂z of ``categorical_log_prob`` in closed form: (target − softmax(z/τ)) / τ, for one-hot target.

    The whole gradient over all K logits, not only the target's (Lemma 3 compares the target's
    component alone); sampling takes it by autograd, and tests check the two agree for K = 3, 4.
    """
    return (target - torch.softmax(logits / tau, dim=1)) / tau


def mask_log_prob(
    logits: torch.Tensor, target: torch.Tensor, mode: GuidanceMode | str, strength: float
) -> torch.Tensor:
    """Per-sample log p(y2 = mask | x_t) ``[B]``: the sum over pixels, sharpened by ``mode``/``strength``.

    One logit channel: Bernoulli, with ``target`` in {0, 1}. K channels: softmax over them, with a
    one-hot ``target``; mode ``tau`` divides the logits by τ, mode ``scale`` multiplies log p by s.
    """
    if logits.shape[1] == 1:
        return sharpened_log_prob(logits, target, mode, strength).flatten(1).sum(dim=1)
    mode = GuidanceMode(mode)
    if strength <= 0:
        raise ValueError(f"guidance strength ({'tau' if mode is GuidanceMode.TAU else 's'}) must be > 0")
    if mode is GuidanceMode.TAU:
        per_pixel = categorical_log_prob(logits, target, tau=strength)
    else:
        per_pixel = strength * categorical_log_prob(logits, target, tau=1.0)
    return per_pixel.flatten(1).sum(dim=1)


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

    ``mask`` is the phase-1 mask in {0, 1} (one channel, or K one-hot channels); its term is the sum
    of per-pixel log-likelihoods (``mask_log_prob``).
    """
    target = torch.full_like(y1_logit, 1.0 if want_image else 0.0)
    total = sharpened_log_prob(y1_logit, target, mode, strength)
    if mask is not None:
        if mask_logits is None:
            raise ValueError("a mask term needs the segmenter's mask logits")
        total = total + mask_log_prob(mask_logits, mask, mode, strength)
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
