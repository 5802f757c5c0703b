"""The picture in README.md and docs/bundles.md: 16 kept synthetic pairs beside 16 real ones, and the Stage IV yield.

    python bench/demo_grid.py --bundle models/bundles/cxr-lung-64 --out docs/demo-grid.png
    python bench/demo_grid.py --bundle models/bundles/cxr-lungs3-64 --data DATA3 --out docs/demo-grid-3label.png

(DATA3: the 3-label set that ``python -m examples.lung_labels`` makes from the same chest X-rays.)

Real pairs are taken from the bundle's *train* split and, when the bundle carries the data's
pairs.csv, only among images under a licence that allows showing them (CC BY, Apache, public
domain; no NC/ND).
"""

from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path

import torch

from models.bundle import Bundle
from models.data import load_folder, to_uint8
from models.expand import expand
from models.labels import mask_to_uint8
from models.plots import sample_grid

ROOT = Path(__file__).resolve().parents[1]
SHOWABLE = ("CC BY 3.0", "CC BY 4.0", "CC BY", "Apache 2.0", "CC0", "Public domain")


def showable_names(bundle: Bundle) -> list[str]:
    train = bundle.meta["split"]["train"]
    licences = bundle.path / "data-pairs.csv"
    if not licences.is_file():
        return list(train)
    ok = {
        row["name"] for row in csv.DictReader(licences.open()) if row.get("license", "").strip() in SHOWABLE
    }
    return [n for n in train if n in ok]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path, default=ROOT / "models" / "bundles" / "cxr-lung-64")
    ap.add_argument("--data", type=Path, help="dataset folder (default: the one recorded in bundle.json)")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "demo-grid.png")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    bundle = Bundle.load(args.bundle)
    data_dir = args.data or (ROOT / bundle.meta["data"]["folder"])
    names = showable_names(bundle)[:16]
    real = load_folder(data_dir, bundle.resolution, names=names, num_classes=bundle.num_classes)
    labels = real.labels[:, 0].numpy()
    real_pairs = [
        (to_uint8(real.images[i, 0]), mask_to_uint8(labels[i], bundle.num_classes)) for i in range(len(real))
    ]

    t0 = time.perf_counter()
    pairs = list(expand(bundle, 16, seed=args.seed, batch_size=16))
    dt = time.perf_counter() - t0
    kept = [(p.image, p.mask) for p in pairs if p.kept]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    title = f"generated, kept at eta={bundle.default_eta} ({len(kept)} of {len(pairs)})"
    sample_grid(args.out, kept, real_pairs, title)
    real = bundle.meta.get("metrics", {}).get("filter_test", {})
    real_rate, real_eta = real.get("real_pass_rate"), real.get("eta")
    print(f"wrote {args.out}")
    print(f"Stage IV yield at eta={bundle.default_eta}: {len(kept)}/{len(pairs)} = {len(kept) / len(pairs):.1%} "
          f"(real held-out pairs passing at eta={real_eta}: {real_rate:.1%}); {dt:.0f} s, {torch.get_num_threads()} threads")  # fmt: skip


if __name__ == "__main__":
    main()
