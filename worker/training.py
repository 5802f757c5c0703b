"""The body of a training task: Stages I, II and IV of ``models.training`` on a dataset from storage,
resumable from the checkpoints it uploads, then published through the registry.

Everything comes from the training's record (an id in, the world re-read here). The bundle folder
being trained lives in a temporary directory and is mirrored to ``trainings/ID/checkpoints/``: a run
that starts downloads that mirror first, so a training whose worker died continues from its last
uploaded checkpoint, and ``models.training`` continues bit for bit from there.
"""

from __future__ import annotations

import io
import logging
import os
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from enum import StrEnum
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from app.layout import owner_id_of
from app.params import DEFAULT_UNLABELLED_SHARE
from app.registry import GRID_FILE, InvalidBundle, NameTaken, Registry
from app.schemas import JobStatus
from app.trainings import STAGES, TrainingStore, eta_seconds, now_iso
from models.bundle import Bundle, new_meta, read_meta, write_meta
from models.data import PairDataset, find_pairs, load_folder, load_unlabelled, make_split, pair_groups
from models.expand import Cancelled, generate_pairs
from models.training import TrainConfig, train_dpm, train_filter, train_segmenter
from worker.shard import is_outage

log = logging.getLogger(__name__)

REPORT_EVERY_S = 1.0  # progress reports and cancel checks, at most this often


class TrainOutcome(StrEnum):
    DONE = "done"
    SKIPPED = "skipped"  # gone, ended, or another worker holds it
    STOPPED = "stopped"  # canceled, or the lease was lost
    RETRY = "retry"  # crashed; enqueued again
    FAILED = "failed"


class Mirror:
    """The bundle folder's files in storage: uploads the ones changed since the last upload."""

    def __init__(self, store: TrainingStore, training_id: str, root: Path) -> None:
        self.store = store
        self.prefix = store.checkpoint_prefix(training_id)
        self.root = root
        self.sent: dict[str, tuple[int, int]] = {}
        self.last = time.monotonic()

    def download(self) -> int:
        n = 0
        for key in self.store.storage.list_keys(self.prefix):
            rel = key[len(self.prefix) :]
            path = self.root / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(self.store.storage.get(key))
            st = path.stat()
            self.sent[rel] = (st.st_size, st.st_mtime_ns)
            n += 1
        return n

    def upload(self) -> int:
        """Upload changed files: checkpoints and weights first, ``bundle.json`` last, so a stored
        ``bundle.json`` that says a stage is done always comes with that stage's weights."""
        files = sorted(
            (p for p in self.root.rglob("*") if p.is_file() and not p.name.endswith(".tmp")),
            key=lambda p: (p.name == "bundle.json", str(p)),
        )
        n = 0
        for path in files:
            rel = path.relative_to(self.root).as_posix()
            st = path.stat()
            if self.sent.get(rel) == (st.st_size, st.st_mtime_ns):
                continue
            self.store.storage.put(self.prefix + rel, path.read_bytes())
            self.sent[rel] = (st.st_size, st.st_mtime_ns)
            n += 1
        self.last = time.monotonic()
        return n

    def maybe_upload(self, every_s: float) -> None:
        if time.monotonic() - self.last >= every_s:
            self.upload()


class LeaseKeeper(threading.Thread):
    """Refreshes the training's lease every third of its TTL while the run lives (also through a
    long step or the sample grid); ``lost`` is set when another worker took it over."""

    def __init__(self, store: TrainingStore, training_id: str, token: str) -> None:
        super().__init__(name=f"lease-{training_id[:8]}", daemon=True)
        self.store, self.training_id, self.token = store, training_id, token
        self.done = threading.Event()
        self.lost = threading.Event()

    def run(self) -> None:
        while not self.done.wait(self.store.settings.lease_ttl_s / 3):
            try:
                if not self.store.refresh_lease(self.training_id, self.token) and not (
                    self.store.acquire_lease(self.training_id, self.token)
                ):
                    self.lost.set()
                    return
            except Exception:  # Redis down: the lease may expire; try again
                log.warning("training %s: lease refresh failed", self.training_id, exc_info=True)


