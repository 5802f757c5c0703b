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
from models.evaluation import PRESETS, VARIANTS, EvalConfig, EvaluationError, run_evaluation

PRESET_HELP = (
    "Settings to start from; explicit options override them. 'paper': N=500, 3 seeds, 50 epochs, "
    "lr 1e-2, every variant, few-shot 10/25/50/100 %. 'cpu': about 30-40 min on one CPU core for "
    "~340 train / ~85 test 64x64 pairs: N=100, 3 seeds, 12 epochs (~336 steps), lr 3e-3, UNet "
    "(16,32,64,128) with 1 residual unit, 10 solver steps, CF+CG+CS stops at 2xN generated, "
    "few-shot 10/25/50/100 % (not retrained)."
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
    retrain: Annotated[bool, typer.Option(help="Retrain the bundle on each few-shot subset.")] = False,
    retrain_steps: Annotated[int | None, typer.Option(help="Stage I steps of a retrained bundle.")] = None,
    inception_fid: Annotated[bool, typer.Option(help="Compute the Inception FID (offline weights).")] = True,
    gen_seed: Annotated[int | None, typer.Option(help="Request seed of the synthetic pairs.")] = None,
    gen_batch_size: Annotated[int | None, typer.Option(help="Pairs per sampling batch.")] = None,
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
        "gen_seed": gen_seed,
        "gen_batch_size": gen_batch_size,
    }
    settings.update({k: v for k, v in given.items() if v is not None})
    settings.update({"retrain": retrain, "inception_fid": inception_fid, "device": str(dev)})
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
        if cfg.fewshot and cfg.fewshot_variant not in (cfg.variants or VARIANTS):
            raise fail(
                f"--fewshot-variant {cfg.fewshot_variant} is not among --variants; add it or pass --fewshot none"
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
