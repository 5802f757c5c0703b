"""``diffuseexpand evaluate``: the protocol end to end at tiny scale, its refusals and its step budget."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.optim.optimizer import register_optimizer_step_post_hook
from typer.testing import CliRunner

from models.bundle import read_meta
from models.cli import app
from models.data import load_folder
from models.downstream import DownstreamConfig, mixed_batches, train_downstream
from models.evaluation import EvalConfig, EvaluationError, check_bundle_data, plan_steps
from models.fewshot import fewshot_subset
from models.sampling import SamplingParams
from models.synthetic import duplicate_rows, make_synthetic
from models.variants import Variant, select_variants

torch.set_num_threads(1)
runner = CliRunner()


@pytest.mark.slow
def test_evaluate_end_to_end_on_the_tiny_bundle(tmp_path: Path, tiny_bundle: Path) -> None:
    data_dir = read_meta(tiny_bundle)["data"]["folder"]
    out = tmp_path / "eval"
    res = runner.invoke(app, ["evaluate", str(tiny_bundle), data_dir, "--out", str(out), "--n-synthetic", "4",
                              "--seeds", "0", "--steps", "4", "--batch-size", "4", "--sample-steps", "2",
                              "--variants", "origin_epochs,duplicates,cf,cfcg_tau2,cfcgcs_tau2,cfcg_s2",
                              "--fewshot", "0.5,1", "--fewshot-variant", "cfcgcs_tau2", "--no-retrain",
                              "--synthetic-sets", "1", "--sweep", "none", "--no-augment", "--device", "cpu"])  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "wall time" in res.output
    r = json.loads((out / "results.json").read_text())
    assert r["data"]["n_train"] == 8 and r["data"]["n_test"] == 2
    v = r["variants"]
    assert list(v) == ["origin", "origin_epochs", "duplicates", "cf", "cfcg_tau2", "cfcgcs_tau2", "cfcg_s2"]
    trained = [k for k in v if v[k]["downstream"] is not None]
    assert "cfcg_s2" not in trained  # generated for the Fig. 2 comparison only
    for k in trained:
        d = v[k]["downstream"]
        assert 0.0 <= d["dice"]["mean"] <= 1.0 and len(d["dice"]["per_seed"]) == 1
        # equal optimisation steps for every row but the labelled equal-epochs origin
        assert d["steps"] == (3 if k == "origin_epochs" else 4), k
        assert d["train_pairs"] == (8 if k.startswith("origin") else 12), k
    for k in ("cf", "cfcg_tau2", "cfcgcs_tau2", "cfcg_s2"):
        s = v[k]
        assert s["kept"] == 4 and s["generated"] >= 4 and 0 < s["yield"] <= 1
        assert len(s["dice_loss"]["values"]) == s["generated"]
        assert all(0.0 <= x <= 1.0 for x in s["dice_loss"]["values"])
        assert s["fid_inception"] is not None and s["fid_inception"] >= 0
        assert s["fid_filter"] is not None and s["fid_filter"] >= 0
    assert v["cf"]["params"]["w_cg"] == 0.0 and v["cf"]["params"]["eta"] == 1.0
    assert v["cfcg_tau2"]["params"]["tau"] == 0.5 and v["cfcg_tau2"]["params"]["eta"] == 1.0
    assert v["cfcg_s2"]["params"]["guidance"] == "scale" and v["cfcg_s2"]["params"]["scale"] == 2.0
    # CF+CG+CS reuses the CF+CG pairs of the same τ (pair i depends on (seed, i) only)
    assert v["cfcgcs_tau2"]["dice_loss"]["values"][:4] == v["cfcg_tau2"]["dice_loss"]["values"]
    assert r["fid"]["inception"]["available"] is True
    assert 0.0 <= r["bundle"]["filter_real_test"]["real_pass_rate"] <= 1.0
    fs = r["fewshot"]
    assert [e["fraction"] for e in fs] == [0.5, 1.0] and [e["n_real"] for e in fs] == [4, 8]
    # --no-retrain: the 50 % rows used the bundle trained on the whole split (labelled upper bound);
    # at 100 % that bundle *is* the one trained on exactly this train split
    assert [e["retrained"] for e in fs] == [False, True]
    assert all(set(e["rows"]) == {"origin", "synthetic", "duplicates"} for e in fs)  # --no-augment
    assert all(0 <= e["rows"]["synthetic"]["mean"] <= 1 for e in fs)

    md = (out / "results.md").read_text()
    dice_row = next(line for line in md.splitlines() if line.startswith("| Dice ↑ |"))
    assert dice_row.count("|") == len(trained) + 2
    assert "| origin (equal steps) | origin (equal epochs) | origin + N duplicates | CF |" in md
    assert "**not retrained** (upper bound)" in md
    for name in ("samples.png", "dice_loss_tau_vs_s.png", "fewshot.png", "memorisation.png"):
        with Image.open(out / name) as im:
            assert im.format == "PNG" and im.size[0] > 100


def test_evaluate_refuses_other_data(tmp_path: Path, tiny_bundle: Path) -> None:
    data_dir = Path(read_meta(tiny_bundle)["data"]["folder"])
    other = tmp_path / "other"
    shutil.copytree(data_dir, other)
    first = sorted((other / "images").iterdir())[0]
    arr = np.asarray(Image.open(first)).copy()
    arr[0, 0] ^= 1  # one pixel differs: not the data the bundle was trained on
    Image.fromarray(arr).save(first)
    res = runner.invoke(app, ["evaluate", str(tiny_bundle), str(other), "--out", str(tmp_path / "o"),
                              "--n-synthetic", "2", "--seeds", "0", "--steps", "1", "--fewshot", "none"])  # fmt: skip
    assert res.exit_code == 2, res.output
    assert "not the data this bundle was trained on" in res.output
    assert not (tmp_path / "o" / "results.json").exists()


def test_split_names_missing_from_the_folder_are_refused(tiny_bundle: Path) -> None:
    meta = read_meta(tiny_bundle)
    data = load_folder(meta["data"]["folder"], 16)
    train, test = check_bundle_data(meta, data)
    assert set(test).isdisjoint(train) and set(test) <= set(data.names)
    bad = {**meta, "split": {**meta["split"], "test": [*meta["split"]["test"], "not-in-folder"]}}
    with pytest.raises(EvaluationError, match="not in the folder"):
        check_bundle_data(bad, data)
    leaky = {**meta, "split": {**meta["split"], "train": [*meta["split"]["train"], meta["split"]["test"][0]]}}
    with pytest.raises(EvaluationError, match="both train and test"):
        check_bundle_data(leaky, data)


def test_equal_steps_origin_trains_as_many_optimiser_steps_as_an_expanded_run() -> None:
    cfg = EvalConfig(epochs=2, batch_size=4, channels=(4, 8), num_res_units=0, seeds=(0,), n_synthetic=5)
    dcfg = cfg.downstream()
    budget = plan_steps(n_real=6, n_synthetic=5, cfg=cfg)
    assert budget == {"expanded": 2 * 3, "origin_epochs": 2 * 2}  # ceil(11/4) = 3, ceil(6/4) = 2 per epoch
    counted: list[int] = []

    def count(_opt: torch.optim.Optimizer, _args: object, _kwargs: object) -> None:
        counted[-1] += 1

    handle = register_optimizer_step_post_hook(count)
    try:
        x, y = torch.randn(11, 1, 8, 8), torch.where(torch.rand(11, 1, 8, 8) > 0.5, 1.0, -1.0)
        results = {}
        for key, n, steps in (("origin", 6, budget["expanded"]), ("expanded", 11, budget["expanded"]),
                              ("origin_epochs", 6, budget["origin_epochs"])):  # fmt: skip
            counted.append(0)
            _, taken = train_downstream(x[:n], y[:n], steps, dcfg, 0, key)
            results[key] = (taken, counted[-1])
    finally:
        handle.remove()
    assert results["origin"] == results["expanded"] == (6, 6)
    assert results["origin_epochs"] == (4, 4)
    # with an explicit --steps, origin_epochs keeps the epoch ratio
    assert plan_steps(30, 10, EvalConfig(steps=100)) == {"expanded": 100, "origin_epochs": 75}


@dataclass
class _Pair:
    index: int
    dice_loss: float


class _FakeCache:
    """Stands in for PairCache: pair i has a fixed Dice loss; records which indices were asked for."""

    batch_size = 2

    def __init__(self, losses: list[float]) -> None:
        self.losses, self.asked = losses, []

    def get(self, params: SamplingParams, indices: range) -> list[_Pair]:
        self.asked.extend(indices)
        return [_Pair(i, self.losses[i]) for i in indices]


def test_stage_iv_variants_keep_the_first_n_passing_pairs_within_max_attempts() -> None:
    losses = [0.5, 0.01, 0.9, 0.05, 0.02, 0.3, 0.04, 0.8, 0.8, 0.8]
    base = SamplingParams(steps=2)
    filt = Variant("cs", "cs", "synthetic", tau=0.5, filtered=True)
    s = make_synthetic(_FakeCache(losses), filt, base, n=3, eta=0.065, max_attempts=10)  # type: ignore[arg-type]
    assert [p.index for p in s.pairs] == [1, 3, 4] and s.generated == 5 and s.losses == losses[:5]
    s = make_synthetic(_FakeCache(losses), filt, base, n=5, eta=0.065, max_attempts=6)  # type: ignore[arg-type]
    assert s.kept == 3 and s.generated == 6  # gave up at max_attempts
    plain = Variant("cf", "cf", "synthetic", guided=False)
    cache = _FakeCache(losses)
    s = make_synthetic(cache, plain, base, n=3, eta=0.065, max_attempts=10)  # type: ignore[arg-type]
    assert [p.index for p in s.pairs] == [0, 1, 2] and s.eta == 1.0 and s.params.w_cg == 0.0
    assert cache.asked == [0, 1, 2]


def test_subsets_duplicates_and_variant_selection() -> None:
    from models.data import PairDataset

    names = [f"p{i}" for i in range(20)]
    train = PairDataset(names, torch.zeros(20, 1, 4, 4), torch.zeros(20, 1, 4, 4), 4)
    small, large = fewshot_subset(train, 0.1, 0), fewshot_subset(train, 0.5, 0)
    assert len(small) == 2 and len(large) == 10 and set(small.names) <= set(large.names)  # nested
    dup = duplicate_rows(6, 14, seed=0)
    assert len(dup) == 14 and set(dup.tolist()) == set(range(6))
    assert [v.key for v in select_variants(["cf"])] == ["origin", "cf"]
    with pytest.raises(ValueError, match="unknown variant"):
        select_variants(["cf", "magic"])


@pytest.mark.slow
def test_fewshot_protocol_end_to_end_with_groups_retraining_and_cache(
    tmp_path: Path, tiny_bundle: Path
) -> None:
    """Section 1 of the protocol at tiny scale: group-aware split, retrained bundles, five rows, sweep, memorisation."""
    data_dir = read_meta(tiny_bundle)["data"]["folder"]
    out = tmp_path / "fs"
    args = ["evaluate", str(tiny_bundle), data_dir, "--out", str(out), "--no-table", "--seeds", "0,1",
            "--batch-size", "4", "--sample-steps", "2", "--fewshot", "0.5,1", "--group-by", "^(shape00)[6-8]",
            "--retrain-steps", "3", "--retrain-segmenter-steps", "2", "--retrain-filter-steps", "2",
            "--synthetic-sets", "2", "--sweep", "1,2", "--fewshot-steps", "3", "--eta", "1",
            "--max-attempts-factor", "2", "--no-inception-fid", "--device", "cpu"]  # fmt: skip
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    r = json.loads((out / "results.json").read_text())
    grouped = {f"shape00{i}" for i in (6, 7, 8)}  # straddles the bundle's own split (test: 7, 8)
    test_names = set(r["split"]["test"])
    assert r["split"]["grouping"] == {"by": "regex", "value": "^(shape00)[6-8]"}
    assert grouped <= test_names or not grouped & test_names  # the group never straddles the split
    assert r["bundle"]["trained_on_this_split"] is False  # so even 100 % is retrained
    fs = r["fewshot"]
    assert [e["fraction"] for e in fs] == [0.5, 1.0] and all(e["retrained"] for e in fs)
    for e in fs:
        oracle = {"oracle_augment"} if e["fraction"] < 1 else set()  # at 100 % no pair is left to add
        assert (
            set(e["rows"]) == {"origin", "augment", "synthetic", "synthetic_augment", "duplicates"} | oracle
        )
        assert (
            len(e["rows"]["origin"]["runs"]) == 2 and len(e["rows"]["synthetic"]["runs"]) == 4
        )  # sets x seeds
        assert {row["steps"] for row in e["rows"].values()} == {3}  # equal steps
        assert [(x["set"], x["seed"]) for x in e["rows"]["synthetic"]["runs"]] == [
            (0, 0),
            (0, 1),
            (1, 0),
            (1, 1),
        ]
        assert [(x["set"], x["seed"]) for x in e["rows"]["augment"]["runs"]] == [(None, 0), (None, 1)]
        assert "vs_augment" not in e["paired_all"]["augment"]  # no row is compared with itself
        for key in ("vs_augment", "vs_origin"):
            p = e["paired"][key]
            assert p["ci_low"] <= p["mean"] <= p["ci_high"]
        assert 0 <= e["memorisation"]["synthetic_share_over_0.95"] <= 1
        # each retrained bundle records the subset it saw, inside the evaluation's train split
        meta = read_meta(e["bundle"])
        assert len(meta["split"]["train"]) == e["n_real"] and set(meta["split"]["train"]).isdisjoint(
            test_names
        )
        assert meta["split"]["grouping"] == r["split"]["grouping"]
    assert [sw["multiple"] for sw in fs[0]["sweep"]] == [1.0, 2.0] and fs[1]["sweep"][0]["multiple"] == 1.0
    assert r["memorisation"]["fraction"] == 0.5
    md = (out / "results.md").read_text()
    assert "origin + N synthetic + augmentation" in md and "N sweep at 50%" in md and "Memorisation" in md

    # a rerun with the same settings retrains nothing, generates nothing and trains nothing
    first = r
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    again = json.loads((out / "results.json").read_text())
    assert again["fewshot"][0]["rows"] == first["fewshot"][0]["rows"]
    assert all(st["seconds"] == 0 for e in again["fewshot"] for st in e["synthetic_sets"])


def test_no_retrain_is_refused_when_the_bundle_did_not_see_this_split(
    tmp_path: Path, tiny_bundle: Path
) -> None:
    meta = read_meta(tiny_bundle)
    data_dir = tmp_path / "data"
    shutil.copytree(meta["data"]["folder"], data_dir)  # same images and masks: same fingerprint
    t, u = meta["split"]["test"][0], meta["split"]["train"][0]
    rows = ["name,group"] + [
        f"{n},{'g' if n in (t, u) else n}" for n in meta["split"]["train"] + meta["split"]["test"]
    ]
    (data_dir / "pairs.csv").write_text("\n".join(rows) + "\n")  # t (test) and u (train) are one patient
    res = runner.invoke(app, ["evaluate", str(tiny_bundle), str(data_dir), "--out", str(tmp_path / "o"),
                              "--no-table", "--no-retrain", "--fewshot", "0.5", "--seeds", "0",
                              "--fewshot-steps", "1"])  # fmt: skip
    assert res.exit_code == 2, res.output
    assert "--no-retrain" in res.output and "group-aware" in res.output
    assert not (tmp_path / "o").exists()


def test_mixed_batches_hold_the_synthetic_ratio() -> None:
    rows = list(mixed_batches(n_real=5, n_synthetic=40, ratio=0.75, batch_size=8, steps=6, seed=0, key="k"))
    assert len(rows) == 6
    for b in rows:
        assert len(b) == 8 and int((b >= 5).sum()) == 6  # round(0.75 * 8) synthetic rows
    real = torch.cat([b[b < 5] for b in rows]).tolist()
    assert sorted(real[:5]) == list(range(5))  # real rows cycle through whole permutations
    assert torch.equal(torch.cat(rows), torch.cat(list(mixed_batches(5, 40, 0.75, 8, 6, 0, "k"))))


def test_augmented_downstream_training_is_repeatable() -> None:
    from models.augment import Augmenter, AugmentRecipe

    cfg = DownstreamConfig(batch_size=4, channels=(4, 8), num_res_units=0, lr=1e-2)
    x, y = torch.randn(6, 1, 16, 16).clamp(-1, 1), torch.where(torch.rand(6, 1, 16, 16) > 0.5, 1.0, -1.0)
    aug = Augmenter(AugmentRecipe(), 16)
    a, _ = train_downstream(x, y, 3, cfg, 0, "k", augmenter=aug)
    b, _ = train_downstream(x, y, 3, cfg, 0, "k", augmenter=aug)
    c, _ = train_downstream(x, y, 3, cfg, 0, "k")
    pa, pb, pc = (torch.cat([p.flatten() for p in m.parameters()]) for m in (a, b, c))
    assert torch.equal(pa, pb) and not torch.equal(pa, pc)


def test_fewshot_with_unlabelled_images_real_masks_oracle_and_pseudo_labels(
    tmp_path: Path, tiny_bundle: Path
) -> None:
    """Issue 19's protocol at tiny scale: the unlabelled pool trains Stage I, the synthetic pairs use real
    masks, and the oracle and pseudo-label rows are there with the real-pair equivalence."""
    data_dir = read_meta(tiny_bundle)["data"]["folder"]
    out = tmp_path / "fs"
    args = ["evaluate", str(tiny_bundle), data_dir, "--out", str(out), "--no-table", "--seeds", "0",
            "--batch-size", "4", "--sample-steps", "2", "--fewshot", "0.5", "--retrain-steps", "3",
            "--retrain-segmenter-steps", "2", "--retrain-filter-steps", "2", "--synthetic-sets", "1",
            "--sweep", "1,2", "--fewshot-steps", "3", "--eta", "1", "--max-attempts-factor", "2",
            "--unlabelled", "rest", "--mask-source", "real", "--no-inception-fid", "--device", "cpu"]  # fmt: skip
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    r = json.loads((out / "results.json").read_text())
    e = r["fewshot"][0]
    assert e["n_real"] == 4 and e["n_unlabelled"] == 4 and e["mask_source"] == "real"
    meta = read_meta(e["bundle"])
    assert meta["training"]["dpm"]["unlabelled"] == 4  # Stage I saw the pool ...
    assert len(meta["split"]["unlabelled"]) == 4
    assert set(meta["split"]["unlabelled"]).isdisjoint(r["split"]["test"])  # ... never a test image
    assert set(meta["split"]["unlabelled"]).isdisjoint(meta["split"]["train"])
    assert e["synthetic_sets"][0]["real_masks"] == e["synthetic_sets"][0]["kept"]
    for row in ("origin", "augment", "oracle_augment", "pseudo_augment", "synthetic_augment", "duplicates"):
        assert {"mean", "std"} <= set(e["rows"][row]), row
    assert e["rows"]["oracle_augment"]["extra_used"] == [4]  # N = 4 real pairs from the other train pairs
    assert 0 <= e["rows"]["pseudo_augment"]["runs"][0]["pseudo_pairs"] <= 4
    for key in ("vs_augment", "vs_pseudo_augment", "oracle_vs_augment"):
        p = e["paired"][key]
        assert p["ci_low"] <= p["mean"] <= p["ci_high"]
    eq = e["equivalence"]
    o = e["paired"]["oracle_vs_augment"]["mean"]
    assert eq is None if o <= 0 else eq == pytest.approx(e["paired"]["vs_augment"]["mean"] / o)
    # the sweep: N = 2x asks for 8 oracle pairs, but only 4 are left: the row says how many it used
    assert [sw["n"] for sw in e["sweep"]] == [4, 8]
    assert e["sweep"][1]["oracle_used"] == 4 and "equivalence" in e["sweep"][1]
    assert "ssim_ratio" in r["memorisation"]
    md = (out / "results.md").read_text()
    assert "Real-pair equivalence" in md and "pseudo-labelled" in md


def test_step_budget_study_trains_only_augmentation_and_the_full_oracle(
    tmp_path: Path, tiny_bundle: Path
) -> None:
    data_dir = read_meta(tiny_bundle)["data"]["folder"]
    out = tmp_path / "budget"
    res = runner.invoke(app, ["evaluate", str(tiny_bundle), data_dir, "--out", str(out), "--no-table",
                              "--seeds", "0", "--batch-size", "4", "--fewshot", "0.5", "--budgets", "2,3",
                              "--no-inception-fid", "--device", "cpu"])  # fmt: skip
    assert res.exit_code == 0, res.output
    r = json.loads((out / "results.json").read_text())
    assert r["fewshot"] == [] and not (out / "bundles").exists()  # nothing retrained or generated
    study = r["budget_study"]
    assert [(b["fraction"], b["steps"]) for b in study] == [(0.5, 2), (0.5, 3)]
    for b in study:
        assert b["n_real"] == 4 and b["n_oracle_extra"] == 4
        assert b["rows"]["augment"]["steps"] == b["steps"]
        p = b["oracle_vs_augment"]
        assert p["ci_low"] <= p["mean"] <= p["ci_high"]
    assert "Step budget" in (out / "results.md").read_text()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--mask-source", "painted"], "mask_source"),
        (["--mask-source", "mixed", "--real-share", "1.5"], "real_share"),
        (["--unlabelled", "some"], "unlabelled"),
        (["--budgets", "0"], "budgets"),
    ],
)
def test_bad_protocol_settings_name_the_value(
    tmp_path: Path, tiny_bundle: Path, args: list[str], message: str
) -> None:
    res = runner.invoke(app, ["evaluate", str(tiny_bundle), "--out", str(tmp_path / "o"), *args])
    assert res.exit_code == 2 and message in res.output, res.output
