"""Expansion: generate pairs (Stage III), score them (Stage IV), stop once ``count`` are kept.

This module composes the bundle's networks with the sampler and the filter; the maths lives in
``sampling``, ``guidance`` and ``filtering``. A caller (the CLI, a Celery worker) passes a
callback that receives progress events and may raise ``Cancelled`` to stop cooperatively: every
pair already yielded stays valid.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Literal

import numpy as np
import torch

from app.params import MaskSettings, default_max_attempts
from models.bundle import Bundle, BundleError
from models.data import to_uint8
from models.early_rejection import EarlyRule, filter_score
from models.filtering import empty_masks, keep, score_pairs_by_class
from models.labels import decode, encode, mask_to_uint8
from models.mask_cleanup import class_floors, clean_labels
from models.mask_source import TrainingMasks, load_training_masks, real_masks_for, takes_real_mask
from models.sampling import SamplingParams, pair_noise, sample_images_pooled, sample_masks, slot_batches

ProgressCallback = Callable[[dict[str, Any]], None]


class Cancelled(Exception):
    """Raised by a progress callback to stop generation between solver steps."""


@dataclass
class GeneratedPair:
    index: int
    seed: int
    image: np.ndarray  # uint8 [R, R]
    mask: np.ndarray  # uint8 [R, R]: 0 or 255 (binary), label values 0..K-1 (K classes)
    dice_loss: float  # Stage IV's; for a pair dropped early, the estimate that dropped it (1.0: empty mask)
    kept: bool
    rejected_at: int | None = None  # image step after which early rejection dropped it (0: before any)
    class_losses: list[float] | None = None  # Stage IV's Dice loss per foreground class 1..K-1
    mask_source: str = "generated"  # or "real:NAME": the training mask it was deformed from
    cleaned: bool = False  # whether the generated mask went through models.mask_cleanup

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


def batch_noise(
    seed: int, batch: list[int | None], resolution: int, batch_size: int, channels: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """The initial noise of one batch (``slot_batches``: pair index or None per row); padded rows are zeros."""
    noise_m = torch.zeros(batch_size, channels, resolution, resolution)
    noise_i = torch.zeros(batch_size, channels, resolution, resolution)
    for row, index in enumerate(batch):
        if index is not None:
            noise_m[row], noise_i[row] = pair_noise(seed, index, resolution, channels)
    return noise_m, noise_i


def generate_pairs(
    bundle: Bundle,
    indices: Iterable[int],
    *,
    seed: int,
    params: SamplingParams,
    eta: float,
    batch_size: int = 8,
    callback: ProgressCallback | None = None,
    rule: EarlyRule | None | Literal["bundle"] = "bundle",
    masks: MaskSettings | None = None,
) -> Iterator[GeneratedPair]:
    """Generate and score exactly the pairs ``indices`` of request ``seed``, ``batch_size`` at a time.

    ``masks`` says where masks come from (``models.mask_source``; default: the mask phase) and whether
    generated masks are cleaned (``models.mask_cleanup``) before the image phase.

    Every network call sees exactly ``batch_size`` rows (padded), so a pair's bits never depend on
    how indices were grouped. With ``params.early_reject``, pairs whose mask is empty (Stage IV
    discards them unless the bundle allows empty masks) skip the image phase, and the bundle's
    early-rejection ``rule`` (``models.early_rejection``; ``rule`` overrides it) drops pairs part-way
    through it; the pairs that go on are regrouped into full batches. Pairs come out in index order,
    a dropped one with ``rejected_at`` set and its estimated Dice loss.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    keep(torch.zeros(1), eta)  # validates eta before any work
    masks = masks or MaskSettings()
    training_masks = bundle_training_masks(bundle) if masks.needs_training_masks else None
    for net in (bundle.dpm, bundle.segmenter, bundle.filter):
        net.eval()  # original defect 1: sampling in training mode dropped the condition at random
    if rule == "bundle":
        rule = bundle.early_rule
    rule = rule if rule is not None and rule.applies_to(params, eta) else None
    pool = sorted(indices)
    if not pool:
        return
    # With a rule, the whole pool goes through together, so the pairs that pass the check can be
    # regrouped into fewer batches; without one, batch by batch, so pairs come out (and a cancel
    # keeps them) after every batch.
    groups = (
        [pool]
        if rule is not None
        else [[i for i in b if i is not None] for b in slot_batches(pool, batch_size)]
    )
    for group_no, group in enumerate(groups):
        yield from _generate_group(
            bundle, group, group_no, seed, params, eta, batch_size, callback, rule, masks, training_masks
        )


