"""Cleaning generated masks before the image phase: drop specks, fill holes, class by class.

The mask phase leaves isolated pixels and small blobs that no human annotation has (docs/results.md).
A class's *floor* is a small share of the area of that class's connected components in the bundle's
training masks (their 10th percentile, times 0.2): a generated component below it is far smaller
than anything the annotators drew and becomes background. Holes (background enclosed by one class)
are then filled with that class. Pure functions on label maps; scipy.ndimage does the labelling.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

FLOOR_PERCENTILE = 10.0
FLOOR_SHARE = 0.2


def component_areas(labels: np.ndarray, cls: int) -> np.ndarray:
    """Areas (pixels) of the 8-connected components of class ``cls`` in label maps ``[N, R, R]``."""
    areas: list[np.ndarray] = []
    structure = np.ones((3, 3), dtype=bool)
    for lab in labels:
        comp, n = ndimage.label(lab == cls, structure=structure)
        if n:
            areas.append(np.bincount(comp.ravel())[1:])
    return np.concatenate(areas) if areas else np.zeros(0, dtype=np.int64)


def class_floors(labels: np.ndarray, num_classes: int) -> list[float]:
    """The floor of each foreground class 1..K-1 (0 for a class the training masks never show)."""
    floors = []
    for cls in range(1, num_classes):
        areas = component_areas(labels, cls)
        floors.append(float(np.percentile(areas, FLOOR_PERCENTILE) * FLOOR_SHARE) if len(areas) else 0.0)
    return floors


def clean_labels(labels: np.ndarray, floors: list[float]) -> np.ndarray:
    """One label map ``[R, R]`` with components below their class's floor removed and holes filled."""
    out = labels.copy()
    structure = np.ones((3, 3), dtype=bool)
    for cls, floor in enumerate(floors, start=1):
        comp, n = ndimage.label(out == cls, structure=structure)
        if n:
            areas = np.bincount(comp.ravel())
            small = np.flatnonzero(areas < floor)
            out[np.isin(comp, small[small > 0])] = 0
    for cls in range(1, len(floors) + 1):
        filled = ndimage.binary_fill_holes(out == cls)
        out[filled & (out == 0)] = cls  # only background becomes the class: other classes stay
    return out
