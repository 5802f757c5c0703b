"""Image/mask folders: loading, validation, the seeded train/test split and the data fingerprint.

A dataset folder holds ``images/NAME.ext`` and ``masks/NAME.ext`` with the same NAME; every image
needs its mask and every mask its image. Formats: PNG, JPEG, TIFF, BMP, DICOM (``.dcm``) and NIfTI
(``.nii``, ``.nii.gz``), one 2D frame per file; DICOM and NIfTI are read through MONAI's readers.
Images are read as greyscale (RGB through luminance, RGBA composited on black), 8-bit scaled by 255,
DICOM by its window, other deeper formats min-max scaled, padded to a square with black (centred,
aspect kept: ``models.shape``; a square image is untouched, the padding recorded per pair), then
resized with area filtering (bilinear when enlarging) and mapped to [-1, 1]. Masks are label maps: K
classes (``models.labels``) are inferred from the masks (whole values 0..K-1, or a palette PNG's
indices) or given. A binary set (K = 2) is binarised *before* a nearest-neighbour resize, so no
boundary pixel is lost to interpolation (original defect 7; padded with background first), and stored
as -1/+1: a label map (whole values, at most 16 of them) by value > 0, any other mask at half its full
value (128 for 8-bit, 0.5 for 0/1 masks, half the maximum for deeper formats). A K-class mask keeps
its labels through the padding and the nearest resize and is stored one-hot. ``app.pixels`` holds the
pixel rules, shared with the API's upload check.
"""

from __future__ import annotations

import csv
import random
import re
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

# The formats, the grey conversion, the DICOM window and the mask rule are defined once, with the
# API (which has no torch): app.pixels; pairing and the fingerprint in app.dataset_check.
from app.dataset_check import fingerprint as fingerprint
from app.dataset_check import match_pairs, read_groups
from app.pixels import (
    FORMATS,
    Grey,
    PixelsError,
    dicom_window,
    foreground,
    format_of,
    grey_from_array,
    split_suffix,
    squeeze_2d,
    to_unit,
)
from app.pixels import read_grey as pixels_read_grey
from models.labels import check_num_classes, decode, encode, infer_num_classes
from models.shape import Padding, pad_to_square, square_padding

IMAGE_SUFFIXES = tuple(FORMATS)


class DatasetError(ValueError):
    """A dataset folder or one of its files cannot be used; the message names the file."""


@dataclass
class PairDataset:
    """Images ``[N, 1, R, R]`` in [-1, 1] and encoded masks ``[N, C, R, R]`` (``models.labels``) of one
    folder at one resolution."""

    names: list[str]
    images: torch.Tensor
    masks: torch.Tensor
    resolution: int
    root: Path | None = None
    fingerprint: str = ""
    num_classes: int = 2
    # how each pair was padded to a square before the resize (models.shape); None: not recorded
    paddings: list[Padding] | None = None

    def __len__(self) -> int:
        return len(self.names)

    @property
    def labels(self) -> torch.Tensor:
        """The masks as label maps ``[N, 1, R, R]`` (long, 0 = background)."""
        return decode(self.masks, self.num_classes)

    @property
    def empty_masks(self) -> int:
        """How many masks have no foreground pixel (recorded in bundle.json as ``data.empty_masks``)."""
        return int((~(self.labels > 0).flatten(1).any(dim=1)).sum())

    def subset(self, names: Sequence[str]) -> PairDataset:
        index = {n: i for i, n in enumerate(self.names)}
        missing = [n for n in names if n not in index]
        if missing:
            raise DatasetError(f"{self.root}: pairs named in the split are missing: {', '.join(missing[:5])}")
        rows = torch.tensor([index[n] for n in names], dtype=torch.long)
        paddings = None if self.paddings is None else [self.paddings[index[n]] for n in names]
        return PairDataset(
            list(names), self.images[rows], self.masks[rows], self.resolution, self.root,
            num_classes=self.num_classes, paddings=paddings,
        )  # fmt: skip

    def shapes(self, most: int = 5) -> dict[str, int]:
        """The ``most`` commonest original sizes, ``{"WxH": pairs}`` (bundle.json ``data.shapes``)."""
        if not self.paddings:
            return {}
        counts = Counter(f"{p.width}x{p.height}" for p in self.paddings)
        return dict(counts.most_common(most))


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
    try:
        return read_groups(path.read_text(encoding="utf-8-sig"), names, column)
    except ValueError as exc:
        raise DatasetError(f"{path}: {exc}") from None


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
    """List ``(name, image_path, mask_path)`` for a folder, raising DatasetError on a broken layout:
    a missing folder, no images, two files of one name, an image without a mask or a mask without
    an image (every one named)."""
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
    matched, issues = match_pairs(
        {n: p.name for n, p in images.items()}, {n: p.name for n, p in masks.items()}
    )
    if issues:
        listed = "; ".join(f"{i.member}: {i.detail}" for i in issues[:20])
        more = f"; and {len(issues) - 20} more" if len(issues) > 20 else ""
        raise DatasetError(f"{root}: {len(issues)} unpaired file(s): {listed}{more}")
    return [(name, images[name], masks[name]) for name, _, _ in matched]


