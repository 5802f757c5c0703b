from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from app.core.config import Settings
from app.layout import manifest_key
from app.pairs import pair_rows
from app.params import JobParams
from app.schemas import JobStatus
from models.bundle import Bundle
from models.expand import generate_pairs
from models.shape import restore_shape
from tests.worker.conftest import Harness
from worker import shard as shard_mod
from worker.shard import Outcome, sampling_params

ETA = 0.42  # the untrained tiny filter scores ~0.35-0.5: this rejects some pairs


def manifest(h: Harness, job_id: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(h.store.storage.get(manifest_key(job_id)).decode())))


def objects(h: Harness, job_id: str) -> dict[str, bytes]:
    return {
        k: h.store.storage.get(k) for k in h.store.storage.list_keys(f"jobs/{job_id}/") if k.endswith(".png")
    }


def test_a_k_class_jobs_pairs_carry_their_class_losses_into_the_manifest(
    settings_factory: Callable[..., Settings], tiny_multiclass_bundle: Path
) -> None:
    settings = settings_factory(bundles_dir=tiny_multiclass_bundle.parent, default_model=tiny_multiclass_bundle.name)  # fmt: skip
    h = Harness(settings, Bundle.load(tiny_multiclass_bundle))
    job_id = h.submit(count=2, eta=1.0, seed=3, steps=2)
    h.drain()
    assert h.store.get(job_id)["status"] == "succeeded"
    stored = h.store.kept_pairs(job_id)
    assert stored and all(len(p["class_losses"]) == 2 for p in stored)
    rows = manifest(h, job_id)
    for r in rows:
        assert float(r["dice_loss"]) == pytest.approx((float(r["dice_loss_1"]) + float(r["dice_loss_2"])) / 2)
        mask = np.asarray(Image.open(io.BytesIO(h.store.storage.get(f"jobs/{job_id}/masks/{r['name']}.png"))))
        assert set(np.unique(mask).tolist()) <= {0, 1, 2}


def test_job_keeps_exactly_count_lowest_kept_indices(harness: Harness) -> None:
    job_id = harness.submit(count=5, eta=ETA, seed=11)
    outcomes = harness.drain()
    rec = harness.store.get(job_id)
    assert rec["status"] == "succeeded", rec["error"]
    assert Outcome.DONE in outcomes

    # the reference: the same pairs generated directly, with the same batch size
    p = rec["params"]
    want = []  # the first five kept (generated lazily: the pairs after the fifth kept one are not needed)
    for pair in generate_pairs(
        harness.bundle, range(40), seed=11, params=sampling_params(p), eta=ETA, batch_size=2
    ):
        want += [pair] if pair.kept else []
        if len(want) == 5:
            break
    rows = manifest(harness, job_id)
    assert [int(r["index"]) for r in rows] == [pair.index for pair in want]
    assert all(float(r["dice_loss"]) <= ETA for r in rows)
    assert "dice_loss_1" not in rows[0]  # binary: no per-class columns
    # every pair of every shard that ran counts, and every pair Stage IV kept (stored, even if unused)
    done = [json.loads(v) for v in harness.store.r.hvals(harness.store._k(job_id, "done"))]
    generated = sum(d["generated"] for d in done)
    kept = len(harness.store.kept_pairs(job_id))
    assert generated >= want[-1].index + 1 and kept == sum(len(d["kept"]) for d in done) >= 5
    progress = rec["progress"]
    assert progress["pairs_per_second"] > 0
    assert progress | {"pairs_per_second": None} == {
        "target": 5,
        "generated": generated,
        "kept": kept,
        "discarded": generated - kept,
        "pairs_per_second": None,
        "eta_seconds": 0.0,
        "phase": None,
    }
    for pair in want:
        img = np.array(
            Image.open(io.BytesIO(harness.store.storage.get(f"jobs/{job_id}/images/{pair.name}.png")))
        )
        mask = np.array(
            Image.open(io.BytesIO(harness.store.storage.get(f"jobs/{job_id}/masks/{pair.name}.png")))
        )
        np.testing.assert_array_equal(img, pair.image)
        np.testing.assert_array_equal(mask, pair.mask)
        assert set(np.unique(mask)) <= {0, 255}


