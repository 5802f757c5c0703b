"""Where a pair's mask comes from: Stage III's mask phase, or a real training mask, deformed.

``generated`` is the paper's pipeline. ``real`` takes one of the masks the bundle's Stage I learned
from (``masks.npz`` in the bundle, written by ``models.training.train_dpm``; never a test mask) and
deforms it with a seeded, label-preserving random affine + elastic transform (MONAI, nearest
neighbour, so label values are kept and nothing is blended); the guided image phase and Stage IV then
run as usual. ``mixed`` draws each pair's source with probability ``real_share``.

Every choice (the source, which training mask, the deformation) is drawn from a generator seeded by
the request seed and the pair index, so the same seed gives the same pair wherever it runs.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

from app.params import TRAINING_MASKS_FILE, MaskSource

MASKS_FILE = TRAINING_MASKS_FILE


@dataclass(frozen=True, eq=False)  # hashed by identity: one object per loaded file (_load's cache)
class TrainingMasks:
    """The label maps ``[N, R, R]`` (uint8, 0 = background) a bundle's Stage I saw, with their pair names."""

    names: tuple[str, ...]
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.names)


def save_training_masks(bundle_dir: str | Path, names: list[str], labels: torch.Tensor) -> Path:
    """Write ``labels`` ``[N, 1, R, R]`` (long) as the bundle's ``masks.npz`` (compressed, a few kB)."""
    path = Path(bundle_dir) / MASKS_FILE
    tmp = path.with_suffix(".tmp.npz")
    arr = labels[:, 0].to(torch.uint8).cpu().numpy()
    np.savez_compressed(tmp, names=np.asarray(names, dtype=str), labels=arr)
    tmp.replace(path)
    return path


def load_training_masks(bundle_dir: str | Path) -> TrainingMasks | None:
    """The bundle's training masks, or None when it carries none (bundles made before ``masks.npz``)."""
    path = Path(bundle_dir) / MASKS_FILE
    if not path.is_file():
        return None
    return _load(str(path), path.stat().st_mtime_ns)


@lru_cache(maxsize=4)
def _load(path: str, _mtime: int) -> TrainingMasks:
    with np.load(path, allow_pickle=False) as z:
        return TrainingMasks(tuple(str(n) for n in z["names"]), z["labels"].astype(np.uint8))


def _generator(seed: int, index: int, what: str) -> np.random.Generator:
    digest = hashlib.sha256(f"diffuseexpand:mask:{what}:{seed}:{index}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def takes_real_mask(source: MaskSource, real_share: float, seed: int, index: int) -> bool:
    """Whether pair ``index`` of request ``seed`` uses a real training mask."""
    if source == MaskSource.GENERATED:
        return False
    if source == MaskSource.REAL:
        return True
    return bool(_generator(seed, index, "source").random() < real_share)


def pick_real_mask(masks: TrainingMasks, seed: int, index: int) -> int:
    """The training mask (its row in ``masks``) that pair ``index`` of request ``seed`` starts from."""
    return int(_generator(seed, index, "pick").integers(len(masks)))


@lru_cache(maxsize=8)
def _deformation(resolution: int) -> Any:
    """MONAI's affine (±10°, ±10 % scale, ±6 % shift) then elastic transform, nearest neighbour,
    background outside the frame: label values survive exactly."""
    from monai.transforms import Compose, Rand2DElastic, RandAffine

    spacing = max(4, resolution // 4)
    return Compose(
        [
            RandAffine(
                prob=1.0,
                rotate_range=0.175,
                scale_range=0.1,
                translate_range=0.06 * resolution,
                mode="nearest",
                padding_mode="zeros",
            ),  # fmt: skip
            Rand2DElastic(
                spacing=(spacing, spacing),
                magnitude_range=(1.0, 2.0),
                prob=1.0,
                mode="nearest",
                padding_mode="zeros",
            ),  # fmt: skip
        ]
    )


def deform_labels(labels: np.ndarray, seed: int, index: int) -> np.ndarray:
    """A seeded, label-preserving random deformation of one label map ``[R, R]`` (uint8)."""
    from monai.utils import convert_to_tensor

    transform = _deformation(labels.shape[-1])
    state = int(_generator(seed, index, "deform").integers(2**32))
    transform.set_random_state(seed=state)
    out = transform(torch.from_numpy(labels.astype(np.float32))[None])
    arr = convert_to_tensor(out, track_meta=False)[0].round().to(torch.uint8).numpy()
    return arr


def real_masks_for(masks: TrainingMasks, seed: int, indices: list[int]) -> tuple[np.ndarray, list[str]]:
    """Deformed real label maps ``[n, R, R]`` for pairs ``indices``, and the training mask each came from."""
    picks = [pick_real_mask(masks, seed, i) for i in indices]
    arrays = [deform_labels(masks.labels[p], seed, i) for p, i in zip(picks, indices, strict=True)]
    return np.stack(arrays), [masks.names[p] for p in picks]
