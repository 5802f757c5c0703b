"""Table 1 and Fig. 2 (left) of the paper: the synthetic variants of the given bundle at the full train split.

Variants (synthetic pairs generated once per variant with one request seed, reused for every
downstream seed): ``cf`` (w_cg = 0, no filter), ``cfcg_tauK`` (τ = 1/K, no filter),
``cfcgcs_tauK`` (τ = 1/K with the Stage IV filter at η), ``cfcg_sK`` (guidance "scale", s = K;
Fig. 2 only). Pair i of a request depends on (seed, i) only, so a ``cfcgcs`` variant reuses the
pairs of the ``cfcg`` variant with the same τ. Rows: ``origin`` (equal steps), ``origin_epochs``
(equal epochs, fewer steps: the paper's comparison, labelled), ``duplicates`` (the control) and
every synthetic variant but ``cfcg_s*``.

K-class bundles: each row's Dice is the mean foreground Dice, and ``dice_by_class`` gives the
Dice of each foreground class 1..K-1 (mean ± std over seeds).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from models.bundle import Bundle
from models.data import PairDataset, load_folder, to_uint8
from models.downstream import steps_per_epoch, test_dice, test_dice_by_class, train_downstream
from models.labels import mask_to_uint8
from models.statistics import summarise, summarise_by_class
from models.synthetic import (
    PairCache,
    Progress,
    SyntheticSet,
    duplicate_rows,
    make_synthetic,
    pairs_to_tensors,
)
from models.training import evaluate_filter
from models.variants import VARIANTS, sampling_params, select_variants

if TYPE_CHECKING:
    from models.evaluation import EvalConfig


def _mask_u8(data: PairDataset, i: int) -> np.ndarray:
    """Pair ``i``'s mask as written: 0/255 (binary, as before) or label values 0..K-1."""
    if data.num_classes == 2:
        return to_uint8(data.masks[i, 0])
    return mask_to_uint8(data.labels[i, 0].numpy(), data.num_classes)


def _variant_params_dict(s: SyntheticSet) -> dict[str, Any]:
    return {**s.params.to_dict(), "eta": s.eta}


def run_table(
    cfg: EvalConfig,
    bundle: Bundle,
    data_dir: str | Path,
    train: PairDataset,
    test: PairDataset,
    base: Any,
    eta: float,
    out: Path,
    progress: Progress,
    log: Callable[[str], None],
    results: dict[str, Any],
    pngs: dict[str, Path],
    plots: Any,
) -> None:
    """Table 1 and Fig. 2 (left) with the given bundle at the full train split."""
    from models.fid import (
        INCEPTION_SOURCE,
        FIDUnavailable,
        InceptionFeatures,
        fid_from_features,
        segmenter_features,
    )

    res, k_classes = train.resolution, bundle.num_classes
    dcfg = cfg.downstream()
    variants = select_variants(cfg.variants)
    n = cfg.n_synthetic
    max_attempts = max(n, int(round(cfg.max_attempts_factor * n)))
    from models.evaluation import plan_steps

    budget = plan_steps(len(train), n, cfg)
    results["steps"] = budget
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
    # the ceiling of the Stage IV yield: the filter's pass rate on real held-out pairs at the same η
    test_b = (
        test
        if res == bundle.resolution
        else load_folder(data_dir, bundle.resolution, test.names, num_classes=k_classes)
    )
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
            scores, taken, by_class = [], [], []
            for seed in cfg.seeds:
                progress.phase(f"{prefix}{key} seed {seed}")
                model, k = train_downstream(x, y, steps, dcfg, seed, prefix + key, progress.step)
                if k_classes == 2:
                    scores.append(float(test_dice(model, test).mean()))
                else:  # mean foreground Dice, and each class's mean over the test images
                    per_class = test_dice_by_class(model, test)
                    scores.append(float(per_class.mean(axis=1).mean()))
                    by_class.append(per_class.mean(axis=0))
                taken.append(k)
                first.setdefault(key, model)
            record[key] = {
                "steps": taken[0],
                "steps_per_seed": taken,
                "epochs": round(taken[0] / steps_per_epoch(len(x), cfg.batch_size), 2),
                "train_pairs": len(x),
                "dice": summarise(scores),
            }
            if by_class:
                record[key]["dice_by_class"] = summarise_by_class(np.stack(by_class))
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
            si, sm = pairs_to_tensors(synthetic[v.key].pairs, res, k_classes)
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

    # ---- outputs
    progress.phase("plots")
    order: list[str] = ["cfcgcs_tau2", "cfcgcs_tau1", "cfcg_tau2", *synthetic]
    grid_key = next((k for k in order if k in synthetic and synthetic[k].pairs), None)
    if grid_key is not None:
        real_pairs = [(to_uint8(train.images[i, 0]), _mask_u8(train, i)) for i in range(min(16, len(train)))]
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
