"""The one augmentation recipe, as MONAI dictionary transforms applied identically to image and mask.

Used by the downstream rows "origin + augmentation" and "origin + synthetic + augmentation" of
``diffuseexpand evaluate``, and (optionally) while training Stage I on few pairs. Geometry moves
image and mask together (image bilinear, mask nearest, so a mask stays a -1/+1 label map);
intensity changes touch the image only. Left/right flips are off by default: chest X-rays are not
mirror-symmetric (heart, aortic arch), and a flipped film is a film no scanner produces.

Recipe (each draw independent per pair):
  * RandAffined, p = 0.8: rotation ±10°, scale ±10 %, translation ±6 % of the side, border padding
  * RandFlipd (left/right), p = 0.5 — only with ``flip=True``
  * RandAdjustContrastd (gamma 0.7-1.5), p = 0.5
  * RandScaleIntensityd (gain ±10 %) and RandShiftIntensityd (offset ±0.1 on [-1, 1]), p = 0.5 each
  * RandGaussianNoised (σ = 0.03 on [-1, 1]), p = 0.3
Elastic deformation is left out: at 64x64 on the CPU it costs more per batch than a downstream
training step, and the affine part already moves the lung outline.

Every draw comes from a generator seeded by the caller, so a run is repeatable bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from monai.transforms import (
    Compose,
    RandAdjustContrastd,
    RandAffined,
    RandFlipd,
    RandGaussianNoised,
    RandScaleIntensityd,
    RandShiftIntensityd,
)
from monai.utils import convert_to_tensor

from models.labels import snap

KEYS = ("image", "mask")


@dataclass(frozen=True)
class AugmentRecipe:
    flip: bool = False  # left/right flips; off for chest X-rays
    intensity: bool = True  # contrast, gain/offset, noise on the image
    rotate_degrees: float = 10.0
    scale: float = 0.10
    translate: float = 0.06  # share of the image side

    def to_dict(self) -> dict[str, float | bool]:
        return {
            "flip": self.flip,
            "intensity": self.intensity,
            "rotate_degrees": self.rotate_degrees,
            "scale": self.scale,
            "translate": self.translate,
        }


def build_transform(recipe: AugmentRecipe, size: int) -> Compose:
    shift = recipe.translate * size
    steps: list = [
        RandAffined(
            keys=KEYS,
            prob=0.8,
            rotate_range=(np.deg2rad(recipe.rotate_degrees),),
            scale_range=(recipe.scale, recipe.scale),
            translate_range=(shift, shift),
            mode=("bilinear", "nearest"),
            padding_mode="border",
        )
    ]
    if recipe.flip:
        steps.append(RandFlipd(keys=KEYS, prob=0.5, spatial_axis=1))
    if recipe.intensity:
        steps += [
            RandAdjustContrastd(keys="image", prob=0.5, gamma=(0.7, 1.5)),
            RandScaleIntensityd(keys="image", prob=0.5, factors=0.1),
            RandShiftIntensityd(keys="image", prob=0.5, offsets=0.1),
            RandGaussianNoised(keys="image", prob=0.3, std=0.03),
        ]
    return Compose(steps)


class Augmenter:
    """Applies the recipe to batches; ``batch(images, masks, seed)`` is a pure function of its arguments."""

    def __init__(self, recipe: AugmentRecipe, size: int) -> None:
        self.recipe = recipe
        self.transform = build_transform(recipe, size)

    def batch(
        self, images: torch.Tensor, masks: torch.Tensor, seed: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Augment ``[B, 1, R, R]`` images in [-1, 1] and -1/+1 masks; returns new tensors on the input device."""
        self.transform.set_random_state(seed=seed % (2**32))
        out_i, out_m = [], []
        for img, msk in zip(images.detach().cpu(), masks.detach().cpu(), strict=True):
            d = self.transform({"image": img, "mask": msk})
            image = convert_to_tensor(d["image"], track_meta=False)
            mask = convert_to_tensor(d["mask"], track_meta=False)
            out_i.append(image.float().clamp(-1, 1))
            # a one-hot mask's pixels moved in from outside the frame have no class: argmax makes them background
            out_m.append(
                torch.where(mask > 0, 1.0, -1.0) if mask.shape[0] == 1 else snap(mask[None], mask.shape[0])[0]
            )
        return torch.stack(out_i).to(images.device), torch.stack(out_m).to(masks.device)
