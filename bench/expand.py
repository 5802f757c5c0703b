"""Expansion throughput and Stage IV yield of a bundle: generated and kept pairs per second.

    python bench/expand.py --bundle models/bundles/cxr-lung-64 --pairs 32
    python bench/expand.py --compare-reference --pairs 32

With --compare-reference it runs, one after the other on the same bundle, seed and requested count
(--pairs kept pairs), the reference path (the eager fp32 sampler at the settings this project used
before: DPM-Solver++ 2M, 20 steps, no early rejection) and the default path (the bundle's defaults
with its calibrated early rejection, compiled with torch.compile unless --no-compile; the compile
time is printed apart). It then samples the pairs early rejection dropped to the end, untimed, to
count the ones Stage IV would have kept (false rejections). Last line:
``kept/s ratio R, false rejections F %, yield Y % vs Y0 %``.

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
from models.expand import GeneratedPair, expand, generate_pairs
from models.sampling import SamplingParams

# The sampler this project shipped before the speed work: the reference of --compare-reference.
REFERENCE = {"steps": 20, "order": 2, "solver": "dpmpp", "karras": False, "early_reject": False}

DEFAULT_BUNDLE = Path(__file__).resolve().parents[1] / "models" / "bundles" / "cxr-lung-64"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path, default=DEFAULT_BUNDLE)
    ap.add_argument("--pairs", type=int, default=32, help="pairs generated per configuration")
    ap.add_argument("--steps", type=int, nargs="+", default=[10, 20, 30])
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--eta", type=float, default=None, help="Stage IV threshold (default: the bundle's)")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--compare-reference", action="store_true", help="reference path vs default path")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                    help="compile the default path (with --compare-reference)")  # fmt: skip
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.compare_reference:
        compare_reference(args)
        return
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


def timed_expand(
    bundle: Bundle, count: int, seed: int, params: SamplingParams, eta: float, batch_size: int
) -> tuple[list[GeneratedPair], float]:
    t0 = time.perf_counter()
    pairs = list(expand(bundle, count, seed=seed, params=params, eta=eta, batch_size=batch_size))
    return pairs, time.perf_counter() - t0


def compare_reference(args: argparse.Namespace) -> None:
    bundle = Bundle.load(args.bundle)
    eta = bundle.default_eta if args.eta is None else args.eta
    new = bundle.default_params()
    ref = new.updated(**REFERENCE)
    rule = bundle.early_rule
    print(f"machine: {platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}; "
          f"bundle {args.bundle.name}, eta {eta}, {args.pairs} kept pairs requested, seed {args.seed}, "
          f"batch {args.batch_size}")  # fmt: skip
    print(f"reference: eager, {ref.to_dict()}")
    print(f"default:   {'compiled' if args.compile else 'eager'}, {new.to_dict()}")
    print(
        f"early rejection: {f'after {rule.at:g} of the image steps, cut {rule.cut:.4f}' if rule and rule.applies_to(new, eta) else 'none for these settings'}"
    )
    rows = []
    ref_pairs, ref_s = timed_expand(bundle, args.pairs, args.seed, ref, eta, args.batch_size)
    rows.append(("reference", ref_pairs, ref_s))
    compiled = Bundle.load(args.bundle)
    if args.compile:
        print(
            f"compile: {compiled.compile(args.batch_size, new):.1f} s (once per worker, not timed below)",
            flush=True,
        )
    new_pairs, new_s = timed_expand(compiled, args.pairs, args.seed, new, eta, args.batch_size)
    rows.append(("default", new_pairs, new_s))
    print(f"{'path':>10} {'generated':>9} {'kept':>5} {'dropped early':>13} {'seconds':>8} {'generated/s':>11} "
          f"{'kept/s':>7} {'yield':>6} {'kept dice loss':>14}")  # fmt: skip
    for name, pairs, secs in rows:
        kept = [p for p in pairs if p.kept]
        early = sum(p.rejected_at is not None for p in pairs)
        loss = sum(p.dice_loss for p in kept) / max(1, len(kept))
        print(f"{name:>10} {len(pairs):>9} {len(kept):>5} {early:>13} {secs:>8.1f} {len(pairs) / secs:>11.3f} "
              f"{len(kept) / secs:>7.3f} {len(kept) / len(pairs):>6.1%} {loss:>14.4f}", flush=True)  # fmt: skip
    # False rejections: the dropped pairs sampled to the end (untimed) and scored by Stage IV.
    dropped = [p.index for p in new_pairs if p.rejected_at is not None]
    full = new.updated(early_reject=False)
    would_keep = sum(
        p.kept
        for p in generate_pairs(
            compiled, dropped, seed=args.seed, params=full, eta=eta, batch_size=args.batch_size
        )
    )
    kept_new = sum(p.kept for p in new_pairs)
    false_rate = would_keep / max(1, kept_new + would_keep)
    ref_rate = sum(p.kept for p in ref_pairs) / ref_s
    new_rate = kept_new / new_s
    y0 = sum(p.kept for p in ref_pairs) / len(ref_pairs)
    y = kept_new / len(new_pairs)  # as users see it: early drops count as discarded
    print(f"dropped early: {len(dropped)}, of which Stage IV would have kept {would_keep}")
    print(f"kept/s ratio {new_rate / ref_rate:.2f}, false rejections {100 * false_rate:.1f} %, "
          f"yield {100 * y:.1f} % vs {100 * y0:.1f} %")  # fmt: skip


if __name__ == "__main__":
    main()
