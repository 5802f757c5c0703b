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
* at the smallest fraction (or ``sweep_fraction``) the "synthetic + augmentation" and oracle rows are
  repeated for each N of the sweep;
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

from app.params import MaskSettings
from models.augment import Augmenter, AugmentRecipe
from models.bundle import Bundle
from models.data import PairDataset, Split
from models.downstream import (
    DownstreamConfig,
    init_downstream,
    steps_per_epoch,
    test_dice_by_class,
    train_downstream,
)
from models.memorisation import memorisation_report
from models.pseudo_labels import PSEUDO_MIN_CONFIDENCE, predict_labels, select_confident
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

ROWS = (
    "origin",
    "augment",
    "synthetic",
    "synthetic_augment",
    "duplicates",
    "oracle_augment",
    "pseudo_augment",
)
ROW_LABELS = {
    "origin": "origin",
    "augment": "origin + augmentation",
    "synthetic": "origin + N synthetic",
    "synthetic_augment": "origin + N synthetic + augmentation",
    "duplicates": "origin + N duplicates",
    "oracle_augment": "origin + N real (oracle) + augmentation",
    "pseudo_augment": "origin + N pseudo-labelled + augmentation",
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
    masks: MaskSettings = MaskSettings()  # where the synthetic pairs' masks come from
    oracle: bool = True  # "origin + N real pairs" rows: the ceiling any N pairs can reach
    pseudo: bool = True  # the pseudo-label row (needs an unlabelled pool)
    sweep_fraction: float | None = None  # where the N sweep runs (default: the smallest fraction)
    plain_synthetic: bool = True  # the "origin + N synthetic" row without augmentation

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


def oracle_order(train: PairDataset, sub: PairDataset, seed: int) -> list[str]:
    """The train-split pairs outside the subset in one seeded order: the oracle rows take the first N
    (nested across N), with their real masks. Test pairs are never among them."""
    taken = set(sub.names)
    rest = sorted(n for n in train.names if n not in taken)
    order = np.random.default_rng(seed).permutation(len(rest))
    return [rest[i] for i in order]


def equivalence(synthetic_gain: dict[str, Any] | None, oracle_gain: dict[str, Any] | None) -> float | None:
    """Real-pair equivalence: (synthetic row - augmentation) / (oracle row - augmentation), from the two
    paired mean differences; None when either is missing or the oracle gains nothing (no ceiling to
    measure against)."""
    if synthetic_gain is None or oracle_gain is None or oracle_gain["mean"] <= 0:
        return None
    return float(synthetic_gain["mean"] / oracle_gain["mean"])


class RowRunner:
    """One fraction's downstream runs: each trained once, or read back from the run cache.

    A run's key holds everything that fixes its result, so rows that do not depend on the bundle
    (origin, augmentation, oracle, duplicates, pseudo-labels) are shared by every Stage I length and
    mask source evaluated into the same output folder.
    """

    def __init__(self, ctx: FewshotContext, fraction: float, sub: PairDataset, steps: int) -> None:
        self.ctx, self.fraction, self.sub, self.steps = ctx, fraction, sub, steps
        s = ctx.settings
        self.augmenter = Augmenter(s.augment, ctx.test.resolution) if s.augment is not None else None
        self.cache = RunCache(ctx.out / "cache" / "runs")
        self.models = ctx.out / "cache" / "models"
        self.counts = {"runs_trained": 0, "runs_from_cache": 0}

    def key(self, row: str, n_extra: int, augmented: bool, seed: int, extra_key: dict[str, Any],
            mixed: bool) -> dict[str, Any]:  # fmt: skip
        s, test = self.ctx.settings, self.ctx.test
        key = {
            "fraction": self.fraction, "row": row, "seed": seed, "steps": self.steps,
            "downstream": asdict(self.ctx.downstream),
            "augment": s.augment.to_dict() if augmented and s.augment else None,
            "ratio": s.synthetic_ratio if mixed else None, "n_real": len(self.sub),
            "train": _digest(self.sub.names), "test": _digest(test.names), "n_extra": n_extra,
            "synthetic": None, "duplicates": None, **extra_key,
        }  # fmt: skip
        if test.num_classes != 2:  # binary keys stay as they were, so their cached runs still count
            key["num_classes"] = test.num_classes
        return key

    def _train(self, row: str, x: torch.Tensor, y: torch.Tensor, augmented: bool, seed: int,
               mixed: bool) -> torch.nn.Module:  # fmt: skip
        s = self.ctx.settings
        model, _taken = train_downstream(
            x, y, self.steps, self.ctx.downstream, seed, f"fewshot{self.fraction:g}:{row}", self.ctx.progress.step,
            augmenter=self.augmenter if augmented else None, n_real=len(self.sub),
            synthetic_ratio=s.synthetic_ratio if mixed else None,
        )  # fmt: skip
        return model

    def run(self, row: str, x: torch.Tensor, y: torch.Tensor, augmented: bool, seed: int,
            extra_key: dict[str, Any], *, mixed: bool) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
        """Per-image Dice ``[N]`` and per class ``[N, K-1]`` of one run."""
        key = self.key(row, len(x) - len(self.sub), augmented, seed, extra_key, mixed)
        self.ctx.progress.phase(f"{self.fraction:.0%} {row} seed {seed}")
        by_class = self.cache.get(key)
        if by_class is None:
            model = self._train(row, x, y, augmented, seed, mixed)
            by_class = test_dice_by_class(model, self.ctx.test)
            self.cache.put(key, by_class)
            self._save_model(key, model)
            self.counts["runs_trained"] += 1
        else:
            self.counts["runs_from_cache"] += 1
            self.ctx.progress.step(self.steps)
        return by_class.mean(axis=1), by_class  # binary: the one column, exactly

    def model(self, row: str, x: torch.Tensor, y: torch.Tensor, augmented: bool, seed: int,
              extra_key: dict[str, Any]) -> tuple[torch.nn.Module, str]:  # fmt: skip
        """The trained model of a run (saved weights, else trained again: runs are deterministic) and its digest."""
        key = self.key(row, len(x) - len(self.sub), augmented, seed, extra_key, False)
        digest = _digest([json.dumps(key, sort_keys=True, default=str)])
        path = self.models / f"{digest}.pt"
        if path.is_file():
            model = init_downstream(self.ctx.downstream, seed, y.shape[1])
            model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
            return model.to(self.ctx.downstream.device).eval(), digest
        model = self._train(row, x, y, augmented, seed, False)
        self._save_model(key, model, force=True)
        return model, digest

    def _save_model(self, key: dict[str, Any], model: torch.nn.Module, force: bool = False) -> None:
        # only the augmentation row's models are needed again (they label the pseudo-label pool)
        if not force and not (key["row"] == "augment" and self.ctx.settings.pseudo):
            return
        path = self.models / f"{_digest([json.dumps(key, sort_keys=True, default=str)])}.pt"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save(model.state_dict(), tmp)
        tmp.replace(path)


def sweep_multiples(s: FewshotSettings, fraction: float) -> list[float]:
    """The N multiples trained at ``fraction``: the main one, plus the sweep at ``sweep_fraction`` (default:
    the smallest fraction) below 100 %."""
    at = s.sweep_fraction if s.sweep_fraction is not None else min(s.fractions)
    if fraction == at and fraction < 1.0 and s.sweep:
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


def run_budget_study(ctx: FewshotContext, budgets: Sequence[int]) -> list[dict[str, Any]]:
    """Where can data matter? At every fraction and step budget: augmentation alone against the
    oracle with *every* other train-split pair (+ augmentation). A budget where augmentation has
    plateaued and the oracle separates from it is one where better pairs can show; it is picked
    from this table before the reported run. No bundle is trained and no pair generated."""
    s, train = ctx.settings, ctx.train
    if s.augment is None:
        raise ValueError("the step-budget study compares rows with augmentation: augmentation must be on")
    out = []
    for fraction in sorted(s.fractions):
        sub = fewshot_subset(train, fraction, ctx.split.seed)
        rest = train.subset(oracle_order(train, sub, s.gen_seed))
        x_all, y_all = torch.cat([sub.images, rest.images]), torch.cat([sub.masks, rest.masks])
        for steps in budgets:
            runner = RowRunner(ctx, fraction, sub, steps)
            ctx.progress.add_total(2 * len(s.seeds) * steps)
            rows: dict[str, RowRuns] = {"augment": RowRuns([], []), "oracle_all_augment": RowRuns([], [])}
            for seed in s.seeds:
                ctx.progress.phase(f"budget {steps} {fraction:.0%} seed {seed}")
                for key, x, y, extra in (
                    ("augment", sub.images, sub.masks, {}),
                    ("oracle_all_augment", x_all, y_all, {"oracle": _digest(rest.names)}),
                ):
                    per_image, _ = runner.run("oracle_augment" if extra else key, x, y, True, seed, extra,
                                              mixed=bool(extra))  # fmt: skip
                    rows[key].runs.append({"seed": seed, "dice": float(per_image.mean())})
                    rows[key].per_image.append(per_image)
            ctx.log(f"budget {steps} at {fraction:g}: trained {runner.counts['runs_trained']}, "
                    f"cached {runner.counts['runs_from_cache']}")  # fmt: skip
            out.append(
                {
                    "fraction": fraction,
                    "steps": steps,
                    "n_real": len(sub),
                    "n_oracle_extra": len(rest),
                    "rows": {
                        "augment": rows["augment"].summary(steps, len(sub)),
                        "oracle_all_augment": rows["oracle_all_augment"].summary(steps, len(x_all)),
                    },
                    "oracle_vs_augment": paired_difference(
                        rows["oracle_all_augment"].matrix(), rows["augment"].matrix()
                    ),
                }
            )
    return out


def run_fewshot(ctx: FewshotContext) -> dict[str, Any]:
    """Run the protocol at every fraction; returns ``{"fewshot": [...], "memorisation": {...}}``."""
    entries = [_one_fraction(ctx, fraction) for fraction in sorted(ctx.settings.fractions)]
    # the headline memorisation figures: the smallest fraction, where copying is likeliest
    headline: dict[str, Any] = {}
    for e in entries:
        if e.get("memorisation"):
            m = e["memorisation"]
            syn, real = m["synthetic_image_ssim"]["mean"], m["real_image_ssim"]["mean"]
            headline = {
                "fraction": e["fraction"],
                "synthetic_share_over_0.95": m["synthetic_share_over_0.95"],
                "real_share_over_0.95": m["real_share_over_0.95"],
                "n_synthetic": m["n_synthetic"],
                "n_real": m["n_real"],
                # synthetic images' nearest-train SSIM over that of real test images (goal: >= 0.8)
                "ssim_ratio": syn / real if syn is not None and real else None,
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
        cache = PairCache(fb, s.gen_seed + k, s.gen_batch_size, progress, n_max, disk=out / "cache" / "pairs",
                          masks=s.masks)  # fmt: skip
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
    runner = RowRunner(ctx, fraction, sub, steps)
    order = oracle_order(train, sub, s.gen_seed)
    syn_tensors = [pairs_to_tensors(st.pairs, test.resolution, test.num_classes) for st in sets]
    dup = duplicate_rows(n_real, n_main, s.gen_seed)
    sweep_n = {m: s.n_for(m, n_real) for m in multiples}
    plans: list[tuple[str, str, bool, int | None]] = [("origin", "origin", False, None)]
    if s.augment is not None:
        plans.append(("augment", "origin", True, None))
    plans.append(("duplicates", "duplicates", False, n_main))
    if s.plain_synthetic or s.augment is None:
        plans.append(("synthetic", "synthetic", False, n_main))
    if s.augment is not None:
        plans.append(("synthetic_augment", "synthetic", True, n_main))
        if s.oracle and order:  # at 100 % no train pair is left to add
            plans.append(("oracle_augment", "oracle", True, n_main))
        if s.pseudo and pool is not None:
            plans.append(("pseudo_augment", "pseudo", True, n_main))
        for m, n_m in sweep_n.items():
            if n_m != n_main:
                plans.append((f"synthetic_augment_x{m:g}", "synthetic", True, n_m))
                if s.oracle and order:
                    plans.append((f"oracle_augment_x{m:g}", "oracle", True, n_m))
    runs_total = sum(len(s.seeds) * (len(sets) if kind == "synthetic" else 1) for _k, kind, _a, _n in plans)
    progress.add_total(runs_total * steps)

    rows: dict[str, RowRuns] = {}
    sizes: dict[str, int] = {}
    used: dict[str, list[int]] = {}
    bundle_key = bundle_identity(fb)
    for key, kind, augmented, n_extra in plans:
        rr = RowRuns([], [])
        for set_id in range(len(sets)) if kind == "synthetic" else [None]:
            for seed in s.seeds:
                extra_key: dict[str, Any] = {}
                if kind == "origin":
                    x, y = sub.images, sub.masks
                elif kind == "duplicates":
                    x, y = torch.cat([sub.images, sub.images[dup]]), torch.cat([sub.masks, sub.masks[dup]])
                    extra_key["duplicates"] = dup.tolist()
                elif kind == "synthetic":
                    assert set_id is not None and n_extra is not None
                    si, sm = syn_tensors[set_id]
                    x, y = torch.cat([sub.images, si[:n_extra]]), torch.cat([sub.masks, sm[:n_extra]])
                    extra_key["synthetic"] = [sets[set_id].extra["seed"],
                                              [p.name for p in sets[set_id].pairs[:n_extra]], bundle_key]  # fmt: skip
                    if s.masks != MaskSettings():
                        extra_key["masks"] = s.masks.model_dump(mode="json")
                elif kind == "oracle":
                    extra = train.subset(order[:n_extra])
                    x, y = torch.cat([sub.images, extra.images]), torch.cat([sub.masks, extra.masks])
                    extra_key["oracle"] = _digest(extra.names)
                else:  # pseudo: the augment row's segmenter of this seed labels the unlabelled pool
                    assert pool is not None and n_extra is not None
                    teacher, teacher_key = runner.model("augment", sub.images, sub.masks, True, seed, {})
                    labels, confidence = predict_labels(teacher, pool[1], test.num_classes)
                    chosen = select_confident(confidence, n_extra)
                    x = torch.cat([sub.images, pool[1][chosen]])
                    y = torch.cat([sub.masks, labels[chosen]])
                    extra_key["pseudo"] = [
                        teacher_key,
                        _digest([pool[0][i] for i in chosen]),
                        PSEUDO_MIN_CONFIDENCE,
                    ]
                if kind in ("synthetic", "oracle", "pseudo") and seed == s.seeds[0]:
                    used.setdefault(key, []).append(len(x) - n_real)
                per_image, by_class = runner.run(key, x, y, augmented, seed, extra_key,
                                                 mixed=kind in ("synthetic", "oracle", "pseudo"))  # fmt: skip
                run: dict[str, Any] = {"set": set_id, "seed": seed, "dice": float(per_image.mean())}
                if kind == "pseudo":
                    run["pseudo_pairs"] = len(x) - n_real
                if by_class.shape[1] > 1:
                    run["dice_by_class"] = [float(v) for v in by_class.mean(axis=0)]
                rr.runs.append(run)
                rr.per_image.append(per_image)
                sizes[key] = len(x)
        rows[key] = rr

    def paired(key: str) -> dict[str, Any]:
        out_: dict[str, Any] = {"vs_origin": paired_difference(rows[key].matrix(), rows["origin"].matrix())}
        for ref in ("augment", "pseudo_augment"):
            if ref in rows and key != ref:
                out_[f"vs_{ref}"] = paired_difference(rows[key].matrix(), rows[ref].matrix())
        return out_

    def oracle_paired(oracle_key: str) -> dict[str, Any] | None:
        if oracle_key not in rows or "augment" not in rows:
            return None
        return paired_difference(rows[oracle_key].matrix(), rows["augment"].matrix())

    headline = "synthetic_augment" if "synthetic_augment" in rows else "synthetic"
    main_paired = paired(headline)
    oracle_main = oracle_paired("oracle_augment")
    if oracle_main is not None:
        main_paired["oracle_vs_augment"] = oracle_main
    entry: dict[str, Any] = {
        "fraction": fraction,
        "retrained": retrained,
        "bundle": source,
        "bundle_filter_test": fb.meta.get("metrics", {}).get("filter_test"),
        "bundle_dpm_steps": fb.meta.get("training", {}).get("dpm", {}).get("steps"),
        "n_real": n_real,
        "n_unlabelled": n_unlabelled,
        "mask_source": s.masks.source.value,
        "masks": s.masks.model_dump(mode="json"),
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
                "real_masks": sum(p.mask_source != "generated" for p in st.pairs),
            }
            for st in sets
        ],
        "rows": {k: rows[k].summary(steps, sizes[k]) for k in ROWS if k in rows},
        "this_process": {**runner.counts, "pairs_generated": sum(st.extra["generated_now"] for st in sets)},
        "bundle_training_seconds": {
            stage: rec.get("seconds_this_run") for stage, rec in fb.meta.get("training", {}).items()
        },
        "paired_row": headline,
        "paired": main_paired,
        "paired_all": {k: paired(k) for k in rows if k != "origin"},
        "equivalence": equivalence(main_paired.get("vs_augment"), oracle_main),
        "sweep": [],
    }
    for row_name, counts in used.items():
        if row_name in entry["rows"]:
            entry["rows"][row_name]["extra_used"] = counts
    if any(min(v) < n_main for k, v in used.items() if k == "synthetic_augment"):
        entry["shortfall"] = "a synthetic set kept fewer pairs than N within the attempt cap (see extra_used)"
    for m, n_m in sweep_n.items():
        suffix = "" if n_m == n_main else f"_x{m:g}"
        row_key, oracle_key = f"synthetic_augment{suffix}", f"oracle_augment{suffix}"
        if row_key in rows:
            p = paired(row_key)
            o = oracle_paired(oracle_key)
            if o is not None:
                p["oracle_vs_augment"] = o
            entry["sweep"].append(
                {
                    "multiple": m,
                    "n": n_m,
                    "n_synthetic": n_m,
                    "synthetic_used_per_set": used.get(row_key),
                    "oracle_used": used[oracle_key][0] if oracle_key in used else None,
                    **{
                        kk: v
                        for kk, v in rows[row_key].summary(steps, sizes[row_key]).items()
                        if kk != "runs"
                    },
                    "oracle": rows[oracle_key].summary(steps, sizes[oracle_key])
                    if oracle_key in rows
                    else None,
                    "paired": p,
                    "equivalence": equivalence(p.get("vs_augment"), o),
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
