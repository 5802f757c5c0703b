"""Stage IV: score synthetic pairs with a clean segmenter and keep those whose Dice loss is ≤ η.

Layout ``[B, 1, H, W]`` throughout. Dice loss with no smoothing term:

    loss = 1 - 2 Σ p·m / (Σ p + Σ m)

Empty-mask rule: when prediction and mask are both empty the pair agrees perfectly (loss 0);
when exactly one is empty the loss is 1. A synthetic pair whose mask is all background never
passes Stage IV, whatever its loss, unless the bundle's training data had empty masks
(``bundle.json`` ``data.empty_masks`` > 0): guidance pushed to its limits yields black images with
empty masks that the filter, predicting nothing, scores as a perfect match.
"""

from __future__ import annotations

import torch

from app.params import DEFAULT_ETA as DEFAULT_ETA  # the paper's threshold, defined with the other ranges


def dice_loss(pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-sample Dice loss ``[B]`` of ``pred`` (probabilities or 0/1) against a 0/1 ``mask``."""
    if pred.shape != mask.shape:
        raise ValueError(f"pred and mask shapes differ: {tuple(pred.shape)} vs {tuple(mask.shape)}")
    if pred.dim() < 2:
        raise ValueError(f"expected [B, ...] tensors, got shape {tuple(pred.shape)}")
    p = pred.flatten(1).double()
    m = mask.flatten(1).double()
    inter = (p * m).sum(dim=1)
    denom = p.sum(dim=1) + m.sum(dim=1)
    safe = torch.where(denom > 0, denom, torch.ones_like(denom))
    loss = torch.where(denom > 0, 1.0 - 2.0 * inter / safe, torch.zeros_like(denom))
    return loss.to(pred.dtype if pred.is_floating_point() else torch.float32)


def dice_score(pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-sample Dice coefficient ``[B]`` (1 - dice_loss), same empty-mask rule."""
    return 1.0 - dice_loss(pred, mask)


def empty_masks(masks: torch.Tensor) -> torch.Tensor:
    """``[B]`` True where a -1/+1 (or 0/1) mask ``[B, ...]`` has no foreground pixel."""
    return ~(masks > 0).flatten(1).any(dim=1)


def keep(
    loss: torch.Tensor, eta: float, *, empty: torch.Tensor | None = None, allow_empty: bool = False
) -> torch.Tensor:
    """The Stage IV rule: keep a pair when its Dice loss is at most η (boundary kept) and, unless
    ``allow_empty``, its mask is not empty (``empty``, from ``empty_masks``)."""
    if not 0.0 < eta <= 1.0:
        raise ValueError(f"eta must be in (0, 1], got {eta}")
    kept = loss <= eta
    if empty is not None and not allow_empty:
        kept = kept & ~empty.to(kept.device)
    return kept


@torch.no_grad()
def score_pairs(filter_net: torch.nn.Module, images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Dice loss ``[B]`` of the filter's thresholded prediction on ``images`` against -1/+1 ``masks``."""
    pred = (torch.sigmoid(filter_net(images)) > 0.5).float()
    return dice_loss(pred, (masks > 0).float())
