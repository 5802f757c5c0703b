"""Masks as label maps with K classes, and their encoding for the networks.

A mask is a label map: 0 is background, 1..K-1 are structures. The networks see it encoded:
- K = 2 (binary): one channel of -1 (background) / +1 (foreground), exactly the format of every
  bundle before multi-class support, so binary bundles and their outputs are unchanged;
- K > 2: K one-hot channels scaled to [-1, 1] (Stage I synthesises all K; a label map comes back
  by argmax).

Written masks keep the same split: a binary mask as 0/255, a K-class mask as its label values 0..K-1.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
from torch.nn import functional as F

MAX_CLASSES = 16  # app.pixels.MAX_MASK_LABELS: the most grey levels a label map may have


def check_num_classes(num_classes: int) -> int:
    if not 2 <= int(num_classes) <= MAX_CLASSES:
        raise ValueError(f"num_classes must be between 2 and {MAX_CLASSES}, got {num_classes}")
    return int(num_classes)


def mask_channels(num_classes: int) -> int:
    """Channels of an encoded mask: 1 for a binary mask, K for K classes."""
    return 1 if check_num_classes(num_classes) == 2 else num_classes


def encode(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """A label map ``[N, 1, H, W]`` (whole values 0..K-1) as the networks' ``[N, C, H, W]`` in {-1, +1}."""
    labels = labels.long()
    if mask_channels(num_classes) == 1:
        return torch.where(labels > 0, 1.0, -1.0)
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(
            f"labels must be in 0..{num_classes - 1}, got {int(labels.min())}..{int(labels.max())}"
        )
    one_hot = F.one_hot(labels[:, 0], num_classes).permute(0, 3, 1, 2)
    return one_hot.float() * 2.0 - 1.0


def decode(x: torch.Tensor, num_classes: int) -> torch.Tensor:
    """An encoded (or sampled, continuous) mask ``[N, C, H, W]`` back to a label map ``[N, 1, H, W]``."""
    if mask_channels(num_classes) == 1:
        return (x > 0).long()
    if x.shape[1] != num_classes:
        raise ValueError(f"a {num_classes}-class mask has {num_classes} channels, got {x.shape[1]}")
    return x.argmax(dim=1, keepdim=True)


def snap(x: torch.Tensor, num_classes: int) -> torch.Tensor:
    """A sampled mask in [-1, 1] to its exact encoding (binarised, or one-hot of its argmax)."""
    return encode(decode(x, num_classes), num_classes).to(x.dtype)


def one_hot01(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Targets for the segmenters' losses: ``[N, 1, H, W]`` 0/1 foreground (binary), else ``[N, K, H, W]`` one-hot."""
    if mask_channels(num_classes) == 1:
        return (labels > 0).float()
    return F.one_hot(labels.long()[:, 0], num_classes).permute(0, 3, 1, 2).float()


def mask_to_uint8(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """A label map as written to disk: 0/255 for a binary mask (as always), the label values for K > 2."""
    labels = np.asarray(labels)
    if mask_channels(num_classes) == 1:
        return np.where(labels > 0, 255, 0).astype(np.uint8)
    return labels.astype(np.uint8)


def infer_num_classes(levels: Iterable[float]) -> int:
    """K from the union of the training masks' values.

    Whole values 0..L with L >= 2 (at most ``MAX_CLASSES`` - 1) are a label map of L + 1 classes;
    anything else (0/1, 0/255, grey levels) is a binary mask, read as before multi-class support.
    """
    values = sorted({float(v) for v in levels})
    whole = all(v == int(v) and v >= 0 for v in values)
    top = int(values[-1]) if values else 0
    if whole and 2 <= top < MAX_CLASSES:
        return top + 1
    return 2
