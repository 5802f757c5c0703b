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
from models.evaluation import (
    EvalConfig,
    EvaluationError,
    Variant,
    check_bundle_data,
    duplicate_rows,
    fewshot_subset,
    make_synthetic,
    plan_steps,
    select_variants,
    train_downstream,
)
from models.sampling import SamplingParams

torch.set_num_threads(1)
runner = CliRunner()


def test_evaluate_end_to_end_on_the_tiny_bundle(tmp_path: Path, tiny_bundle: Path) -> None:
    data_dir = read_meta(tiny_bundle)["data"]["folder"]
    out = tmp_path / "eval"
    res = runner.invoke(app, ["evaluate", str(tiny_bundle), data_dir, "--out", str(out), "--n-synthetic", "4",
                              "--seeds", "0", "--steps", "4", "--batch-size", "4", "--sample-steps", "2",
                              "--variants", "origin_epochs,duplicates,cf,cfcg_tau2,cfcgcs_tau2,cfcg_s2",
                              "--fewshot", "0.5,1", "--fewshot-variant", "cfcgcs_tau2", "--device", "cpu"])  # fmt: skip
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
    assert all(e["retrained"] is False and 0 <= e["expanded"]["mean"] <= 1 for e in fs)
    assert fs[1]["origin"] == v["origin"]["downstream"]["dice"]  # 100 % reuses the main table

    md = (out / "results.md").read_text()
    dice_row = next(line for line in md.splitlines() if line.startswith("| Dice ↑ |"))
    assert dice_row.count("|") == len(trained) + 2
    assert "| origin (equal steps) | origin (equal epochs) | origin + N duplicates | CF |" in md
    assert "not** retrained" in md
    for name in ("samples.png", "dice_loss_tau_vs_s.png", "fewshot.png"):
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
            _, taken = train_downstream(x[:n], y[:n], steps, cfg, 0, key)
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