class Reporter:
    """The ``models.training`` callback: progress to Redis at most every second, cancel and lease
    checks as often, checkpoint uploads every ``train_checkpoint_s``."""

    def __init__(
        self,
        store: TrainingStore,
        rec: dict[str, Any],
        mirror: Mirror,
        lease: LeaseKeeper,
        counts: dict[str, int] | None = None,
    ) -> None:
        self.store, self.rec, self.mirror, self.lease = store, rec, mirror, lease
        self.counts = counts or {}  # pairs and unlabelled images, shown with every report
        self.stage = STAGES[0]
        self.t0 = time.monotonic()
        self.first_step: int | None = None
        self.last = 0.0

    def begin(self, stage: str) -> None:
        self.stage, self.t0, self.first_step = stage, time.monotonic(), None

    def __call__(self, step: int, steps: int, loss: float) -> None:
        if self.first_step is None:  # the rate counts the steps of this run, not resumed ones
            self.first_step, self.t0 = step, time.monotonic()
        self.mirror.maybe_upload(self.store.settings.train_checkpoint_s)
        now = time.monotonic()
        if now - self.last < REPORT_EVERY_S and step < steps:
            return
        self.last = now
        self.check()
        done = step - self.first_step
        rate = (now - self.t0) / done if done > 0 else None
        self.store.report(
            self.rec["id"],
            {
                "stage": self.stage,
                "step": step,
                "steps": steps,
                "loss": loss if np.isfinite(loss) else None,
                "eta_seconds": eta_seconds(self.rec["params"], self.stage, step, rate),
                "updated_at": now_iso(),
                **self.counts,
            },
        )

    def check(self) -> None:
        if self.lease.lost.is_set():
            raise Cancelled("lease lost")
        if self.store.stopped(self.rec["id"]):
            raise Cancelled("canceled")


def run_training(
    store: TrainingStore,
    training_id: str,
    *,
    registry: Callable[[TrainingStore], Any] | None = None,
    device: str = "cpu",
) -> TrainOutcome:
    rec = store.record(training_id)
    if rec is None or JobStatus(rec["status"]).is_terminal():
        return TrainOutcome.SKIPPED
    token = f"{os.getpid()}:{uuid.uuid4().hex}"
    if not store.acquire_lease(training_id, token):
        return TrainOutcome.SKIPPED  # a duplicate delivery while another worker trains it
    lease = LeaseKeeper(store, training_id, token)
    lease.start()
    try:
        attempts = store.bump_attempts(training_id)
        tries = store.settings.train_max_tries
        if attempts > tries:
            store.finish(
                training_id,
                JobStatus.FAILED,
                error=f"training did not finish in {tries} attempts (its workers crashed)",
            )
            return TrainOutcome.FAILED
        if not store.mark_running(training_id):
            return TrainOutcome.SKIPPED
        try:
            with tempfile.TemporaryDirectory(prefix="diffexp-train-") as tmp:
                model = _train(store, rec, Path(tmp), lease, registry, device)
        except Cancelled as exc:
            log.info("training %s stopped: %s", training_id, exc)
            if str(exc) == "canceled":  # what this run uploaded after the cancel removed the rest
                try:
                    store.storage.delete_prefix(store.checkpoint_prefix(training_id))
                except Exception:
                    log.warning("training %s: checkpoints left in storage", training_id, exc_info=True)
            return TrainOutcome.STOPPED
        except (NameTaken, InvalidBundle) as exc:  # the registry refused it: no retry can change that
            log.error("training %s: the registry refused the bundle: %s", training_id, exc)
            store.finish(training_id, JobStatus.FAILED, error=f"could not publish: {exc}")
            return TrainOutcome.FAILED
        except Exception as exc:
            log.exception("training %s crashed (attempt %s of %s)", training_id, attempts, tries)
            if attempts >= tries:
                kind = "storage or Redis unavailable" if is_outage(exc) else "error"
                store.finish(
                    training_id, JobStatus.FAILED, error=f"failed {attempts} times, last {kind}: {exc!r}"
                )
                return TrainOutcome.FAILED
            store.enqueue(training_id)
            return TrainOutcome.RETRY
        if store.finish(training_id, JobStatus.SUCCEEDED, model=model) is None:
            return TrainOutcome.STOPPED  # canceled as it published: the version stays published
        return TrainOutcome.DONE
    finally:
        lease.done.set()
        try:
            store.release_lease(training_id, token)
        except Exception:
            pass  # it expires by itself