UNLABELLED_DIR = "unlabelled"


def find_unlabelled(root: str | Path) -> list[tuple[str, Path]]:
    """``(name, path)`` of the images in ``root/unlabelled/`` (none when the folder is absent).

    Unlabelled images are explicit: they live in their own folder, so an image in ``images/``
    without its mask stays an error (``find_pairs``) rather than silently becoming unlabelled."""
    folder = Path(root) / UNLABELLED_DIR
    if not folder.is_dir():
        return []
    return sorted(_by_stem(folder).items())


def load_unlabelled(root: str | Path, resolution: int) -> tuple[list[str], torch.Tensor]:
    """The names and images ``[U, 1, R, R]`` in [-1, 1] of ``root/unlabelled/`` (read like ``images/``)."""
    found = find_unlabelled(root)
    if not found:
        return [], torch.zeros(0, 1, resolution, resolution)
    arrays = [load_image(path, resolution) for _name, path in found]
    return [name for name, _ in found], torch.from_numpy(np.stack(arrays))[:, None]


def _by_stem(folder: Path) -> dict[str, Path]:
    """Files of a supported format by NAME (files of other formats are not the dataset's)."""
    found: dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        parts = split_suffix(p.name)
        if p.is_file() and parts is not None:
            if parts[0] in found:
                raise DatasetError(f"{p}: two files share the name '{parts[0]}' ({found[parts[0]].name})")
            found[parts[0]] = p
    return found


@lru_cache(maxsize=2)
def _monai_loader(kind: str) -> Any:
    """MONAI's ``LoadImage`` with its pydicom or nibabel reader; arrays come as float32 ``(x, y)``."""
    from monai.data import NibabelReader, PydicomReader
    from monai.transforms import LoadImage

    # prune_metadata=False keeps the DICOM tags (the window) in the metadata
    reader = PydicomReader(prune_metadata=False) if kind == "dicom" else NibabelReader()
    return LoadImage(reader=reader, image_only=True, dtype=np.float32)


def _tag(meta: dict[str, Any], tag: str) -> Any:
    """A DICOM tag from MONAI's metadata (pydicom's JSON form: ``{"vr": ..., "Value": [...]}``)."""
    entry = meta.get(tag)
    values = entry.get("Value") if isinstance(entry, dict) else None
    return values if values else None


def read_grey(path: Path, *, as_image: bool = True) -> Grey:
    """One file as ``app.pixels.Grey``: PNG, JPEG, TIFF and BMP through PIL (``app.pixels``), DICOM
    and NIfTI through MONAI's readers, with the same rescale, window and axes as the API's."""
    try:
        kind = format_of(path)
        if kind == "pil":
            return pixels_read_grey(path, as_image=as_image)
        with warnings.catch_warnings():  # a 2D file has no orientation tags: MONAI warns of its affine
            warnings.simplefilter("ignore", UserWarning)
            loaded = _monai_loader(kind)(str(path))
        values = squeeze_2d(np.asarray(loaded)).T  # (x, y) -> [rows, columns]
    except PixelsError as exc:
        raise DatasetError(f"{path}: {exc}") from None
    except Exception as exc:
        raise DatasetError(f"{path}: unreadable image file ({exc})") from None
    if kind != "dicom" or not as_image:
        return grey_from_array(values)
    meta = dict(getattr(loaded, "meta", {}))
    photometric = _tag(meta, "00280004")
    return grey_from_array(
        values,
        window=dicom_window(_tag(meta, "00281050"), _tag(meta, "00281051")),
        invert=bool(photometric) and str(photometric[0]).strip() == "MONOCHROME1",
    )


def image_from_grey(grey: Grey, resolution: int) -> np.ndarray:
    """An image as float32 ``[R, R]`` in [-1, 1]: [0, 1] by ``app.pixels.to_unit``, padded to a square
    with black, then resized with area filtering (bilinear when enlarging)."""
    unit = to_unit(grey)
    # padded to a square (aspect kept) with its black level (0: the format's or window's black), before
    # the resize; a square image is untouched
    unit, _ = pad_to_square(unit, 0.0)
    h, w = unit.shape
    pil = Image.fromarray(unit.astype(np.float32), mode="F")
    shrinking = resolution < min(h, w)
    pil = pil.resize(
        (resolution, resolution), Image.Resampling.BOX if shrinking else Image.Resampling.BILINEAR
    )
    out = np.clip(np.asarray(pil, dtype=np.float32), 0.0, 1.0)
    return out * 2.0 - 1.0


