"""Image/mask folders: loading, validation, the seeded train/test split and the data fingerprint.

A dataset folder holds ``images/NAME.ext`` and ``masks/NAME.ext`` with the same NAME. Images are
read as greyscale (RGB through luminance, RGBA composited on black), 8-bit scaled by 255 and
deeper formats min-max scaled, then resized with area filtering (bilinear when enlarging) and
mapped to [-1, 1]. Masks are binarised at half their full value (128 for 8-bit, 0.5 for 0/1
masks, half the maximum for deeper formats) *before* a nearest-neighbour resize, so no boundary pixel is lost to interpolation (original defect 7), and stored as -1/+1.
"""

from __future__ import annotations

import csv
import hashlib
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


class DatasetError(ValueError):
    """A dataset folder or one of its files cannot be used; the message names the file."""


@dataclass
class PairDataset:
    """Images and masks of one folder at one resolution, as ``[N, 1, R, R]`` tensors in [-1, 1]."""

    names: list[str]
    images: torch.Tensor
    masks: torch.Tensor
    resolution: int
    root: Path | None = None
    fingerprint: str = ""

    def __len__(self) -> int:
        return len(self.names)

    @property
    def empty_masks(self) -> int:
        """How many masks have no foreground pixel (recorded in bundle.json as ``data.empty_masks``)."""
        return int((~(self.masks > 0).flatten(1).any(dim=1)).sum())

    def subset(self, names: Sequence[str]) -> PairDataset:
        index = {n: i for i, n in enumerate(self.names)}
        missing = [n for n in names if n not in index]
        if missing:
            raise DatasetError(f"{self.root}: pairs named in the split are missing: {', '.join(missing[:5])}")
        rows = torch.tensor([index[n] for n in names], dtype=torch.long)
        return PairDataset(list(names), self.images[rows], self.masks[rows], self.resolution, self.root)


@dataclass(frozen=True)
class Split:
    """A seeded train/test split by pair name, saved in the bundle so evaluation never trains on test pairs.

    ``grouping`` says how pairs were grouped (``{"by": "regex"|"column", "value": ...}``, or None
    for one group per pair): every group lies wholly in train or wholly in test.
    """

    seed: int
    test_fraction: float
    train: list[str] = field(default_factory=list)
    test: list[str] = field(default_factory=list)
    grouping: dict[str, str] | None = None

    def to_dict(self) -> dict[str, object]:
        d: dict[str, object] = {
            "seed": self.seed,
            "test_fraction": self.test_fraction,
            "train": self.train,
            "test": self.test,
        }
        if self.grouping is not None:
            d["grouping"] = dict(self.grouping)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, object]) -> Split:
        grouping = d.get("grouping")
        return cls(
            seed=int(d["seed"]),  # type: ignore[call-overload]
            test_fraction=float(d["test_fraction"]),  # type: ignore[arg-type]
            train=list(d["train"]),  # type: ignore[call-overload]
            test=list(d["test"]),  # type: ignore[call-overload]
            grouping=dict(grouping) if isinstance(grouping, dict) else None,
        )


def make_split(
    names: Sequence[str],
    *,
    test_fraction: float = 0.2,
    seed: int = 0,
    groups: dict[str, str] | None = None,
    grouping: dict[str, str] | None = None,
) -> Split:
    """Hold out about ``test_fraction`` of the pairs for test, seeded.

    Without ``groups`` every pair is its own group: the sorted names are shuffled and the first
    ``round(test_fraction * N)`` (at least one) go to test. With ``groups`` (name -> group) the
    groups are shuffled and taken into test in that order, skipping any group that would push
    the test split past its target, so no group straddles the split (a patient, or the panels of
    one source figure, never sits on both sides).
    """
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction}")
    ordered = sorted(names)
    n_test = round(test_fraction * len(ordered))
    if test_fraction > 0:
        n_test = min(max(n_test, 1), len(ordered) - 1)
    if groups is None:
        random.Random(seed).shuffle(ordered)
        return Split(seed, test_fraction, train=sorted(ordered[n_test:]), test=sorted(ordered[:n_test]))
    members: dict[str, list[str]] = {}
    for name in ordered:
        members.setdefault(groups[name], []).append(name)
    keys = sorted(members)
    random.Random(seed).shuffle(keys)
    test: list[str] = []
    for key in keys:
        if len(test) >= n_test:
            break
        if len(test) + len(members[key]) <= n_test or not test:
            test.extend(members[key])
    if len(test) == len(ordered):
        raise ValueError("one group holds every pair: a group-aware split cannot hold any pair out")
    held = set(test)
    return Split(
        seed,
        test_fraction,
        train=[n for n in ordered if n not in held],
        test=sorted(test),
        grouping=grouping,
    )


