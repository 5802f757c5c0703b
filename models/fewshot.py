"""The few-shot protocol: does expansion beat plain augmentation where real pairs are scarce?

For each train fraction (nested subsets of the train split, one seeded permutation):

* the bundle is **retrained** on that subset only (``models.retrain``; cached under OUT/bundles),
  unless ``--no-retrain`` reuses the given bundle, and the rows are then labelled an upper bound;
* ``synthetic_sets`` synthetic sets (request seeds ``gen_seed + k``) of the few-shot variant are
  generated with the fraction's bundle, up to the largest N asked for; smaller N take each set's
  first kept pairs, so the sets of a sweep are nested;
* five rows train the downstream segmenter at **equal optimisation steps**: origin; origin +
  augmentation; origin + N synthetic; origin + N synthetic + augmentation; origin + N duplicates
  (the control). Rows without synthetic pairs run once per downstream seed, rows with synthetic
  pairs once per (synthetic set, seed);
* every run keeps its per-test-image Dice, so rows are compared image by image
  (``models.statistics.paired_difference``);
* at the smallest fraction the "synthetic + augmentation" row is repeated for each N of the sweep;
* memorisation: each kept synthetic pair's nearest training mask (Dice) and image (SSIM) among
  the subset the bundle saw, beside the same figures for the real test pairs.

K-class bundles: a run's per-image score is the mean foreground Dice, and each run and row also
carries the Dice of each foreground class 1..K-1 (``dice_by_class``).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.augment import Augmenter, AugmentRecipe
from models.bundle import Bundle
from models.data import PairDataset, Split
from models.downstream import DownstreamConfig, steps_per_epoch, test_dice_by_class, train_downstream
from models.memorisation import memorisation_report
from models.retrain import RetrainRecipe, fraction_dir, retrain_bundle
from models.sampling import SamplingParams
from models.statistics import paired_difference, summarise, summarise_by_class
from models.synthetic import (
    PairCache,
    Progress,
    SyntheticSet,
    bundle_identity,
    duplicate_rows,
    make_synthetic,
    pairs_to_tensors,
)
from models.variants import Variant

ROWS = ("origin", "augment", "synthetic", "synthetic_augment", "duplicates")
ROW_LABELS = {
    "origin": "origin",
    "augment": "origin + augmentation",
    "synthetic": "origin + N synthetic",
    "synthetic_augment": "origin + N synthetic + augmentation",
    "duplicates": "origin + N duplicates",
}


@dataclass(frozen=True)
class FewshotSettings:
    fractions: tuple[float, ...]
    retrain: bool
    recipe: RetrainRecipe
    synthetic_sets: int
    multiple: float  # main N = round(multiple * n_real), at most max_synthetic
    sweep: tuple[float, ...]  # extra multiples at the smallest fraction
    synthetic_ratio: float | None
    augment: AugmentRecipe | None  # None: no augmentation rows
    steps: int | None  # equal steps of every row; default epochs * ceil((n_real + N) / batch)
    epochs: int
    seeds: tuple[int, ...]
    gen_seed: int
    gen_batch_size: int
    max_attempts_factor: float
    max_synthetic: int | None = None
    unlabelled: str = "none"  # "rest": the train split's images outside the subset, masks withheld

    def n_for(self, multiple: float, n_real: int) -> int:
        n = max(1, round(multiple * n_real))
        return n if self.max_synthetic is None else min(n, self.max_synthetic)


class RunCache:
    """Per-test-image Dice of finished downstream runs, keyed by everything that fixes the run.

    Stored as ``per_image`` (what binary runs always stored) plus, for K classes, ``per_class``
    ``[N, K-1]``; ``get`` and ``put`` take the ``[N, K-1]`` matrix (``[N, 1]`` binary).

    A rerun (after an interruption, or with more rows or seeds) trains only what is new, and
    several processes can fill one output folder in parallel (one file per run, written atomically).
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def _path(self, key: dict[str, Any]) -> Path:
        return self.folder / (_digest([json.dumps(key, sort_keys=True, default=str)]) + ".json")

    def get(self, key: dict[str, Any]) -> np.ndarray | None:
        path = self._path(key)
        if not path.is_file():
            return None
        stored = json.loads(path.read_text())
        if "per_class" in stored:
            return np.asarray(stored["per_class"], dtype=np.float64)
        return np.asarray(stored["per_image"], dtype=np.float64)[:, None]

    def put(self, key: dict[str, Any], by_class: np.ndarray) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        record: dict[str, Any] = {"key": key, "per_image": [float(x) for x in by_class.mean(axis=1)]}
        if by_class.shape[1] > 1:
            record["per_class"] = [[float(x) for x in row] for row in by_class]
        tmp.write_text(json.dumps(record, default=str))
        tmp.replace(path)


