"""Mask sources and the clean-up, measured on one bundle: Stage IV yield, Dice loss and speckle.

    OMP_NUM_THREADS=1 python bench/mask_sources.py --bundle models/bundles/cxr-lung-64 --pairs 64

The same request seed and pair indices run once per setting (generated; generated + clean-up;
real; mixed 0.5), every pair to the end (no early rejection), so the settings are compared pair by
pair: for generated masks the clean-up changes only the mask and what the image phase is given.
Prints, per setting, the share of pairs Stage IV keeps at the bundle's η, the mean Dice loss, the
mean number of connected foreground components per mask (the training masks' is printed beside),
and the seconds it took. docs/results.md records a run and what it decided.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from app.params import MaskSettings, MaskSource
from models.bundle import Bundle
from models.expand import generate_pairs
from models.mask_cleanup import component_areas
from models.mask_source import load_training_masks

SETTINGS = {
    "generated": MaskSettings(),
    "generated+clean": MaskSettings(clean=True),
    "real": MaskSettings(source=MaskSource.REAL),
    "mixed 0.5": MaskSettings(source=MaskSource.MIXED, real_share=0.5),
}


def components(labels: np.ndarray) -> float:
    """Mean connected foreground components per label map (all foreground classes)."""
    return float(np.mean([len(component_areas((lab > 0)[None].astype(np.uint8), 1)) for lab in labels]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bundle", default="models/bundles/cxr-lung-64")
    ap.add_argument("--pairs", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eta", type=float, default=None, help="Stage IV η (default: the bundle's)")
    ap.add_argument("--only", default=",".join(SETTINGS), help="comma-separated settings to run")
    args = ap.parse_args()
    bundle = Bundle.load(args.bundle)
    eta = bundle.default_eta if args.eta is None else args.eta
    params = bundle.default_params().updated(early_reject=False)
    training = load_training_masks(bundle.path)
    if training is not None:
        print(f"training masks: {components(training.labels):.2f} components per mask")
    print(f"{args.bundle}: {args.pairs} pairs, seed {args.seed}, η = {eta}")
    print(
        f"{'setting':<18} {'kept':>6} {'yield':>7} {'mean Dice loss':>15} {'components':>11} {'seconds':>8}"
    )
    for name in args.only.split(","):
        settings = SETTINGS[name]
        t0 = time.perf_counter()
        pairs = list(generate_pairs(bundle, range(args.pairs), seed=args.seed, params=params, eta=eta,
                                    masks=settings))  # fmt: skip
        seconds = time.perf_counter() - t0
        losses = np.array([p.dice_loss for p in pairs])
        kept = sum(p.kept for p in pairs)
        comps = components(np.stack([p.mask for p in pairs]))
        print(
            f"{name:<18} {kept:>6} {kept / len(pairs):>7.1%} {losses.mean():>15.3f} {comps:>11.2f} {seconds:>8.0f}"
        )


if __name__ == "__main__":
    main()