def bundle_training_masks(bundle: Bundle) -> TrainingMasks:
    """The bundle's training masks, for real mask sources and the clean-up; a clear error without them."""
    found = load_training_masks(bundle.path)
    if found is None or not len(found):
        raise BundleError(
            f"{bundle.path}: this bundle carries no training masks (masks.npz), which mask_source real/mixed "
            "and clean_masks need; retrain its Stage I (`diffuseexpand train-dpm`) to add them"
        )
    return found


@lru_cache(maxsize=8)
def _floors(masks: TrainingMasks, num_classes: int) -> tuple[float, ...]:
    """The clean-up floors of a bundle's training masks (loaded once per file: ``load_training_masks``)."""
    return tuple(class_floors(masks.labels, num_classes))


def _generate_group(
    bundle: Bundle,
    pool: list[int],
    first_batch: int,
    seed: int,
    params: SamplingParams,
    eta: float,
    batch_size: int,
    callback: ProgressCallback | None,
    rule: EarlyRule | None,
    mask_settings: MaskSettings,
    training_masks: TrainingMasks | None,
) -> Iterator[GeneratedPair]:
    """``generate_pairs`` for one group of pairs sampled together (one batch, or a pool with a rule)."""
    r, dev, c = bundle.resolution, bundle.device, bundle.mask_channels
    dpm, segmenter, filter_net = bundle.networks()
    at = {index: k for k, index in enumerate(pool)}
    masks = torch.zeros(len(pool), c, r, r, device=dev)
    noise = torch.zeros(len(pool), c, r, r, device=dev)
    sources = ["generated"] * len(pool)
    real = [i for i in pool if takes_real_mask(mask_settings.source, mask_settings.real_share, seed, i)]
    if real:
        assert training_masks is not None
        labels, names = real_masks_for(training_masks, seed, real)
        encoded = encode(torch.from_numpy(labels).long()[:, None], bundle.num_classes).to(dev)
        for k, pair_index in enumerate(real):
            masks[at[pair_index]] = encoded[k]
            noise[at[pair_index]] = pair_noise(seed, pair_index, r, c)[1].to(dev)
            sources[at[pair_index]] = f"real:{names[k]}"
    generated = [i for i in pool if sources[at[i]] == "generated"]
    # the mask phase runs for generated masks only; a pair keeps its batch row (slot_batches) either way
    batches = slot_batches(pool, batch_size)
    for batch_no, batch in enumerate(slot_batches(generated, batch_size)):
        noise_m, noise_i = batch_noise(seed, batch, r, batch_size, c)
        n = sum(i is not None for i in batch)

        def on_mask_step(event: dict[str, Any], _batch: int = first_batch + batch_no, _n: int = n) -> None:
            if callback is not None:
                callback({"event": "step", "batch": _batch, "batch_pairs": _n, **event})

        batch_masks = sample_masks(dpm, segmenter, noise_m.to(dev), params, on_mask_step)
        for row, index in enumerate(batch):
            if index is not None:
                masks[at[index]], noise[at[index]] = batch_masks[row], noise_i[row].to(dev)
    cleaned = mask_settings.clean and bool(generated)
    if cleaned:
        assert training_masks is not None
        floors = list(_floors(training_masks, bundle.num_classes))
        rows = torch.tensor([at[i] for i in generated])
        labels_g = decode(masks[rows], bundle.num_classes)[:, 0].cpu().numpy().astype(np.uint8)
        fixed = np.stack([clean_labels(lab, floors) for lab in labels_g])
        masks[rows] = encode(torch.from_numpy(fixed).long()[:, None], bundle.num_classes).to(dev)
    empty = empty_masks(masks).cpu()
    skip = empty if params.early_reject and not bundle.allows_empty_masks else None

    check_step = rule.check_step(params.steps) if rule is not None else None

    def on_image_step(event: dict[str, Any]) -> None:
        if callback is not None:
            callback({"event": "step", "batch": first_batch, "batch_pairs": len(pool), **event})

    out = sample_images_pooled(
        dpm, segmenter, noise, masks, params, batch_size, indices=pool,
        score=filter_score(filter_net) if rule is not None else None,
        cut=rule.cut if rule is not None else float("inf"),
        check_step=check_step,
        skip=skip, callback=on_image_step,
    )  # fmt: skip
    finished = ~out.dropped
    losses = torch.ones(len(pool))
    by_class = torch.ones(len(pool), bundle.num_classes - 1)
    if out.checked is not None:
        losses = torch.where(out.dropped, out.checked, losses)
    for batch in batches:  # Stage IV, each pair at its row
        rows = torch.tensor([at[i] if i is not None else len(pool) for i in batch])
        images_p = torch.cat([out.images, torch.zeros_like(out.images[:1])])[rows]
        masks_p = torch.cat([masks, torch.zeros_like(masks[:1])])[rows]
        scored = score_pairs_by_class(filter_net, images_p, masks_p).cpu()
        for k, i in enumerate(batch):
            if i is not None and finished[at[i]]:
                losses[at[i]], by_class[at[i]] = scored[k].mean(), scored[k]
    kept = keep(losses, eta, empty=empty, allow_empty=bundle.allows_empty_masks) & finished
    image_u8 = to_uint8(out.images[:, 0])
    mask_u8 = mask_to_uint8(decode(masks, bundle.num_classes)[:, 0].cpu().numpy(), bundle.num_classes)
    for row, index in enumerate(pool):
        yield GeneratedPair(
            index=index,
            seed=seed,
            image=image_u8[row],
            mask=mask_u8[row],
            dice_loss=float(losses[row]),
            kept=bool(kept[row]),
            rejected_at=None if finished[row] else (0 if skip is not None and skip[row] else check_step),
            class_losses=[float(v) for v in by_class[row]] if finished[row] else None,
            mask_source=sources[row],
            cleaned=cleaned and sources[row] == "generated",
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
    pool_batches: int = 4,
    masks: MaskSettings | None = None,
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
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    generated = kept = batch_no = 0
    next_index = start_index

    def on_step(event: dict[str, Any]) -> None:
        if callback is not None:
            callback({**event, "batch": batch_no})  # numbered across the whole request

    def report(generated: int, kept: int) -> None:
        if callback is not None:
            callback({"event": "batch", "generated": generated, "kept": kept,
                      "discarded": generated - kept, "target": count})  # fmt: skip

    while kept < count and generated < max_attempts:
        # A pool of several batches lets early rejection regroup survivors into fewer batches; it is
        # sized on the yield so far so that the last pool does not overshoot ``count`` by much.
        observed = kept / generated if generated else 0.5
        guess = math.ceil((count - kept) / max(observed, 0.2))
        n = min(
            pool_batches * batch_size, max_attempts - generated, math.ceil(guess / batch_size) * batch_size
        )
        indices = range(next_index, next_index + n)
        next_index += n

        in_batch = 0
        for pair in generate_pairs(
            bundle,
            indices,
            seed=seed,
            params=params,
            eta=eta,
            batch_size=batch_size,
            callback=on_step,
            masks=masks,
        ):
            if kept >= count:
                break
            generated += 1
            kept += pair.kept
            in_batch += 1
            yield pair
            if in_batch == batch_size:  # pairs come out a batch at a time (a pool at a time with a rule)
                report(generated, kept)
                batch_no, in_batch = batch_no + 1, 0
        if in_batch:
            report(generated, kept)
            batch_no += 1
