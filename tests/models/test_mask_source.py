"""Where masks come from (generated, real deformed training masks, mixed) and the clean-up of generated masks."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from app.params import MaskSettings, MaskSource
from models.bundle import Bundle, BundleError
from models.expand import generate_pairs
from models.labels import mask_to_uint8
from models.mask_cleanup import class_floors, clean_labels, component_areas
from models.mask_source import deform_labels, load_training_masks, pick_real_mask, takes_real_mask
from models.sampling import SamplingParams

PARAMS = SamplingParams(steps=2, early_reject=False)


@pytest.fixture(scope="module")
def bundle(tiny_bundle: Path) -> Bundle:
    return Bundle.load(tiny_bundle)


def blob_labels(size: int = 32) -> np.ndarray:
    lab = np.zeros((size, size), np.uint8)
    lab[4:14, 4:14] = 1
    lab[18:28, 16:28] = 2
    return lab


def test_deformation_is_seeded_and_keeps_label_values() -> None:
    lab = blob_labels()
    a, b = deform_labels(lab, 7, 3), deform_labels(lab, 7, 3)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, deform_labels(lab, 7, 4))
    assert not np.array_equal(a, lab)
    assert set(np.unique(a)) <= {0, 1, 2}  # nearest neighbour: no blended label
    for cls in (1, 2):  # a mild deformation: each class keeps most of its area
        assert 0.6 < (a == cls).sum() / (lab == cls).sum() < 1.5


def test_mixed_source_draws_each_pair_with_the_share() -> None:
    draws = [takes_real_mask(MaskSource.MIXED, 0.3, 5, i) for i in range(400)]
    assert 0.2 < np.mean(draws) < 0.4
    assert draws == [takes_real_mask(MaskSource.MIXED, 0.3, 5, i) for i in range(400)]
    assert not any(takes_real_mask(MaskSource.MIXED, 0.0, 5, i) for i in range(50))
    assert all(takes_real_mask(MaskSource.MIXED, 1.0, 5, i) for i in range(50))
    assert all(takes_real_mask(MaskSource.REAL, 0.0, 5, i) for i in range(5))
    assert not any(takes_real_mask(MaskSource.GENERATED, 1.0, 5, i) for i in range(5))


def test_clean_up_drops_specks_and_fills_holes_per_class() -> None:
    lab = blob_labels()
    lab[8, 8] = 0  # a hole in class 1
    lab[20:23, 20:23] = 0  # a hole in class 2
    lab[21, 21] = 1  # ... holding a pixel of class 1: a speck, and the hole around it is filled after
    lab[30, 2] = 1  # specks
    lab[0, 30] = 2
    floors = class_floors(blob_labels()[None], 3)
    assert floors == [pytest.approx(0.2 * 100), pytest.approx(0.2 * 120)]
    out = clean_labels(lab, floors)
    assert out[30, 2] == 0 and out[0, 30] == 0
    assert out[8, 8] == 1 and out[21, 21] == 2 and out[20, 20] == 2
    assert np.array_equal(out, blob_labels())
    assert len(component_areas(out[None], 1)) == 1
    # a class the training masks never show has floor 0: nothing of it is dropped
    assert class_floors(np.zeros((2, 8, 8), np.uint8), 2) == [0.0]


def test_real_masks_are_deformed_training_masks_and_same_seed_same_pair(bundle: Bundle) -> None:
    settings = MaskSettings(source=MaskSource.REAL)
    pairs = list(
        generate_pairs(bundle, range(5), seed=3, params=PARAMS, eta=1.0, batch_size=4, masks=settings)
    )
    again = list(
        generate_pairs(bundle, range(5), seed=3, params=PARAMS, eta=1.0, batch_size=4, masks=settings)
    )
    training = load_training_masks(bundle.path)
    assert training is not None and len(training) == len(bundle.meta["split"]["train"])
    assert set(training.names) == set(bundle.meta["split"]["train"])  # never a test mask
    for p, q in zip(pairs, again, strict=True):
        assert np.array_equal(p.image, q.image) and np.array_equal(p.mask, q.mask)
        pick = pick_real_mask(training, 3, p.index)
        assert p.mask_source == f"real:{training.names[pick]}"
        expected = mask_to_uint8(deform_labels(training.labels[pick], 3, p.index), bundle.num_classes)
        assert np.array_equal(p.mask, expected)


def test_mixed_pairs_on_generated_masks_are_the_generated_pairs(bundle: Bundle) -> None:
    plain = {
        p.index: p for p in generate_pairs(bundle, range(8), seed=1, params=PARAMS, eta=1.0, batch_size=4)
    }
    mixed = list(
        generate_pairs(
            bundle,
            range(8),
            seed=1,
            params=PARAMS,
            eta=1.0,
            batch_size=4,
            masks=MaskSettings(source=MaskSource.MIXED, real_share=0.5),
        )  # fmt: skip
    )
    sources = {p.mask_source.split(":")[0] for p in mixed}
    assert sources == {"generated", "real"}
    for p in mixed:
        if p.mask_source == "generated":
            assert np.array_equal(p.mask, plain[p.index].mask)
            assert np.array_equal(p.image, plain[p.index].image)


def test_cleaned_generated_masks_are_marked_and_clean(bundle: Bundle) -> None:
    training = load_training_masks(bundle.path)
    assert training is not None
    floors = class_floors(training.labels, bundle.num_classes)
    pairs = list(
        generate_pairs(
            bundle, range(4), seed=2, params=PARAMS, eta=1.0, batch_size=4, masks=MaskSettings(clean=True)
        )  # fmt: skip
    )
    for p in pairs:
        assert p.cleaned and p.mask_source == "generated"
        labels = (p.mask > 0).astype(np.uint8)
        assert np.array_equal(clean_labels(labels, floors), labels)  # cleaning again changes nothing


def test_a_bundle_without_training_masks_is_a_clear_error(tmp_path: Path, tiny_bundle: Path) -> None:
    copy = Path(shutil.copytree(tiny_bundle, tmp_path / "old"))
    (copy / "masks.npz").unlink()
    old = Bundle.load(copy)
    with pytest.raises(BundleError, match="no training masks"):
        list(generate_pairs(old, range(1), seed=0, params=PARAMS, eta=1.0, masks=MaskSettings(clean=True)))
    assert len(list(generate_pairs(old, range(1), seed=0, params=PARAMS, eta=1.0))) == 1
