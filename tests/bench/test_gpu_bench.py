"""bench/gpu.py runs where there is no GPU (at a small size), and Bundle.compile wires compiled networks in."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from models.bundle import Bundle
from models.expand import generate_pairs
from models.sampling import SamplingParams

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow  # the benchmark script in a subprocess; torch.compile


def test_gpu_bench_runs_on_the_cpu_at_a_small_size() -> None:
    cmd = [sys.executable, "bench/gpu.py", "--device", "cpu", "--sizes", "32", "--batches", "2", "--steps", "2",
           "--timed-batches", "1", "--no-compile", "--channels", "16", "32", "--precisions", "fp32"]  # fmt: skip
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240, check=True).stdout
    lines = out.strip().splitlines()
    assert lines[0].startswith("no GPU here")
    rows = [line.split() for line in lines[3:]]
    assert [(r[0], r[1], r[3], r[4], r[5]) for r in rows] == [("32", "random", "2", "fp32", "eager")]
    assert all(float(r[7]) > 0 and r[8] == "-" for r in rows)  # generated/s; no kept/s for random weights


def test_a_compiled_bundle_samples_with_its_compiled_networks(tiny_bundle: Path) -> None:
    """torch.compile's "eager" backend (tracing only: the inductor one takes minutes here) keeps the bits."""
    params = SamplingParams(steps=2, w_cf=2.0, w_cg=1.0, early_reject=False)
    plain = list(
        generate_pairs(Bundle.load(tiny_bundle), range(2), seed=3, params=params, eta=1.0, batch_size=2)
    )
    bundle = Bundle.load(tiny_bundle)
    assert bundle.compile(2, params, backend="eager") > 0
    assert bundle.compiled is not None and bundle.networks() == bundle.compiled
    # the noisy segmenter stays eager: inductor zeroed its input gradient, i.e. all guidance (bug found
    # with bench/expand.py --compare-reference); the DPM and the filter are compiled
    assert bundle.networks()[1] is bundle.segmenter and bundle.networks()[0] is not bundle.dpm
    compiled = list(generate_pairs(bundle, range(2), seed=3, params=params, eta=1.0, batch_size=2))
    assert all(
        np.array_equal(a.image, b.image) and a.dice_loss == b.dice_loss
        for a, b in zip(plain, compiled, strict=True)
    )
