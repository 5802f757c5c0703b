"""``diffuseexpand expand --format`` and ``diffuseexpand merge``: folders users train nnU-Net and MONAI on."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from app.exports import Entry, Labels, index_file, layout, mask_member
from models.cli import app
from tests.utils.tiny import make_multiclass_dataset, make_shapes_dataset

runner = CliRunner()


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def values(path: Path) -> set[int]:
    return set(np.unique(np.asarray(Image.open(path))).tolist())


def expand(bundle: Path, out: Path, fmt: str, count: int = 3) -> None:
    res = runner.invoke(app, ["expand", str(bundle), "--count", str(count), "--out", str(out), "--steps", "2",
                              "--eta", "1.0", "--seed", "4", "--batch-size", "2", "--format", fmt,
                              "--device", "cpu"])  # fmt: skip
    assert res.exit_code == 0, res.output


def synthetic_set(root: Path, n: int = 3, size: int = 16) -> Path:
    """A synthetic set as a plain zip unpacks to: images/, masks/ (0/255), manifest.csv, job.json."""
    make_shapes_dataset(root, n=n, size=size, seed=9)
    for p in sorted((root / "images").iterdir()):  # pair names as the service gives them
        p.rename(root / "images" / f"s1-{int(p.stem[5:]):06d}.png")
    for p in sorted((root / "masks").iterdir()):
        p.rename(root / "masks" / f"s1-{int(p.stem[5:]):06d}.png")
    with (root / "manifest.csv").open("w") as fh:
        fh.write("name,index,seed,dice_loss,model,synthetic\n")
        fh.writelines(f"s1-{i:06d},{i},1,0.01,tiny,1\n" for i in range(n))
    (root / "job.json").write_text(json.dumps({"id": "ab" * 16, "params": {"model": "tiny", "seed": 1}}))
    return root


def real_set(root: Path, n: int = 6, split: dict[str, str] | None = None) -> Path:
    """Real pairs at 32x32 (twice the synthetic size), with a pairs.csv split column when given."""
    make_shapes_dataset(root, n=n, size=32)
    if split is not None:
        with (root / "pairs.csv").open("w") as fh:
            fh.write("name,split,license\n")
            fh.writelines(f"shape{i:03d},{split.get(f'shape{i:03d}', 'train')},CC0\n" for i in range(n))
    return root


# ---- expand --format


def test_expand_as_nnunet_writes_a_raw_nnunet_dataset(tmp_path: Path, tiny_bundle: Path) -> None:
    out = tmp_path / "nn"
    expand(tiny_bundle, out, "nnunet")
    rows = read_csv(out / "manifest.csv")
    kept = [r["name"] for r in rows if r["kept"] == "1"]
    assert len(kept) == 3 and all(r["synthetic"] == "1" for r in rows)
    assert list(rows[0]) == [
        "name",
        "index",
        "seed",
        "dice_loss",
        "kept",
        "mask_source",
        "cleaned",
        "synthetic",
    ]
    assert sorted(p.name for p in (out / "imagesTr").iterdir()) == sorted(f"{n}_0000.png" for n in kept)
    for name in kept:
        image = np.asarray(Image.open(out / "imagesTr" / f"{name}_0000.png"))
        label = Image.open(out / "labelsTr" / f"{name}.png")
        assert image.shape == (16, 16) and image.dtype == np.uint8  # greyscale: one channel
        assert label.mode == "L" and values(out / "labelsTr" / f"{name}.png") <= {0, 1}
        assert 1 in values(out / "labelsTr" / f"{name}.png")  # Stage IV kept no empty mask
    doc = json.loads((out / "dataset.json").read_text())
    assert doc["numTraining"] == 3 and doc["file_ending"] == ".png"
    assert doc["channel_names"] == {"0": "image"} and doc["labels"] == {"background": 0, "foreground": 1}
    prov = doc["provenance"]
    assert prov["synthetic"] is True and prov["model"] == tiny_bundle.name and prov["seed"] == 4
    assert prov["params"]["steps"] == 2 and prov["eta"] == 1.0
    assert not (out / "images").exists() and not (out / "masks").exists()


def test_a_k_class_bundle_expands_and_merges_as_label_maps_with_k_labels(
    tmp_path: Path, tiny_multiclass_bundle: Path
) -> None:
    out = tmp_path / "nn"
    expand(tiny_multiclass_bundle, out, "nnunet", count=2)
    rows = read_csv(out / "manifest.csv")
    assert list(rows[0]) == ["name", "index", "seed", "dice_loss", "dice_loss_1", "dice_loss_2", "kept",
                             "mask_source", "cleaned", "synthetic"]  # fmt: skip
    kept = [r for r in rows if r["kept"] == "1"]
    for r in kept:  # dice_loss is the mean of the class losses; masks keep their labels 0..2
        assert float(r["dice_loss"]) == pytest.approx((float(r["dice_loss_1"]) + float(r["dice_loss_2"])) / 2, abs=1e-5)  # fmt: skip
        assert values(out / "labelsTr" / f"{r['name']}.png") <= {0, 1, 2}
    labels = {"background": 0, "organ 1": 1, "organ 2": 2}  # bundle.json's names
    assert json.loads((out / "dataset.json").read_text())["labels"] == labels
    # merged with a real K = 3 set: its label maps stay label maps (resized nearest), the labels stay K
    real = make_multiclass_dataset(tmp_path / "real", n=2, size=32)
    merged = tmp_path / "merged"
    res = runner.invoke(app, ["merge", str(real), str(out), "--out", str(merged), "--format", "nnunet"])
    assert res.exit_code == 0, res.output
    assert values(merged / "labelsTr" / "real_multi000.png") == {0, 1, 2}
    assert json.loads((merged / "dataset.json").read_text())["labels"] == labels


def test_expand_as_monai_is_read_by_monai(tmp_path: Path, tiny_bundle: Path) -> None:
    from monai.data import load_decathlon_datalist
    from monai.transforms import LoadImaged

    bundle = tmp_path / "b"
    shutil.copytree(tiny_bundle, bundle)
    meta = json.loads((bundle / "bundle.json").read_text())
    (bundle / "bundle.json").write_text(json.dumps({**meta, "modality": "X-ray", "structure": "lung"}))
    out = tmp_path / "mo"
    expand(bundle, out, "monai", count=2)
    items = load_decathlon_datalist(str(out / "datalist.json"), data_list_key="training")
    assert len(items) == 2
    for item in items:
        loaded = LoadImaged(keys=["image", "label"])(item)
        assert loaded["image"].shape == loaded["label"].shape == (16, 16)
        assert set(np.unique(np.asarray(loaded["label"])).tolist()) == {0, 1}
    doc = json.loads((out / "datalist.json").read_text())
    assert doc["labels"] == {"0": "background", "1": "lung"} and doc["modality"] == {"0": "X-ray"}


# ---- merge


def test_merge_into_nnunet_keeps_the_real_test_pairs_out_of_training(tmp_path: Path) -> None:
    real = real_set(tmp_path / "real", split={"shape001": "test", "shape004": " Test "})
    synth = synthetic_set(tmp_path / "synth")
    with (synth / "manifest.csv").open("w") as fh:  # pair 1's mask came from a training mask
        fh.write("name,index,seed,dice_loss,model,mask_source,cleaned,synthetic\n")
        fh.writelines(
            f"s1-{i:06d},{i},1,0.01,tiny,{'real:shape002' if i == 1 else 'generated'},0,1\n" for i in range(3)
        )
    out = tmp_path / "merged"
    res = runner.invoke(app, ["merge", str(real), str(synth), "--out", str(out), "--format", "nnunet"])
    assert res.exit_code == 0, res.output
    assert "4 real + 3 synthetic training pairs, 2 real held out, 16x16" in res.output
    train = sorted(p.name for p in (out / "imagesTr").iterdir())
    assert train == sorted(
        [f"real_shape{i:03d}_0000.png" for i in (0, 2, 3, 5)]
        + [f"synth_s1-{i:06d}_0000.png" for i in range(3)]
    )
    assert sorted(p.name for p in (out / "imagesTs").iterdir()) == ["real_shape001_0000.png", "real_shape004_0000.png"]  # fmt: skip
    assert sorted(p.name for p in (out / "labelsTs").iterdir()) == ["real_shape001.png", "real_shape004.png"]
    for label in [*(out / "labelsTr").iterdir(), *(out / "labelsTs").iterdir()]:
        assert Image.open(label).size == (16, 16) and values(label) == {0, 1}
    for image in (out / "imagesTr").iterdir():
        assert Image.open(image).mode == "L" and Image.open(image).size == (16, 16)
    doc = json.loads((out / "dataset.json").read_text())
    assert doc["numTraining"] == 7 and doc["numTest"] == 2
    prov = doc["provenance"]
    assert prov["real"]["test"] == 2 and "column 'split'" in prov["real"]["split_from"]
    assert prov["synthetic"]["made_by"]["params"]["model"] == "tiny"
    rows = read_csv(out / "manifest.csv")
    assert {(r["source"], r["split"]) for r in rows} == {
        ("real", "train"),
        ("real", "test"),
        ("synthetic", "train"),
    }
    assert {r["original"] for r in rows if r["source"] == "synthetic"} == {f"s1-{i:06d}" for i in range(3)}
    assert {r["original"]: r["mask_source"] for r in rows if r["source"] == "synthetic"} == {
        "s1-000000": "generated", "s1-000001": "real:shape002", "s1-000002": "generated",
    }  # fmt: skip
    assert {r["mask_source"] for r in rows if r["source"] == "real"} == {""}
    # the sources' notes travel along: licence rows, the synthetic manifest and job record
    assert {"real_pairs.csv", "synthetic_manifest.csv", "synthetic_job.json"} <= {
        p.name for p in out.iterdir()
    }


def test_merge_with_a_bundle_holds_out_its_test_pairs(tmp_path: Path, tiny_bundle: Path) -> None:
    meta = json.loads((tiny_bundle / "bundle.json").read_text())
    real = Path(meta["data"]["folder"])  # the data the bundle was trained on
    synth = synthetic_set(tmp_path / "synth")
    out = tmp_path / "merged"
    res = runner.invoke(app, ["merge", str(real), str(synth), "--out", str(out), "--format", "monai",
                              "--bundle", str(tiny_bundle)])  # fmt: skip
    assert res.exit_code == 0, res.output
    doc = json.loads((out / "datalist.json").read_text())
    assert sorted(e["image"] for e in doc["test"]) == sorted(
        f"images/real_{n}.png" for n in meta["split"]["test"]
    )
    assert all(e["source"] == "real" for e in doc["test"])
    assert sum(e["source"] == "synthetic" for e in doc["training"]) == 3
    assert {e["image"] for e in doc["training"]}.isdisjoint(e["image"] for e in doc["test"])
    from monai.data import load_decathlon_datalist

    assert len(load_decathlon_datalist(str(out / "datalist.json"), data_list_key="test")) == 2


def as_nnunet(plain: Path, root: Path) -> Path:
    """A plain synthetic set laid out as a job's ``?format=nnunet`` zip unpacks (app.exports)."""
    lay = layout("nnunet")
    for sub in (lay.images, lay.masks):
        (root / sub).mkdir(parents=True)
    names = sorted(p.stem for p in (plain / "images").iterdir())
    for name in names:
        shutil.copyfile(plain / "images" / f"{name}.png", root / lay.image(name))
        (root / lay.mask(name)).write_bytes(mask_member(lay, (plain / "masks" / f"{name}.png").read_bytes()))
    _, raw = index_file("nnunet", [Entry(n) for n in names], Labels("X-ray", "lung"), {"synthetic": True}, "")
    (root / "dataset.json").write_bytes(raw)
    for note in ("manifest.csv", "job.json"):
        shutil.copyfile(plain / note, root / note)
    return root


