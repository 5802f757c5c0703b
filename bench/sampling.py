"""Stage III sampling speed: seconds per generated pair, guided vs unguided, by steps and batch size.

    python bench/sampling.py                       # default architecture at 64x64, random weights
    python bench/sampling.py --bundle models/bundles/cxr-lung-64

Timing does not depend on the weights, so without --bundle the networks are freshly initialised
with the architecture `diffuseexpand train` builds. "Unguided" is w_cg = 0 (classifier-free
guidance only, as the CF variant); "guided" adds the segmenter gradient (w_cg > 0). Each pair
includes both phases (mask, then image with the doubled CFG batch) and the Stage IV filter.
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import torch

from models.bundle import Bundle
from models.expand import generate_pairs
from models.networks import FilterSegmenter, NoisySegmenter, build_dpm, default_segmenter_downsample
from models.sampling import SamplingParams


def random_bundle(resolution: int) -> Bundle:
    torch.manual_seed(0)
    nets = (
        build_dpm(resolution),
        NoisySegmenter(sample_size=resolution, downsample=default_segmenter_downsample(resolution)),
        FilterSegmenter(),
    )
    for n in nets:
        n.to(memory_format=torch.channels_last).eval().requires_grad_(False)
    return Bundle(Path("random"), {"resolution": resolution}, *nets)  # type: ignore[arg-type]


def seconds_per_pair(bundle: Bundle, steps: int, batch: int, guided: bool, pairs: int) -> float:
    params = SamplingParams(steps=steps, w_cf=2.0, w_cg=1.0 if guided else 0.0)
    n = max(pairs, batch)
    list(
        generate_pairs(
            bundle, range(batch), seed=0, params=SamplingParams(steps=1), eta=1.0, batch_size=batch
        )
    )
    t0 = time.perf_counter()
    list(generate_pairs(bundle, range(n), seed=1, params=params, eta=1.0, batch_size=batch))
    return (time.perf_counter() - t0) / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path)
    ap.add_argument("--resolution", type=int, default=64)
    ap.add_argument("--steps", type=int, nargs="+", default=[10, 20, 30])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument(
        "--pairs", type=int, default=16, help="pairs timed per configuration (at least one batch)"
    )
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    bundle = Bundle.load(args.bundle) if args.bundle else random_bundle(args.resolution)
    print(
        f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}"
    )
    print(f"bundle: {args.bundle or 'random weights'}, {bundle.resolution}x{bundle.resolution}, "
          f"DPM {sum(p.numel() for p in bundle.dpm.parameters()) / 1e6:.2f}M params, "
          f"segmenter {sum(p.numel() for p in bundle.segmenter.parameters()) / 1e6:.2f}M")  # fmt: skip
    print(f"{'steps':>5} {'batch':>5} {'unguided s/pair':>16} {'guided s/pair':>14} {'guided/unguided':>16}")
    for steps in args.steps:
        for batch in args.batch:
            u = seconds_per_pair(bundle, steps, batch, False, args.pairs)
            g = seconds_per_pair(bundle, steps, batch, True, args.pairs)
            print(f"{steps:>5} {batch:>5} {u:>16.3f} {g:>14.3f} {g / u:>16.3f}", flush=True)


if __name__ == "__main__":
    main()
