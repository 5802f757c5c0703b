"""Export formats of a set of pairs: where each file goes and what the index file says.

- ``plain``: ``images/NAME.png``, ``masks/NAME.png`` (0/255), ``manifest.csv`` (+ ``job.json``/``run.json``).
- ``nnunet``: a raw nnU-Net v2 dataset: ``imagesTr/NAME_0000.png`` (channel 0), ``labelsTr/NAME.png``
  with label values 0/1, ``dataset.json`` (``channel_names``, ``labels``, ``numTraining``,
  ``file_ending``); held-out pairs (``diffuseexpand merge``) in ``imagesTs``/``labelsTs``.
- ``monai``: ``images/NAME.png``, ``labels/NAME.png`` (0/1) and ``datalist.json`` in the Medical
  Segmentation Decathlon form MONAI's ``load_decathlon_datalist`` reads (``training``, ``test``).

A K-class model's (K > 2) masks are label maps 0..K-1 in every format (already label values, so kept
as they are) and the index files list K labels: background and one per class (``Labels.classes``).

Every format keeps ``manifest.csv``; ``dataset.json``/``datalist.json`` carry a ``provenance`` block
saying the pairs are synthetic and which model and parameters made them. One module for the service's
zip (``app.zipstream``) and the library's folders (``diffuseexpand expand --format``, ``merge``): pure
functions, no torch, no numpy (the API image has neither).
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from PIL import Image

GENERATOR = "DiffuseExpand"
DEFAULT_MODALITY = "image"  # nnU-Net: any channel name but "CT" means per-image z-scoring, right for PNGs
DEFAULT_STRUCTURE = "foreground"


class ExportFormat(StrEnum):
    PLAIN = "plain"
    NNUNET = "nnunet"
    MONAI = "monai"


@dataclass(frozen=True)
class Layout:
    """Where a format puts a pair's files (relative paths, ``/``-separated as in a zip)."""

    format: ExportFormat
    images: str
    masks: str
    test_images: str
    test_masks: str
    channel_suffix: str  # nnU-Net names each input channel: NAME_0000 is channel 0
    labels: bool  # binary masks as label values 0/1 (True) or 0/255 as stored (K classes: always 0..K-1)
    index: str | None  # the format's index file

    def image(self, name: str, *, test: bool = False) -> str:
        return f"{self.test_images if test else self.images}/{name}{self.channel_suffix}.png"

    def mask(self, name: str, *, test: bool = False) -> str:
        return f"{self.test_masks if test else self.masks}/{name}.png"


LAYOUTS = {
    ExportFormat.PLAIN: Layout(ExportFormat.PLAIN, "images", "masks", "images", "masks", "", False, None),
    ExportFormat.NNUNET: Layout(
        ExportFormat.NNUNET, "imagesTr", "labelsTr", "imagesTs", "labelsTs", "_0000", True, "dataset.json"
    ),
    ExportFormat.MONAI: Layout(
        ExportFormat.MONAI, "images", "labels", "images", "labels", "", True, "datalist.json"
    ),
}


def layout(fmt: str) -> Layout:
    """The layout of ``fmt``; ``ValueError`` naming it when it is not one of the formats."""
    try:
        return LAYOUTS[ExportFormat(fmt)]
    except ValueError:
        known = ", ".join(f.value for f in ExportFormat)
        raise ValueError(f"unknown export format {fmt!r} (one of: {known})") from None


@dataclass(frozen=True)
class Labels:
    """What the image channel and the labels are called (nnU-Net ``channel_names``/``labels``).

    Binary (``classes`` empty): label 1 is ``structure``. K classes: ``classes`` names labels 1..K-1."""

    modality: str = DEFAULT_MODALITY
    structure: str = DEFAULT_STRUCTURE
    classes: tuple[str, ...] = ()

    @property
    def num_classes(self) -> int:
        return len(self.classes) + 1 if self.classes else 2

    def foreground(self) -> list[str]:
        """The names of labels 1, 2, ... (one for a binary model)."""
        return list(self.classes) or [self.structure]

    @classmethod
    def from_bundle(cls, meta: Mapping[str, Any] | None) -> Labels:
        """A bundle.json's optional ``modality`` and ``structure`` (e.g. "X-ray", "lung"), else the defaults;
        for K = ``num_classes`` > 2 the class names of its ``labels`` (``{"1": "left lung", ...}``)."""
        meta = meta or {}

        def text(key: str, default: str) -> str:
            value = meta.get(key)
            return value.strip() if isinstance(value, str) and value.strip() else default

        structure = text("structure", DEFAULT_STRUCTURE)
        if structure == "background":  # label 0 is nnU-Net's background: the foreground needs another name
            structure = DEFAULT_STRUCTURE
        num_classes = meta.get("num_classes", 2)
        if not isinstance(num_classes, int) or num_classes <= 2:
            return cls(text("modality", DEFAULT_MODALITY), structure)
        names = meta.get("labels")
        return cls(text("modality", DEFAULT_MODALITY), structure, class_names(num_classes, names))


