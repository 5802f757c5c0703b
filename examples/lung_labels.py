"""Three-label chest X-ray masks from binary lung masks: 0 background, 1 left lung, 2 right lung.

Side convention (radiological display, as in every standard PA or AP chest X-ray): the patient faces
the viewer, so the patient's LEFT lung is on the IMAGE RIGHT (larger column index) and gets label 1;
the patient's RIGHT lung is on the image left and gets label 2. Nothing here reads side markers, so a
mirrored image gets mirrored labels.

How each binary mask is split (``split_lungs``; its status string names the case):

- ``two``: exactly two connected components (8-connectivity); the one whose centroid is further right
  in the image is label 1, the other label 2.
- ``specks``: more than two components, but all except two are specks (under ``SPECK_FRACTION`` of the
  mask's foreground); the specks are dropped (background), the two lungs as for ``two``.
- ``fragments``: more than two components after dropping specks. Each goes to the side of its centroid
  relative to a divider: the middle of the gap between the two largest components, or the image
  midline when those two overlap so much in x that they are one lung in pieces.
- ``merged``: one component (the lungs touch, e.g. over the mediastinum). It is cut at a vertical line:
  the column with the fewest foreground pixels in the central part of the blob, when that is a clear
  valley (at most ``VALLEY_RATIO`` of the peaks on both sides).
- ``merged-midline``: one component across the image midline without such a valley: cut at the midline.
- ``one-sided``: all kept foreground lies on one side of the divider (one lung only); that side's label.
- ``empty``: no foreground (or only specks); the pair is skipped by the CLI.

``python -m examples.lung_labels SRC DST [--limit N] [--size S]`` writes such a dataset (see ``main``).
"""

from __future__ import annotations

import argparse
import csv
import shutil
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

BACKGROUND, LEFT, RIGHT = 0, 1, 2  # LEFT/RIGHT: the patient's sides (LEFT is on the image right)
SPECK_FRACTION = 0.005  # components under 0.5% of the foreground are annotation specks, not lung
VALLEY_RATIO = 0.5  # a merged blob's cut column must hold at most half the pixels of the peaks beside it
CENTRAL_BAND = (0.25, 0.75)  # where in a merged blob's x-extent the cut may fall
CASES = ("two", "specks", "fragments", "merged", "merged-midline", "one-sided", "empty")


def split_lungs(mask: np.ndarray) -> tuple[np.ndarray, str]:
    """A 2D binary mask (> 0 is lung) as a uint8 label map (0 background, 1 the patient's left lung on
    the image right, 2 the patient's right lung on the image left) and the case that produced it."""
    fg = np.asarray(mask) > 0
    if fg.ndim != 2:
        raise ValueError(f"mask must be 2D, got shape {fg.shape}")
    out = np.zeros(fg.shape, dtype=np.uint8)
    # 8-connectivity: pixels touching at a corner are one structure, not two lungs
    comps, n = ndimage.label(fg, structure=np.ones((3, 3), dtype=bool))
    areas = np.bincount(comps.ravel(), minlength=n + 1)[1:]
    kept = [i + 1 for i in range(n) if areas[i] >= SPECK_FRACTION * fg.sum()]
    if not kept:
        return out, "empty"
    if len(kept) == 1:
        cut, case = _merged_cut(comps == kept[0])
        cols = np.arange(fg.shape[1])[None, :]
        blob = comps == kept[0]
        out[blob & (cols >= cut)] = LEFT
        out[blob & (cols < cut)] = RIGHT
        return out, _one_sided(out) or case

    cx = {k: float(np.nonzero(comps == k)[1].mean()) for k in kept}
    divider = _divider(comps, sorted(kept, key=lambda k: -areas[k - 1])[:2], fg.shape[1])
    for k in kept:
        out[comps == k] = LEFT if cx[k] >= divider else RIGHT
    case = "two" if n == 2 else "specks" if len(kept) == 2 else "fragments"
    return out, _one_sided(out) or case


def _one_sided(labels: np.ndarray) -> str | None:
    return None if (labels == LEFT).any() and (labels == RIGHT).any() else "one-sided"


