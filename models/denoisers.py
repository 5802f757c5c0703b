"""Noise predictors of Stage III as small wrappers (k-diffusion's style): each is a callable
``eps(x_t, t, sigma_t) -> ε̂`` that ``models.sampling.solve`` drives, and each composes with the next.

- ``MaskDenoiser``: ε(x_t, y1 = mask), the mask channel zeros (phase 1).
- ``ImageDenoiser``: classifier-free ε_∅ + w_cf (ε_m − ε_∅) for given masks (phase 2); one network
  call on the doubled batch, or the conditional branch alone at w_cf = 1.
- ``ClassifierGuided``: wraps either and adds −w_cg · σ_t · ∇ₓ log p(y | x_t) from the noisy segmenter
  (Eq. 3); the only gradient taken while sampling.

The networks are whatever modules the caller passes: eager, ``torch.compile``d, or another device's.
A wrapper's conditions are per sample (``[B, ...]``), so ``rows(index)`` gives the wrapper for a
subset of the batch when the sampler regroups samples part-way (early rejection).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Protocol

import torch

from models.guidance import GuidanceMode, classifier_free, classifier_guided, guidance_log_prob
from models.networks import Condition

EpsFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class Denoiser(Protocol):
    def __call__(self, x: torch.Tensor, t: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor: ...

    def rows(self, index: torch.Tensor) -> Denoiser: ...


def _labels(like: torch.Tensor, condition: Condition) -> torch.Tensor:
    return torch.full((like.shape[0],), int(condition), device=like.device, dtype=torch.long)


@dataclass(frozen=True)
class MaskDenoiser:
    """ε(x_t, y1 = mask): phase 1 has no condition but y1."""

    dpm: Any  # a UNet2DModel, or its torch.compile'd wrapper

    def __call__(self, x: torch.Tensor, t: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        out = self.dpm(torch.cat([x, torch.zeros_like(x)], dim=1), t, class_labels=_labels(x, Condition.MASK))
        return out.sample

    def rows(self, index: torch.Tensor) -> MaskDenoiser:
        return self


@dataclass(frozen=True)
class ImageDenoiser:
    """ε_∅ + w_cf (ε_m − ε_∅) for -1/+1 ``masks`` ``[B, 1, H, W]`` (w_cf = 1: ε_m alone)."""

    dpm: Any  # a UNet2DModel, or its torch.compile'd wrapper
    masks: torch.Tensor
    w_cf: float

    def __call__(self, x: torch.Tensor, t: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        cond = _labels(x, Condition.IMAGE_GIVEN_MASK)
        if self.w_cf == 1.0:  # the unconditional branch would be multiplied by zero
            out = self.dpm(torch.cat([x, self.masks], dim=1), t, class_labels=cond)
            return out.sample
        both = torch.cat(
            [torch.cat([x, self.masks], dim=1), torch.cat([x, torch.zeros_like(self.masks)], dim=1)]
        )
        labels = torch.cat([cond, _labels(x, Condition.IMAGE_UNCOND)])
        eps = self.dpm(both, t.repeat(2), class_labels=labels).sample
        return classifier_free(eps[b:], eps[:b], self.w_cf)

    def rows(self, index: torch.Tensor) -> ImageDenoiser:
        return replace(self, masks=self.masks[index])


@dataclass(frozen=True)
class ClassifierGuided:
    """``inner``'s ε̂ − w_cg · σ_t · ∇ₓ [log p(y1 | x_t) (+ log p(y2 = mask | x_t))] (Eq. 3, Lemma 2).

    ``mask01`` ({0, 1}, ``[B, 1, H, W]``) adds the mask term (phase 2); ``want_image`` picks y1.
    """

    inner: Denoiser
    segmenter: Any  # a NoisySegmenter, or its torch.compile'd wrapper
    w_cg: float
    want_image: bool
    mode: GuidanceMode
    strength: float
    mask01: torch.Tensor | None = None

    def grad(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            x_in = x.detach().requires_grad_(True)
            out = self.segmenter(x_in, t)
            log_p = guidance_log_prob(
                out.y1_logit,
                out.mask_logits,
                want_image=self.want_image,
                mask=self.mask01,
                mode=self.mode,
                strength=self.strength,
            )
            (grad,) = torch.autograd.grad(log_p.sum(), x_in)
        return grad

    def __call__(self, x: torch.Tensor, t: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return classifier_guided(self.inner(x, t, sigma), self.grad(x, t), sigma, self.w_cg)

    def rows(self, index: torch.Tensor) -> ClassifierGuided:
        mask01 = None if self.mask01 is None else self.mask01[index]
        return replace(self, inner=self.inner.rows(index), mask01=mask01)
