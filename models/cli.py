"""The ``diffuseexpand`` command line: train a bundle, expand a dataset, inspect a bundle."""

from __future__ import annotations

import csv
import io
import json
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from PIL import Image
from tqdm import tqdm

from app.exports import GENERATOR, Entry, ExportFormat, Labels, describe, index_file, layout, mask_member
from app.layout import MASK_FIELDS, class_loss_fields
from app.params import DEFAULT_REAL_SHARE, MaskSettings, MaskSource, Solver, default_max_attempts, draw_seed
from models.bundle import Bundle, BundleError, new_meta, read_meta, resolve_device, write_meta
from models.data import (
    DatasetError,
    PairDataset,
    Split,
    find_pairs,
    load_folder,
    load_unlabelled,
    make_split,
    pair_groups,
)
from models.expand import Cancelled, expand
from models.guidance import GuidanceMode
from models.mask_source import MASKS_FILE
from models.merge import merge
from models.shape import parse_size, restore_shape
from models.training import DEFAULT_UNLABELLED_SHARE, TrainConfig, train_dpm, train_filter, train_segmenter

app = typer.Typer(
    name="diffuseexpand",
    help="Expand a small 2D image/mask segmentation dataset with diffusion models (DiffuseExpand).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def fail(message: str) -> typer.Exit:
    typer.echo(f"Error: {message}", err=True)
    return typer.Exit(code=2)


@contextmanager
def user_errors() -> Iterator[None]:
    """Bad data, bundles or values end the command with their message and exit code 2."""
    try:
        yield
    except (DatasetError, BundleError, ValueError, FileNotFoundError) as exc:
        raise fail(str(exc)) from None


def _positive(name: str) -> Callable[[Any], Any]:
    def check(value: Any) -> Any:
        if value is not None and value <= 0:
            raise typer.BadParameter(f"must be > 0, got {value}", param_hint=name)
        return value

    return check


def _progress(desc: str, total: int) -> tuple[tqdm, Callable[[int, int, float], None]]:
    bar = tqdm(total=total, desc=desc, unit="step", dynamic_ncols=True, file=sys.stderr)

    def update(step: int, steps: int, loss: float) -> None:
        bar.n = step
        bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
        bar.update(0)

    return bar, update


def _prepare_bundle(
    data_dir: Path,
    out: Path,
    resolution: int | None,
    seed: int,
    test_fraction: float,
    group_by: str | None = None,
    group_column: str | None = None,
    num_classes: int | None = None,
) -> tuple[PairDataset, PairDataset, dict[str, Any], Any]:
    """Create the bundle's bundle.json and split on first use; later stages must use the same data.

    Returns the train and test pairs, the bundle's metadata and the images of the data's
    ``unlabelled/`` folder (``[U, 1, R, R]``, U = 0 without one), which only Stage I uses.

    K (``num_classes``) is inferred from the masks on first use unless given, then kept in bundle.json.

    The split is group-aware with ``group_by``/``group_column`` (or a ``group`` column in the
    data's pairs.csv): no group straddles train and test, and the split records the grouping.
    """
    pairs = find_pairs(data_dir)
    if (out / "bundle.json").exists():
        meta = read_meta(out)
        if resolution is not None and resolution != meta["resolution"]:
            raise ValueError(
                f"--resolution {resolution} differs from the bundle's {meta['resolution']}; use a new --out folder"
            )
        bundle_classes = int(meta.get("num_classes", 2))
        if num_classes is not None and num_classes != bundle_classes:
            raise ValueError(
                f"--num-classes {num_classes} differs from the bundle's {bundle_classes}; use a new --out folder"
            )
        split = Split.from_dict(meta["split"])
        data = load_folder(data_dir, int(meta["resolution"]), num_classes=bundle_classes)
    else:
        if resolution is None:
            resolution = 64
        data = load_folder(data_dir, resolution, num_classes=num_classes)
        meta = new_meta(resolution, data.num_classes)
        names = [p[0] for p in pairs]
        groups, grouping = pair_groups(data_dir, names, group_by=group_by, group_column=group_column)
        split = make_split(names, test_fraction=test_fraction, seed=seed, groups=groups, grouping=grouping)
        meta["split"] = split.to_dict()
    if "data" in meta and meta["data"]["fingerprint"] != data.fingerprint:
        raise ValueError(
            f"{data_dir} is not the data this bundle was trained on (fingerprint differs); use a new --out folder"
        )
    unlabelled_names, unlabelled = load_unlabelled(data_dir, int(meta["resolution"]))
    both = sorted(set(unlabelled_names) & set(data.names))
    if both:  # as an upload is refused (app.dataset_check): an image is labelled or unlabelled
        raise DatasetError(
            f"{data_dir}: {len(both)} name(s) both in unlabelled/ and a labelled pair ({', '.join(both[:5])}); "
            "an image is labelled or unlabelled"
        )
    meta["data"] = {
        "folder": str(data_dir),
        "fingerprint": data.fingerprint,
        "pairs": len(data),
        "unlabelled": len(unlabelled),  # images without masks (unlabelled/): Stage I's image phase only
        "empty_masks": data.empty_masks,  # 0: Stage IV never keeps a synthetic pair with an empty mask
        "shapes": data.shapes(),  # the commonest original sizes, "WxH": pairs (padded to squares)
        "licence_files": [],
    }
    write_meta(out, meta)
    # Keep the data's provenance and licence notes beside the weights trained on it.
    for note in ("SOURCE.md", "pairs.csv", "LICENSE", "LICENSE.md"):
        if (data_dir / note).is_file():
            shutil.copyfile(data_dir / note, out / f"data-{note}")
            meta["data"]["licence_files"].append(f"data-{note}")
    write_meta(out, meta)
    return data.subset(split.train), data.subset(split.test), meta, unlabelled


DataArg = Annotated[Path, typer.Argument(help="Dataset folder with images/NAME.ext and masks/NAME.ext.")]
OutOpt = Annotated[Path, typer.Option("--out", "-o", help="Bundle folder to create or continue.")]
ResOpt = Annotated[
    int | None,
    typer.Option(
        help="Square training resolution in pixels (default 64).", callback=_positive("--resolution")
    ),
]
SeedOpt = Annotated[int, typer.Option(help="Seed of the split and of every training draw.")]
BatchOpt = Annotated[int, typer.Option(help="Training batch size.", callback=_positive("--batch-size"))]
DeviceOpt = Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")]
TestFracOpt = Annotated[
    float, typer.Option(help="Share of pairs held out for testing (saved in the bundle).")
]
GroupByOpt = Annotated[
    str | None,
    typer.Option(
        help="Group-aware split on first use: a pair's group is the first match of this regex in its "
        "name (its first capture group if any); no group straddles train and test."
    ),
]
ClassesOpt = Annotated[
    int | None,
    typer.Option(
        help="Classes K of the masks, background included (default: inferred on first use, 2 for binary "
        "masks; label maps 0..K-1 or palette PNGs for K > 2).",
        min=2,
        max=16,
    ),
]


def _share(value: float) -> float:
    if not 0.0 <= value < 1.0:
        raise typer.BadParameter(f"must be in [0, 1), got {value}", param_hint="--unlabelled-share")
    return value


UnlabelledShareOpt = Annotated[
    float,
    typer.Option(
        help="Share of Stage I batch rows drawn from the data's unlabelled/ images (trained with the mask "
        "condition dropped), 0 to below 1; ignored without an unlabelled/ folder.",
        callback=_share,
    ),
]
GroupColumnOpt = Annotated[
    str | None,
    typer.Option(
        help="Group-aware split by this column of the data's pairs.csv (default: 'group' if present)."
    ),
]

FormatOpt = Annotated[
    ExportFormat,
    typer.Option(
        "--format",
        help="Layout: plain (images/, masks/ 0/255), nnunet (raw nnU-Net v2 dataset: imagesTr/, labelsTr/ "
        "0/1, dataset.json) or monai (images/, labels/ 0/1, datalist.json); a K-class bundle's masks are "
        "label maps 0..K-1 in every layout. See docs/exports.md.",
    ),
]


def _png(array: Any) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array, mode="L").save(buf, format="PNG")
    return buf.getvalue()


