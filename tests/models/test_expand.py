"""expand(): stop at `count` kept, respect max_attempts, report progress, cancel cooperatively."""

from __future__ import annotations

from pathlib import Path

import pytest

from models.bundle import Bundle, BundleError, read_meta, write_meta
from models.expand import Cancelled, expand
from models.sampling import SamplingParams


@pytest.fixture(scope="module")
def bundle(tiny_bundle: Path) -> Bundle:
    return Bundle.load(tiny_bundle)


FAST = SamplingParams(steps=2)


def test_expand_stops_once_count_pairs_are_kept(bundle: Bundle) -> None:
    events: list[dict] = []
    pairs = list(expand(bundle, 3, seed=5, params=FAST, eta=1.0, batch_size=2, callback=events.append))
    assert [p.index for p in pairs] == [0, 1, 2] and all(p.kept for p in pairs)
    batches = [e for e in events if e["event"] == "batch"]
    assert batches[-1] == {"event": "batch", "generated": 3, "kept": 3, "discarded": 0, "target": 3}


def test_expand_discards_and_keeps_going_until_max_attempts(bundle: Bundle) -> None:
    # An untrained filter on a tiny model gives Dice losses well above 0.01: everything is discarded.
    pairs = list(expand(bundle, 2, seed=5, params=FAST, eta=0.01, batch_size=2, max_attempts=5))
    assert len(pairs) == 5 and not any(p.kept for p in pairs)
    assert [p.index for p in pairs] == list(range(5))


def test_kept_pairs_are_the_lowest_kept_indices_whatever_the_batch_size(bundle: Bundle) -> None:
    losses = {p.index: p.dice_loss for p in expand(bundle, 8, seed=9, params=FAST, eta=1.0, batch_size=4)}
    ordered = sorted(losses.values())
    eta = (ordered[4] + ordered[5]) / 2  # no loss sits on the boundary
    expected = [i for i in sorted(losses) if losses[i] <= eta][:3]
    for batch_size in (2, 4, 8):
        got = [
            p.index for p in expand(bundle, 3, seed=9, params=FAST, eta=eta, batch_size=batch_size) if p.kept
        ]
        assert got == expected, batch_size


def test_cancel_keeps_pairs_already_yielded(bundle: Bundle) -> None:
    got = []
    state = {"batches": 0}

    def callback(event: dict) -> None:
        if event["event"] == "batch":
            state["batches"] += 1
        if state["batches"] == 1 and event["event"] == "step":
            raise Cancelled

    with pytest.raises(Cancelled):
        for p in expand(bundle, 10, seed=1, params=FAST, eta=1.0, batch_size=2, callback=callback):
            got.append(p.index)
    assert got == [0, 1]


@pytest.mark.parametrize("kwargs,match", [({"count": 0}, "count"), ({"count": 1, "max_attempts": 0}, "max_attempts"),
                                          ({"count": 1, "eta": 0.0}, "eta"), ({"count": 1, "batch_size": 0}, "batch_size")])  # fmt: skip
def test_bad_arguments_are_rejected(bundle: Bundle, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        list(expand(bundle, seed=0, params=FAST, **kwargs))


def test_incomplete_or_missing_bundle_names_the_problem(tmp_path: Path, tiny_bundle: Path) -> None:
    with pytest.raises(BundleError, match="not a bundle"):
        Bundle.load(tmp_path)
    write_meta(tmp_path, read_meta(tiny_bundle))
    with pytest.raises(BundleError, match="missing dpm .*train-dpm"):
        Bundle.load(tmp_path)