def groups_from_regex(names: Sequence[str], pattern: str) -> dict[str, str]:
    """Group of each name: the first match of ``pattern`` in it (its first capture group if it has one).

    A name the pattern does not match is its own group (and is listed in no error: a pattern
    that groups only some names, such as the panels of multi-panel figures, is normal).
    """
    try:
        rx = re.compile(pattern)
    except re.error as exc:
        raise ValueError(f"--group-by {pattern!r} is not a valid regular expression ({exc})") from None
    out = {}
    for name in names:
        m = rx.search(name)
        if m is None:
            out[name] = name
        else:
            out[name] = m.group(1) if rx.groups and m.group(1) is not None else m.group(0)
    return out


def groups_from_csv(root: str | Path, names: Sequence[str], column: str = "group") -> dict[str, str]:
    """Group of each name from ``root/pairs.csv`` (columns ``name`` and ``column``); empty cells are their own group."""
    path = Path(root) / "pairs.csv"
    if not path.is_file():
        raise DatasetError(f"{path}: no pairs.csv, so no '{column}' column to group pairs by")
    with path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        fields = reader.fieldnames or []
        if "name" not in fields or column not in fields:
            raise DatasetError(
                f"{path}: needs the columns 'name' and '{column}' to group pairs (has: {', '.join(fields)})"
            )
        table = {row["name"]: (row[column] or "").strip() for row in reader}
    missing = [n for n in names if n not in table]
    if missing:
        raise DatasetError(f"{path}: no row for {len(missing)} pairs ({', '.join(missing[:3])})")
    return {n: table[n] or n for n in names}


def pair_groups(
    root: str | Path, names: Sequence[str], *, group_by: str | None = None, group_column: str | None = None
) -> tuple[dict[str, str] | None, dict[str, str] | None]:
    """``(groups, grouping)`` for a split: by regex on the name, by a pairs.csv column, or none.

    With neither option, a ``group`` column in pairs.csv is used when it exists.
    """
    if group_by and group_column:
        raise ValueError("give either --group-by REGEX or --group-column NAME, not both")
    if group_by:
        return groups_from_regex(names, group_by), {"by": "regex", "value": group_by}
    csv_path = Path(root) / "pairs.csv"
    if group_column is None and csv_path.is_file():
        with csv_path.open(newline="") as fh:
            header = next(csv.reader(fh), [])
        if "group" in header:
            group_column = "group"
    if group_column:
        return groups_from_csv(root, names, group_column), {"by": "column", "value": group_column}
    return None, None


def groups_straddling(split: Split, groups: dict[str, str]) -> list[str]:
    """Groups with pairs on both sides of ``split`` (empty for a group-aware split)."""
    train_groups = {groups[n] for n in split.train if n in groups}
    return sorted({groups[n] for n in split.test if n in groups} & train_groups)


def find_pairs(root: str | Path) -> list[tuple[str, Path, Path]]:
    """List ``(name, image_path, mask_path)`` for a folder, raising DatasetError on a broken layout."""
    root = Path(root)
    image_dir, mask_dir = root / "images", root / "masks"
    if not root.is_dir():
        raise DatasetError(f"{root}: no such dataset folder")
    for d in (image_dir, mask_dir):
        if not d.is_dir():
            raise DatasetError(
                f"{root}: missing the '{d.name}/' folder (expected images/NAME.png + masks/NAME.png)"
            )
    images = _by_stem(image_dir)
    masks = _by_stem(mask_dir)
    if not images:
        raise DatasetError(f"{image_dir}: empty folder, no images ({', '.join(IMAGE_SUFFIXES)}) found")
    pairs = []
    for name in sorted(images):
        if name not in masks:
            raise DatasetError(f"{images[name]}: missing mask (no masks/{name}.* beside it)")
        pairs.append((name, images[name], masks[name]))
    return pairs


def _by_stem(folder: Path) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES:
            if p.stem in found:
                raise DatasetError(f"{p}: two files share the name '{p.stem}' ({found[p.stem].name})")
            found[p.stem] = p
    return found


def _open(path: Path) -> Image.Image:
    try:
        img = Image.open(path)
        img.load()
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise DatasetError(f"{path}: unreadable image file ({exc})") from exc
    return img