def _device(device: str) -> Any:
    try:
        return resolve_device(device)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--device") from None


def _run_dpm(train: PairDataset, out: Path, steps: int, batch: int, seed: int, lr: float, cf: float,
             pretrained: Path | None, dev: Any, unlabelled: Any = None,
             unlabelled_share: float = DEFAULT_UNLABELLED_SHARE) -> None:  # fmt: skip
    bar, cb = _progress("Stage I  DPM      ", steps)
    with bar:
        s = train_dpm(train, out, TrainConfig(steps=steps, batch_size=batch, lr=lr, seed=seed),
                      cf_dropout=cf, pretrained=pretrained, device=dev, callback=cb,
                      unlabelled=unlabelled, unlabelled_share=unlabelled_share)  # fmt: skip
    if s["reinitialised_from_pretrained"]:
        typer.echo(
            f"re-initialised from scratch (shape differs): {', '.join(s['reinitialised_from_pretrained'])}"
        )


def _run_segmenter(train: PairDataset, out: Path, steps: int, batch: int, seed: int, dev: Any) -> None:
    bar, cb = _progress("Stage II segmenter", steps)
    with bar:
        train_segmenter(
            train,
            out,
            TrainConfig(steps=steps, batch_size=batch, lr=5e-4, seed=seed),
            device=dev,
            callback=cb,
        )


