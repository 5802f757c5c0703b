"""Summaries and paired comparisons of per-test-image Dice: pure functions of arrays."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


def summarise(values: Sequence[float]) -> dict[str, Any]:
    """Mean and sample standard deviation (ddof 1; 0 for a single value) of run-level scores."""
    a = np.asarray(values, dtype=np.float64)
    return {
        "per_seed": [float(x) for x in a],
        "mean": float(a.mean()),
        "std": float(a.std(ddof=1)) if len(a) > 1 else 0.0,
    }


def summarise_by_class(per_run: np.ndarray) -> dict[str, dict[str, Any]]:
    """``{"1": summarise(...), ...}``: each foreground class's score over runs, from ``[runs, K-1]``
    (class index as a string key, as JSON writes it)."""
    per_run = np.asarray(per_run, dtype=np.float64)
    return {str(c + 1): summarise(per_run[:, c].tolist()) for c in range(per_run.shape[1])}


def paired_difference(
    row: np.ndarray, reference: np.ndarray, *, resamples: int = 2000, seed: int = 0, level: float = 0.95
) -> dict[str, Any]:
    """Paired comparison of two rows on the same test images.

    ``row`` is ``[runs, images]`` and ``reference`` ``[ref_runs, images]`` of per-image Dice. Each
    image's difference is the mean of the row's runs minus the mean of the reference's runs (the
    runs of one seed share initial weights, so averaging over runs removes most seed noise while
    the images stay paired). The confidence interval is a percentile bootstrap over test images:
    it says how much the mean gain depends on which images happened to be in the test split.
    """
    row, reference = np.atleast_2d(row), np.atleast_2d(reference)
    if row.shape[1] != reference.shape[1]:
        raise ValueError(f"rows score different test sets: {row.shape[1]} vs {reference.shape[1]} images")
    diff = row.mean(axis=0) - reference.mean(axis=0)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(diff), size=(resamples, len(diff)))
    boot = diff[idx].mean(axis=1)
    alpha = (1.0 - level) / 2.0
    return {
        "mean": float(diff.mean()),
        "ci_low": float(np.quantile(boot, alpha)),
        "ci_high": float(np.quantile(boot, 1.0 - alpha)),
        "level": level,
        "images": int(len(diff)),
        "images_better": int((diff > 0).sum()),
        "images_worse": int((diff < 0).sum()),
    }
