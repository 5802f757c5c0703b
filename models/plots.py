"""PNG plots of an evaluation (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

Pair = tuple[np.ndarray, np.ndarray]  # uint8 image [R, R], uint8 mask [R, R] (0/255, or labels 0..K-1)

# outline colours of foreground classes 1, 2, ... of a K-class mask (class 1 keeps the binary red)
CLASS_COLOURS = ("#ff3030", "#30a0ff", "#ffd030", "#30e060", "#e040ff", "#ff8c00", "#00e0e0", "#a0a0a0")


def _show_pairs(axes: Any, pairs: Sequence[Pair], cols: int) -> None:
    for i, ax in enumerate(axes):
        ax.set_axis_off()
        if i >= len(pairs):
            continue
        img, mask = pairs[i]
        ax.imshow(img, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
        if mask.max() > 15:  # a binary mask, written 0/255
            if mask.min() == 0:
                ax.contour(mask > 127, levels=[0.5], colors="#ff3030", linewidths=0.8)
            continue
        for k in (int(v) for v in np.unique(mask) if v > 0):  # a label map: one outline per class
            if (mask != k).any():
                colour = CLASS_COLOURS[(k - 1) % len(CLASS_COLOURS)]
                ax.contour(mask == k, levels=[0.5], colors=colour, linewidths=0.8)


def sample_grid(
    path: Path, generated: Sequence[Pair], real: Sequence[Pair], title: str, cols: int = 4
) -> Path:
    """Up to 16 generated pairs (left) beside up to 16 real pairs (right), mask outlined in red over the image."""
    rows = max(1, int(np.ceil(max(len(generated[:16]), len(real[:16]), 1) / cols)))
    fig, axes = plt.subplots(rows, 2 * cols + 1, figsize=(2 * cols + 1, rows + 0.6), squeeze=False)
    for r in range(rows):
        axes[r, cols].set_axis_off()
    _show_pairs(axes[:, :cols].ravel(), list(generated[:16]), cols)
    _show_pairs(axes[:, cols + 1 :].ravel(), list(real[:16]), cols)
    axes[0, cols // 2].set_title(title, fontsize=8)
    axes[0, cols + 1 + cols // 2].set_title("real (train split)", fontsize=8)
    fig.tight_layout(pad=0.2)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def dice_loss_histogram(path: Path, losses: Mapping[str, Sequence[float]], eta: float) -> Path:
    """Fig. 2 left: the filter's Dice loss of generated pairs (no Stage IV) for τ and s = 1/τ."""
    fig, ax = plt.subplots(figsize=(6, 3.6))
    bins = [float(b) for b in np.linspace(0.0, 1.0, 41)]
    for label, values in losses.items():
        v = np.asarray(values, dtype=float)
        ax.hist(
            v,
            bins=bins,
            histtype="step",
            linewidth=1.4,
            label=f"{label} (n={len(v)}, median {np.median(v):.3f})",
        )
    ax.axvline(eta, color="k", linestyle="--", linewidth=0.8, label=f"η = {eta}")
    ax.set_xlabel("Dice loss of the Stage IV filter on the generated pair")
    ax.set_ylabel("pairs")
    ax.set_title("Generated pairs, τ vs s = 1/τ (before Stage IV)", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def fewshot_rows(path: Path, entries: Sequence[Mapping[str, Any]]) -> Path:
    """Fig. 2 right, extended: test Dice (mean ± std over runs) of the five rows vs share of the train split."""
    fr = np.array([e["fraction"] * 100 for e in entries])
    fig, ax = plt.subplots(figsize=(5.6, 3.8))
    styles = {
        "origin": ("origin", "o"),
        "augment": ("+ augmentation", "^"),
        "synthetic": ("+ synthetic", "s"),
        "synthetic_augment": ("+ synthetic + augmentation", "D"),
        "duplicates": ("+ duplicates (control)", "x"),
    }
    for key, (label, marker) in styles.items():
        pts = [(f, e["rows"][key]) for f, e in zip(fr, entries, strict=True) if key in e["rows"]]
        if not pts:
            continue
        x = np.array([p[0] for p in pts])
        ax.errorbar(x, [p[1]["mean"] for p in pts], yerr=[p[1]["std"] for p in pts], marker=marker,
                    capsize=3, label=label)  # fmt: skip
    retrained = all(e.get("retrained") for e in entries)
    ax.set_xscale("log")
    ax.set_xticks(fr)
    ax.set_xticklabels([f"{f:g}%" for f in fr])
    ax.set_xlabel("share of the train split")
    ax.set_ylabel("test Dice")
    ax.set_title(
        f"Few-shot, equal steps (bundle {'retrained' if retrained else 'not retrained'} per fraction)",
        fontsize=9,
    )
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def memorisation_histogram(path: Path, mem: Mapping[str, Any], fraction: float) -> Path:
    """Nearest-training-mask Dice of synthetic pairs beside real held-out pairs (the reference)."""
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.2))
    vals = mem["values"]
    for ax, key, xlabel in (
        (axes[0], "mask_dice", "Dice of the mask to its nearest training mask"),
        (axes[1], "image_ssim", "SSIM of the image to its nearest training image"),
    ):
        bins = np.linspace(
            min(0.5, *(vals[f"synthetic_{key}"] or [1]), *(vals[f"real_{key}"] or [1])), 1.0, 26
        )
        ax.hist(vals[f"synthetic_{key}"], bins=bins, alpha=0.6, density=True, label="synthetic (kept)")
        ax.hist(vals[f"real_{key}"], bins=bins, alpha=0.6, density=True, label="real test pairs")
        if key == "mask_dice":
            ax.axvline(mem["threshold"], color="k", linestyle="--", linewidth=0.8)
        ax.set_xlabel(xlabel, fontsize=8)
        ax.legend(fontsize=7)
    axes[0].set_ylabel("density")
    fig.suptitle(
        f"Memorisation at {fraction:.0%}: against the {mem['n_train_reference']} pairs the bundle saw",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