def _digest(items: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(items).encode()).hexdigest()[:20]


def fewshot_subset(train: PairDataset, fraction: float, seed: int) -> PairDataset:
    """Nested subsets: the first round(fraction * n) names of one seeded permutation of the train split."""
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(train), generator=g).tolist()
    n = max(1, round(fraction * len(train)))
    return train.subset([train.names[i] for i in sorted(order[:n])])


UNLABELLED_MODES = ("none", "rest")


def unlabelled_pool(train: PairDataset, sub: PairDataset, mode: str) -> tuple[list[str], torch.Tensor] | None:
    """The images a fraction's Stage I may learn appearance from, without their masks.

    ``rest``: every train-split image outside the labelled subset (test images never: they are not
    in ``train``); ``none``: no pool."""
    if mode not in UNLABELLED_MODES:
        raise ValueError(f"unlabelled must be one of {', '.join(UNLABELLED_MODES)}, got {mode!r}")
    if mode == "none":
        return None
    taken = set(sub.names)
    names = [n for n in train.names if n not in taken]
    if not names:
        return None
    return names, train.subset(names).images


def sweep_multiples(s: FewshotSettings, fraction: float) -> list[float]:
    """The N multiples trained at ``fraction``: the main one, plus the sweep at the smallest fraction below 100 %."""
    smallest = min(s.fractions)
    if fraction == smallest and fraction < 1.0 and s.sweep:
        return sorted({s.multiple, *s.sweep})
    return [s.multiple]


@dataclass
class RowRuns:
    """Every downstream run of one row: its (set, seed) labels, mean Dice and per-image Dice."""

    runs: list[dict[str, Any]]
    per_image: list[np.ndarray]

    def matrix(self) -> np.ndarray:
        return np.stack(self.per_image)

    def summary(self, steps: int, train_pairs: int) -> dict[str, Any]:
        means = [r["dice"] for r in self.runs]
        s = summarise(means)
        out: dict[str, Any] = {
            "mean": s["mean"],
            "std": s["std"],
            "runs": self.runs,
            "steps": steps,
            "train_pairs": train_pairs,
        }
        if self.runs and "dice_by_class" in self.runs[0]:
            out["dice_by_class"] = {
                c: {"mean": v["mean"], "std": v["std"]}
                for c, v in summarise_by_class(np.array([r["dice_by_class"] for r in self.runs])).items()
            }
        return out


@dataclass(frozen=True)
class FewshotContext:
    """What every fraction of one run shares."""

    settings: FewshotSettings
    downstream: DownstreamConfig
    bundle: Bundle  # the given bundle: sampling defaults, and the 100 % row when it fits the split
    bundle_fits_split: bool
    train: PairDataset
    test: PairDataset
    split: Split
    data_meta: dict[str, Any]
    variant: Variant
    base: SamplingParams
    eta: float
    out: Path
    progress: Progress
    log: Callable[[str], None]


def run_fewshot(ctx: FewshotContext) -> dict[str, Any]:
    """Run the protocol at every fraction; returns ``{"fewshot": [...], "memorisation": {...}}``."""
    entries = [_one_fraction(ctx, fraction) for fraction in sorted(ctx.settings.fractions)]
    # the headline memorisation figures: the smallest fraction, where copying is likeliest
    headline: dict[str, Any] = {}
    for e in entries:
        if e.get("memorisation"):
            m = e["memorisation"]
            headline = {
                "fraction": e["fraction"],
                "synthetic_share_over_0.95": m["synthetic_share_over_0.95"],
                "real_share_over_0.95": m["real_share_over_0.95"],
                "n_synthetic": m["n_synthetic"],
                "n_real": m["n_real"],
            }
            break
    return {"fewshot": entries, "memorisation": headline}


