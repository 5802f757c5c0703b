"""Factories for tiny datasets and bundles, so tests never need the real data or the demo bundle."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def make_shapes_dataset(root: Path, n: int = 12, size: int = 32, seed: int = 0) -> Path:
    """``n`` pairs of a bright ellipse (the mask) on a noisy background, ``images/`` + ``masks/`` PNGs."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[:size, :size]
    for i in range(n):
        cx, cy = rng.uniform(size * 0.3, size * 0.7, 2)
        rx, ry = rng.uniform(size * 0.12, size * 0.3, 2)
        mask = ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 < 1
        img = (rng.normal(70, 12, (size, size)) + mask * 110).clip(0, 255).astype(np.uint8)
        Image.fromarray(img).save(root / "images" / f"shape{i:03d}.png")
        Image.fromarray((mask * 255).astype(np.uint8)).save(root / "masks" / f"shape{i:03d}.png")
    return root


def make_multiclass_dataset(root: Path, n: int = 12, size: int = 32, classes: int = 3, seed: int = 0) -> Path:
    """``n`` pairs of ``classes - 1`` ellipses on a noisy background, masks as label maps ``0..classes-1``.

    Class ``k`` is the ellipse in the ``k``-th of ``classes - 1`` vertical strips from the image left
    (with a gap between them, so they never touch) and has its own brightness, so the classes are learnable from the image.
    """
    if classes < 2:
        raise ValueError(f"classes must be >= 2, got {classes}")
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[:size, :size]
    strip = size / (classes - 1)
    for i in range(n):
        labels = np.zeros((size, size), dtype=np.uint8)
        img = rng.normal(60, 10, (size, size))
        for k in range(1, classes):
            cx = (k - 0.5) * strip + rng.uniform(-0.1, 0.1) * strip
            cy = rng.uniform(size * 0.35, size * 0.65)
            rx, ry = rng.uniform(0.2, 0.35) * strip, rng.uniform(size * 0.15, size * 0.3)
            inside = ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 < 1
            labels[inside] = k
            img[inside] += 160 * k / (classes - 1)
        Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(root / "images" / f"multi{i:03d}.png")
        Image.fromarray(labels).save(root / "masks" / f"multi{i:03d}.png")
    return root


def make_nonsquare_dataset(root: Path, n: int = 8, width: int = 32, height: int = 24, seed: int = 0) -> Path:
    """Like ``make_shapes_dataset`` with ``width`` != ``height``: an ellipse (the mask) on noise, W x H PNGs."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[:height, :width]
    for i in range(n):
        cx, cy = rng.uniform(0.3, 0.7, 2) * (width, height)
        rx, ry = rng.uniform(0.15, 0.3, 2) * (width, height)
        mask = ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 < 1
        img = (rng.normal(70, 12, (height, width)) + mask * 110).clip(0, 255).astype(np.uint8)
        Image.fromarray(img).save(root / "images" / f"wide{i:03d}.png")
        Image.fromarray((mask * 255).astype(np.uint8)).save(root / "masks" / f"wide{i:03d}.png")
    return root


def make_tiny_bundle(root: Path, size: int = 16, steps: int = 30) -> Path:
    """Train a throwaway bundle on shapes in a few seconds (all three stages, CPU)."""
    return _train_tiny(make_shapes_dataset(root / "data", n=10, size=size), root / "bundle", size, steps)


def make_tiny_multiclass_bundle(root: Path, size: int = 16, steps: int = 20, classes: int = 3) -> Path:
    """``make_tiny_bundle`` on ``make_multiclass_dataset``: a K-class bundle (K = ``classes``) whose
    bundle.json names its labels, in a few seconds."""
    data_dir = make_multiclass_dataset(root / "data", n=10, size=size, classes=classes)
    names = {"0": "background", **{str(k): f"organ {k}" for k in range(1, classes)}}
    return _train_tiny(data_dir, root / "bundle", size, steps, labels=names)


def _train_tiny(
    data_dir: Path, bundle: Path, size: int, steps: int, labels: dict[str, str] | None = None
) -> Path:
    from models.bundle import new_meta, write_meta
    from models.data import load_folder, make_split
    from models.training import TrainConfig, train_dpm, train_filter, train_segmenter

    data = load_folder(data_dir, size)
    split = make_split(data.names, test_fraction=0.2, seed=0)
    meta = new_meta(size, data.num_classes)
    if labels is not None:
        meta["labels"] = labels
    meta["split"] = split.to_dict()
    meta["data"] = {
        "folder": str(data_dir),
        "fingerprint": data.fingerprint,
        "pairs": len(data),
        "empty_masks": data.empty_masks,
        "licence_files": [],
    }
    meta["sampling_defaults"]["steps"] = 4
    meta["eta_default"] = 1.0  # an untrained filter must not reject everything in tests
    write_meta(bundle, meta)
    train, test = data.subset(split.train), data.subset(split.test)
    train_dpm(train, bundle, TrainConfig(steps=steps, batch_size=4), device="cpu")
    train_segmenter(train, bundle, TrainConfig(steps=max(1, steps // 2), batch_size=4), device="cpu")
    train_filter(
        train, bundle, TrainConfig(steps=max(1, steps // 2), batch_size=4), test_data=test, device="cpu"
    )
    return bundle


def make_unlabelled_images(root: Path, n: int = 6, size: int = 32, seed: int = 100) -> Path:
    """``n`` images without masks in ``root/unlabelled/`` (drawn like ``make_shapes_dataset``'s images)."""
    rng = np.random.default_rng(seed)
    folder = root / "unlabelled"
    folder.mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[:size, :size]
    for i in range(n):
        cx, cy = rng.uniform(size * 0.3, size * 0.7, 2)
        inside = ((xx - cx) / (size * 0.2)) ** 2 + ((yy - cy) / (size * 0.2)) ** 2 < 1
        img = (rng.normal(70, 12, (size, size)) + inside * 110).clip(0, 255).astype(np.uint8)
        Image.fromarray(img).save(folder / f"extra{i:03d}.png")
    return root
