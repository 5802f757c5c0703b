"""``diffuseexpand merge``: a real set and a synthetic set into one training set of an export format.

- Real pairs (``images/NAME.ext`` + ``masks/NAME.ext``, any format ``models.data`` reads) are brought
  into the synthetic pairs' space exactly as training saw them: greyscale, 8-bit, resized to the
  synthetic resolution (area filter; masks binarised at half their full value, 0/255 or 0/1 alike,
  then nearest-neighbour), written as PNG. With a K-class synthetic set (K > 2: its manifest's
  ``dice_loss_k`` columns, or its index file's labels) masks keep their label values 0..K-1 instead.
- Synthetic pairs come from what ``expand`` writes or a job's zip unpacks to, in any export format; a
  ``manifest.csv`` is required (it is what says they are synthetic).
- Names are prefixed (``real_``, ``synth_``) so they never collide. Real pairs the real set holds out
  (its bundle's split, or a ``split`` column in its pairs.csv) stay the test set: nnU-Net's
  ``imagesTs``/``labelsTs``, MONAI's ``test`` list, ``split=test`` in the manifest. No synthetic pair
  is ever a test pair.
- Provenance: ``manifest.csv`` says per pair ``source`` (real / synthetic), ``split`` and its
  original name; ``dataset.json``/``datalist.json`` carry a ``provenance`` block; the sources'
  manifests, records and licence notes are copied beside (``real_pairs.csv``, ``synthetic_manifest.csv``, ...).
"""

from __future__ import annotations

import csv
import json
import re
import shutil
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from app.exports import GENERATOR, Entry, ExportFormat, Labels, Layout, class_names, index_file, layout
from app.pixels import read_grey
from models.bundle import read_meta
from models.data import IMAGE_SUFFIXES, DatasetError, labels_from_grey, load_image, load_mask

REAL_PREFIX = "real_"
SYNTH_PREFIX = "synth_"
SPLIT_VALUES = {"": "train", "train": "train", "test": "test"}
# Notes copied from each source, under the merged folder's names: licences and provenance travel along.
REAL_NOTES = ("pairs.csv", "SOURCE.md", "LICENSE", "LICENSE.md")
SYNTH_NOTES = ("manifest.csv", "job.json", "run.json", "dataset.json", "datalist.json")
# mask_source: a synthetic pair's (its manifest's: generated or real:NAME); empty for a real pair
MANIFEST_FIELDS = ["name", "source", "split", "original", "image", "label", "mask_source"]


@dataclass(frozen=True)
class SourcePair:
    name: str
    image: Path
    mask: Path


@dataclass
class SyntheticSet:
    pairs: list[SourcePair]
    format: ExportFormat
    made_by: dict[str, Any] = field(default_factory=dict)  # job.json (a zip) or run.json (expand)
    labels: Labels | None = None  # what its dataset.json / datalist.json calls the channel and label
    num_classes: int = 2  # K > 2: its masks are label maps 0..K-1 (its manifest's dice_loss_k columns)
    mask_sources: dict[str, str] = field(default_factory=dict)  # name -> its manifest's mask_source


def _stems(folder: Path, suffixes: Iterable[str], strip: str = "") -> dict[str, Path]:
    """``name -> file`` of the image files in ``folder`` (``strip``: nnU-Net's channel suffix)."""
    found: dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        if not (p.is_file() and p.suffix.lower() in suffixes):
            continue
        stem = p.stem
        if strip:
            if not stem.endswith(strip):
                raise DatasetError(f"{p}: not an nnU-Net channel file (expected NAME{strip}{p.suffix})")
            stem = stem[: -len(strip)]
        if stem in found:
            raise DatasetError(f"{p}: two files share the name '{stem}' ({found[stem].name})")
        found[stem] = p
    return found


