"""Expansion: generate pairs (Stage III), score them (Stage IV), stop once ``count`` are kept.

This module composes the bundle's networks with the sampler and the filter; the maths lives in
``sampling``, ``guidance`` and ``filtering``. A caller (the CLI, a Celery worker) passes a
callback that receives progress events and may raise ``Cancelled`` to stop cooperatively: every
pair already yielded stays valid.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from app.params import default_max_attempts
from models.bundle import Bundle
from models.data import to_uint8
from models.filtering import empty_masks, keep, score_pairs
from models.sampling import SamplingParams, pair_noise, sample_images, sample_masks

ProgressCallback = Callable[[dict[str, Any]], None]


class Cancelled(Exception):
    """Raised by a progress callback to stop generation between solver steps."""


@dataclass
class GeneratedPair:
    index: int
    seed: int
    image: np.ndarray  # uint8 [R, R]
    mask: np.ndarray  # uint8 [R, R], 0 or 255
    dice_loss: float
    kept: bool

    @property
    def name(self) -> str:
        return pair_name(self.seed, self.index)


def pair_name(seed: int, index: int) -> str:
    return f"s{seed}-{index:06d}"


def _chunks(indices: Iterable[int], size: int) -> Iterator[list[int]]:
    chunk: list[int] = []
    for i in indices:
        chunk.append(i)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def generate_pairs(
    bundle: Bundle,
    indices: Iterable[int],
    *,
    seed: int,
    params: SamplingParams,
    eta: float,
    batch_size: int = 8,
    callback: ProgressCallback | None = None,
) -> Iterator[GeneratedPair]:
    """Generate and score exactly the pairs ``indices`` of request ``seed``, ``batch_size`` at a time.

    Each batch is padded to ``batch_size`` so a pair's bits never depend on how indices were grouped.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    keep(torch.zeros(1), eta)  # validates eta before any work
    r = bundle.resolution
    dev = bundle.device
    for net in (bundle.dpm, bundle.segmenter, bundle.filter):
        net.eval()  # original defect 1: sampling in training mode dropped the condition at random
    for batch_no, chunk in enumerate(_chunks(indices, batch_size)):
        noise_m = torch.zeros(batch_size, 1, r, r)
        noise_i = torch.zeros(batch_size, 1, r, r)
        for row, index in enumerate(chunk):
            noise_m[row], noise_i[row] = pair_noise(seed, index, r)

        def on_step(event: dict[str, Any], _batch: int = batch_no, _n: int = len(chunk)) -> None:
            if callback is not None:
                callback({"event": "step", "batch": _batch, "batch_pairs": _n, **event})

        masks = sample_masks(bundle.dpm, bundle.segmenter, noise_m.to(dev), params, on_step)
        images = sample_images(bundle.dpm, bundle.segmenter, noise_i.to(dev), masks, params, on_step)
        losses = score_pairs(bundle.filter, images, masks).cpu()
        kept = keep(losses, eta, empty=empty_masks(masks).cpu(), allow_empty=bundle.allows_empty_masks)
        image_u8, mask_u8 = to_uint8(images[:, 0]), to_uint8(masks[:, 0])
        for row, index in enumerate(chunk):
            yield GeneratedPair(
                index=index,
                seed=seed,
                image=image_u8[row],
                mask=mask_u8[row],
                dice_loss=float(losses[row]),
                kept=bool(kept[row]),
            )


def expand(
    bundle: Bundle,
    count: int,
    *,
    seed: int,
    params: SamplingParams | None = None,
    eta: float | None = None,
    batch_size: int = 8,
    max_attempts: int | None = None,
    start_index: int = 0,
    callback: ProgressCallback | None = None,
) -> Iterator[GeneratedPair]:
    """Yield generated pairs (kept or not) in index order until ``count`` are kept or ``max_attempts`` generated.

    Pairs past the ``count``-th kept one in the last batch are dropped, so the kept set is always
    the lowest kept indices. ``callback`` also receives ``{"event": "batch", generated, kept,
    discarded, target}`` after each batch.
    """
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    params = params or bundle.default_params()
    eta = bundle.default_eta if eta is None else eta
    max_attempts = max_attempts if max_attempts is not None else default_max_attempts(count)
    if max_attempts < 1:
        raise ValueError(f"max_attempts must be >= 1, got {max_attempts}")
    generated = kept = batch_no = 0
    next_index = start_index

    def on_step(event: dict[str, Any]) -> None:
        if callback is not None:
            callback({**event, "batch": batch_no})  # numbered across the whole request

    while kept < count and generated < max_attempts:
        n = min(batch_size, max_attempts - generated)
        indices = range(next_index, next_index + n)
        next_index += n
        for pair in generate_pairs(
            bundle, indices, seed=seed, params=params, eta=eta, batch_size=batch_size, callback=on_step
        ):
            if kept >= count:
                break
            generated += 1
            kept += pair.kept
            yield pair
        if callback is not None:
            callback(
                {
                    "event": "batch",
                    "generated": generated,
                    "kept": kept,
                    "discarded": generated - kept,
                    "target": count,
                }
            )
        batch_no += 1
