"""Expansion throughput and Stage IV yield of a bundle: generated and kept pairs per second.

    python bench/expand.py --bundle models/bundles/cxr-lung-64 --pairs 32

For 10/20/30 solver steps, unguided (w_cg = 0, classifier-free only) and guided (the bundle's
w_cg), it generates the same pairs (same seed and indices) and prints generated/s, kept/s and
the yield at the bundle's η (paper: 0.065).
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import torch

from models.bundle import Bundle
from models.expand import generate_pairs

DEFAULT_BUNDLE = Path(__file__).resolve().parents[1] / "models" / "bundles" / "cxr-lung-64"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path, default=DEFAULT_BUNDLE)
    ap.add_argument("--pairs", type=int, default=32, help="pairs generated per configuration")
    ap.add_argument("--steps", type=int, nargs="+", default=[10, 20, 30])
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--eta", type=float, default=None, help="Stage IV threshold (default: the bundle's)")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    bundle = Bundle.load(args.bundle)
    eta = bundle.default_eta if args.eta is None else args.eta
    base = bundle.default_params()
    print(
        f"machine: {platform.machine()}, {torch.get_num_threads()} torch threads; bundle {args.bundle.name}, eta {eta}"
    )
    print(f"defaults: {base.to_dict()}")
    print(
        f"{'steps':>5} {'guidance':>9} {'generated/s':>12} {'kept/s':>8} {'yield':>7} {'mean dice loss':>15}"
    )
    for steps in args.steps:
        for guided in (False, True):
            params = base.updated(steps=steps, w_cg=base.w_cg if guided else 0.0)
            t0 = time.perf_counter()
            pairs = list(
                generate_pairs(
                    bundle, range(args.pairs), seed=0, params=params, eta=eta, batch_size=args.batch_size
                )
            )
            dt = time.perf_counter() - t0
            kept = sum(p.kept for p in pairs)
            mean_loss = sum(p.dice_loss for p in pairs) / len(pairs)
            label = "guided" if guided else "unguided"
            print(
                f"{steps:>5} {label:>9} {len(pairs) / dt:>12.3f} {kept / dt:>8.3f} {kept / len(pairs):>7.1%} {mean_loss:>15.4f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