def download_dataset(store: TrainingStore, dataset_id: str, dest: Path) -> Path:
    """The dataset's files (``datasets/ID/...`` but its record) under ``dest``."""
    prefix = f"datasets/{dataset_id}/"
    for key in store.storage.list_keys(prefix):
        rel = key[len(prefix) :]
        if rel == "dataset.json":
            continue
        path = dest / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(store.storage.get(key))
    return dest


def prepare(data_dir: Path, bundle: Path, rec: dict[str, Any]) -> tuple[PairDataset, PairDataset, Any]:
    """The bundle's ``bundle.json`` and split on first run (``diffuseexpand train`` does the same);
    a resumed run reads them from the mirror. Returns the train and test pairs and the dataset's
    unlabelled images ``[U, 1, R, R]`` (U = 0 without any), for Stage I."""
    params = rec["params"]
    if (bundle / "bundle.json").exists():
        meta = read_meta(bundle)
        data = load_folder(data_dir, int(meta["resolution"]), num_classes=int(meta.get("num_classes", 2)))
    else:
        data = load_folder(data_dir, int(params["resolution"]), num_classes=params.get("num_classes"))
        meta = new_meta(int(params["resolution"]), data.num_classes)
        names = [p[0] for p in find_pairs(data_dir)]
        groups, grouping = pair_groups(data_dir, names)
        split = make_split(
            names, test_fraction=float(params["test_fraction"]), seed=int(params["seed"]), groups=groups,
            grouping=grouping,
        )  # fmt: skip
        meta["split"] = split.to_dict()
    _, unlabelled = load_unlabelled(data_dir, int(meta["resolution"]))
    meta["data"] = {
        "folder": f"dataset:{rec['dataset']}",  # not the temporary folder: the same on every run
        "fingerprint": data.fingerprint,
        "pairs": len(data),
        "unlabelled": len(unlabelled),  # images without masks: Stage I's image phase only
        "empty_masks": data.empty_masks,
        "shapes": data.shapes(),  # the commonest original sizes, "WxH": pairs (padded to squares)
        "licence_files": [],
    }
    for note in ("SOURCE.md", "pairs.csv", "LICENSE", "LICENSE.md"):
        if (data_dir / note).is_file():
            shutil.copyfile(data_dir / note, bundle / f"data-{note}")
            meta["data"]["licence_files"].append(f"data-{note}")
    write_meta(bundle, meta)
    split_rec = meta["split"]
    return data.subset(split_rec["train"]), data.subset(split_rec["test"]), unlabelled


