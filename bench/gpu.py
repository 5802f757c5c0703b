"""Sampling throughput on a GPU: generated (and, with a trained bundle, kept) pairs per second by
resolution, batch size, precision (fp32 / bf16 autocast) and eager vs torch.compile.

    python bench/gpu.py                                   # on a CUDA machine: 64, 128, 256 px
    python bench/gpu.py --bundle models/bundles/cxr-lung-64 --sizes 64
    python bench/gpu.py --device cpu --sizes 32 --batches 2 --steps 2 --no-compile   # runs anywhere

Without --bundle the networks have random weights (labelled "random" in the table): the throughput
of the architecture, not of a trained model, so no kept/s. The DPM is built with --channels per
level (default ~70M parameters at 4 levels, attention at the coarsest), the noisy segmenter and the
Stage IV filter as ``diffuseexpand train`` builds them. Every pair is guided (w_cf = 3 doubles the
image phase's batch, w_cg = 1 adds the segmenter's input gradient). On a machine without CUDA it
says so and measures the CPU at the sizes asked.
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from models.bundle import Bundle  # noqa: E402
from models.expand import generate_pairs  # noqa: E402
from models.networks import FilterSegmenter, NoisySegmenter, build_dpm, default_segmenter_downsample  # noqa: E402


def random_bundle(resolution: int, channels: tuple[int, ...], device: torch.device) -> Bundle:
    torch.manual_seed(0)
    nets = (
        build_dpm(resolution, block_out_channels=channels, layers_per_block=2),
        NoisySegmenter(sample_size=resolution, downsample=default_segmenter_downsample(resolution)),
        FilterSegmenter(),
    )
    for n in nets:
        n.to(device).to(memory_format=torch.channels_last).eval().requires_grad_(False)
    meta = {"resolution": resolution, "sampling_defaults": {"steps": 20, "w_cf": 3.0, "w_cg": 1.0}}
    return Bundle(Path("random"), meta, *nets, device=device)  # type: ignore[arg-type]


def measure(bundle: Bundle, batch: int, steps: int, bf16: bool, batches: int) -> tuple[float, float]:
    """(generated/s, kept/s) over ``batches`` batches after one warm-up batch."""
    params = bundle.default_params().updated(steps=steps, early_reject=False)
    dev = bundle.device
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    eta = bundle.default_eta
    with autocast:
        list(
            generate_pairs(
                bundle, range(batch), seed=0, params=params.updated(steps=2), eta=eta, batch_size=batch
            )
        )
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        pairs = list(
            generate_pairs(bundle, range(batch * batches), seed=1, params=params, eta=eta, batch_size=batch)
        )
        if dev.type == "cuda":
            torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    return len(pairs) / dt, sum(p.kept for p in pairs) / dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--bundle", type=Path, help="a trained bundle (its resolution only); default: random weights"
    )
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--sizes", type=int, nargs="+", default=[64, 128, 256])
    ap.add_argument("--batches", type=int, nargs="+", default=[8, 32, 128])
    ap.add_argument("--channels", type=int, nargs="+", default=[128, 256, 384, 512])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--timed-batches", type=int, default=2, help="batches timed per row")
    ap.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True)
    args = ap.parse_args()
    dev = torch.device(args.device)
    if dev.type == "cuda":
        name = torch.cuda.get_device_name(dev)
    else:
        name = f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)"
        print("no GPU here: measuring the CPU at the sizes asked (not GPU figures)")
    print(f"device: {name}, torch {torch.__version__}, {args.steps} steps, guided (w_cf 3, w_cg 1)")
    print(f"{'size':>5} {'weights':>8} {'DPM params':>10} {'batch':>5} {'precision':>9} {'mode':>8} "
          f"{'compile s':>9} {'generated/s':>11} {'kept/s':>7}")  # fmt: skip
    modes = ["eager", "compiled"] if args.compile else ["eager"]
    for size in args.sizes:
        for batch in args.batches:
            for mode in modes:
                if args.bundle:
                    bundle, weights = Bundle.load(args.bundle, device=dev), "trained"
                else:
                    bundle, weights = random_bundle(size, tuple(args.channels), dev), "random"
                if bundle.resolution != size:
                    raise SystemExit(f"--sizes {size}: the bundle is {bundle.resolution} px")
                compile_s = bundle.compile(batch) if mode == "compiled" else 0.0
                params_m = sum(p.numel() for p in bundle.dpm.parameters()) / 1e6
                for precision in args.precisions:
                    gen, kept = measure(bundle, batch, args.steps, precision == "bf16", args.timed_batches)
                    kept_s = f"{kept:>7.2f}" if weights == "trained" else f"{'-':>7}"
                    print(f"{size:>5} {weights:>8} {params_m:>9.1f}M {batch:>5} {precision:>9} {mode:>8} "
                          f"{compile_s:>9.1f} {gen:>11.2f} {kept_s}", flush=True)  # fmt: skip
                del bundle
                if dev.type == "cuda":
                    torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
