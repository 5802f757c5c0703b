"""Pseudo-labels: the plain semi-supervised baseline that synthetic pairs must beat.

A segmenter trained on the labelled pairs (the "origin + augmentation" one) labels the unlabelled
images; the images it is most confident about become extra pairs. The rule, stated once: an image's
confidence is the mean over its pixels of the predicted class's probability; images are ranked by
it, and the ``n`` most confident with confidence >= ``PSEUDO_MIN_CONFIDENCE`` are kept (fewer when
fewer pass).
"""

from __future__ import annotations

import torch

from models.labels import encode

PSEUDO_MIN_CONFIDENCE = 0.9


@torch.no_grad()
def predict_labels(
    model: torch.nn.Module, images: torch.Tensor, num_classes: int, batch_size: int = 64
) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's masks for ``images`` ``[N, 1, R, R]``, encoded (``models.labels``), and each image's confidence ``[N]``."""
    model.eval()
    dev = next(model.parameters()).device
    masks, confidence = [], []
    for i in range(0, len(images), batch_size):
        logits = model(images[i : i + batch_size].to(dev)).float().cpu()
        if logits.shape[1] == 1:  # one sigmoid channel: foreground where p > 0.5
            p = torch.sigmoid(logits)
            labels = (p > 0.5).long()
            top = torch.maximum(p, 1 - p)
        else:
            probs = torch.softmax(logits, dim=1)
            top, labels = probs.max(dim=1, keepdim=True)
        masks.append(encode(labels, num_classes))
        confidence.append(top.flatten(1).mean(dim=1))
    return torch.cat(masks), torch.cat(confidence)


def select_confident(
    confidence: torch.Tensor, n: int, min_confidence: float = PSEUDO_MIN_CONFIDENCE
) -> list[int]:
    """Rows of the ``n`` most confident images at or above ``min_confidence``, most confident first (ties by row)."""
    order = sorted(range(len(confidence)), key=lambda i: (-float(confidence[i]), i))
    return [i for i in order if float(confidence[i]) >= min_confidence][:n]