def mask_from_grey(grey: Grey, resolution: int, path: Path, *, allow_empty: bool = False) -> np.ndarray:
    """A binary mask as float32 ``[R, R]`` of -1 (background) / +1 (foreground), binarised
    (``app.pixels.foreground``) before a nearest-neighbour resize.

    ``allow_empty`` accepts a mask without foreground (a real negative case in an export); training
    refuses them."""
    labels = labels_from_grey(grey, resolution, path, 2, allow_empty=allow_empty)
    return np.where(labels > 0, 1.0, -1.0).astype(np.float32)


def mask_levels(grey: Grey) -> set[float]:
    """The distinct values of one mask (what ``models.labels.infer_num_classes`` reads)."""
    return {float(v) for v in np.unique(grey.values)}


def labels_from_grey(
    grey: Grey, resolution: int, path: Path, num_classes: int, *, allow_empty: bool = False
) -> np.ndarray:
    """A mask as a uint8 label map ``[R, R]`` (0..K-1) after a nearest-neighbour resize.

    Binary (K = 2): foreground by ``app.pixels.foreground``, as 0/1. K > 2: the file's values are the
    labels and must be whole numbers 0..K-1."""
    if num_classes == 2:
        labels = foreground(grey).astype(np.uint8)
    else:
        values = grey.values
        bad = values[(values < 0) | (values > num_classes - 1) | (values != np.floor(values))]
        if bad.size:
            raise DatasetError(
                f"{path}: mask value {float(bad.flat[0]):g} is not a label of a {num_classes}-class set "
                f"(whole values 0..{num_classes - 1}; set --num-classes to match the masks)"
            )
        labels = values.astype(np.uint8)
    if not labels.any() and not allow_empty:
        raise DatasetError(
            f"{path}: mask with no foreground (no label above 0, no pixel at half of the mask's full value)"
        )
    labels, _ = pad_to_square(labels, 0)  # background in the padding (models.shape)
    out = np.asarray(
        Image.fromarray(labels, mode="L").resize((resolution, resolution), Image.Resampling.NEAREST)
    )
    if not out.any() and labels.any():
        raise DatasetError(
            f"{path}: mask foreground vanishes at {resolution}x{resolution}; use a higher resolution"
        )
    return out


def load_image(path: Path, resolution: int) -> np.ndarray:
    """One image as float32 ``[R, R]`` in [-1, 1]."""
    return image_from_grey(read_grey(path), resolution)


def load_mask(path: Path, resolution: int, *, allow_empty: bool = False) -> np.ndarray:
    """One mask as float32 ``[R, R]`` of -1 (background) / +1 (foreground) (``mask_from_grey``)."""
    return mask_from_grey(read_grey(path, as_image=False), resolution, path, allow_empty=allow_empty)


def load_folder(
    root: str | Path, resolution: int, names: Sequence[str] | None = None, *, num_classes: int | None = None
) -> PairDataset:
    """Load and validate every pair of ``root`` (or only ``names``) at ``resolution``.

    ``num_classes`` K is inferred from the masks' values when None (``models.labels.infer_num_classes``);
    a bundle passes its own so that evaluation reads a folder as its bundle was trained."""
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
    images, greys, paddings = [], [], []
    for _name, ip, mp in pairs:
        image, mask = read_grey(ip), read_grey(mp, as_image=False)
        if image.size != mask.size:
            (iw, ih), (mw, mh) = image.size, mask.size
            raise DatasetError(f"{mp}: size mismatch, mask is {mw}x{mh} but image is {iw}x{ih}")
        images.append(image_from_grey(image, resolution))
        greys.append(mask)
        paddings.append(square_padding(*image.size))  # as image_from_grey/labels_from_grey padded them
    if num_classes is None:
        num_classes = infer_num_classes(set().union(*(mask_levels(g) for g in greys)))
    num_classes = check_num_classes(num_classes)
    labels = np.stack(
        [labels_from_grey(g, resolution, p[2], num_classes) for g, p in zip(greys, pairs, strict=True)]
    )
    return PairDataset(
        names=[p[0] for p in pairs],
        images=torch.from_numpy(np.stack(images))[:, None],
        masks=encode(torch.from_numpy(labels)[:, None], num_classes),
        resolution=resolution,
        root=Path(root),
        fingerprint=fingerprint(pairs),
        num_classes=num_classes,
        paddings=paddings,
    )


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """``[..., R, R]`` in [-1, 1] to uint8 0..255 (for images and -1/+1 masks alike)."""
    arr = ((x.detach().float().cpu().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)
    return arr.numpy()
