"""The paper's evaluation protocol (Table 1, Fig. 2): what expanded data buys a downstream segmenter.

Protocol, as run by ``diffuseexpand evaluate``:

* **Split**: the bundle's own seeded train/test split. The data folder must be the one the bundle
  was trained on (same fingerprint) and hold every name of the split, else ``EvaluationError``
  (the CLI exits 2); downstream models train on train names only and are scored on test names only.
* **Variants** (synthetic pairs generated once per variant with one request seed, reused for every
  downstream seed): ``cf`` (w_cg = 0, no filter, η = 1 keeps all), ``cfcg_tauK`` (τ = 1/K, no
  filter), ``cfcgcs_tauK`` (τ = 1/K with the Stage IV filter at η), ``cfcg_sK`` (guidance
  "scale", s = K = 1/τ, no filter; generated for the Fig. 2 Dice-loss comparison only, s = 1 is
  τ = 1). Pair i of a request depends on (seed, i) only, so a ``cfcgcs`` variant reuses the pairs
  of the ``cfcg`` variant with the same τ and generates further indices only until N are kept.
* **Rows** trained downstream: ``origin`` (real train pairs at the *same number of optimisation
  steps* as the expanded rows), ``origin_epochs`` (real pairs at the same number of *epochs*,
  i.e. fewer steps: the paper's comparison, labelled), ``duplicates`` (N real train pairs added
  again, the control that must not count as a gain), and every synthetic variant but ``cfcg_s*``.
* **Downstream model**: MONAI ``UNet`` (or ``AttentionUnet``), Dice + BCE, Adam with a cosine
  schedule (paper: lr 1e-2, 50 epochs, batch 16), no augmentation, the last weights scored (no
  model selection on test), per-image Dice at threshold 0.5 averaged over the test split, mean ±
  std (sample std) over seeds. A seed fixes the initial weights (the same for every row) and
  the batch order.
* **Budget**: expanded rows train ``epochs * ceil((n_train + N) / batch)`` steps (or ``--steps``);
  ``origin`` and ``duplicates`` train exactly as many; ``origin_epochs`` trains
  ``epochs * ceil(n_train / batch)`` (with ``--steps``: scaled by n_train / (n_train + N)).
* **Few-shot** (Fig. 2 right): origin vs origin + synthetic on nested seeded subsets of the train
  split, at equal steps. With ``retrain`` the bundle is retrained on each subset; without it the
  synthetic pairs come from the bundle trained on the full train split (recorded as
  ``retrained: false``: an optimistic upper bound, since the DPM saw more real data).
* **FID**: synthetic (the pairs used for training) vs real test images, Inception and
  filter-bottleneck features (see ``models.fid``).
"""

from __future__ import annotations

import math
import platform
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.losses import DiceLoss
from torch.nn import functional as F

from models.bundle import Bundle, new_meta, read_meta, write_meta
from models.data import PairDataset, load_folder, to_uint8
from models.expand import GeneratedPair, generate_pairs
from models.filtering import score_pairs
from models.guidance import GuidanceMode
from models.sampling import SamplingParams
from models.training import (
    TrainConfig,
    evaluate_filter,
    step_generator,
    train_dpm,
    train_filter,
    train_segmenter,
)


class EvaluationError(ValueError):
    """The bundle and data cannot be evaluated together (leakage risk, mismatch); the message says why."""


# ---------------------------------------------------------------------------------------------
# variants

TAUS = {1: 1.0, 2: 0.5, 3: 1.0 / 3.0}
TAU_TEXT = {1: "1", 2: "1/2", 3: "1/3"}


@dataclass(frozen=True)
class Variant:
    key: str
    label: str
    kind: str  # "origin" | "origin_epochs" | "duplicates" | "synthetic"
    guidance: str = "tau"
    tau: float = 1.0
    scale: float | None = None
    guided: bool = True  # w_cg > 0
    filtered: bool = False  # Stage IV at η (else η = 1: keep every pair)
    downstream: bool = True  # trained downstream (the s variants are generated for Fig. 2 only)

    @property
    def synthetic(self) -> bool:
        return self.kind == "synthetic"


def all_variants() -> dict[str, Variant]:
    v = [
        Variant("origin", "origin (equal steps)", "origin"),
        Variant("origin_epochs", "origin (equal epochs)", "origin_epochs"),
        Variant("duplicates", "origin + N duplicates", "duplicates"),
        Variant("cf", "CF", "synthetic", guided=False),
    ]
    for k in (1, 2, 3):
        v.append(Variant(f"cfcg_tau{k}", f"CF+CG τ={TAU_TEXT[k]}", "synthetic", tau=TAUS[k]))
    for k in (1, 2, 3):
        v.append(
            Variant(f"cfcgcs_tau{k}", f"CF+CG+CS τ={TAU_TEXT[k]}", "synthetic", tau=TAUS[k], filtered=True)
        )
    for k in (2, 3):
        v.append(
            Variant(
                f"cfcg_s{k}", f"CF+CG s={k}", "synthetic", guidance="scale", scale=float(k), downstream=False
            )
        )
    return {x.key: x for x in v}