def folder_pairs(
    root: Path, images: str, masks: str, *, suffixes: Iterable[str] = IMAGE_SUFFIXES, strip: str = ""
) -> list[SourcePair]:
    """Pairs of ``root/images`` and ``root/masks`` by name; an image without mask or a mask without
    image is an error naming the file."""
    if not root.is_dir():
        raise DatasetError(f"{root}: no such folder")
    for sub in (images, masks):
        if not (root / sub).is_dir():
            raise DatasetError(f"{root}: missing the '{sub}/' folder")
    suffixes = tuple(suffixes)
    image_files = _stems(root / images, suffixes, strip)
    mask_files = _stems(root / masks, suffixes)
    if not image_files:
        raise DatasetError(f"{root / images}: no images")
    for name, path in image_files.items():
        if name not in mask_files:
            raise DatasetError(f"{path}: orphan image (no {masks}/{name}.* beside it)")
    for name, path in mask_files.items():
        if name not in image_files:
            raise DatasetError(f"{path}: orphan mask (no {images}/{name}{strip}.* beside it)")
    return [SourcePair(n, image_files[n], mask_files[n]) for n in sorted(image_files)]


def _read_json(path: Path) -> dict[str, Any]:
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise DatasetError(f"{path}: unreadable JSON ({exc})") from None
    if not isinstance(doc, dict):
        raise DatasetError(f"{path}: expected a JSON object")
    return doc


def _index_labels(fmt: ExportFormat, doc: dict[str, Any]) -> Labels | None:
    try:
        if fmt is ExportFormat.NNUNET:
            structure = next(k for k, v in doc["labels"].items() if v == 1)
            modality = str(doc["channel_names"]["0"])
            by_value = {int(v): str(k) for k, v in doc["labels"].items()}
        else:
            structure = doc["labels"]["1"]
            modality = str(doc["modality"]["0"])
            by_value = {int(k): str(v) for k, v in doc["labels"].items()}
    except (KeyError, StopIteration, AttributeError, TypeError, ValueError):
        return None
    top = max(by_value)
    if top <= 1:
        return Labels(modality, str(structure))
    return Labels(modality, str(structure), class_names(top + 1, {str(k): v for k, v in by_value.items()}))


def manifest_classes(fields: Iterable[str] | None) -> int:
    """K of a synthetic set from its manifest's columns: ``dice_loss_1`` ... for K > 2, none when binary."""
    per_class = [f for f in fields or () if re.fullmatch(r"dice_loss_[0-9]+", f)]
    return len(per_class) + 1 if per_class else 2


def read_synthetic(root: Path) -> SyntheticSet:
    """The kept pairs of a synthetic set in any export format, checked against its manifest.csv."""
    if not root.is_dir():
        raise DatasetError(f"{root}: no such synthetic set folder")
    if (root / "dataset.json").is_file() and (root / "imagesTr").is_dir():
        fmt = ExportFormat.NNUNET
    elif (root / "datalist.json").is_file():
        fmt = ExportFormat.MONAI
    else:
        fmt = ExportFormat.PLAIN
    lay = layout(fmt)
    manifest = root / "manifest.csv"
    if not manifest.is_file():
        raise DatasetError(
            f"{manifest}: missing; a synthetic set is what `expand` writes or a job's zip holds"
        )
    with manifest.open(newline="") as fh:
        reader = csv.DictReader(fh)
        rows = list(reader)
        num_classes = manifest_classes(reader.fieldnames)
    if rows and "name" not in rows[0]:
        raise DatasetError(f"{manifest}: no 'name' column")
    real = [r["name"] for r in rows if r.get("source", "synthetic") != "synthetic"]
    if real:  # a merged set: its real pairs must not come back as synthetic ones
        raise DatasetError(
            f"{manifest}: {len(real)} rows are not synthetic pairs ({', '.join(real[:3])}); "
            "give the synthetic set itself, not a merged one"
        )
    kept = {r["name"] for r in rows if r.get("kept", "1") != "0"}  # expand lists rejected attempts too
    suffixes = (".png",) if fmt is not ExportFormat.PLAIN else IMAGE_SUFFIXES
    pairs = folder_pairs(root, lay.images, lay.masks, suffixes=suffixes, strip=lay.channel_suffix)
    on_disk = {p.name for p in pairs}
    if on_disk - kept:
        extra = sorted(on_disk - kept)
        raise DatasetError(
            f"{manifest}: no kept row for {len(extra)} pairs of the folder ({', '.join(extra[:3])})"
        )
    if kept - on_disk:
        gone = sorted(kept - on_disk)
        raise DatasetError(f"{root}: {len(gone)} pairs of manifest.csv have no files ({', '.join(gone[:3])})")
    made_by: dict[str, Any] = {}
    for note in ("job.json", "run.json"):
        if (root / note).is_file():
            made_by = {"file": note, **_read_json(root / note)}
            break
    labels = _index_labels(fmt, _read_json(root / lay.index)) if lay.index else None
    num_classes = max(num_classes, labels.num_classes if labels is not None else 2)
    # manifests written before the mask_source column: generated masks
    sources = {r["name"]: r.get("mask_source") or "generated" for r in rows if r["name"] in kept}
    return SyntheticSet(pairs, fmt, made_by, labels, num_classes, sources)