def class_names(num_classes: int, names: Any = None) -> tuple[str, ...]:
    """Names of labels 1..K-1: ``names[str(k)]`` (a bundle.json's ``labels``) where it is usable text,
    else ``class_k``. nnU-Net keys its labels by name, so a repeated name (or "background") is replaced."""
    given = names if isinstance(names, Mapping) else {}
    out: list[str] = []
    for k in range(1, num_classes):
        value = given.get(str(k))
        name = value.strip() if isinstance(value, str) and value.strip() else f"class_{k}"
        if name == "background" or name in out:
            name = f"class_{k}"
        out.append(name)
    return tuple(out)


@dataclass(frozen=True)
class Entry:
    """One pair of an export: its name there, whether it is held out, where it came from."""

    name: str
    test: bool = False
    source: str = "synthetic"  # or "real" (diffuseexpand merge)


def nnunet_dataset(
    entries: Iterable[Entry], labels: Labels, provenance: Mapping[str, Any], description: str
) -> dict[str, Any]:
    """nnU-Net v2's ``dataset.json``; held-out entries are not training cases (``numTraining``)."""
    entries = list(entries)
    return {
        "channel_names": {"0": labels.modality},
        "labels": {"background": 0, **{name: k for k, name in enumerate(labels.foreground(), 1)}},
        "numTraining": sum(not e.test for e in entries),
        "file_ending": ".png",
        # 2D greyscale PNGs: the natural-image reader (also what nnU-Net picks for .png by itself)
        "overwrite_image_reader_writer": "NaturalImage2DIO",
        "name": GENERATOR,
        "description": description,
        "numTest": sum(e.test for e in entries),
        "provenance": dict(provenance),
    }


def monai_datalist(
    entries: Iterable[Entry], labels: Labels, provenance: Mapping[str, Any], description: str
) -> dict[str, Any]:
    """A decathlon datalist: ``training`` and ``test`` lists of ``{"image", "label", "source"}``."""
    lay = LAYOUTS[ExportFormat.MONAI]
    training: list[dict[str, str]] = []
    test: list[dict[str, str]] = []
    for e in entries:
        item = {
            "image": lay.image(e.name, test=e.test),
            "label": lay.mask(e.name, test=e.test),
            "source": e.source,
        }
        (test if e.test else training).append(item)
    doc: dict[str, Any] = {
        "name": GENERATOR,
        "description": description,
        "modality": {"0": labels.modality},
        "labels": {"0": "background", **{str(k): name for k, name in enumerate(labels.foreground(), 1)}},
        "numTraining": len(training),
        "numTest": len(test),
        "training": training,
    }
    if test:
        doc["test"] = test
    doc["provenance"] = dict(provenance)
    return doc


def encode_json(doc: Any) -> bytes:
    """JSON as every export writes it: indented, key order as built, so the same input gives the same bytes."""
    return (json.dumps(doc, indent=2) + "\n").encode()


def index_file(
    fmt: str,
    entries: Iterable[Entry],
    labels: Labels,
    provenance: Mapping[str, Any],
    description: str,
) -> tuple[str, bytes] | None:
    """``(path, content)`` of the format's index file (``dataset.json``/``datalist.json``), or None."""
    lay = layout(fmt)
    if lay.format is ExportFormat.NNUNET:
        return lay.index or "", encode_json(nnunet_dataset(entries, labels, provenance, description))
    if lay.format is ExportFormat.MONAI:
        return lay.index or "", encode_json(monai_datalist(entries, labels, provenance, description))
    return None


def binary_png(png: bytes, foreground: int) -> bytes:
    """An 8-bit mask PNG (0/255 or 0/1, any colour mode) as a greyscale PNG of 0 and ``foreground``.

    Binarised like ``models.data.load_mask``: a pixel is foreground from half the full value (128),
    or from 1 when the mask's values are 0/1. Fixed encoder settings: the same mask gives the same bytes.
    """
    with Image.open(io.BytesIO(png)) as img:
        grey = img.convert("L")
    top = grey.getextrema()[1]  # (min, max) of a one-band image
    cut = 1 if isinstance(top, int | float) and top <= 1 else 128
    out = grey.point([0] * cut + [foreground] * (256 - cut))
    buf = io.BytesIO()
    out.save(buf, format="PNG", compress_level=6, optimize=False)
    return buf.getvalue()


def mask_member(lay: Layout, png: bytes, num_classes: int = 2) -> bytes:
    """A stored mask as the format keeps it: a binary 0/255 mask as label values 0/1, or unchanged for
    ``plain``; a K-class mask (K > 2) is stored as its label values 0..K-1 already: unchanged everywhere."""
    return binary_png(png, 1) if lay.labels and num_classes <= 2 else png


def describe(count: int, model: str, source: str) -> str:
    return f"{count} synthetic image/mask pairs made by {GENERATOR} with model {model!r} ({source})"