def _train(
    store: TrainingStore,
    rec: dict[str, Any],
    work: Path,
    lease: LeaseKeeper,
    registry: Callable[[TrainingStore], Any] | None,
    device: str,
) -> dict[str, Any]:
    params = rec["params"]
    bundle = work / "bundle"
    bundle.mkdir()
    mirror = Mirror(store, rec["id"], bundle)
    resumed = mirror.download()
    data_dir = download_dataset(store, rec["dataset"], work / "data")
    train, test, unlabelled = prepare(data_dir, bundle, rec)
    log.info("training %s: %d train / %d test pairs, %d unlabelled images, %d files resumed", rec["id"],
             len(train), len(test), len(unlabelled), resumed)  # fmt: skip
    reporter = Reporter(store, rec, mirror, lease, {"pairs": len(train), "unlabelled": len(unlabelled)})
    reporter.check()

    def cfg(steps_key: str, lr: float) -> TrainConfig:
        return TrainConfig(
            steps=int(params[steps_key]),
            batch_size=int(params["batch_size"]),
            lr=lr,
            seed=int(params["seed"]),
            checkpoint_every=int(params["checkpoint_every"]),
        )

    done = read_meta(bundle)["training"]  # stages recorded there finished (their weights are mirrored)
    for stage in STAGES:
        if stage in done:
            continue
        reporter.begin(stage)
        if stage == "dpm":
            train_dpm(train, bundle, cfg("train_steps", float(params["lr"])),
                      cf_dropout=float(params["cf_dropout"]), device=device, callback=reporter,
                      unlabelled=unlabelled,
                      unlabelled_share=float(params.get("unlabelled_share", DEFAULT_UNLABELLED_SHARE)))  # fmt: skip
        elif stage == "segmenter":
            train_segmenter(train, bundle, cfg("segmenter_steps", 5e-4), device=device, callback=reporter)
        else:
            train_filter(train, bundle, cfg("filter_steps", 1e-3), test_data=test, device=device,
                         callback=reporter)  # fmt: skip
        mirror.upload()
        reporter.check()
    return publish(store, rec, bundle, work / "publish", registry, device)


def publish(
    store: TrainingStore,
    rec: dict[str, Any],
    bundle: Path,
    out: Path,
    registry: Callable[[TrainingStore], Any] | None,
    device: str,
) -> dict[str, Any]:
    """The bundle without its checkpoints, with a sample grid, into the registry."""
    shutil.copytree(bundle, out, ignore=shutil.ignore_patterns(".checkpoints"))
    meta = read_meta(out)
    test = meta["metrics"].get("filter_test") or {}
    n = store.settings.train_sample_pairs
    if n:
        grid = sample_grid(Bundle.load(out, device=device), n, seed=int(rec["params"]["seed"]))
        (out / GRID_FILE).write_bytes(grid)
    extra = {
        "training": rec["id"],
        "dataset": rec["dataset"],
        "resolution": meta["resolution"],
        "metrics": {
            "filter_dice": test.get("dice_mean"),
            "real_pass_rate": test.get("real_pass_rate"),
            "eta": test.get("eta"),
            "test_pairs": test.get("n"),
        },
        "sample_grid": GRID_FILE if n else None,
    }
    reg = registry(store) if registry is not None else Registry(store.storage, store.r, store.settings)
    published: dict[str, Any] = reg.publish(
        out, rec["name"], owner=owner_id_of(rec) or rec["owner"], owner_name=rec["owner"], extra=extra
    )
    return {
        **{k: published.get(k) for k in ("name", "version", "digest")},
        "metrics": extra["metrics"],
        "sample_grid": extra["sample_grid"],
    }


def sample_grid(bundle: Bundle, n: int, *, seed: int) -> bytes:
    """A PNG of ``n`` generated pairs, image over mask, side by side, with the bundle's default
    sampling settings (every pair, kept or not: it shows what the model makes)."""
    params = bundle.default_params()
    pairs = list(
        generate_pairs(bundle, range(n), seed=seed, params=params, eta=bundle.default_eta, batch_size=n)
    )
    r = bundle.resolution
    pad = 2
    grid = np.full((2 * r + 3 * pad, n * (r + pad) + pad), 255, np.uint8)
    for i, pair in enumerate(pairs):
        x = pad + i * (r + pad)
        grid[pad : pad + r, x : x + r] = pair.image
        grid[2 * pad + r : 2 * pad + 2 * r, x : x + r] = pair.mask
    buf = io.BytesIO()
    Image.fromarray(grid, mode="L").save(buf, format="PNG")
    return buf.getvalue()
