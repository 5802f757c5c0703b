"""Synthetic pair sets for the evaluation: generated once, cached by (parameters, index), filtered at η."""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from app.params import MaskSettings
from models.bundle import Bundle
from models.expand import GeneratedPair, generate_pairs
from models.labels import encode, mask_channels
from models.sampling import SamplingParams
from models.variants import Variant, sampling_params


class Progress:
    """One bar for the whole run, in work units: one per downstream training step, ``steps`` per generated pair."""

    def __init__(self, bar: Any | None) -> None:
        self.bar = bar

    def add_total(self, n: int) -> None:
        if self.bar is not None:
            self.bar.total = (self.bar.total or 0) + n
            self.bar.refresh()

    def step(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def phase(self, text: str) -> None:
        if self.bar is not None:
            self.bar.set_description(text[:40].ljust(40))


def bundle_identity(bundle: Bundle) -> str:
    """A digest of what makes a bundle's pairs what they are: its path, training record and split."""
    meta = {k: bundle.meta.get(k) for k in ("training", "split", "data", "resolution")}
    text = json.dumps({"path": str(Path(bundle.path).resolve()), **meta}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class PairCache:
    """Generated pairs by (sampling params, index), so a pair is never generated twice.

    With ``disk`` set, every pair is also written there (one .npz per pair, under a folder named
    by a digest of the bundle, parameters, request seed and batch size, all of which fix its bits):
    an interrupted evaluation resumes, and parallel runs over one output folder share the work.
    """

    def __init__(self, bundle: Bundle, seed: int, batch_size: int, progress: Progress, planned: int,
                 disk: Path | None = None, masks: MaskSettings | None = None) -> None:  # fmt: skip
        self.bundle, self.seed, self.batch_size = bundle, seed, batch_size
        self.masks = masks or MaskSettings()
        self.progress, self.planned = progress, planned  # indices below ``planned`` are in the bar's total
        self.store: dict[str, dict[int, GeneratedPair]] = {}
        self.seconds = 0.0
        self.generated_now = 0  # pairs this process generated (not read back from ``disk``)
        self.disk = disk
        self._bundle_id = bundle_identity(bundle) if disk is not None else ""

    def _folder(self, params: SamplingParams) -> Path | None:
        if self.disk is None:
            return None
        parts: list[Any] = [self._bundle_id, params.to_dict(), self.seed, self.batch_size]
        if self.masks != MaskSettings():  # the paper's masks keep the folders they always had
            parts.append(self.masks.model_dump(mode="json"))
        key = json.dumps(parts, sort_keys=True)
        return self.disk / hashlib.sha256(key.encode()).hexdigest()[:20]

    def get(self, params: SamplingParams, indices: range) -> list[GeneratedPair]:
        key = repr(sorted(params.to_dict().items()))
        have = self.store.setdefault(key, {})
        folder = self._folder(params)
        if folder is not None:
            for i in indices:
                if i not in have and (folder / f"{i:06d}.npz").is_file():
                    have[i] = _read_pair(folder / f"{i:06d}.npz", self.seed)
        todo = [i for i in indices if i not in have]
        weight = params.steps  # one pair costs about as much as `steps` downstream training steps
        self.progress.add_total(weight * sum(i >= self.planned for i in todo))
        t0 = time.perf_counter()
        for pair in generate_pairs(
            self.bundle,
            todo,
            seed=self.seed,
            params=params,
            eta=1.0,
            batch_size=self.batch_size,
            masks=self.masks,
        ):
            have[pair.index] = pair
            self.generated_now += 1
            if folder is not None:
                _write_pair(folder / f"{pair.index:06d}.npz", pair)
            self.progress.step(weight)
        self.seconds += time.perf_counter() - t0
        return [have[i] for i in indices]


def _write_pair(path: Path, pair: GeneratedPair) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    arrays: dict[str, Any] = {"image": pair.image, "mask": pair.mask, "index": pair.index,
                              "dice_loss": pair.dice_loss}  # fmt: skip
    if pair.class_losses is not None and len(pair.class_losses) > 1:  # K classes: Stage IV per class
        arrays["class_losses"] = np.asarray(pair.class_losses)
    if pair.mask_source != "generated" or pair.cleaned:
        arrays["mask_source"], arrays["cleaned"] = np.asarray(pair.mask_source), pair.cleaned
    np.savez(tmp, **arrays)
    tmp.replace(path)


def _read_pair(path: Path, seed: int) -> GeneratedPair:
    """A cached pair; its mask as written (0/255 binary, label values 0..K-1 for K classes)."""
    with np.load(path) as z:
        by_class = [float(v) for v in z["class_losses"]] if "class_losses" in z.files else None
        source = str(z["mask_source"]) if "mask_source" in z.files else "generated"
        cleaned = bool(z["cleaned"]) if "cleaned" in z.files else False
        return GeneratedPair(index=int(z["index"]), seed=seed, image=z["image"], mask=z["mask"],
                             dice_loss=float(z["dice_loss"]), kept=True, class_losses=by_class,
                             mask_source=source, cleaned=cleaned)  # fmt: skip


@dataclass
class SyntheticSet:
    pairs: list[GeneratedPair]  # the pairs used (kept)
    losses: list[float]  # Dice loss of every generated pair, kept or not
    generated: int
    params: SamplingParams
    eta: float
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def kept(self) -> int:
        return len(self.pairs)


def make_synthetic(cache: PairCache, v: Variant, base: SamplingParams, n: int, eta: float,
                   max_attempts: int) -> SyntheticSet:  # fmt: skip
    """N pairs of variant ``v``: the first N indices, or (filtered) the first N kept within max_attempts."""
    params = sampling_params(base, v).updated(
        early_reject=False
    )  # every pair to the end: the study needs them all
    if not v.filtered:
        pairs = cache.get(params, range(n))
        return SyntheticSet(pairs, [p.dice_loss for p in pairs], n, params, 1.0)
    kept: list[GeneratedPair] = []
    losses: list[float] = []  # of every pair examined, in index order, up to the N-th kept one
    start = 0
    while len(kept) < n and start < max_attempts:
        stop = min(max_attempts, start + (n if start == 0 else max(n - len(kept), cache.batch_size)))
        for p in cache.get(params, range(start, stop)):
            if len(kept) == n:
                break  # generated (cached) but not examined: not counted in the yield
            losses.append(p.dice_loss)
            if p.dice_loss <= eta:
                kept.append(p)
        start = stop
    return SyntheticSet(kept, losses, len(losses), params, eta)


def pairs_to_tensors(
    pairs: Sequence[GeneratedPair], resolution: int, num_classes: int = 2
) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 pairs to ``[N, 1, R, R]`` images in [-1, 1] and encoded masks (``models.labels``: binary
    ``[N, 1, R, R]`` -1/+1 from 0/255; K classes ``[N, K, R, R]`` one-hot from the label values),
    resized when ``R`` differs (masks nearest)."""
    c = mask_channels(num_classes)
    if not pairs:
        return torch.zeros(0, 1, resolution, resolution), torch.zeros(0, c, resolution, resolution)
    img = torch.from_numpy(np.stack([p.image for p in pairs])).float()[:, None] / 127.5 - 1.0
    if num_classes != 2:
        labels = torch.from_numpy(np.stack([p.mask for p in pairs]).astype(np.int64))[:, None]
        if img.shape[-1] != resolution:
            mode = "area" if img.shape[-1] > resolution else "bilinear"
            img = F.interpolate(img, size=(resolution, resolution), mode=mode).clamp(-1, 1)
            labels = F.interpolate(labels.float(), size=(resolution, resolution), mode="nearest").long()
        return img, encode(labels, num_classes)
    msk = torch.from_numpy(np.stack([p.mask for p in pairs])).float()[:, None] / 127.5 - 1.0
    if img.shape[-1] != resolution:
        mode = "area" if img.shape[-1] > resolution else "bilinear"
        img = F.interpolate(img, size=(resolution, resolution), mode=mode).clamp(-1, 1)
        msk = F.interpolate(msk, size=(resolution, resolution), mode="nearest")
    return img, torch.where(msk > 0, 1.0, -1.0)


def duplicate_rows(n_real: int, n: int, seed: int) -> torch.Tensor:
    """``n`` row indices of the real train set to add again: whole shuffled passes, seeded."""
    reps = math.ceil(n / n_real)
    g = torch.Generator().manual_seed(seed)
    return torch.cat([torch.randperm(n_real, generator=g) for _ in range(reps)])[:n]