VARIANTS = all_variants()
BASE_ROWS = ("origin", "origin_epochs", "duplicates")


def select_variants(keys: Sequence[str] | None) -> list[Variant]:
    """The requested variants in canonical order; ``origin`` is always included (it is the baseline)."""
    if not keys:
        return list(VARIANTS.values())
    unknown = [k for k in keys if k not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown variant(s) {', '.join(unknown)}; known: {', '.join(VARIANTS)}")
    wanted = set(keys) | {"origin"}
    return [v for k, v in VARIANTS.items() if k in wanted]


# ---------------------------------------------------------------------------------------------
# configuration


@dataclass
class EvalConfig:
    """Every knob of one evaluation run; defaults follow the paper where it says (see ``PRESETS``)."""

    n_synthetic: int = 500
    seeds: tuple[int, ...] = (0, 1, 2)
    epochs: int = 50
    steps: int | None = None  # overrides epochs: every equal-steps row trains exactly this many
    batch_size: int = 16
    lr: float = 1e-2
    model: str = "unet"  # "unet" | "attention-unet"
    channels: tuple[int, ...] = (16, 32, 64, 128)
    num_res_units: int = 2
    resolution: int | None = None  # default: the bundle's
    variants: tuple[str, ...] = ()
    sample_steps: int | None = None  # default: the bundle's
    gen_seed: int = 0
    gen_batch_size: int = 8
    eta: float | None = None  # default: the bundle's
    max_attempts_factor: float = 20.0  # CF+CG+CS gives up after this many x N generated pairs
    fewshot: tuple[float, ...] = (0.1, 0.25, 0.5, 1.0)
    fewshot_variant: str = "cfcgcs_tau1"
    retrain: bool = False
    retrain_steps: int = 2400  # Stage I steps when retraining; Stages II and IV get half
    inception_fid: bool = True
    device: str = "cpu"

    def __post_init__(self) -> None:
        for name in ("n_synthetic", "epochs", "batch_size", "gen_batch_size", "retrain_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if not self.seeds:
            raise ValueError("at least one seed is needed")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.model not in ("unet", "attention-unet"):
            raise ValueError(f"model must be unet or attention-unet, got {self.model!r}")
        if any(not 0 < f <= 1 for f in self.fewshot):
            raise ValueError(f"few-shot fractions must be in (0, 1], got {list(self.fewshot)}")
        if self.eta is not None and not 0 < self.eta <= 1:
            raise ValueError(f"eta must be in (0, 1], got {self.eta}")
        if self.max_attempts_factor < 1:
            raise ValueError(f"max_attempts_factor must be >= 1, got {self.max_attempts_factor}")
        select_variants(self.variants)


# The "cpu" preset: the whole protocol on ~340 train / ~85 test 64x64 chest X-rays in about
# 30-40 minutes on one CPU core (measured figures in the CLI help and docs/results.md).
PRESETS: dict[str, dict[str, Any]] = {
    "paper": {},
    "cpu": {
        "n_synthetic": 100,
        "seeds": (0, 1, 2),
        "epochs": 12,
        "lr": 3e-3,
        "num_res_units": 1,
        "sample_steps": 10,
        "max_attempts_factor": 2.0,
        "fewshot": (0.1, 0.25, 0.5, 1.0),
    },
}


# ---------------------------------------------------------------------------------------------
# data checks


def check_bundle_data(meta: dict[str, Any], data: PairDataset) -> tuple[list[str], list[str]]:
    """The bundle's (train, test) names after the leakage checks; raises EvaluationError otherwise."""
    split = meta.get("split")
    if not split or not split.get("test"):
        raise EvaluationError(
            "the bundle records no train/test split; it cannot be evaluated without leakage"
        )
    expected = meta.get("data", {}).get("fingerprint")
    if expected != data.fingerprint:
        raise EvaluationError(
            f"{data.root}: not the data this bundle was trained on (fingerprint {data.fingerprint[:19]}... "
            f"differs from the bundle's {str(expected)[:19]}...); its split could not be trusted"
        )
    train, test = list(split["train"]), list(split["test"])
    overlap = set(train) & set(test)
    if overlap:
        raise EvaluationError(f"the bundle's split puts {len(overlap)} pairs in both train and test")
    names = set(data.names)
    missing = [n for n in test + train if n not in names]
    if missing:
        raise EvaluationError(
            f"{data.root}: {len(missing)} pairs of the bundle's split are not in the folder "
            f"({', '.join(missing[:3])}); refusing to evaluate on another test set"
        )
    return train, test


# ---------------------------------------------------------------------------------------------
# step budget


def steps_per_epoch(n: int, batch_size: int) -> int:
    return max(1, math.ceil(n / batch_size))


def plan_steps(n_real: int, n_synthetic: int, cfg: EvalConfig) -> dict[str, int]:
    """Optimisation steps of the equal-steps rows (``expanded``) and of ``origin_epochs``."""
    if cfg.steps is not None:
        expanded = cfg.steps
        epochs_row = max(1, round(cfg.steps * n_real / (n_real + n_synthetic)))
    else:
        expanded = cfg.epochs * steps_per_epoch(n_real + n_synthetic, cfg.batch_size)
        epochs_row = cfg.epochs * steps_per_epoch(n_real, cfg.batch_size)
    return {"expanded": expanded, "origin_epochs": epochs_row}


# ---------------------------------------------------------------------------------------------
# downstream model


def build_downstream(cfg: EvalConfig) -> torch.nn.Module:
    from monai.networks.nets import AttentionUnet, UNet

    strides = (2,) * (len(cfg.channels) - 1)
    if cfg.model == "attention-unet":
        return AttentionUnet(
            spatial_dims=2, in_channels=1, out_channels=1, channels=cfg.channels, strides=strides
        )
    return UNet(
        spatial_dims=2,
        in_channels=1,
        out_channels=1,
        channels=cfg.channels,
        strides=strides,
        num_res_units=cfg.num_res_units,
    )


def _init_downstream(cfg: EvalConfig, seed: int) -> torch.nn.Module:
    """Initial weights depend on the seed only: every row of one seed starts from the same network."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(step_generator(seed, "downstream:init", 0).initial_seed())
        return build_downstream(cfg)


def _batches(n: int, batch_size: int, steps: int, seed: int, key: str) -> Iterator[torch.Tensor]:
    """``steps`` batches of row indices, epoch by epoch through seeded permutations (last batch of an epoch may be short)."""
    done, epoch = 0, 0
    while True:
        perm = torch.randperm(n, generator=step_generator(seed, f"downstream:{key}", epoch))
        for i in range(0, n, batch_size):
            if done == steps:
                return
            yield perm[i : i + batch_size]
            done += 1
        epoch += 1


def train_downstream(
    images: torch.Tensor,
    masks: torch.Tensor,
    steps: int,
    cfg: EvalConfig,
    seed: int,
    key: str,
    callback: Callable[[int], None] | None = None,
) -> tuple[torch.nn.Module, int]:
    """Train the downstream segmenter ``steps`` optimisation steps; returns it and the steps it took."""
    dev = torch.device(cfg.device)
    model = _init_downstream(cfg, seed).to(dev)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    dice = DiceLoss(sigmoid=True)
    x_all, y_all = images.to(dev), (masks > 0).float().to(dev)
    model.train()
    taken = 0
    for rows in _batches(len(x_all), cfg.batch_size, steps, seed, key):
        logits = model(x_all[rows])
        loss = dice(logits, y_all[rows]) + F.binary_cross_entropy_with_logits(logits, y_all[rows])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        taken += 1
        if callback is not None:
            callback(1)
    model.eval()
    return model, taken


@torch.no_grad()
def test_dice(model: torch.nn.Module, data: PairDataset, batch_size: int = 64) -> np.ndarray:
    """Per-image Dice at threshold 0.5 on ``data`` (no test-time augmentation)."""
    model.eval()
    dev = next(model.parameters()).device
    losses = [
        score_pairs(
            model, data.images[i : i + batch_size].to(dev), data.masks[i : i + batch_size].to(dev)
        ).cpu()
        for i in range(0, len(data), batch_size)
    ]
    return (1.0 - torch.cat(losses).double()).numpy()


def summarise(values: Sequence[float]) -> dict[str, Any]:
    a = np.asarray(values, dtype=np.float64)
    return {
        "per_seed": [float(x) for x in a],
        "mean": float(a.mean()),
        "std": float(a.std(ddof=1)) if len(a) > 1 else 0.0,
    }


# ---------------------------------------------------------------------------------------------
# synthetic pairs


def sampling_params(base: SamplingParams, v: Variant) -> SamplingParams:
    w_cg = (base.w_cg if base.w_cg > 0 else 1.0) if v.guided else 0.0
    if v.guidance == "scale":
        return base.updated(w_cg=w_cg, guidance=GuidanceMode.SCALE, scale=v.scale, tau=1.0 / (v.scale or 1.0))
    return base.updated(w_cg=w_cg, guidance=GuidanceMode.TAU, tau=v.tau, scale=None)


class Progress:
    """One bar for the whole run, in work units: one per downstream training step, ``steps`` per generated pair."""

    def __init__(self, bar: Any | None) -> None:
        self.bar = bar

    def add_total(self, n: int) -> None:
        if self.bar is not None:
            self.bar.total = (self.bar.total or 0) + n
            self.bar.refresh()

    def step(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def phase(self, text: str) -> None:
        if self.bar is not None:
            self.bar.set_description(text[:40].ljust(40))


class PairCache:
    """Generated pairs by (sampling params, index), so a pair is never generated twice in one run."""

    def __init__(self, bundle: Bundle, seed: int, batch_size: int, progress: Progress, planned: int) -> None:
        self.bundle, self.seed, self.batch_size = bundle, seed, batch_size
        self.progress, self.planned = progress, planned  # indices below ``planned`` are in the bar's total
        self.store: dict[str, dict[int, GeneratedPair]] = {}
        self.seconds = 0.0

    def get(self, params: SamplingParams, indices: range) -> list[GeneratedPair]:
        key = repr(sorted(params.to_dict().items()))
        have = self.store.setdefault(key, {})
        todo = [i for i in indices if i not in have]
        weight = params.steps  # one pair costs about as much as `steps` downstream training steps
        self.progress.add_total(weight * sum(i >= self.planned for i in todo))
        t0 = time.perf_counter()
        for pair in generate_pairs(
            self.bundle, todo, seed=self.seed, params=params, eta=1.0, batch_size=self.batch_size
        ):
            have[pair.index] = pair
            self.progress.step(weight)
        self.seconds += time.perf_counter() - t0
        return [have[i] for i in indices]


@dataclass
class SyntheticSet:
    pairs: list[GeneratedPair]  # the pairs used (kept)
    losses: list[float]  # Dice loss of every generated pair, kept or not
    generated: int
    params: SamplingParams
    eta: float
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def kept(self) -> int:
        return len(self.pairs)


def make_synthetic(cache: PairCache, v: Variant, base: SamplingParams, n: int, eta: float,
                   max_attempts: int) -> SyntheticSet:  # fmt: skip
    """N pairs of variant ``v``: the first N indices, or (filtered) the first N kept within max_attempts."""
    params = sampling_params(base, v)
    if not v.filtered:
        pairs = cache.get(params, range(n))
        return SyntheticSet(pairs, [p.dice_loss for p in pairs], n, params, 1.0)
    kept: list[GeneratedPair] = []
    losses: list[float] = []  # of every pair examined, in index order, up to the N-th kept one
    start = 0
    while len(kept) < n and start < max_attempts:
        stop = min(max_attempts, start + (n if start == 0 else max(n - len(kept), cache.batch_size)))
        for p in cache.get(params, range(start, stop)):
            if len(kept) == n:
                break  # generated (cached) but not examined: not counted in the yield
            losses.append(p.dice_loss)
            if p.dice_loss <= eta:
                kept.append(p)
        start = stop
    return SyntheticSet(kept, losses, len(losses), params, eta)


def pairs_to_tensors(pairs: Sequence[GeneratedPair], resolution: int) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 pairs to ``[N, 1, R, R]`` images in [-1, 1] and -1/+1 masks, resized when ``R`` differs."""
    if not pairs:
        return torch.zeros(0, 1, resolution, resolution), torch.zeros(0, 1, resolution, resolution)
    img = torch.from_numpy(np.stack([p.image for p in pairs])).float()[:, None] / 127.5 - 1.0
    msk = torch.from_numpy(np.stack([p.mask for p in pairs])).float()[:, None] / 127.5 - 1.0
    if img.shape[-1] != resolution:
        mode = "area" if img.shape[-1] > resolution else "bilinear"
        img = F.interpolate(img, size=(resolution, resolution), mode=mode).clamp(-1, 1)
        msk = F.interpolate(msk, size=(resolution, resolution), mode="nearest")
    return img, torch.where(msk > 0, 1.0, -1.0)


def duplicate_rows(n_real: int, n: int, seed: int) -> torch.Tensor:
    """``n`` row indices of the real train set to add again: whole shuffled passes, seeded."""
    reps = math.ceil(n / n_real)
    g = torch.Generator().manual_seed(seed)
    return torch.cat([torch.randperm(n_real, generator=g) for _ in range(reps)])[:n]


# ---------------------------------------------------------------------------------------------
# the run


def _variant_params_dict(s: SyntheticSet) -> dict[str, Any]:
    return {**s.params.to_dict(), "eta": s.eta}


def _retrain_bundle(bundle: Bundle, subset: PairDataset, test: PairDataset, out: Path, cfg: EvalConfig,
                    progress: Progress) -> Bundle:  # fmt: skip
    """Retrain Stages I, II and IV on a few-shot subset into ``out`` (resuming if already there)."""
    meta = new_meta(bundle.resolution)
    old = bundle.meta
    meta["split"] = {**old["split"], "train": list(subset.names)}
    meta["data"] = {**old.get("data", {}), "fewshot_of": str(bundle.path), "pairs": len(subset) + len(test)}
    meta["sampling_defaults"] = old.get("sampling_defaults", meta["sampling_defaults"])
    meta["eta_default"] = old.get("eta_default", meta["eta_default"])
    if not (out / "bundle.json").exists():
        write_meta(out, meta)
    s1 = cfg.retrain_steps
    s2 = max(1, s1 // 2)
    progress.add_total(s1 + 2 * s2)
    dev = cfg.device
    bs = min(16, cfg.batch_size)

    def cb(step: int, total: int, loss: float) -> None:
        progress.step(1)

    train_dpm(subset, out, TrainConfig(steps=s1, batch_size=bs, seed=0), device=dev, callback=cb)
    train_segmenter(
        subset, out, TrainConfig(steps=s2, batch_size=bs, lr=5e-4, seed=0), device=dev, callback=cb
    )
    train_filter(subset, out, TrainConfig(steps=s2, batch_size=bs, lr=1e-3, seed=0), test_data=test,
                 device=dev, callback=cb)  # fmt: skip
    return Bundle.load(out, device=dev)


def fewshot_subset(train: PairDataset, fraction: float, seed: int) -> PairDataset:
    """Nested subsets: the first round(fraction * n) names of one seeded permutation of the train split."""
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(train), generator=g).tolist()
    n = max(1, round(fraction * len(train)))
    return train.subset([train.names[i] for i in sorted(order[:n])])


def run_evaluation(
    bundle_path: str | Path,
    data_dir: str | Path,
    out: str | Path,
    cfg: EvalConfig,
    bar: Any | None = None,
    log: Callable[[str], None] = lambda _m: None,
) -> dict[str, Any]:
    """Run the whole protocol; writes ``out/results.json``, ``out/results.md`` and the PNGs; returns the results."""
    from models import plots
    from models.fid import (
        INCEPTION_SOURCE,
        FIDUnavailable,
        InceptionFeatures,
        fid_from_features,
        segmenter_features,
    )

    t_start = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    progress = Progress(bar)
    meta = read_meta(bundle_path)
    data_full = load_folder(data_dir, int(cfg.resolution or meta["resolution"]))
    train_names, test_names = check_bundle_data(meta, data_full)
    bundle = Bundle.load(bundle_path, device=cfg.device)
    res = data_full.resolution
    train, test = data_full.subset(train_names), data_full.subset(test_names)
    variants = select_variants(cfg.variants)
    n = cfg.n_synthetic
    eta = bundle.default_eta if cfg.eta is None else cfg.eta
    base = bundle.default_params()
    if cfg.sample_steps is not None:
        base = base.updated(steps=cfg.sample_steps)
    max_attempts = max(n, int(round(cfg.max_attempts_factor * n)))
    budget = plan_steps(len(train), n, cfg)

    # work plan for the progress bar (CF+CG+CS extras and few-shot retraining are added when known)
    synth = [v for v in variants if v.synthetic]
    distinct = {repr(sorted(sampling_params(base, v).to_dict().items())) for v in synth}
    trained_rows = [v for v in variants if v.downstream]
    progress.add_total(len(distinct) * n * base.steps)
    progress.add_total(
        len(cfg.seeds)
        * sum(
            budget["origin_epochs"] if v.kind == "origin_epochs" else budget["expanded"] for v in trained_rows
        )
    )
    cache = PairCache(bundle, cfg.gen_seed, cfg.gen_batch_size, progress, n)

    results: dict[str, Any] = {
        "protocol": "DiffuseExpand Table 1 / Fig. 2, equal optimisation steps",
        "config": {**asdict(cfg), "seeds": list(cfg.seeds), "channels": list(cfg.channels)},
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "device": cfg.device,
        },
        "bundle": {
            "path": str(bundle_path),
            "resolution": bundle.resolution,
            "sampling_params": base.to_dict(),
            "eta": eta,
            "filter_test": meta.get("metrics", {}).get("filter_test"),
        },
        "data": {
            "folder": str(data_dir),
            "fingerprint": data_full.fingerprint,
            "resolution": res,
            "n_train": len(train),
            "n_test": len(test),
        },
        "steps": budget,
        "variants": {},
        "fewshot": [],
    }
    # the ceiling of the Stage IV yield: the filter's pass rate on real held-out pairs at the same η
    test_b = test if res == bundle.resolution else load_folder(data_dir, bundle.resolution, test_names)
    results["bundle"]["filter_real_test"] = evaluate_filter(bundle.filter, test_b, eta)

    # ---- synthetic sets (generated once per variant, reused for every downstream seed)
    synthetic: dict[str, SyntheticSet] = {}
    for v in synth:
        progress.phase(f"generate {v.key}")
        before = cache.seconds
        s = make_synthetic(cache, v, base, n, eta, max_attempts)
        synthetic[v.key] = s
        s.extra["seconds"] = round(cache.seconds - before, 1)
        log(f"{v.key}: {s.kept} kept of {s.generated} generated")

    # ---- downstream training
    def train_rows(
        rows: list[tuple[str, torch.Tensor, torch.Tensor, int]],
        prefix: str,
        record: dict[str, dict[str, Any]],
    ) -> dict[str, torch.nn.Module]:
        first: dict[str, torch.nn.Module] = {}
        for key, x, y, steps in rows:
            scores, taken = [], []
            for seed in cfg.seeds:
                progress.phase(f"{prefix}{key} seed {seed}")
                model, k = train_downstream(x, y, steps, cfg, seed, prefix + key, progress.step)
                scores.append(float(test_dice(model, test).mean()))
                taken.append(k)
                first.setdefault(key, model)
            record[key] = {
                "steps": taken[0],
                "steps_per_seed": taken,
                "epochs": round(taken[0] / steps_per_epoch(len(x), cfg.batch_size), 2),
                "train_pairs": len(x),
                "dice": summarise(scores),
            }
        return first

    rows: list[tuple[str, torch.Tensor, torch.Tensor, int]] = []
    for v in trained_rows:
        if v.kind == "origin":
            rows.append((v.key, train.images, train.masks, budget["expanded"]))
        elif v.kind == "origin_epochs":
            rows.append((v.key, train.images, train.masks, budget["origin_epochs"]))
        elif v.kind == "duplicates":
            dup = duplicate_rows(len(train), n, cfg.gen_seed)
            rows.append((v.key, torch.cat([train.images, train.images[dup]]),
                         torch.cat([train.masks, train.masks[dup]]), budget["expanded"]))  # fmt: skip
        else:
            si, sm = pairs_to_tensors(synthetic[v.key].pairs, res)
            rows.append(
                (v.key, torch.cat([train.images, si]), torch.cat([train.masks, sm]), budget["expanded"])
            )
    downstream: dict[str, dict[str, Any]] = {}
    train_rows(rows, "", downstream)

    # ---- FID of the synthetic pairs used vs the real test images
    fid_info: dict[str, Any] = {
        "reference": f"real test split ({len(test)} images)",
        "inception": {"features": INCEPTION_SOURCE, "available": False},
        "filter": {
            "features": "Stage IV filter (MONAI UNet) bottleneck, global average pool",
            "available": True,
        },
    }
    inception = None
    if cfg.inception_fid:
        try:
            inception = InceptionFeatures(cfg.device)
            fid_info["inception"]["available"] = True
        except FIDUnavailable as exc:
            fid_info["inception"]["reason"] = str(exc)
    else:
        fid_info["inception"]["reason"] = "disabled (--no-inception-fid)"
    progress.phase("FID")
    real_u8 = to_uint8(test_b.images[:, 0])
    real_inc = inception(real_u8) if inception is not None else None
    real_seg = segmenter_features(bundle.filter, test_b.images)
    fids: dict[str, dict[str, float | None]] = {}
    inc_cache: dict[int, np.ndarray] = {}
    for key, s in synthetic.items():
        entry: dict[str, float | None] = {"inception": None, "filter": None}
        if len(s.pairs) >= 2:
            u8 = np.stack([p.image for p in s.pairs])
            x = torch.from_numpy(u8).float()[:, None] / 127.5 - 1.0
            entry["filter"] = fid_from_features(segmenter_features(bundle.filter, x), real_seg)
            if inception is not None and real_inc is not None:
                # CF+CG and CF+CG+CS at one τ share most pairs: extract each pair's features once
                todo = [p for p in s.pairs if id(p) not in inc_cache]
                if todo:
                    for p, f in zip(todo, inception(np.stack([p.image for p in todo])), strict=True):
                        inc_cache[id(p)] = f
                feats = np.stack([inc_cache[id(p)] for p in s.pairs])
                entry["inception"] = fid_from_features(feats, real_inc)
        fids[key] = entry
    results["fid"] = fid_info

    for v in variants:
        row: dict[str, Any] = {"label": v.label, "kind": v.kind, "downstream": downstream.get(v.key)}
        if v.synthetic:
            s = synthetic[v.key]
            losses = np.asarray(s.losses)
            row.update(
                {
                    "params": _variant_params_dict(s),
                    "generated": s.generated,
                    "kept": s.kept,
                    "yield": s.kept / max(1, s.generated),
                    "filter_pass_rate_at_eta": float((losses <= eta).mean()) if len(losses) else None,
                    "dice_loss": {
                        "mean": float(losses.mean()),
                        "median": float(np.median(losses)),
                        "values": [round(float(x), 5) for x in losses],
                    },
                    "fid_inception": fids[v.key]["inception"],
                    "fid_filter": fids[v.key]["filter"],
                    "generation_seconds": s.extra.get("seconds"),
                }
            )
        results["variants"][v.key] = row

    # ---- few-shot
    fs_key = cfg.fewshot_variant
    if cfg.fewshot:
        if fs_key not in synthetic:
            raise EvaluationError(
                f"few-shot variant {fs_key} is not among the evaluated variants; add it with --variants"
            )
        fv = VARIANTS[fs_key]
        for frac in cfg.fewshot:
            sub = fewshot_subset(train, frac, int(meta["split"].get("seed", 0)))
            fs_budget = plan_steps(len(sub), n, cfg)
            fs_entry: dict[str, Any] = {
                "fraction": frac,
                "n_real": len(sub),
                "retrained": False,
                "steps": fs_budget["expanded"],
            }
            if frac == 1.0 and "origin" in downstream and fs_key in downstream:
                fs_entry.update({"origin": downstream["origin"]["dice"], "expanded": downstream[fs_key]["dice"],
                              "kept": synthetic[fs_key].kept, "reused_main_table": True})  # fmt: skip
                fs_entry["retrained"] = cfg.retrain  # the full-split bundle is the retrained bundle here
                results["fewshot"].append(fs_entry)
                continue
            progress.add_total(2 * len(cfg.seeds) * fs_budget["expanded"])
            s = synthetic[fs_key]
            if cfg.retrain:
                progress.phase(f"retrain bundle at {frac:.0%}")
                sub_b = (
                    sub if res == bundle.resolution else load_folder(data_dir, bundle.resolution, sub.names)
                )
                fb = _retrain_bundle(
                    bundle, sub_b, test_b, out / "fewshot" / f"bundle-{frac:g}", cfg, progress
                )
                fcache = PairCache(fb, cfg.gen_seed, cfg.gen_batch_size, progress, 0)
                s = make_synthetic(fcache, fv, base, n, eta, max_attempts)
                fs_entry["retrained"] = True
            si, sm = pairs_to_tensors(s.pairs, res)
            record: dict[str, dict[str, Any]] = {}
            train_rows(
                [
                    ("origin", sub.images, sub.masks, fs_budget["expanded"]),
                    (
                        "expanded",
                        torch.cat([sub.images, si]),
                        torch.cat([sub.masks, sm]),
                        fs_budget["expanded"],
                    ),
                ],
                f"fewshot{frac:g}:",
                record,
            )
            fs_entry.update({"origin": record["origin"]["dice"], "expanded": record["expanded"]["dice"],
                          "kept": s.kept, "reused_main_table": False})  # fmt: skip
            results["fewshot"].append(fs_entry)
        results["fewshot_variant"] = fs_key

    # ---- outputs
    progress.phase("plots")
    real_pairs = [
        (to_uint8(train.images[i, 0]), to_uint8(train.masks[i, 0])) for i in range(min(16, len(train)))
    ]
    order: list[str] = ["cfcgcs_tau2", "cfcgcs_tau1", "cfcg_tau2", *synthetic]
    grid_key = next((k for k in order if k in synthetic and synthetic[k].pairs), None)
    pngs = {}
    if grid_key is not None:
        fake = [(p.image, p.mask) for p in synthetic[grid_key].pairs[:16]]
        pngs["samples"] = plots.sample_grid(
            out / "samples.png", fake, real_pairs, f"generated: {VARIANTS[grid_key].label}"
        )
    hist = {
        VARIANTS[k].label: synthetic[k].losses
        for k in ("cfcg_tau1", "cfcg_tau2", "cfcg_s2", "cfcg_tau3", "cfcg_s3")
        if k in synthetic
    }
    if hist:
        pngs["dice_loss_hist"] = plots.dice_loss_histogram(out / "dice_loss_tau_vs_s.png", hist, eta)
    if results["fewshot"]:
        pngs["fewshot"] = plots.fewshot_curve(out / "fewshot.png", results["fewshot"], VARIANTS[fs_key].label)
    results["plots"] = {k: Path(p).name for k, p in pngs.items()}
    results["wall_seconds"] = round(time.perf_counter() - t_start, 1)
    write_results(out, results)
    return results


# ---------------------------------------------------------------------------------------------
# writing


def _fmt(x: float | None, digits: int = 3) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _dice_cell(d: dict[str, Any] | None) -> str:
    if not d:
        return "–"
    return f"{d['dice']['mean']:.3f} (±{d['dice']['std']:.3f})"


def results_markdown(r: dict[str, Any]) -> str:
    """A Table-1-shaped table (metrics as rows, variants as columns) plus the Fig. 2 numbers."""
    cfg = r["config"]
    vs = r["variants"]
    table_keys = [k for k in vs if vs[k]["downstream"] is not None]
    lines = [
        "# DiffuseExpand evaluation",
        "",
        f"Data `{r['data']['folder']}` at {r['data']['resolution']}x{r['data']['resolution']}: "
        f"{r['data']['n_train']} train / {r['data']['n_test']} test pairs (the bundle's split). "
        f"Bundle `{r['bundle']['path']}`. N = {cfg['n_synthetic']} synthetic pairs per variant, "
        f"seeds {cfg['seeds']}, downstream {cfg['model']} {cfg['channels']} "
        f"(res units {cfg['num_res_units']}), batch {cfg['batch_size']}, Adam lr {cfg['lr']} cosine, "
        f"{r['steps']['expanded']} steps (equal-steps rows), {r['steps']['origin_epochs']} steps (equal epochs). "
        f"Stage III: {r['bundle']['sampling_params']}; η = {r['bundle']['eta']}.",
        "",
        "Dice: per-image Dice at 0.5 on the test split, mean (± std over seeds), no test-time augmentation.",
        "",
        "| Metric | " + " | ".join(vs[k]["label"] for k in table_keys) + " |",
        "|---|" + "---|" * len(table_keys),
    ]

    def row(name: str, cell: Callable[[dict[str, Any]], str]) -> None:
        lines.append(f"| {name} | " + " | ".join(cell(vs[k]) for k in table_keys) + " |")

    row("FID (Inception) ↓", lambda v: _fmt(v.get("fid_inception"), 2))
    row("FID (filter features) ↓", lambda v: _fmt(v.get("fid_filter"), 3))
    row("Dice ↑", lambda v: _dice_cell(v["downstream"]))
    row("train steps", lambda v: str(v["downstream"]["steps"]))
    row("train pairs", lambda v: str(v["downstream"]["train_pairs"]))
    row("kept / generated", lambda v: f"{v['kept']}/{v['generated']}" if "kept" in v else "–")
    origin = vs.get("origin", {}).get("downstream")
    if origin:
        o = origin["dice"]["mean"]
        row("Δ Dice vs origin (equal steps)", lambda v: f"{v['downstream']['dice']['mean'] - o:+.3f}")
    f = r["bundle"]["filter_real_test"]
    lines += [
        "",
        f"Stage IV ceiling: the filter passes {f['real_pass_rate']:.1%} of the real test pairs at η = {f['eta']} "
        f"(filter test Dice {f['dice_mean']:.3f}).",
        "",
    ]
    gen = [k for k in vs if "kept" in vs[k]]
    if gen:
        lines += [
            "## Synthetic pairs (Fig. 2 left: τ vs s)",
            "",
            "| Variant | generated | kept | yield | pass rate at η | mean Dice loss | median Dice loss | FID (Inception) | FID (filter) |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for k in gen:
            v = vs[k]
            lines.append(
                f"| {v['label']} | {v['generated']} | {v['kept']} | {v['yield']:.1%} | "
                f"{_fmt(v['filter_pass_rate_at_eta'] * 100, 1)} % | {v['dice_loss']['mean']:.3f} | "
                f"{v['dice_loss']['median']:.3f} | {_fmt(v['fid_inception'], 2)} | {_fmt(v['fid_filter'])} |"
            )
        lines.append("")
    if r.get("fewshot"):
        lines += [
            f"## Few-shot (Fig. 2 right), + {r['fewshot_variant']}",
            "",
            "| train fraction | real pairs | steps | origin Dice | expanded Dice | Δ | bundle retrained |",
            "|---|---|---|---|---|---|---|",
        ]
        for e in r["fewshot"]:
            lines.append(
                f"| {e['fraction']:.0%} | {e['n_real']} | {e['steps']} | {e['origin']['mean']:.3f} (±{e['origin']['std']:.3f}) | "
                f"{e['expanded']['mean']:.3f} (±{e['expanded']['std']:.3f}) | "
                f"{e['expanded']['mean'] - e['origin']['mean']:+.3f} | {'yes' if e['retrained'] else 'no'} |"
            )
        if not any(e["retrained"] for e in r["fewshot"]):
            lines.append("")
            lines.append(
                "The bundle was **not** retrained per split: its DPM saw the full train split, so the "
                "expanded rows below 100 % are an optimistic upper bound (use `--retrain`)."
            )
        lines.append("")
    fid = r["fid"]
    lines += [
        "## FID",
        "",
        f"Against the {fid['reference']}. Inception: {fid['inception']['features']}"
        + ("" if fid["inception"]["available"] else f" — not computed: {fid['inception'].get('reason')}")
        + f". Filter features: {fid['filter']['features']}. Small sets bias FID upwards; compare only at equal N.",
        "",
        f"Wall time {r['wall_seconds']:.0f} s on {r['machine']['processor']} ({r['machine']['threads']} thread(s), "
        f"{r['machine']['device']}).",
        "",
    ]
    for name, file in r.get("plots", {}).items():
        lines.append(f"![{name}]({file})")
    return "\n".join(lines) + "\n"


def write_results(out: Path, results: dict[str, Any]) -> None:
    import json

    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "results.md").write_text(results_markdown(results))