def test_merge_reads_an_nnunet_synthetic_set_and_real_masks_of_any_form(tmp_path: Path) -> None:
    real = real_set(tmp_path / "real", n=3)
    # 0/1 masks, RGB JPEG images: every real pair still comes out as greyscale + 0/255
    for p in (real / "masks").iterdir():
        Image.fromarray((np.asarray(Image.open(p)) > 0).astype(np.uint8)).save(p)
    for p in list((real / "images").iterdir()):
        Image.open(p).convert("RGB").save(p.with_suffix(".jpg"), quality=95)
        p.unlink()
    synth = as_nnunet(synthetic_set(tmp_path / "plain"), tmp_path / "nn")
    out = tmp_path / "merged"
    res = runner.invoke(app, ["merge", str(real), str(synth), "--out", str(out), "--format", "plain",
                              "--resolution", "24"])  # fmt: skip
    assert res.exit_code == 0, res.output
    masks = sorted((out / "masks").iterdir())
    assert len(masks) == 3 + 3 and all(
        values(m) == {0, 255} and Image.open(m).size == (24, 24) for m in masks
    )
    assert Image.open(out / "images" / "real_shape000.png").mode == "L"
    assert (out / "synthetic_dataset.json").is_file() and not (out / "dataset.json").exists()
    # into nnU-Net again: the synthetic set's names for channel and label are kept
    again = tmp_path / "again"
    assert runner.invoke(app, ["merge", str(real), str(synth), "--out", str(again)]).exit_code == 0
    doc = json.loads((again / "dataset.json").read_text())
    assert doc["labels"] == {"background": 0, "lung": 1} and doc["channel_names"] == {"0": "X-ray"}
    # a merged set is no synthetic set: its real pairs would come back as synthetic ones
    res = runner.invoke(app, ["merge", str(real), str(out), "--out", str(tmp_path / "x")])
    assert res.exit_code == 2 and "rows are not synthetic pairs (real_shape000" in res.output


