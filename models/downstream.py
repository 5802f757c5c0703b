"""The downstream segmenter of the evaluation: the model a user would train on real (+ synthetic) pairs.

MONAI ``UNet`` (or ``AttentionUnet``), Dice + BCE, Adam with a cosine schedule, the last weights
scored (no model selection on test), per-image Dice at threshold 0.5. A seed fixes the initial
weights (the same for every row of that seed), the batch order and the augmentation draws.

K-class masks (``[N, K, R, R]`` one-hot in -1/+1, ``models.labels``): K softmax outputs, Dice
(background excluded) + cross-entropy, and per image the Dice of each foreground class of the
argmax (``models.filtering.class_dice_losses``: a class absent from both prediction and mask counts
as agreement, 1); the "mean foreground Dice" of an image is the mean over its K - 1 classes. The
number of classes is read from the masks' channels, so a binary run is exactly what it always was.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from monai.losses import DiceLoss
from torch.nn import functional as F

from models.augment import Augmenter
from models.data import PairDataset
from models.filtering import score_pairs, score_pairs_by_class
from models.training import step_generator


@dataclass(frozen=True)
class DownstreamConfig:
    batch_size: int = 16
    lr: float = 1e-2
    model: str = "unet"  # "unet" | "attention-unet"
    channels: tuple[int, ...] = (16, 32, 64, 128)
    num_res_units: int = 2
    device: str = "cpu"


def steps_per_epoch(n: int, batch_size: int) -> int:
    return max(1, math.ceil(n / batch_size))


def build_downstream(cfg: DownstreamConfig, out_channels: int = 1) -> torch.nn.Module:
    """The segmenter with ``out_channels`` logits: 1 (sigmoid, binary) or K (softmax)."""
    from monai.networks.nets import AttentionUnet, UNet

    strides = (2,) * (len(cfg.channels) - 1)
    if cfg.model == "attention-unet":
        return AttentionUnet(
            spatial_dims=2, in_channels=1, out_channels=out_channels, channels=cfg.channels, strides=strides
        )
    return UNet(
        spatial_dims=2,
        in_channels=1,
        out_channels=out_channels,
        channels=cfg.channels,
        strides=strides,
        num_res_units=cfg.num_res_units,
    )


def init_downstream(cfg: DownstreamConfig, seed: int, out_channels: int = 1) -> torch.nn.Module:
    """Initial weights depend on the seed only: every row of one seed starts from the same network."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(step_generator(seed, "downstream:init", 0).initial_seed())
        return build_downstream(cfg, out_channels)


def segmentation_loss(logits: torch.Tensor, masks: torch.Tensor, dice: DiceLoss) -> torch.Tensor:
    """Dice + BCE for one -1/+1 channel; Dice (softmax, background excluded) + cross-entropy for K one-hot channels."""
    target = (masks > 0).float()
    if masks.shape[1] == 1:
        return dice(logits, target) + F.binary_cross_entropy_with_logits(logits, target)
    return dice(logits, target) + F.cross_entropy(logits, target.argmax(dim=1))


def _permutations(n: int, seed: int, key: str) -> Iterator[int]:
    """An endless stream of row indices, one seeded permutation per pass."""
    epoch = 0
    while True:
        yield from torch.randperm(n, generator=step_generator(seed, f"downstream:{key}", epoch)).tolist()
        epoch += 1


def plain_batches(n: int, batch_size: int, steps: int, seed: int, key: str) -> Iterator[torch.Tensor]:
    """``steps`` batches of row indices, epoch by epoch through seeded permutations (last batch of an epoch may be short)."""
    done, epoch = 0, 0
    while True:
        perm = torch.randperm(n, generator=step_generator(seed, f"downstream:{key}", epoch))
        for i in range(0, n, batch_size):
            if done == steps:
                return
            yield perm[i : i + batch_size]
            done += 1
        epoch += 1