def test_a_job_with_a_size_stores_its_pairs_at_that_size(harness: Harness) -> None:
    job_id = harness.submit(count=2, seed=5, size="20x12")  # eta 1: both pairs of shard 0 kept
    harness.drain()
    rec = harness.store.get(job_id)
    assert rec["status"] == "succeeded", rec["error"]
    rows = manifest(harness, job_id)
    assert [r["size"] for r in rows] == ["20x12", "20x12"]
    p = rec["params"]
    direct = generate_pairs(
        harness.bundle, range(2), seed=5, params=sampling_params(p), eta=p["eta"], batch_size=2
    )
    for pair in direct:  # the square pair, cropped to 5:3 and resized (the mask nearest)
        want_image, want_mask = restore_shape(pair.image, pair.mask, (20, 12))
        img, mask = (
            np.array(
                Image.open(io.BytesIO(harness.store.storage.get(f"jobs/{job_id}/{part}/{pair.name}.png")))
            )
            for part in ("images", "masks")
        )
        assert img.shape == mask.shape == (12, 20)
        np.testing.assert_array_equal(img, want_image)
        np.testing.assert_array_equal(mask, want_mask)
        assert set(np.unique(mask)) <= {0, 255}


def test_result_does_not_depend_on_shard_order(harness: Harness) -> None:
    a = harness.submit(count=5, eta=ETA, seed=3)
    harness.drain("fifo")
    names = [r["name"] for r in manifest(harness, a)]
    for order in ("lifo", "random"):  # against one fifo reference
        b = harness.submit(count=5, eta=ETA, seed=3)
        harness.drain(order, seed=1)
        assert harness.store.get(b)["status"] == "succeeded", order
        assert names == [r["name"] for r in manifest(harness, b)], order
        for name in names:
            for part in ("images", "masks"):
                key = f"{part}/{name}.png"
                assert harness.store.storage.get(f"jobs/{a}/{key}") == harness.store.storage.get(
                    f"jobs/{b}/{key}"
                ), order


def test_a_shard_run_again_overwrites_identical_objects(harness: Harness) -> None:
    job_id = harness.submit(count=4, seed=2)  # eta 1: all kept, shards 0 and 1
    assert harness.run(job_id, 0) is Outcome.DONE
    first = objects(harness, job_id)
    harness.store.r.hdel(harness.store._k(job_id, "done"), "0")  # as if the worker died before reporting
    assert harness.run(job_id, 0) is Outcome.DONE
    assert objects(harness, job_id) == first and len(first) == 4


def test_cancel_stops_within_one_batch_and_keeps_finished_pairs(
    settings_factory: Callable[..., Settings], loaded_bundle: Bundle, monkeypatch: pytest.MonkeyPatch
) -> None:
    harness = Harness(settings_factory(shard_size=8), loaded_bundle)  # one shard of four batches
    job_id = harness.submit(count=8, seed=4)
    put_pairs = harness.store.put_pairs  # the worker stores a batch's kept pairs at once

    def put_then_cancel(*args: object, **kwargs: object) -> bool:
        stored = put_pairs(*args, **kwargs)  # type: ignore[arg-type]
        if harness.store.get(job_id)["status"] != "canceled":
            harness.store.cancel(job_id)
        return stored

    monkeypatch.setattr(harness.store, "put_pairs", put_then_cancel)
    assert harness.run(job_id, 0) is Outcome.STOPPED
    rec = harness.store.get(job_id)
    assert rec["status"] == "canceled"
    assert len(harness.store.kept_pairs(job_id)) == 2  # the batch being written, nothing after it
    assert rec["progress"]["generated"] == 2
    assert harness.drain() == [Outcome.SKIPPED]  # the other queued shard does nothing