def _to_grey_float(img: Image.Image, path: Path) -> tuple[np.ndarray, float]:
    """Greyscale float array and the value that stands for 'full scale' in its format."""
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        img = Image.alpha_composite(black, rgba).convert("L")
    elif img.mode in ("RGB", "CMYK", "YCbCr", "P", "1"):
        img = img.convert("L")
    arr = np.asarray(img)
    if arr.ndim == 3:  # multi-channel 16-bit arrays that PIL keeps as-is
        arr = arr[..., :3].astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    arr = arr.astype(np.float64)
    if arr.size == 0:
        raise DatasetError(f"{path}: empty image")
    if img.mode == "L":
        return arr, 255.0
    return arr, float(arr.max()) if arr.max() > 0 else 1.0


def load_image(path: Path, resolution: int) -> np.ndarray:
    """One image as float32 ``[R, R]`` in [-1, 1]."""
    img = _open(path)
    arr, full = _to_grey_float(img, path)
    if img.mode == "L":
        unit = arr / full
    else:  # 16-bit, 32-bit and float images: min-max, since their range varies by scanner
        lo, hi = float(arr.min()), float(arr.max())
        unit = (arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr)
    h, w = unit.shape
    pil = Image.fromarray(unit.astype(np.float32), mode="F")
    shrinking = resolution < min(h, w)
    pil = pil.resize(
        (resolution, resolution), Image.Resampling.BOX if shrinking else Image.Resampling.BILINEAR
    )
    out = np.clip(np.asarray(pil, dtype=np.float32), 0.0, 1.0)
    return out * 2.0 - 1.0


def load_mask(path: Path, resolution: int, *, allow_empty: bool = False) -> np.ndarray:
    """One mask as float32 ``[R, R]`` of -1 (background) / +1 (foreground).

    ``allow_empty`` accepts a mask without foreground (a real negative case in an export); training
    refuses them."""
    img = _open(path)
    arr, full = _to_grey_float(img, path)
    if arr.max() <= 1.0:
        full = 1.0  # masks stored as 0/1
    binary = (arr >= full / 2.0).astype(np.uint8) * 255
    if not binary.any() and not allow_empty:
        raise DatasetError(
            f"{path}: mask with no foreground (no pixel reaches half of the mask's full value)"
        )
    pil = Image.fromarray(binary, mode="L").resize((resolution, resolution), Image.Resampling.NEAREST)
    out = np.asarray(pil) > 127
    if not out.any() and binary.any():
        raise DatasetError(
            f"{path}: mask foreground vanishes at {resolution}x{resolution}; use a higher resolution"
        )
    return np.where(out, 1.0, -1.0).astype(np.float32)


def _image_size(path: Path) -> tuple[int, int]:
    return _open(path).size


def load_folder(root: str | Path, resolution: int, names: Sequence[str] | None = None) -> PairDataset:
    """Load and validate every pair of ``root`` (or only ``names``) at ``resolution``."""
    if resolution < 8:
        raise DatasetError(f"resolution must be at least 8 pixels, got {resolution}")
    pairs = find_pairs(root)
    if names is not None:
        wanted = set(names)
        pairs = [p for p in pairs if p[0] in wanted]
        missing = wanted - {p[0] for p in pairs}
        if missing:
            raise DatasetError(
                f"{root}: pairs named in the split are missing: {', '.join(sorted(missing)[:5])}"
            )
    images, masks = [], []
    for _name, ip, mp in pairs:
        isize, msize = _image_size(ip), _image_size(mp)
        if isize != msize:
            raise DatasetError(
                f"{mp}: size mismatch, mask is {msize[0]}x{msize[1]} but image is {isize[0]}x{isize[1]}"
            )
        images.append(load_image(ip, resolution))
        masks.append(load_mask(mp, resolution))
    return PairDataset(
        names=[p[0] for p in pairs],
        images=torch.from_numpy(np.stack(images))[:, None],
        masks=torch.from_numpy(np.stack(masks))[:, None],
        resolution=resolution,
        root=Path(root),
        fingerprint=fingerprint(pairs),
    )


def fingerprint(pairs: Sequence[tuple[str, Path, Path]]) -> str:
    """sha256 over every pair's name and file bytes: the same folder content gives the same value."""
    h = hashlib.sha256()
    for name, ip, mp in sorted(pairs):
        h.update(name.encode())
        h.update(hashlib.sha256(ip.read_bytes()).digest())
        h.update(hashlib.sha256(mp.read_bytes()).digest())
    return "sha256:" + h.hexdigest()


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """``[..., R, R]`` in [-1, 1] to uint8 0..255 (for images and -1/+1 masks alike)."""
    arr = ((x.detach().float().cpu().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)
    return arr.numpy()