def test_a_merge_that_fails_half_way_leaves_no_folder(tmp_path: Path) -> None:
    real = real_set(tmp_path / "real", n=4)
    (real / "images" / "shape003.png").write_bytes(b"not a png")
    out = tmp_path / "out"
    res = runner.invoke(app, ["merge", str(real), str(synthetic_set(tmp_path / "s")), "--out", str(out)])
    assert res.exit_code == 2 and "shape003.png: unreadable image file" in res.output
    assert not out.exists()


@pytest.mark.parametrize(
    "case,needle",
    [
        ("no_real", "no such folder"),
        ("no_synth", "no such synthetic set folder"),
        ("orphan_mask", "orphan mask"),
        ("orphan_image", "orphan image"),
        ("bad_format", "--format"),
        ("out_not_empty", "is not an empty folder"),
        ("bad_split", "'validation' of pair 'shape002' is neither 'train' nor 'test'"),
        ("no_manifest", "manifest.csv: missing"),
        ("manifest_gap", "have no files (s1-000009)"),
        ("bad_column", "no 'fold' column"),
        ("not_a_bundle", "not a bundle"),
    ],
)
def test_merge_errors_name_the_bad_value(tmp_path: Path, case: str, needle: str) -> None:
    real = real_set(tmp_path / "real", n=4, split={"shape002": "validation"} if case == "bad_split" else None)
    synth = synthetic_set(tmp_path / "synth")
    out = tmp_path / "out"
    args = ["merge", str(real), str(synth), "--out", str(out)]
    if case == "no_real":
        args[1] = str(tmp_path / "missing")
    elif case == "no_synth":
        args[2] = str(tmp_path / "missing")
    elif case == "orphan_mask":
        (real / "images" / "shape003.png").unlink()
    elif case == "orphan_image":
        (synth / "masks" / "s1-000001.png").unlink()
    elif case == "bad_format":
        args += ["--format", "zarr"]
    elif case == "out_not_empty":
        out.mkdir()
        (out / "x").write_text("")
    elif case == "no_manifest":
        (synth / "manifest.csv").unlink()
    elif case == "manifest_gap":
        with (synth / "manifest.csv").open("a") as fh:
            fh.write("s1-000009,9,1,0.01,tiny,1\n")
    elif case == "bad_column":
        args += ["--split-column", "fold"]
    elif case == "not_a_bundle":
        args += ["--bundle", str(tmp_path)]
    res = runner.invoke(app, args)
    assert res.exit_code == 2, res.output
    assert needle in res.output
    if case != "out_not_empty":
        assert not out.exists() or not any(out.iterdir())  # a refused merge writes nothing