def real_split(
    root: Path, names: list[str], *, bundle: Path | None = None, column: str | None = None
) -> tuple[set[str], str | None]:
    """``(held-out names, where that came from)``: the bundle's split, else pairs.csv's ``column``
    (default ``split`` when it has one: ``train``/``test``, empty = train), else none held out."""
    known = set(names)
    if bundle is not None:
        split = read_meta(bundle).get("split")
        if not isinstance(split, dict) or "test" not in split:
            raise ValueError(f"--bundle {bundle}: bundle.json has no split")
        test = set(split["test"])
        missing = sorted(test - known)
        if missing:
            raise DatasetError(
                f"{root}: {len(missing)} held-out pairs of --bundle {bundle} are not in the real set "
                f"({', '.join(missing[:3])}); is it the data the bundle was trained on?"
            )
        return test, f"the split of bundle {bundle}"
    table = root / "pairs.csv"
    header: list[str] = []
    if table.is_file():
        with table.open(newline="") as fh:
            header = next(csv.reader(fh), [])
    wanted = column or "split"
    if wanted not in header:
        if column is not None:
            raise DatasetError(f"{table}: no '{column}' column to read the split from")
        return set(), None
    with table.open(newline="") as fh:
        values = {row.get("name", ""): (row.get(wanted) or "").strip() for row in csv.DictReader(fh)}
    test = set()
    for name in names:
        if name not in values:
            raise DatasetError(f"{table}: no row for pair '{name}', so its split is unknown")
        kind = SPLIT_VALUES.get(values[name].lower())
        if kind is None:
            raise DatasetError(
                f"{table}: {wanted} {values[name]!r} of pair '{name}' is neither 'train' nor 'test'"
            )
        if kind == "test":
            test.add(name)
    return test, f"column '{wanted}' of {table}"


def _size(path: Path) -> tuple[int, int]:
    try:
        with Image.open(path) as img:
            return img.size
    except (OSError, SyntaxError) as exc:
        raise DatasetError(f"{path}: unreadable image file ({exc})") from None


def _synthetic_size(pairs: list[SourcePair]) -> int:
    """The one square size of the synthetic images: the resolution the real pairs are brought to."""
    sizes = sorted({_size(p.image) for p in pairs})
    if len(sizes) != 1 or sizes[0][0] != sizes[0][1]:
        shown = ", ".join(f"{w}x{h}" for w, h in sizes[:3])
        raise ValueError(f"synthetic images are not of one square size ({shown}); give --resolution")
    return sizes[0][0]


def _write_pair(
    pair: SourcePair, image_to: Path, mask_to: Path, resolution: int, foreground: int, num_classes: int = 2
) -> None:
    (iw, ih), (mw, mh) = _size(pair.image), _size(pair.mask)
    if (iw, ih) != (mw, mh):
        raise DatasetError(f"{pair.mask}: size mismatch, mask is {mw}x{mh} but image is {iw}x{ih}")
    image = np.round((load_image(pair.image, resolution) + 1.0) * 127.5).astype(np.uint8)
    if num_classes > 2:  # label maps keep their labels 0..K-1 (a value out of range is an error naming it)
        grey = read_grey(pair.mask, as_image=False)
        mask = labels_from_grey(grey, resolution, pair.mask, num_classes, allow_empty=True)
    else:
        mask = (load_mask(pair.mask, resolution, allow_empty=True) > 0).astype(np.uint8) * foreground
    Image.fromarray(image).save(image_to, format="PNG")
    Image.fromarray(mask).save(mask_to, format="PNG")