def _one_fraction(ctx: FewshotContext, fraction: float) -> dict[str, Any]:
    s, downstream, bundle, train, test, split = (
        ctx.settings,
        ctx.downstream,
        ctx.bundle,
        ctx.train,
        ctx.test,
        ctx.split,
    )
    variant, base, eta, out, progress, log = ctx.variant, ctx.base, ctx.eta, ctx.out, ctx.progress, ctx.log
    sub = fewshot_subset(train, fraction, split.seed)
    n_real = len(sub)
    multiples = sweep_multiples(s, fraction)
    n_main = s.n_for(s.multiple, n_real)
    n_max = max(s.n_for(m, n_real) for m in multiples)
    steps = s.steps or s.epochs * steps_per_epoch(n_real + n_main, downstream.batch_size)
    pool = unlabelled_pool(train, sub, s.unlabelled)
    n_unlabelled = 0 if pool is None else len(pool[0])  # reported in the entry

    # ---- the bundle that generates this fraction's pairs
    if fraction == 1.0 and ctx.bundle_fits_split:
        fb, retrained, source = bundle, True, "given bundle (trained on exactly this train split)"
    elif s.retrain:
        progress.phase(f"retrain bundle at {fraction:.0%}")
        log(
            f"fraction {fraction:g}: retraining the bundle on {n_real} pairs (cached in {fraction_dir(out, fraction)})"
        )

        r = s.recipe
        progress.add_total(r.dpm_steps + r.segmenter_steps + r.filter_steps)

        def cb(stage: str, step: int, total: int) -> None:
            progress.step(1)

        fb = retrain_bundle(sub, test, split, fraction_dir(out, fraction), s.recipe, fraction=fraction,
                            data_meta=ctx.data_meta, sampling_defaults=bundle.meta.get("sampling_defaults", {}),
                            eta_default=bundle.default_eta, unlabelled=pool, device=downstream.device,
                            callback=cb)  # fmt: skip
        retrained, source = True, str(fraction_dir(out, fraction))
    else:
        fb, retrained, source = bundle, False, "given bundle, trained on the whole train split (upper bound)"

    # ---- synthetic sets
    sets: list[SyntheticSet] = []
    progress.add_total(s.synthetic_sets * n_max * base.steps)
    for k in range(s.synthetic_sets):
        progress.phase(f"generate {fraction:.0%} set {k}")
        cache = PairCache(fb, s.gen_seed + k, s.gen_batch_size, progress, n_max, disk=out / "cache" / "pairs")
        max_attempts = max(n_max, int(round(s.max_attempts_factor * n_max)))
        st = make_synthetic(cache, variant, base, n_max, eta, max_attempts)
        st.extra["seconds"] = round(cache.seconds, 1)
        st.extra["seed"] = s.gen_seed + k
        st.extra["generated_now"] = cache.generated_now
        log(
            f"fraction {fraction:g} set {k}: {st.kept} kept of {st.generated} generated in {cache.seconds:.0f} s"
        )
        sets.append(st)

    # ---- downstream rows
    augmenter = Augmenter(s.augment, test.resolution) if s.augment is not None else None
    res = test.resolution
    syn_tensors = [pairs_to_tensors(st.pairs, res, test.num_classes) for st in sets]
    dup = duplicate_rows(n_real, n_main, s.gen_seed)
    plans: list[tuple[str, bool, int | None]] = [("origin", False, None), ("duplicates", False, None)]
    if augmenter is not None:
        plans.insert(1, ("augment", True, None))
    plans.append(("synthetic", False, n_main))
    if augmenter is not None:
        plans.append(("synthetic_augment", True, n_main))
        for m in multiples:
            n_m = s.n_for(m, n_real)
            if n_m != n_main:
                plans.append((f"synthetic_augment_x{m:g}", True, n_m))
    runs_total = sum(len(s.seeds) * (len(sets) if n is not None else 1) for _k, _a, n in plans)
    progress.add_total(runs_total * steps)

    runs_cache = RunCache(out / "cache" / "runs")
    counts = {"runs_trained": 0, "runs_from_cache": 0}
    bundle_key = bundle_identity(fb)
    rows: dict[str, RowRuns] = {}
    sizes: dict[str, int] = {}
    kept_used: dict[str, list[int]] = {}
    for key, augmented, n_syn in plans:
        rr = RowRuns([], [])
        set_ids: list[int | None] = list(range(len(sets))) if n_syn is not None else [None]
        for set_id in set_ids:
            if key == "duplicates":
                x = torch.cat([sub.images, sub.images[dup]])
                y = torch.cat([sub.masks, sub.masks[dup]])
            elif n_syn is not None:
                assert set_id is not None
                si, sm = syn_tensors[set_id]
                x, y = torch.cat([sub.images, si[:n_syn]]), torch.cat([sub.masks, sm[:n_syn]])
                kept_used.setdefault(key, []).append(min(n_syn, len(si)))
            else:
                x, y = sub.images, sub.masks
            for seed in s.seeds:
                progress.phase(f"{fraction:.0%} {key} seed {seed}")
                run_key = {
                    "fraction": fraction, "row": key, "seed": seed, "steps": steps,
                    "downstream": asdict(downstream), "augment": s.augment.to_dict() if augmented and s.augment else None,
                    "ratio": s.synthetic_ratio if n_syn is not None else None, "n_real": n_real,
                    "train": _digest(sub.names), "test": _digest(test.names), "n_extra": len(x) - n_real,
                    "synthetic": None if set_id is None else
                    [sets[set_id].extra["seed"], [p.name for p in sets[set_id].pairs[: n_syn]], bundle_key],
                    "duplicates": dup.tolist() if key == "duplicates" else None,
                }  # fmt: skip
                if test.num_classes != 2:  # binary keys stay as they were, so their cached runs still count
                    run_key["num_classes"] = test.num_classes
                by_class = runs_cache.get(run_key)
                if by_class is None:
                    model, _taken = train_downstream(
                        x, y, steps, downstream, seed, f"fewshot{fraction:g}:{key}", progress.step,
                        augmenter=augmenter if augmented else None, n_real=n_real,
                        synthetic_ratio=s.synthetic_ratio if n_syn is not None else None,
                    )  # fmt: skip
                    by_class = test_dice_by_class(model, test)
                    runs_cache.put(run_key, by_class)
                    counts["runs_trained"] += 1
                else:
                    counts["runs_from_cache"] += 1
                    progress.step(steps)
                per_image = by_class.mean(axis=1)  # binary: the one column, exactly
                run: dict[str, Any] = {"set": set_id, "seed": seed, "dice": float(per_image.mean())}
                if by_class.shape[1] > 1:
                    run["dice_by_class"] = [float(v) for v in by_class.mean(axis=0)]
                rr.runs.append(run)
                rr.per_image.append(per_image)
            sizes[key] = len(x)
        rows[key] = rr

    def paired(key: str) -> dict[str, Any]:
        out_: dict[str, Any] = {"vs_origin": paired_difference(rows[key].matrix(), rows["origin"].matrix())}
        if "augment" in rows and key != "augment":
            out_["vs_augment"] = paired_difference(rows[key].matrix(), rows["augment"].matrix())
        return out_

    headline = "synthetic_augment" if "synthetic_augment" in rows else "synthetic"
    entry: dict[str, Any] = {
        "fraction": fraction,
        "retrained": retrained,
        "bundle": source,
        "bundle_filter_test": fb.meta.get("metrics", {}).get("filter_test"),
        "n_real": n_real,
        "n_unlabelled": n_unlabelled,
        "n_synthetic": n_main,
        "steps": steps,
        "synthetic_ratio": s.synthetic_ratio,
        "synthetic_sets": [
            {
                "seed": st.extra["seed"],
                "generated": st.generated,
                "kept": st.kept,
                "yield": st.kept / max(1, st.generated),
                "dice_loss_mean": float(np.mean(st.losses)) if st.losses else None,
                "seconds": st.extra["seconds"],
            }
            for st in sets
        ],
        "rows": {k: rows[k].summary(steps, sizes[k]) for k in ROWS if k in rows},
        "this_process": {**counts, "pairs_generated": sum(st.extra["generated_now"] for st in sets)},
        "bundle_training_seconds": {
            stage: rec.get("seconds_this_run") for stage, rec in fb.meta.get("training", {}).items()
        },
        "paired_row": headline,
        "paired": paired(headline),
        "paired_all": {k: paired(k) for k in rows if k != "origin"},
        "sweep": [],
    }
    for row_name, used in kept_used.items():
        if row_name in entry["rows"]:
            entry["rows"][row_name]["synthetic_used_per_set"] = used
    for m in multiples:
        n_m = s.n_for(m, n_real)
        row_key = "synthetic_augment" if n_m == n_main else f"synthetic_augment_x{m:g}"
        if row_key in rows:
            entry["sweep"].append(
                {
                    "multiple": m,
                    "n_synthetic": n_m,
                    "synthetic_used_per_set": kept_used.get(row_key),
                    **{
                        kk: v
                        for kk, v in rows[row_key].summary(steps, sizes[row_key]).items()
                        if kk != "runs"
                    },
                    "paired": paired(row_key),
                }
            )

    # ---- memorisation: the kept pairs of every set against the pairs the bundle saw
    progress.phase(f"memorisation {fraction:.0%}")
    reference = sub if retrained or fraction == 1.0 else train
    all_i = torch.cat([t[0] for t in syn_tensors]) if syn_tensors else torch.zeros(0)
    all_m = torch.cat([t[1] for t in syn_tensors]) if syn_tensors else torch.zeros(0)
    if len(all_i):
        entry["memorisation"] = memorisation_report(
            all_i, all_m, test.images, test.masks, reference.images, reference.masks
        )
        entry["memorisation"]["reference"] = f"the {len(reference)} training pairs of this fraction's bundle"
    return entry