def mixed_batches(
    n_real: int, n_synthetic: int, ratio: float, batch_size: int, steps: int, seed: int, key: str
) -> Iterator[torch.Tensor]:
    """Batches with a fixed share of synthetic rows (rows ``n_real..``), so many synthetic pairs cannot drown a few real ones.

    Each batch holds ``round(ratio * batch_size)`` synthetic and the rest real rows, each drawn
    through its own stream of seeded permutations.
    """
    n_syn = round(ratio * batch_size) if n_synthetic else 0
    n_syn = min(max(n_syn, 0), batch_size - 1)  # at least one real pair in every batch
    real = _permutations(n_real, seed, key + ":real")
    syn = _permutations(n_synthetic, seed, key + ":synthetic") if n_syn else iter(())
    for _ in range(steps):
        rows = [next(real) for _ in range(batch_size - n_syn)] + [n_real + next(syn) for _ in range(n_syn)]
        yield torch.tensor(rows, dtype=torch.long)


def train_downstream(
    images: torch.Tensor,
    masks: torch.Tensor,
    steps: int,
    cfg: DownstreamConfig,
    seed: int,
    key: str,
    callback: Callable[[int], None] | None = None,
    *,
    augmenter: Augmenter | None = None,
    n_real: int | None = None,
    synthetic_ratio: float | None = None,
) -> tuple[torch.nn.Module, int]:
    """Train the downstream segmenter ``steps`` optimisation steps; returns it and the steps it took.

    The first ``n_real`` rows are real pairs and the rest synthetic; with ``synthetic_ratio`` each
    batch holds that share of synthetic rows, else batches run through the concatenation.
    ``masks`` are encoded (``models.labels``): one channel trains a sigmoid output, K a softmax.
    """
    dev = torch.device(cfg.device)
    channels = masks.shape[1]
    model = init_downstream(cfg, seed, channels).to(dev)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    dice = DiceLoss(sigmoid=True) if channels == 1 else DiceLoss(softmax=True, include_background=False)
    x_all, y_all = images.to(dev), masks.to(dev)
    n_real = len(x_all) if n_real is None else n_real
    if synthetic_ratio is not None and n_real < len(x_all):
        batches = mixed_batches(
            n_real, len(x_all) - n_real, synthetic_ratio, cfg.batch_size, steps, seed, key
        )
    else:
        batches = plain_batches(len(x_all), cfg.batch_size, steps, seed, key)
    model.train()
    taken = 0
    for rows in batches:
        x, y = x_all[rows], y_all[rows]
        if augmenter is not None:
            x, y = augmenter.batch(x, y, step_generator(seed, f"augment:{key}", taken).initial_seed())
        loss = segmentation_loss(model(x), y, dice)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        taken += 1
        if callback is not None:
            callback(1)
    model.eval()
    return model, taken


@torch.no_grad()
def test_dice(model: torch.nn.Module, data: PairDataset, batch_size: int = 64) -> np.ndarray:
    """Per-image Dice at threshold 0.5 on ``data`` (no test-time augmentation); K classes: per-image mean
    foreground Dice of the argmax."""
    model.eval()
    dev = next(model.parameters()).device
    losses = [
        score_pairs(
            model, data.images[i : i + batch_size].to(dev), data.masks[i : i + batch_size].to(dev)
        ).cpu()
        for i in range(0, len(data), batch_size)
    ]
    return (1.0 - torch.cat(losses).double()).numpy()


@torch.no_grad()
def test_dice_by_class(model: torch.nn.Module, data: PairDataset, batch_size: int = 64) -> np.ndarray:
    """Per-image Dice of each foreground class ``[N, K-1]`` (binary: ``[N, 1]``, exactly ``test_dice``).

    A row's mean is the image's mean foreground Dice."""
    if data.masks.shape[1] == 1:
        return test_dice(model, data, batch_size)[:, None]
    model.eval()
    dev = next(model.parameters()).device
    losses = [
        score_pairs_by_class(
            model, data.images[i : i + batch_size].to(dev), data.masks[i : i + batch_size].to(dev)
        ).cpu()
        for i in range(0, len(data), batch_size)
    ]
    return (1.0 - torch.cat(losses).double()).numpy()
