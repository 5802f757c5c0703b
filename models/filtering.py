"""Stage IV: score synthetic pairs with a clean segmenter and keep those whose Dice loss is ≤ η.

Layout ``[B, 1, H, W]`` throughout. Dice loss with no smoothing term:

    loss = 1 - 2 Σ p·m / (Σ p + Σ m)

K-class masks: the filter's argmax is compared with the mask class by class, and a pair's loss is
the mean of the K - 1 foreground classes' Dice losses (``class_dice_losses``). A class absent from
both counts as agreement (0); a class the mask has and the prediction lost counts 1, so the pair is
scored, not skipped.

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


def class_dice_losses(pred: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Dice loss of each foreground class ``[B, K-1]`` between label maps ``pred`` and ``labels`` ``[B, 1, H, W]``."""
    return torch.stack(
        [dice_loss((pred == k).float(), (labels == k).float()) for k in range(1, num_classes)], dim=1
    )


def _labels_of(masks: torch.Tensor) -> torch.Tensor:
    """Label maps of encoded masks ``[B, C, H, W]``: C = 1 is a -1/+1 (or 0/1) binary mask."""
    return (masks > 0).long() if masks.shape[1] == 1 else masks.argmax(dim=1, keepdim=True)


def empty_masks(masks: torch.Tensor) -> torch.Tensor:
    """``[B]`` True where an encoded mask ``[B, C, ...]`` (-1/+1 or 0/1; one-hot for K classes) has no foreground pixel."""
    return ~(_labels_of(masks) > 0).flatten(1).any(dim=1)


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
def score_pairs_by_class(
    filter_net: torch.nn.Module, images: torch.Tensor, masks: torch.Tensor
) -> torch.Tensor:
    """Dice loss per foreground class ``[B, K-1]`` of the filter on ``images`` against encoded ``masks``
    (binary: ``[B, 1]``, the thresholded prediction against the -1/+1 mask)."""
    logits = filter_net(images)
    if masks.shape[1] == 1:
        pred = (torch.sigmoid(logits) > 0.5).float()
        return dice_loss(pred, (masks > 0).float())[:, None]
    return class_dice_losses(logits.argmax(dim=1, keepdim=True), _labels_of(masks), masks.shape[1])


@torch.no_grad()
def score_pairs(filter_net: torch.nn.Module, images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Stage IV's Dice loss ``[B]``: the filter's prediction on ``images`` against encoded ``masks``,
    averaged over the foreground classes (one for a binary mask)."""
    return score_pairs_by_class(filter_net, images, masks).mean(dim=1)