def _run_filter(
    train: PairDataset, test: PairDataset, out: Path, steps: int, batch: int, seed: int, dev: Any
) -> None:
    bar, cb = _progress("Stage IV filter   ", steps)
    with bar:
        s = train_filter(train, out, TrainConfig(steps=steps, batch_size=batch, lr=1e-3, seed=seed),
                         test_data=test, device=dev, callback=cb)  # fmt: skip
    if "test" in s:
        t = s["test"]
        typer.echo(
            f"filter held-out Dice {t['dice_mean']:.4f} ± {t['dice_std']:.4f} on {t['n']} test pairs; "
            f"real pairs passing eta={t['eta']}: {t['real_pass_rate']:.1%}"
        )


@app.command()
def train(
    data: DataArg,
    out: OutOpt,
    resolution: ResOpt = None,
    train_steps: Annotated[
        int, typer.Option(help="Stage I DPM steps.", callback=_positive("--train-steps"))
    ] = 2400,
    segmenter_steps: Annotated[
        int | None,
        typer.Option(
            help="Stage II steps (default: train-steps / 2).", callback=_positive("--segmenter-steps")
        ),
    ] = None,
    filter_steps: Annotated[
        int | None,
        typer.Option(help="Stage IV steps (default: train-steps / 2).", callback=_positive("--filter-steps")),
    ] = None,
    batch_size: BatchOpt = 16,
    seed: SeedOpt = 0,
    test_fraction: TestFracOpt = 0.2,
    lr: Annotated[float, typer.Option(help="Stage I learning rate.", callback=_positive("--lr"))] = 2e-4,
    cf_dropout: Annotated[float, typer.Option(help="Classifier-free dropout of the mask condition.")] = 0.2,
    pretrained: Annotated[Path | None, typer.Option(help="Local DPM checkpoint to fine-tune from.")] = None,
    group_by: GroupByOpt = None,
    group_column: GroupColumnOpt = None,
    num_classes: ClassesOpt = None,
    unlabelled_share: UnlabelledShareOpt = DEFAULT_UNLABELLED_SHARE,
    device: DeviceOpt = "auto",
) -> None:
    """Train all stages (I, II, IV) into a bundle; re-running continues from the checkpoints."""
    dev = _device(device)
    with user_errors():
        tr, te, _, unl = _prepare_bundle(
            data, out, resolution, seed, test_fraction, group_by, group_column, num_classes
        )
        extra = f", {len(unl)} unlabelled images (Stage I)" if len(unl) else ""
        typer.echo(f"{len(tr)} training pairs, {len(te)} held out{extra}, device {dev}")
        _run_dpm(
            tr, out, train_steps, batch_size, seed, lr, cf_dropout, pretrained, dev, unl, unlabelled_share
        )
        _run_segmenter(tr, out, segmenter_steps or max(1, train_steps // 2), batch_size, seed, dev)
        _run_filter(tr, te, out, filter_steps or max(1, train_steps // 2), batch_size, seed, dev)
    typer.echo(f"bundle ready: {out}")


@app.command("train-dpm")
def train_dpm_cmd(
    data: DataArg,
    out: OutOpt,
    resolution: ResOpt = None,
    train_steps: Annotated[int, typer.Option(callback=_positive("--train-steps"))] = 2400,
    batch_size: BatchOpt = 16,
    seed: SeedOpt = 0,
    test_fraction: TestFracOpt = 0.2,
    lr: Annotated[float, typer.Option(callback=_positive("--lr"))] = 2e-4,
    cf_dropout: float = 0.2,
    pretrained: Annotated[Path | None, typer.Option(help="Local DPM checkpoint to fine-tune from.")] = None,
    group_by: GroupByOpt = None,
    group_column: GroupColumnOpt = None,
    num_classes: ClassesOpt = None,
    unlabelled_share: UnlabelledShareOpt = DEFAULT_UNLABELLED_SHARE,
    device: DeviceOpt = "auto",
) -> None:
    """Stage I only: the two-condition DPM (with the data's unlabelled/ images, if any)."""
    dev = _device(device)
    with user_errors():
        tr, _, _, unl = _prepare_bundle(
            data, out, resolution, seed, test_fraction, group_by, group_column, num_classes
        )
        _run_dpm(
            tr, out, train_steps, batch_size, seed, lr, cf_dropout, pretrained, dev, unl, unlabelled_share
        )


@app.command("train-segmenter")
def train_segmenter_cmd(
    data: DataArg,
    out: OutOpt,
    resolution: ResOpt = None,
    train_steps: Annotated[int, typer.Option(callback=_positive("--train-steps"))] = 1200,
    batch_size: BatchOpt = 16,
    seed: SeedOpt = 0,
    test_fraction: TestFracOpt = 0.2,
    group_by: GroupByOpt = None,
    group_column: GroupColumnOpt = None,
    num_classes: ClassesOpt = None,
    device: DeviceOpt = "auto",
) -> None:
    """Stage II only: the noisy segmenter with its image/mask head."""
    dev = _device(device)
    with user_errors():
        tr, _, _, _ = _prepare_bundle(
            data, out, resolution, seed, test_fraction, group_by, group_column, num_classes
        )
        _run_segmenter(tr, out, train_steps, batch_size, seed, dev)


@app.command("train-filter")
def train_filter_cmd(
    data: DataArg,
    out: OutOpt,
    resolution: ResOpt = None,
    train_steps: Annotated[int, typer.Option(callback=_positive("--train-steps"))] = 1200,
    batch_size: BatchOpt = 16,
    seed: SeedOpt = 0,
    test_fraction: TestFracOpt = 0.2,
    group_by: GroupByOpt = None,
    group_column: GroupColumnOpt = None,
    num_classes: ClassesOpt = None,
    device: DeviceOpt = "auto",
) -> None:
    """Stage IV only: the clean filter segmenter, with its held-out Dice."""
    dev = _device(device)
    with user_errors():
        tr, te, _, _ = _prepare_bundle(
            data, out, resolution, seed, test_fraction, group_by, group_column, num_classes
        )
        _run_filter(tr, te, out, train_steps, batch_size, seed, dev)


def _mask_settings(source: MaskSource, real_share: float | None, clean: bool) -> MaskSettings:
    """``--mask-source``, ``--real-share`` and ``--clean-masks`` as MaskSettings (exit 2 naming the flag)."""
    if real_share is not None and source != MaskSource.MIXED:
        raise typer.BadParameter("only with --mask-source mixed", param_hint="--real-share")
    if real_share is not None and not 0.0 <= real_share <= 1.0:
        raise typer.BadParameter(f"must be in [0, 1], got {real_share}", param_hint="--real-share")
    share = DEFAULT_REAL_SHARE if real_share is None else real_share
    return MaskSettings(source=source, real_share=share, clean=clean)


@app.command("expand")
def expand_cmd(
    bundle: Annotated[Path, typer.Argument(help="Bundle folder made by `diffuseexpand train`.")],
    count: Annotated[int, typer.Option(help="Number of pairs to keep.", callback=_positive("--count"))],
    out: Annotated[
        Path,
        typer.Option("--out", "-o", help="Output folder (its layout: see --format; always manifest.csv)."),
    ],
    tau: Annotated[
        float | None, typer.Option(help="Temperature τ > 0 (guidance tau).", callback=_positive("--tau"))
    ] = None,
    scale: Annotated[
        float | None,
        typer.Option(help="Gradient scale s > 0 (guidance scale).", callback=_positive("--scale")),
    ] = None,
    eta: Annotated[
        float | None, typer.Option(help="Stage IV threshold: keep Dice loss ≤ η, 0 < η ≤ 1.")
    ] = None,
    steps: Annotated[
        int | None, typer.Option(help="Solver steps per phase.", callback=_positive("--steps"))
    ] = None,
    order: Annotated[int | None, typer.Option(help="Solver order: 1, 2 or 3.")] = None,
    solver: Annotated[Solver | None, typer.Option(help="dpmpp (DPM-Solver++) or unipc.")] = None,
    karras: Annotated[bool | None, typer.Option("--karras/--no-karras", help="Karras sigmas.")] = None,
    early_reject: Annotated[
        bool | None, typer.Option("--early-reject/--no-early-reject", help="The bundle's early rejection.")
    ] = None,
    w_cf: Annotated[float | None, typer.Option(help="Classifier-free weight.")] = None,
    w_cg: Annotated[float | None, typer.Option(help="Classifier-guidance weight (≥ 0).")] = None,
    guidance: Annotated[GuidanceMode | None, typer.Option(help="tau (paper) or scale (comparison).")] = None,
    seed: Annotated[int | None, typer.Option(help="Request seed (random if omitted; recorded).")] = None,
    batch_size: Annotated[
        int, typer.Option(help="Pairs per sampling batch.", callback=_positive("--batch-size"))
    ] = 8,
    max_attempts: Annotated[
        int | None,
        typer.Option(
            help="Stop after this many generated pairs (default 20 x count).",
            callback=_positive("--max-attempts"),
        ),  # fmt: skip
    ] = None,
    keep_rejected: Annotated[bool, typer.Option(help="Also write discarded pairs under rejected/.")] = False,
    size: Annotated[
        str | None,
        typer.Option(
            help="Output WIDTHxHEIGHT (e.g. 256x192): each pair centre-cropped to that aspect and resized "
            "(masks nearest). Default: the bundle's square resolution."
        ),
    ] = None,
    mask_source: Annotated[
        MaskSource,
        typer.Option(
            help="Where masks come from: generated (the mask phase), real (a training mask of the bundle, "
            "deformed by a seeded affine + elastic transform) or mixed (--real-share of the pairs real)."
        ),
    ] = MaskSource.GENERATED,
    real_share: Annotated[
        float | None,
        typer.Option(
            help="With --mask-source mixed: the share of pairs on real masks, 0 to 1 (default 0.5)."
        ),
    ] = None,
    clean_masks: Annotated[
        bool,
        typer.Option(
            "--clean-masks/--no-clean-masks",
            help="Drop specks far smaller than the training masks' components and fill holes in generated "
            "masks before the image phase.",
        ),
    ] = False,
    export_format: FormatOpt = ExportFormat.PLAIN,
    device: DeviceOpt = "auto",
) -> None:
    """Generate pairs until COUNT pass the Stage IV filter; write them and a manifest of every attempt."""
    dev = _device(device)
    mask_settings = _mask_settings(mask_source, real_share, clean_masks)
    try:
        out_size = parse_size(size) if size is not None else None
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--size") from None
    if eta is not None and not 0 < eta <= 1:
        raise typer.BadParameter(f"must be in (0, 1], got {eta}", param_hint="--eta")
    if order is not None and order not in (1, 2, 3):
        raise typer.BadParameter(f"must be 1, 2 or 3, got {order}", param_hint="--order")
    if w_cg is not None and w_cg < 0:
        raise typer.BadParameter(f"must be >= 0, got {w_cg}", param_hint="--w-cg")
    if out.exists() and (out / "manifest.csv").exists():
        raise fail(
            f"--out {out} already holds a manifest.csv; choose an empty folder so nothing is overwritten"
        )
    with user_errors():
        b = Bundle.load(bundle, device=dev)
        params = b.default_params().updated(
            tau=tau, scale=scale, steps=steps, order=order, w_cf=w_cf, w_cg=w_cg, guidance=guidance,
            solver=solver, karras=karras, early_reject=early_reject,
        )  # fmt: skip
        eta_used = b.default_eta if eta is None else eta
        seed_used = seed if seed is not None else draw_seed()
        lay = layout(export_format)
        for sub in (lay.images, lay.masks) + (("rejected/images", "rejected/masks") if keep_rejected else ()):
            (out / sub).mkdir(parents=True, exist_ok=True)
        run = {
            "bundle": str(bundle),
            "count": count,
            "seed": seed_used,
            "eta": eta_used,
            "batch_size": batch_size,
            "max_attempts": max_attempts or default_max_attempts(count),
            "params": params.to_dict(),
        }
        if size is not None:
            run["size"] = size
        run["masks"] = mask_settings.model_dump(mode="json")
        (out / "run.json").write_text(json.dumps(run, indent=2) + "\n")
        typer.echo(f"seed {seed_used}, eta {eta_used}, {params.to_dict()}")
        bar = tqdm(total=count, desc="kept", unit="pair", dynamic_ncols=True, file=sys.stderr)
        steps_bar = tqdm(desc="solver", unit="step", leave=False, dynamic_ncols=True, file=sys.stderr)
        generated = kept = 0
        t0 = time.perf_counter()

        def on_event(e: dict[str, Any]) -> None:
            if e["event"] == "step":
                steps_bar.update(1)

        manifest = (out / "manifest.csv").open("w", newline="")
        writer = csv.writer(manifest)
        per_class = class_loss_fields(b.num_classes)  # K > 2: dice_loss_1 ... dice_loss_{K-1}
        writer.writerow(["name", "index", "seed", "dice_loss", *per_class, "kept", *MASK_FIELDS, "synthetic"])
        labels = Labels.from_bundle(b.meta)
        names: list[str] = []
        try:
            for pair in expand(b, count, seed=seed_used, params=params, eta=eta_used, batch_size=batch_size,
                               max_attempts=max_attempts, callback=on_event, masks=mask_settings):  # fmt: skip
                generated += 1
                image, mask = pair.image, pair.mask
                if out_size is not None and (pair.kept or keep_rejected):
                    image, mask = restore_shape(image, mask, out_size)
                if pair.kept:
                    Image.fromarray(image, mode="L").save(out / lay.image(pair.name))
                    (out / lay.mask(pair.name)).write_bytes(mask_member(lay, _png(mask), b.num_classes))
                    names.append(pair.name)
                elif (
                    keep_rejected
                ):  # rejected pairs stay plain (masks as stored), outside the format's folders
                    Image.fromarray(image, mode="L").save(out / "rejected" / "images" / f"{pair.name}.png")
                    Image.fromarray(mask, mode="L").save(out / "rejected" / "masks" / f"{pair.name}.png")
                # a pair dropped before Stage IV has no class losses: empty cells
                losses = [f"{v:.6f}" for v in pair.class_losses or []] if per_class else []
                losses += [""] * (len(per_class) - len(losses))
                writer.writerow(
                    [
                        pair.name,
                        pair.index,
                        pair.seed,
                        f"{pair.dice_loss:.6f}",
                        *losses,
                        int(pair.kept),
                        pair.mask_source,
                        int(pair.cleaned),
                        1,
                    ]  # fmt: skip
                )
                manifest.flush()
                if pair.kept:
                    kept += 1
                    bar.update(1)
                bar.set_postfix(generated=generated, yield_=f"{kept / generated:.0%}", refresh=False)
        except (KeyboardInterrupt, Cancelled):
            typer.echo("interrupted: the pairs written so far are complete", err=True)
            raise typer.Exit(130) from None
        finally:  # an interrupted run's index names the pairs written so far
            manifest.close()
            steps_bar.close()
            bar.close()
            provenance = {"synthetic": True, "generator": GENERATOR, "model": bundle.name, **run}
            index = index_file(
                lay.format,
                [Entry(n) for n in names],
                labels,
                provenance,
                describe(len(names), bundle.name, "diffuseexpand expand"),
            )
            if index is not None:
                (out / index[0]).write_bytes(index[1])
    dt = time.perf_counter() - t0
    typer.echo(
        f"kept {kept} of {generated} generated ({kept / max(generated, 1):.1%}) in {dt:.1f} s -> {out}"
    )
    if kept < count:
        typer.echo(f"warning: only {kept} of {count} pairs kept within max_attempts", err=True)
        raise typer.Exit(1)


@app.command("merge")
def merge_cmd(
    real: Annotated[
        Path, typer.Argument(help="Real set: images/NAME.ext + masks/NAME.ext (optional pairs.csv).")
    ],
    synthetic: Annotated[
        Path,
        typer.Argument(help="Synthetic set: what `expand` writes or a job's zip unpacks to (manifest.csv)."),
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="New (or empty) folder for the merged set.")],
    export_format: FormatOpt = ExportFormat.NNUNET,
    bundle: Annotated[
        Path | None,
        typer.Option(help="Keep this bundle's held-out real pairs as the test set (its saved split)."),
    ] = None,
    split_column: Annotated[
        str | None,
        typer.Option(
            help="Column of the real set's pairs.csv saying train/test per pair (default: 'split' if present)."
        ),
    ] = None,
    resolution: Annotated[
        int | None,
        typer.Option(
            help="Square size of every pair (default: the synthetic pairs' size).",
            callback=_positive("--resolution"),
        ),
    ] = None,
    modality: Annotated[
        str | None,
        typer.Option(help="Name of the image channel (default: the synthetic set's, else 'image')."),
    ] = None,
    structure: Annotated[
        str | None, typer.Option(help="Name of label 1 (default: the synthetic set's, else 'foreground').")
    ] = None,
) -> None:
    """Merge a real and a synthetic set into one training set; real held-out pairs stay the test set."""
    with user_errors():
        summary = merge(real, synthetic, out, export_format, resolution=resolution, bundle=bundle,
                        split_column=split_column, modality=modality, structure=structure)  # fmt: skip
    r, s = summary["real"], summary["synthetic"]
    typer.echo(
        f"{r['train']} real + {s['pairs']} synthetic training pairs, {r['test']} real held out, "
        f"{summary['resolution']}x{summary['resolution']}, {summary['format']} -> {out}"
    )
    if r["split_from"] is None:
        typer.echo(
            "note: the real set says no pair is held out, so every real pair is a training pair; if the "
            "synthetic pairs' model was trained on part of it, give --bundle so its test pairs stay out",
            err=True,
        )


@app.command()
def calibrate(
    bundle: Annotated[Path, typer.Argument(help="Bundle folder; its bundle.json gets the rule.")],
    pairs: Annotated[
        int, typer.Option(help="Pairs sampled in full to calibrate on.", callback=_positive("--pairs"))
    ] = 128,
    seed: Annotated[
        int, typer.Option(help="Seed of the calibration pairs (not one users ask for).")
    ] = 1_000_003,
    max_false_rejection: Annotated[
        float, typer.Option(help="Most share of finally kept pairs the rule may drop, 0 to 0.5.")
    ] = 0.02,
    steps: Annotated[
        int | None,
        typer.Option(
            help="Calibrate at these steps (and make them the default).", callback=_positive("--steps")
        ),
    ] = None,
    solver: Annotated[
        Solver | None, typer.Option(help="Calibrate with this solver (and make it the default).")
    ] = None,
    batch_size: Annotated[
        int, typer.Option(help="Pairs per sampling batch.", callback=_positive("--batch-size"))
    ] = 8,
    device: DeviceOpt = "auto",
) -> None:
    """Calibrate early rejection on the bundle's default settings: sample PAIRS in full, score each
    one's predicted x0 part-way, and store the rule that saves the most steps while dropping at most
    --max-false-rejection of the pairs Stage IV keeps."""
    from models.early_rejection import calibrate as run_calibration

    if not 0 <= max_false_rejection <= 0.5:
        raise typer.BadParameter(
            f"must be in [0, 0.5], got {max_false_rejection}", param_hint="--max-false-rejection"
        )
    with user_errors():
        b = Bundle.load(bundle, device=_device(device))
        params = b.default_params().updated(steps=steps, solver=solver)
        rule, cal = run_calibration(b, pairs=pairs, seed=seed, params=params, batch_size=batch_size,
                                    max_false_rejection=max_false_rejection)  # fmt: skip
        for row in cal.candidates(max_false_rejection):
            typer.echo(f"at {row['at']:.2f}: cut {row['cut']:.4f}, drops {row['dropped']:.1%} of pairs, "
                       f"false rejections {row['false_rejections']:.0f} of {row['kept']:.0f} kept "
                       f"({row['false_rejection']:.1%}), image steps saved {row['saved']:.1%}")  # fmt: skip
        meta = read_meta(bundle)
        meta["sampling_defaults"] = params.to_dict()
        if rule is None:
            meta.pop("early_rejection", None)
            typer.echo("no rule drops anything at that false-rejection rate: early rejection stays off")
        else:
            meta["early_rejection"] = rule.to_dict()
            typer.echo(
                f"rule: drop at {rule.at:.2f} of the image steps when the estimated Dice loss is above {rule.cut:.4f}"
            )
        write_meta(bundle, meta)


@app.command()
def inspect(bundle: Annotated[Path, typer.Argument(help="Bundle folder.")]) -> None:
    """Print a bundle's metadata: resolution, classes, split sizes, training, held-out metrics, defaults."""
    with user_errors():
        meta = read_meta(bundle)
    split = meta.get("split", {})
    summary = {
        "bundle": str(bundle),
        "resolution": meta["resolution"],
        "num_classes": int(meta.get("num_classes", 2)),
        "package_version": meta.get("package_version"),
        "data": dict(meta.get("data", {})),
        "split": {
            "seed": split.get("seed"),
            "train": len(split.get("train", [])),
            "test": len(split.get("test", [])),
        },
        "training": {
            k: {
                kk: v.get(kk)
                for kk in ("steps", "final_loss", "parameters", "unlabelled", "unlabelled_share")
                if kk in v or kk in ("steps", "final_loss", "parameters")
            }
            for k, v in meta["training"].items()
        },
        # masks.npz: what mask_source real/mixed and --clean-masks need
        "training_masks": (bundle / MASKS_FILE).is_file(),
        "metrics": meta.get("metrics", {}),
        "sampling_defaults": meta.get("sampling_defaults"),
        "eta_default": meta.get("eta_default"),
        "early_rejection": {
            k: v for k, v in (meta.get("early_rejection") or {}).items() if k != "calibration"
        }
        or None,
    }
    typer.echo(json.dumps(summary, indent=2))


from models.cli_evaluate import evaluate_cmd  # noqa: E402
from models.cli_remote import ApiKey, Url, remote_errors  # noqa: E402
from models.cli_remote import _client as remote_client  # noqa: E402
from models.cli_remote import app as remote_app  # noqa: E402


@app.command()
def push(
    bundle: Annotated[Path, typer.Argument(help="Bundle folder (from `diffuseexpand train`).")],
    name: Annotated[str, typer.Option("--name", help="model name: a-z, 0-9, '.', '_', '-'")],
    url: Url,
    api_key: ApiKey = None,
) -> None:
    """Publish a locally trained bundle to a service's registry as the next version of NAME; prints
    NAME@VERSION and its digest (use it as `model` of a job)."""
    with remote_errors(), remote_client(url, api_key) as client:
        model = client.push(bundle, name)
    typer.echo(f"{model['name']}@{model['version']}\t{model.get('digest')}")


app.command("evaluate")(evaluate_cmd)
app.add_typer(remote_app, name="remote")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
