"""Yield against time for the solvers at few steps: which solver and step count keep the most pairs per second.

    python bench/solvers.py --bundle models/bundles/cxr-lung-64 --pairs 48 --steps 8 12 16 20

For each solver (DPM-Solver++ 2M/3M, UniPC, each optionally on Karras sigmas) and step count, it
generates the same pairs (same seed and indices) with the bundle's guidance, scores them with
Stage IV at the bundle's η and prints seconds per generated pair, yield, kept pairs/s and the mean
Dice loss of the kept pairs. Early rejection is off, so the yield is the solver's alone.
"""

from __future__ import annotations

import argparse
import csv
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from models.bundle import Bundle  # noqa: E402
from models.expand import generate_pairs  # noqa: E402

DEFAULT_BUNDLE = ROOT / "models" / "bundles" / "cxr-lung-64"
DEFAULT_SOLVERS = ["dpmpp:2", "dpmpp:3", "unipc:2", "dpmpp:2:karras", "unipc:2:karras"]


def parse_solver(spec: str) -> dict[str, object]:
    """``KIND:ORDER[:karras]`` -> SamplingParams fields."""
    parts = spec.split(":")
    if len(parts) not in (2, 3) or parts[0] not in ("dpmpp", "unipc") or parts[1] not in ("1", "2", "3"):
        raise SystemExit(f"--solvers: expected KIND:ORDER[:karras] with KIND dpmpp|unipc, got {spec!r}")
    if len(parts) == 3 and parts[2] != "karras":
        raise SystemExit(f"--solvers: the third part can only be 'karras', got {spec!r}")
    return {"solver": parts[0], "order": int(parts[1]), "karras": len(parts) == 3}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path, default=DEFAULT_BUNDLE)
    ap.add_argument("--pairs", type=int, default=48, help="pairs per configuration")
    ap.add_argument("--steps", type=int, nargs="+", default=[8, 12, 16, 20])
    ap.add_argument("--solvers", nargs="+", default=DEFAULT_SOLVERS, help="KIND:ORDER[:karras]")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--csv", type=Path, help="also write the rows here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    solvers = [(spec, parse_solver(spec)) for spec in args.solvers]
    bundle = Bundle.load(args.bundle)
    eta, base = bundle.default_eta, bundle.default_params().updated(early_reject=False)
    print(
        f"machine: {platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}"
    )
    print(f"bundle {args.bundle.name}, eta {eta}, {args.pairs} pairs per row (seed {args.seed}), guidance "
          f"w_cf {base.w_cf} w_cg {base.w_cg} tau {base.tau}")  # fmt: skip
    header = ["solver", "steps", "s/pair", "yield", "kept/s", "kept dice loss"]
    print(f"{header[0]:>16} {header[1]:>5} {header[2]:>7} {header[3]:>6} {header[4]:>7} {header[5]:>15}")
    warm = base.updated(steps=1)  # first calls build the kernels: keep that out of the first row
    list(
        generate_pairs(
            bundle, range(args.batch_size), seed=0, params=warm, eta=eta, batch_size=args.batch_size
        )
    )
    rows = []
    for steps in args.steps:
        for spec, fields in solvers:
            params = base.updated(steps=steps, **fields)
            t0 = time.perf_counter()
            pairs = list(
                generate_pairs(
                    bundle,
                    range(args.pairs),
                    seed=args.seed,
                    params=params,
                    eta=eta,
                    batch_size=args.batch_size,
                )
            )
            dt = time.perf_counter() - t0
            kept = [p for p in pairs if p.kept]
            loss = sum(p.dice_loss for p in kept) / len(kept) if kept else float("nan")
            row = [spec, steps, dt / len(pairs), len(kept) / len(pairs), len(kept) / dt, loss]
            rows.append(row)
            print(
                f"{spec:>16} {steps:>5} {row[2]:>7.3f} {row[3]:>6.1%} {row[4]:>7.3f} {loss:>15.4f}",
                flush=True,
            )
    if args.csv:
        with args.csv.open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(header)
            w.writerows(rows)


if __name__ == "__main__":
    main()
