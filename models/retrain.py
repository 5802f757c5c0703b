"""Bundles retrained on one train subset (a few-shot fraction), cached under the evaluation's output folder.

A few-shot row is only a result if its DPM, guidance segmenter and filter saw that subset's pairs
and nothing else: with a bundle trained on the whole train split the synthetic pairs carry
information the few-shot segmenter was never given (an upper bound, not a result). Retraining
costs tens of minutes on a CPU, so each retrained bundle lives in ``OUT/bundles/fraction-F`` with
its recipe and split in ``bundle.json``: a rerun with other downstream settings loads it, an
interrupted one resumes from its checkpoints, and one with another recipe or split is refused
rather than silently mixed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from models.augment import AugmentRecipe
from models.bundle import Bundle, missing_stages, new_meta, read_meta, write_meta
from models.data import PairDataset, Split
from models.training import DEFAULT_UNLABELLED_SHARE, TrainConfig, train_dpm, train_filter, train_segmenter


class RetrainMismatch(ValueError):
    """A cached retrained bundle was made with another recipe or split; the message names the folder."""


@dataclass(frozen=True)
class RetrainRecipe:
    """How a few-shot bundle is trained. The DPM is smaller than the demo bundle's (2.7M vs 3.7M
    parameters, 16 instead of 32 channels at full resolution): 2.4x cheaper per step on the CPU,
    and a few dozen pairs do not need more capacity."""

    dpm_steps: int = 1800
    segmenter_steps: int = 800
    filter_steps: int = 800
    batch_size: int = 16
    dpm_lr: float = 2e-4
    dpm_channels: tuple[int, ...] = (16, 32, 64, 128)
    augment_dpm: bool = True  # geometric augmentation of Stage I's pairs (see models.augment)
    seed: int = 0
    unlabelled_share: float = DEFAULT_UNLABELLED_SHARE  # Stage I rows from the unlabelled pool, when given

    def __post_init__(self) -> None:
        for name in ("dpm_steps", "segmenter_steps", "filter_steps", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["dpm_channels"] = list(self.dpm_channels)
        return d


def fraction_dir(out: Path, fraction: float) -> Path:
    return out / "bundles" / f"fraction-{fraction:g}"


def retrain_bundle(
    subset: PairDataset,
    test: PairDataset,
    split: Split,
    out: Path,
    recipe: RetrainRecipe,
    *,
    fraction: float,
    data_meta: dict[str, Any],
    sampling_defaults: dict[str, Any],
    eta_default: float,
    unlabelled: tuple[list[str], torch.Tensor] | None = None,
    device: str | torch.device = "cpu",
    callback: Callable[[str, int, int], None] | None = None,
) -> Bundle:
    """Train (or resume, or load) Stages I, II and IV on ``subset`` into ``out``.

    ``split`` is the evaluation's split; the bundle records it with its train side narrowed to
    the subset, so the bundle itself proves which pairs it saw. ``unlabelled`` (names, images) are
    images whose masks Stage I never sees (the rest of the train split, never a test image); only
    Stage I uses them, and the record names them. ``callback(stage, step, total)``.
    """
    pool_names, pool_images = unlabelled if unlabelled is not None else ([], None)
    leaked = set(pool_names) & set(test.names)
    if leaked:
        raise ValueError(f"unlabelled images include test images: {', '.join(sorted(leaked)[:5])}")
    record = {
        **split.to_dict(),
        "train": list(subset.names),
        "fraction": fraction,
        "train_split_size": len(split.train),
    }
    if pool_names:  # recorded only when used, so earlier cached bundles still match
        record["unlabelled"] = list(pool_names)
    if (out / "bundle.json").exists():
        meta = read_meta(out)
        if meta.get("retrain_recipe") != recipe.to_dict() or meta.get("split") != record:
            raise RetrainMismatch(
                f"{out}: a cached bundle made with another recipe or split; delete it or use another --out"
            )
        if not missing_stages(out) and _complete(meta, recipe):
            return Bundle.load(out, device=device)
    else:
        meta = new_meta(subset.resolution, subset.num_classes)
        meta.update(
            {
                "split": record,
                "data": {
                    **data_meta,
                    "pairs": len(subset) + len(test),
                    "fewshot_fraction": fraction,
                    "unlabelled": len(pool_names),
                },
                "sampling_defaults": dict(sampling_defaults),
                "eta_default": eta_default,
                "retrain_recipe": recipe.to_dict(),
            }
        )
        write_meta(out, meta)

    def cb(stage: str) -> Callable[[int, int, float], None]:
        return lambda step, total, _loss: callback(stage, step, total) if callback else None

    r = recipe
    train_dpm(
        subset,
        out,
        TrainConfig(steps=r.dpm_steps, batch_size=r.batch_size, lr=r.dpm_lr, seed=r.seed),
        block_out_channels=r.dpm_channels,
        augment=AugmentRecipe(intensity=False) if r.augment_dpm else None,
        unlabelled=pool_images,
        unlabelled_share=r.unlabelled_share,
        device=device,
        callback=cb("dpm"),
    )
    train_segmenter(
        subset,
        out,
        TrainConfig(steps=r.segmenter_steps, batch_size=r.batch_size, lr=5e-4, seed=r.seed),
        device=device,
        callback=cb("segmenter"),
    )
    train_filter(
        subset,
        out,
        TrainConfig(steps=r.filter_steps, batch_size=r.batch_size, lr=1e-3, seed=r.seed),
        test_data=test,
        device=device,
        callback=cb("filter"),
    )
    return Bundle.load(out, device=device)


def _complete(meta: dict[str, Any], recipe: RetrainRecipe) -> bool:
    t = meta.get("training", {})
    return (
        t.get("dpm", {}).get("steps") == recipe.dpm_steps
        and t.get("segmenter", {}).get("steps") == recipe.segmenter_steps
        and t.get("filter", {}).get("steps") == recipe.filter_steps
    )
