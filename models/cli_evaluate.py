"""``diffuseexpand evaluate``: the paper's Table 1 / Fig. 2 protocol on a bundle and its data folder."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from tqdm import tqdm

from models.bundle import BundleError, read_meta, resolve_device
from models.data import DatasetError
from models.evaluation import PRESETS, EvalConfig, EvaluationError, run_evaluation
from models.variants import VARIANTS

PRESET_HELP = (
    "Settings to start from; explicit options override them. 'paper': N=500, 3 seeds, 50 epochs, "
    "lr 1e-2, every variant, few-shot 10/25/50/100 % with retrained bundles. 'cpu': Table 1 only, "
    "about 15 min on two CPU cores for ~340 train / ~85 test 64x64 pairs: N=100, 3 seeds, 12 epochs, "
    "lr 3e-3, UNet (16,32,64,128) with 1 residual unit, 10 solver steps. 'fewshot-cpu': the "
    "few-shot protocol only at 10 % and 100 %, 300 steps per row, bundles retrained per fraction "
    "(docs/results.md gives its wall time). 'fewshot-ceiling': 5 % and 10 % with the rest of the train "
    "split unlabelled, real masks, oracle and pseudo-label rows (give --fewshot-steps)."
)


def fail(message: str) -> typer.Exit:
    """Print the message and give exit code 2 (as the other commands do); not imported from models.cli,
    which imports this module to register the command."""
    typer.echo(f"Error: {message}", err=True)
    return typer.Exit(code=2)


def _floats(text: str | None, name: str) -> tuple[float, ...] | None:
    if text is None:
        return None
    if text.strip().lower() in ("", "none"):
        return ()
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise typer.BadParameter(f"expected comma-separated numbers, got {text!r}", param_hint=name) from None


def evaluate_cmd(
    bundle: Annotated[Path, typer.Argument(help="Bundle folder made by `diffuseexpand train`.")],
    data: Annotated[
        Path | None,
        typer.Argument(help="Dataset folder the bundle was trained on (default: the one in bundle.json)."),
    ] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder for results and plots.")] = Path(
        "evaluation"
    ),
    preset: Annotated[str, typer.Option(help=PRESET_HELP)] = "paper",
    n_synthetic: Annotated[int | None, typer.Option(help="Synthetic pairs N per variant.")] = None,
    seeds: Annotated[
        str | None, typer.Option(help="Downstream seeds, e.g. 0,1,2 (mean ± std over them).")
    ] = None,
    epochs: Annotated[
        int | None, typer.Option(help="Downstream epochs over origin + N (sets the step budget).")
    ] = None,
    steps: Annotated[
        int | None, typer.Option(help="Downstream steps of every equal-steps row (overrides --epochs).")
    ] = None,
    batch_size: Annotated[int | None, typer.Option(help="Downstream batch size.")] = None,
    lr: Annotated[float | None, typer.Option(help="Downstream Adam learning rate (cosine schedule).")] = None,
    model: Annotated[str | None, typer.Option(help="Downstream model: unet or attention-unet.")] = None,
    resolution: Annotated[
        int | None, typer.Option(help="Downstream resolution (default: the bundle's).")
    ] = None,
    variants: Annotated[
        str | None, typer.Option(help=f"Comma-separated subset of: {', '.join(VARIANTS)} (origin always).")
    ] = None,
    sample_steps: Annotated[
        int | None, typer.Option(help="Solver steps per phase (default: the bundle's).")
    ] = None,
    eta: Annotated[
        float | None, typer.Option(help="Stage IV η of the CF+CG+CS variants (default: the bundle's).")
    ] = None,
    max_attempts_factor: Annotated[
        float | None, typer.Option(help="CF+CG+CS stops after this many x N generated pairs.")
    ] = None,
    fewshot: Annotated[
        str | None, typer.Option(help="Few-shot train fractions, e.g. 0.1,0.25,0.5,1 or none.")
    ] = None,
    fewshot_variant: Annotated[
        str | None, typer.Option(help="Synthetic variant of the few-shot rows.")
    ] = None,
    retrain: Annotated[
        bool,
        typer.Option(
            help="Retrain the bundle on each few-shot subset (--no-retrain reuses the given bundle: "
            "an upper bound, labelled as such)."
        ),
    ] = True,
    retrain_steps: Annotated[int | None, typer.Option(help="Stage I steps of a retrained bundle.")] = None,
    retrain_segmenter_steps: Annotated[
        int | None, typer.Option(help="Stage II steps of a retrained bundle.")
    ] = None,
    retrain_filter_steps: Annotated[
        int | None, typer.Option(help="Stage IV steps of a retrained bundle.")
    ] = None,
    retrain_augment: Annotated[
        bool | None, typer.Option(help="Geometric augmentation while retraining Stage I.")
    ] = None,
    group_by: Annotated[
        str | None,
        typer.Option(
            help="Group-aware split: the group of a pair is the first match of this regex in its name "
            "(its first capture group if any); a group never straddles train and test."
        ),
    ] = None,
    group_column: Annotated[
        str | None,
        typer.Option(
            help="Group-aware split by this column of the data's pairs.csv (default: 'group' if present)."
        ),
    ] = None,
    table: Annotated[
        bool | None, typer.Option(help="Run the Table-1 part (variants at the full train split).")
    ] = None,
    synthetic_sets: Annotated[
        int | None, typer.Option(help="Synthetic sets per few-shot fraction (different request seeds).")
    ] = None,
    synthetic_multiple: Annotated[
        float | None, typer.Option(help="Few-shot N as a multiple of the fraction's real pairs.")
    ] = None,
    max_synthetic: Annotated[
        int | None, typer.Option(help="Cap on the few-shot N (bounds generation at large fractions).")
    ] = None,
    sweep: Annotated[
        str | None, typer.Option(help="N multiples tried at the smallest fraction, e.g. 1,3,10 (or none).")
    ] = None,
    synthetic_ratio: Annotated[
        float | None,
        typer.Option(
            help="Share of synthetic pairs in each few-shot batch, in (0, 1) (default: concatenate)."
        ),
    ] = None,
    augment: Annotated[bool | None, typer.Option(help="Train the augmentation rows.")] = None,
    flip: Annotated[
        bool, typer.Option(help="Left/right flips in the augmentation (off: chest X-rays are not symmetric).")
    ] = False,
    fewshot_steps: Annotated[
        int | None, typer.Option(help="Downstream steps of every few-shot row (equal steps).")
    ] = None,
    inception_fid: Annotated[bool, typer.Option(help="Compute the Inception FID (offline weights).")] = True,
    gen_seed: Annotated[int | None, typer.Option(help="Request seed of the synthetic pairs.")] = None,
    gen_batch_size: Annotated[int | None, typer.Option(help="Pairs per sampling batch.")] = None,
    unlabelled: Annotated[
        str | None,
        typer.Option(
            help="Few-shot unlabelled pool: 'rest' gives Stage I (and the pseudo-label row) the train "
            "split's images outside the fraction, without masks (test images never); 'none'."
        ),
    ] = None,
    mask_source: Annotated[
        str | None, typer.Option(help="Masks of the few-shot synthetic pairs: generated, real or mixed.")
    ] = None,
    real_share: Annotated[
        float | None, typer.Option(help="With --mask-source mixed: the share of pairs on real masks.")
    ] = None,
    clean_masks: Annotated[
        bool | None, typer.Option(help="Clean generated masks (specks, holes) before the image phase.")
    ] = None,
    oracle: Annotated[
        bool | None, typer.Option(help="The oracle rows: origin + N real train pairs (+ augmentation).")
    ] = None,
    plain_synthetic: Annotated[
        bool | None, typer.Option(help="The 'origin + N synthetic' row without augmentation.")
    ] = None,
    pseudo: Annotated[
        bool | None, typer.Option(help="The pseudo-label row (needs --unlabelled rest).")
    ] = None,
    sweep_fraction: Annotated[
        float | None, typer.Option(help="The fraction where the N sweep runs (default: the smallest).")
    ] = None,
    budgets: Annotated[
        str | None,
        typer.Option(
            help="Run only the step-budget study at these downstream step counts, e.g. 300,1000,3000: "
            "augmentation vs origin + every other train pair + augmentation, per fraction."
        ),
    ] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
) -> None:
    """Measure what expansion buys: downstream Dice of origin vs origin + synthetic pairs, at equal steps.

    Writes OUT/results.json, OUT/results.md (Table 1 shape) and PNG plots; prints the wall time.
    """
    t0 = time.perf_counter()
    try:
        dev = resolve_device(device)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--device") from None
    if preset not in PRESETS:
        raise typer.BadParameter(
            f"unknown preset {preset!r}; choose {', '.join(PRESETS)}", param_hint="--preset"
        )
    settings: dict[str, Any] = dict(PRESETS[preset])
    seed_list = _floats(seeds, "--seeds")
    given: dict[str, Any] = {
        "n_synthetic": n_synthetic,
        "seeds": tuple(int(s) for s in seed_list) if seed_list is not None else None,
        "epochs": epochs,
        "steps": steps,
        "batch_size": batch_size,
        "lr": lr,
        "model": model,
        "resolution": resolution,
        "variants": tuple(v.strip() for v in variants.split(",") if v.strip()) if variants else None,
        "sample_steps": sample_steps,
        "eta": eta,
        "max_attempts_factor": max_attempts_factor,
        "fewshot": _floats(fewshot, "--fewshot"),
        "fewshot_variant": fewshot_variant,
        "retrain_steps": retrain_steps,
        "retrain_segmenter_steps": retrain_segmenter_steps,
        "retrain_filter_steps": retrain_filter_steps,
        "retrain_augment": retrain_augment,
        "group_by": group_by,
        "group_column": group_column,
        "table": table,
        "synthetic_sets": synthetic_sets,
        "synthetic_multiple": synthetic_multiple,
        "max_synthetic": max_synthetic,
        "sweep": _floats(sweep, "--sweep"),
        "synthetic_ratio": synthetic_ratio,
        "augment": augment,
        "fewshot_steps": fewshot_steps,
        "gen_seed": gen_seed,
        "gen_batch_size": gen_batch_size,
        "unlabelled": unlabelled,
        "mask_source": mask_source,
        "real_share": real_share,
        "clean_masks": clean_masks,
        "oracle": oracle,
        "pseudo": pseudo,
        "plain_synthetic": plain_synthetic,
        "sweep_fraction": sweep_fraction,
        "budgets": tuple(int(b) for b in _floats(budgets, "--budgets") or ())
        if budgets is not None
        else None,
    }
    settings.update({k: v for k, v in given.items() if v is not None})
    settings.update({"retrain": retrain, "flip": flip, "inception_fid": inception_fid, "device": str(dev)})
    try:
        cfg = EvalConfig(**settings)
    except ValueError as exc:
        raise fail(f"invalid setting: {exc}") from None
    try:
        if resolution is not None and resolution < 8:
            raise fail(f"--resolution must be at least 8, got {resolution}")
        if data is None:
            folder = read_meta(bundle).get("data", {}).get("folder")
            if not folder:
                raise fail("no DATA folder given and the bundle records none")
            data = Path(folder)
        fv = VARIANTS.get(cfg.fewshot_variant)
        if cfg.fewshot and (fv is None or not fv.synthetic or not fv.downstream):
            synthetic = ", ".join(k for k, v in VARIANTS.items() if v.synthetic and v.downstream)
            raise fail(
                f"--fewshot-variant {cfg.fewshot_variant!r} is not a synthetic variant; choose one of {synthetic}"
            )
        typer.echo(f"evaluate {bundle} on {data} -> {out} ({preset} preset, device {dev})")
        bar = tqdm(total=0, unit="work", dynamic_ncols=True, file=sys.stderr)
        try:
            run_evaluation(bundle, data, out, cfg, bar=bar, log=lambda m: bar.write(m, file=sys.stderr))
        finally:
            bar.close()
    except (EvaluationError, BundleError, DatasetError, ValueError, FileNotFoundError) as exc:
        raise fail(str(exc)) from None
    typer.echo((out / "results.md").read_text())
    typer.echo(
        f"results: {out / 'results.json'}, {out / 'results.md'}; wall time {time.perf_counter() - t0:.0f} s"
    )