def test_crashing_shard_is_retried_then_fails_the_job(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    def boom(*args: object, **kwargs: object) -> None:
        raise RuntimeError("CUDA out of memory (simulated)")

    monkeypatch.setattr(shard_mod, "generate_pairs", boom)
    job_id = harness.submit(count=2, seed=1)
    outcomes = harness.drain()
    assert outcomes == [Outcome.RETRY, Outcome.RETRY, Outcome.FAILED]
    rec = harness.store.get(job_id)
    assert rec["status"] == "failed" and "failed 3 times" in rec["error"] and "out of memory" in rec["error"]


def test_shard_whose_workers_keep_dying_fails_the_job(harness: Harness) -> None:
    job_id = harness.submit(count=2, seed=1)
    for _ in range(3):  # three deliveries that died (SIGKILL) after taking the shard
        harness.store.bump_attempts(job_id, 0)
    assert harness.run(job_id, 0) is Outcome.FAILED
    rec = harness.store.get(job_id)
    assert rec["status"] == "failed" and "did not finish in 3 attempts" in rec["error"]


def test_duplicate_delivery_returns_at_once_while_the_lease_lives(harness: Harness) -> None:
    job_id = harness.submit(count=2, seed=1)
    assert harness.store.acquire_lease(job_id, 0, "other-worker")
    assert harness.run(job_id, 0) is Outcome.SKIPPED  # not run twice, and the worker is free again
    assert harness.run(job_id, 0) is Outcome.SKIPPED
    # redeliveries that did nothing cost nothing
    assert int(harness.store.r.hget(harness.store._k(job_id, "attempts"), "0") or 0) == 0


def test_max_attempts_reached_fails_with_all_kept(harness: Harness) -> None:
    job_id = harness.submit(count=3, eta=0.36, seed=9, max_attempts=5)
    harness.drain()
    rec = harness.store.get(job_id)
    assert rec["status"] == "failed" and rec["error"] == "max_attempts reached"
    assert rec["progress"]["generated"] == 5 and rec["progress"]["kept"] < 3
    assert len(manifest(harness, job_id)) == rec["progress"]["kept"]


def test_unloadable_model_fails_the_job(harness: Harness) -> None:
    job_id = harness.submit(count=2)

    def broken(name: str) -> None:
        raise OSError("bundle weights missing")

    assert shard_mod.run_shard(harness.store, broken, job_id, 0) is Outcome.FAILED  # type: ignore[arg-type]
    assert "bundle weights missing" in harness.store.get(job_id)["error"]


def test_a_record_with_parameters_out_of_range_fails_the_job(harness: Harness) -> None:
    """A record the API did not validate (an older version took τ = 5e-324: black pairs, all kept)."""
    job_id = harness.submit(count=2)
    key = harness.store._k(job_id)
    rec = json.loads(harness.store.r.get(key) or b"{}")
    rec["params"]["sampling"]["tau"] = 5e-324
    harness.store.r.set(key, json.dumps(rec))
    assert harness.run(job_id, 0) is Outcome.FAILED
    failed = harness.store.get(job_id)
    assert failed["status"] == "failed" and failed["error"].startswith("invalid job parameters: sampling.tau")
    assert harness.store.kept_pairs(job_id) == []


def test_finished_job_survives_the_loss_of_redis(harness: Harness) -> None:
    job_id = harness.submit(count=2, seed=6)
    harness.drain()
    before = harness.store.get(job_id)
    for key in harness.store.r.scan_iter(f"{harness.settings.redis_prefix}:*"):
        harness.store.r.delete(key)
    after = harness.store.get(job_id)
    assert after["status"] == JobStatus.SUCCEEDED and after["progress"] == before["progress"]
    rows, final = harness.store.result_rows(job_id, partial=False) or ([], False)
    assert final and len(rows) == 2


@pytest.mark.parametrize(
    ("body", "real"),
    [({"mask_source": "real"}, "all"), ({"mask_source": "mixed", "real_share": 0.5}, "some"),
     ({"clean_masks": True}, "none")],
)  # fmt: skip
def test_a_jobs_mask_source_reaches_each_pairs_entry_the_pairs_api_and_the_manifest(
    harness: Harness, body: dict[str, Any], real: str
) -> None:
    job_id = harness.submit(count=4, eta=1.0, seed=5, steps=2, **body)
    harness.drain()
    rec = harness.store.get(job_id)
    assert rec["status"] == "succeeded", rec["error"]
    rows = manifest(harness, job_id)
    train = set(harness.bundle.meta["split"]["train"])
    sources = [r["mask_source"] for r in rows]
    assert all(s == "generated" or s.removeprefix("real:") in train for s in sources)  # never a test mask
    n_real = sum(s.startswith("real:") for s in sources)
    assert {"all": n_real == len(rows), "none": n_real == 0, "some": 0 < n_real < len(rows)}[real]
    clean = bool(body.get("clean_masks"))
    assert all(r["cleaned"] == str(int(clean and r["mask_source"] == "generated")) for r in rows)
    # the pairs API shows what the manifest says
    listed = {p["name"]: p for p in pair_rows(harness.store, job_id)[0]}
    assert {n: (p["mask_source"], p["cleaned"]) for n, p in listed.items()} == {
        r["name"]: (r["mask_source"], r["cleaned"] == "1") for r in rows
    }
    # same seed, same pair: generated directly with the job's settings, the same sources and pixels
    params = JobParams.model_validate(rec["params"])
    direct = {
        p.name: p
        for p in generate_pairs(harness.bundle, [int(r["index"]) for r in rows], seed=5,
                                params=sampling_params(params), eta=1.0, batch_size=2, masks=params.masks)
    }  # fmt: skip
    for r in rows:
        pair = direct[r["name"]]
        assert pair.mask_source == r["mask_source"]
        assert objects(harness, job_id)[f"jobs/{job_id}/masks/{r['name']}.png"] == shard_mod.png(pair.mask)
