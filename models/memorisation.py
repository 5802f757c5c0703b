"""Does the generator copy its training set? Nearest-training-pair similarity of synthetic pairs.

For every synthetic pair: the Dice of its mask to the *nearest* training mask and the SSIM of its
image to the nearest training image. The same numbers for real held-out pairs against the same
training pairs are the reference: real anatomy is similar from patient to patient, so a synthetic
set is only suspicious where it sits closer to the training set than unseen real pairs do.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from monai.metrics import SSIMMetric

COPY_THRESHOLD = 0.95


def _foreground(masks: torch.Tensor) -> torch.Tensor:
    """Encoded masks as flat 0/1 foreground: the -1/+1 channel, or the K - 1 one-hot foreground channels."""
    return (masks > 0 if masks.shape[1] == 1 else masks[:, 1:] > 0).flatten(1).float()


def nearest_mask_dice(query: torch.Tensor, reference: torch.Tensor, chunk: int = 256) -> np.ndarray:
    """For each query mask ``[N, C, R, R]`` (encoded: -1/+1, or K one-hot channels), its highest Dice
    against any reference mask ``[M, C, R, R]``.

    K classes: the foreground channels are pooled, so the overlap counts pixels where both masks
    have the *same* foreground class (a left lung drawn where the other has the right one does not count)."""
    q = _foreground(query)
    r = _foreground(reference)
    r_sum = r.sum(dim=1)
    best = []
    for i in range(0, len(q), chunk):
        qc = q[i : i + chunk]
        inter = qc @ r.T
        denom = qc.sum(dim=1, keepdim=True) + r_sum[None, :]
        dice = torch.where(denom > 0, 2 * inter / denom.clamp(min=1), torch.ones_like(denom))
        best.append(dice.max(dim=1).values)
    return torch.cat(best).double().numpy() if best else np.zeros(0)


def nearest_image_ssim(query: torch.Tensor, reference: torch.Tensor) -> np.ndarray:
    """For each query image ``[N, 1, R, R]`` in [-1, 1], its highest SSIM (MONAI, Gaussian 11x11, σ 1.5) to a reference image."""
    metric = SSIMMetric(spatial_dims=2, data_range=2.0)
    ref = reference.float()
    out = np.zeros(len(query))
    for i, img in enumerate(query.float()):
        tiled = img[None].expand(len(ref), -1, -1, -1)
        out[i] = float(metric(tiled, ref).max())
    return out


def histogram(values: np.ndarray, bins: int = 20) -> dict[str, list[float]]:
    counts, edges = np.histogram(values, bins=bins, range=(0.0, 1.0))
    return {"edges": [round(float(e), 3) for e in edges], "counts": [int(c) for c in counts]}


def memorisation_report(
    synthetic_images: torch.Tensor,
    synthetic_masks: torch.Tensor,
    real_images: torch.Tensor,
    real_masks: torch.Tensor,
    train_images: torch.Tensor,
    train_masks: torch.Tensor,
) -> dict[str, Any]:
    """Nearest-training-pair figures of synthetic pairs beside real held-out pairs (the reference)."""
    syn_dice = nearest_mask_dice(synthetic_masks, train_masks)
    real_dice = nearest_mask_dice(real_masks, train_masks)
    syn_ssim = nearest_image_ssim(synthetic_images, train_images)
    real_ssim = nearest_image_ssim(real_images, train_images)

    def share(a: np.ndarray) -> float | None:
        return float((a > COPY_THRESHOLD).mean()) if len(a) else None

    return {
        "threshold": COPY_THRESHOLD,
        "n_synthetic": int(len(syn_dice)),
        "n_real": int(len(real_dice)),
        "n_train_reference": int(len(train_masks)),
        f"synthetic_share_over_{COPY_THRESHOLD}": share(syn_dice),
        f"real_share_over_{COPY_THRESHOLD}": share(real_dice),
        "synthetic_mask_dice": {
            "mean": float(syn_dice.mean()) if len(syn_dice) else None,
            **histogram(syn_dice),
        },
        "real_mask_dice": {
            "mean": float(real_dice.mean()) if len(real_dice) else None,
            **histogram(real_dice),
        },
        "synthetic_image_ssim": {
            "mean": float(syn_ssim.mean()) if len(syn_ssim) else None,
            **histogram(syn_ssim),
        },
        "real_image_ssim": {
            "mean": float(real_ssim.mean()) if len(real_ssim) else None,
            **histogram(real_ssim),
        },
        "values": {
            "synthetic_mask_dice": [round(float(x), 4) for x in syn_dice],
            "real_mask_dice": [round(float(x), 4) for x in real_dice],
            "synthetic_image_ssim": [round(float(x), 4) for x in syn_ssim],
            "real_image_ssim": [round(float(x), 4) for x in real_ssim],
        },
    }