def _write(
    out: Path,
    lay: Layout,
    sources: list[tuple[str, str, SourcePair, bool]],
    resolution: int,
    real: Path,
    synthetic: Path,
    num_classes: int = 2,
    mask_sources: dict[str, str] | None = None,
) -> tuple[list[Entry], list[str]]:
    """The pairs, manifest.csv and the sources' notes; returns the entries and the notes copied."""
    foreground = 1 if lay.labels else 255
    out.mkdir(parents=True, exist_ok=True)
    held_out = any(test for *_, test in sources)
    for sub in {lay.images, lay.masks} | ({lay.test_images, lay.test_masks} if held_out else set()):
        (out / sub).mkdir(parents=True, exist_ok=True)
    entries, rows = [], []
    for prefix, source, pair, test in sources:
        name = prefix + pair.name
        image, mask = lay.image(name, test=test), lay.mask(name, test=test)
        _write_pair(pair, out / image, out / mask, resolution, foreground, num_classes)
        entries.append(Entry(name, test=test, source=source))
        split = "test" if test else "train"
        mask_source = (mask_sources or {}).get(pair.name, "generated") if source == "synthetic" else ""
        rows.append({"name": name, "source": source, "split": split, "original": pair.name, "image": image,
                     "label": mask, "mask_source": mask_source})  # fmt: skip
    with (out / "manifest.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=MANIFEST_FIELDS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    copied = []
    for src, notes, prefix in ((real, REAL_NOTES, "real_"), (synthetic, SYNTH_NOTES, "synthetic_")):
        for note in notes:
            if (src / note).is_file():
                shutil.copyfile(src / note, out / f"{prefix}{note}")
                copied.append(f"{prefix}{note}")
    return entries, copied


def merge(
    real: Path,
    synthetic: Path,
    out: Path,
    fmt: str = ExportFormat.NNUNET,
    *,
    resolution: int | None = None,
    bundle: Path | None = None,
    split_column: str | None = None,
    modality: str | None = None,
    structure: str | None = None,
) -> dict[str, Any]:
    """Write the merged set to ``out`` (new or empty) and return what it holds (also its provenance).

    ``modality``/``structure`` name the channel and label 1; by default what the synthetic set's
    dataset.json / datalist.json says, else ``image``/``foreground``."""
    lay = layout(fmt)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"--out {out} exists and is not an empty folder; choose a new one")
    real_pairs = folder_pairs(real, "images", "masks")
    synth = read_synthetic(synthetic)
    test, split_from = real_split(real, [p.name for p in real_pairs], bundle=bundle, column=split_column)
    resolution = resolution or _synthetic_size(synth.pairs)
    base = synth.labels or Labels()
    labels = Labels.from_bundle(
        {"modality": modality or base.modality, "structure": structure or base.structure}
    )
    k = synth.num_classes
    if k > 2:  # K classes: the synthetic set's class names (its index file), else class_1, ...
        names = base.classes if base.num_classes == k else class_names(k)
        labels = Labels(labels.modality, labels.structure, names)

    sources = [(REAL_PREFIX, "real", p, p.name in test) for p in real_pairs]
    sources += [(SYNTH_PREFIX, "synthetic", p, False) for p in synth.pairs]  # never a test pair
    created = not out.exists()
    try:
        entries, copied = _write(out, lay, sources, resolution, real, synthetic, k, synth.mask_sources)
    except BaseException:
        if created:  # a merge that fails half-way leaves no half-written set to trip over
            shutil.rmtree(out, ignore_errors=True)
        raise
    n_real, n_synth = len(real_pairs), len(synth.pairs)
    summary: dict[str, Any] = {
        "format": lay.format.value,
        "resolution": resolution,
        **({"num_classes": k} if k > 2 else {}),  # binary summaries stay as they were
        "real": {
            "folder": str(real),
            "pairs": n_real,
            "train": n_real - len(test),
            "test": len(test),
            "split_from": split_from,
            "prefix": REAL_PREFIX,
        },
        "synthetic": {
            "folder": str(synthetic),
            "pairs": n_synth,
            "format": synth.format.value,
            "prefix": SYNTH_PREFIX,
            "generator": GENERATOR,
            "made_by": synth.made_by,
        },
        "files": copied,
    }
    description = (
        f"{n_real - len(test)} real and {n_synth} synthetic training pairs, {len(test)} real held-out "
        f"pairs; merged by {GENERATOR} (manifest.csv: source of each pair)"
    )
    index = index_file(fmt, entries, labels, summary, description)
    if index is not None:
        (out / index[0]).write_bytes(index[1])
    return summary