def _divider(comps: np.ndarray, largest: list[int], width: int) -> float:
    """The x between the two largest components: the middle of their gap (or of their centroids when
    their x-extents touch a little); the image midline when they overlap in x by over half the narrower
    one, i.e. they are pieces of one lung stacked vertically, not a left and a right lung."""
    (a0, a1, ac), (b0, b1, bc) = (_x_extent(comps == k) for k in largest)
    if ac > bc:
        (a0, a1, ac), (b0, b1, bc) = (b0, b1, bc), (a0, a1, ac)
    overlap = min(a1, b1) - max(a0, b0)
    if overlap > 0.5 * min(a1 - a0, b1 - b0):
        return width / 2
    return (a1 + b0) / 2 if a1 <= b0 else (ac + bc) / 2


def _x_extent(blob: np.ndarray) -> tuple[float, float, float]:
    xs = np.nonzero(blob)[1]
    return float(xs.min()), float(xs.max() + 1), float(xs.mean())


def _merged_cut(blob: np.ndarray) -> tuple[float, str]:
    """The column where one blob holding both lungs is cut: columns >= cut are the image right."""
    width = blob.shape[1]
    sums = blob.sum(axis=0)
    x0, x1, _ = _x_extent(blob)
    lo = int(x0 + CENTRAL_BAND[0] * (x1 - x0))
    hi = max(lo + 1, int(x0 + CENTRAL_BAND[1] * (x1 - x0)))
    # the valley: the emptiest central column (the middle one of ties), clearly below both peaks
    band = sums[lo:hi]
    ties = np.flatnonzero(band == band.min())
    valley = lo + int(ties[len(ties) // 2])
    left_peak, right_peak = sums[:valley].max(initial=0), sums[valley + 1 :].max(initial=0)
    if sums[valley] <= VALLEY_RATIO * min(left_peak, right_peak):
        return valley + 0.5, "merged"
    return width / 2, "merged-midline"


# ---- the command line: a 3-label copy of a binary lung-mask dataset ----


def _resize(img: Image.Image, size: int | None, resample: Image.Resampling) -> Image.Image:
    return img if size is None or img.size == (size, size) else img.resize((size, size), resample)


def convert(src: Path, dst: Path, *, limit: int | None = None, size: int | None = None) -> Counter[str]:
    """Write ``dst/images``, ``dst/masks`` (label maps 0/1/2), ``dst/cases.csv``, ``dst/pairs.csv``
    (``src``'s rows for the written pairs, when ``src`` has one) and ``dst/SOURCE.md``; the case counts."""
    from models.data import find_pairs  # the project's image/mask pairing rules (imports torch: lazily)

    pairs = find_pairs(src)[:limit]
    (dst / "images").mkdir(parents=True, exist_ok=True)
    (dst / "masks").mkdir(exist_ok=True)
    counts: Counter[str] = Counter()
    rows: list[tuple[str, str, int, int]] = []
    skipped: list[str] = []
    for name, image_path, mask_path in pairs:
        with Image.open(mask_path) as m:
            binary = np.asarray(m.convert("L"))
        labels, case = split_lungs(binary)
        counts[case] += 1
        if case == "empty":
            skipped.append(name)
            continue
        # split at the source resolution, then resize; nearest keeps the labels exact
        label_img = _resize(Image.fromarray(labels), size, Image.Resampling.NEAREST)
        label_img.save(dst / "masks" / f"{name}.png")
        if size is None and image_path.suffix.lower() == ".png":
            shutil.copyfile(image_path, dst / "images" / f"{name}.png")
        else:
            with Image.open(image_path) as im:
                _resize(im.convert("L"), size, Image.Resampling.BILINEAR).save(dst / "images" / f"{name}.png")
        out = np.asarray(label_img)
        rows.append((name, case, int((out == LEFT).sum()), int((out == RIGHT).sum())))

    with open(dst / "cases.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["name", "case", "left_lung_px", "right_lung_px"])
        writer.writerows(rows)
    if (src / "pairs.csv").is_file():
        written = {r[0] for r in rows}
        with open(src / "pairs.csv", newline="") as f:
            reader = csv.reader(f)
            header = next(reader)
            col = header.index("name") if "name" in header else None
            kept_rows = [r for r in reader if r and (col is None or r[col] in written)]
        with open(dst / "pairs.csv", "w", newline="") as f:
            csv.writer(f).writerows([header, *kept_rows])
    (dst / "SOURCE.md").write_text(_source_md(src, len(pairs), len(rows), counts, skipped, size))
    return counts


def _source_md(
    src: Path, found: int, written: int, counts: Counter[str], skipped: list[str], size: int | None
) -> str:
    table = "\n".join(f"| {c} | {counts[c]} |" for c in CASES)
    original = (
        (src / "SOURCE.md").read_text() if (src / "SOURCE.md").is_file() else "(no SOURCE.md in source)\n"
    )
    skipped_line = f"Skipped (empty masks): {', '.join(skipped)}\n\n" if skipped else ""
    return f"""# Three-label lung masks derived from `{src.name}`

Derived by `python -m examples.lung_labels` (examples/lung_labels.py) from `{src}`:
{found} pairs read, {written} written.

- `masks/NAME.png`: uint8 label maps, NOT scaled: **0 background, 1 the patient's LEFT lung (on the
  IMAGE RIGHT), 2 the patient's RIGHT lung (on the image left)**, the radiological display convention
  of PA/AP chest X-rays. Side markers are not read: a mirrored image gets mirrored labels.
- The source's binary lung mask is split by connected components (8-connectivity) and centroid side;
  components under {SPECK_FRACTION:.1%} of the foreground are dropped as specks; more fragments go to
  the side of their centroid relative to the gap between the two largest components; a single merged
  blob is cut at the emptiest column in the middle half of the blob when that column is a clear valley
  (at most {VALLEY_RATIO:.0%} of the peaks either side), else at the image midline. See the module's docstring.
- `images/NAME.png`: the source images, {f"resized to {size}x{size} (bilinear)" if size else "copied"};
  masks {f"resized to {size}x{size} (nearest, after the split)" if size else "at the source size"}.
- `cases.csv`: the case and the pixel count of each lung per pair; `pairs.csv`: the source's rows
  (with each image's licence) for the written pairs.
- Licences: as the source's (below and its `pairs.csv`, column `license`); the derived masks keep the
  source masks' licence and attribution. Not for clinical use.

| case | pairs |
|---|---|
{table}

{skipped_line}## Source provenance (copied from `{src.name}/SOURCE.md`)

{original}"""


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m examples.lung_labels",
        description="Split binary lung masks into 0 background, 1 left lung (image right), 2 right lung.",
    )
    parser.add_argument("src", type=Path, help="dataset folder with images/ and masks/ (binary lung masks)")
    parser.add_argument("dst", type=Path, help="new output folder (must not exist or be empty)")
    parser.add_argument("--limit", type=int, default=None, help="only the first N pairs (by name)")
    parser.add_argument("--size", type=int, default=None, help="resize images and masks to SxS")
    args = parser.parse_args(argv)
    if args.limit is not None and args.limit <= 0:
        parser.error(f"--limit must be > 0, got {args.limit}")
    if args.size is not None and args.size <= 0:
        parser.error(f"--size must be > 0, got {args.size}")
    if not (args.src / "masks").is_dir():
        parser.error(f"{args.src}: no masks/ folder, not a dataset folder")
    if args.dst.exists() and (not args.dst.is_dir() or any(args.dst.iterdir())):
        parser.error(f"{args.dst}: exists and is not empty; choose a new output folder")
    from models.data import DatasetError

    try:
        counts = convert(args.src, args.dst, limit=args.limit, size=args.size)
    except (DatasetError, OSError) as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 2
    total = sum(counts.values())
    print(f"{total - counts['empty']} of {total} pairs written to {args.dst}")
    for case in CASES:
        print(f"  {case:15s} {counts[case]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
