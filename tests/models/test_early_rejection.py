"""Early rejection: splitting the solve, regrouping part-way and dropping pairs never changes a pair that
goes on, and which pairs are dropped does not depend on how pairs are grouped (shards, workers)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from models.bundle import Bundle, write_meta
from models.early_rejection import EarlyRule, calibrate, choose_cut, evaluate_cut
from models.expand import GeneratedPair, generate_pairs
from models.sampling import SamplingParams, image_denoiser, params_solver, sample_images_pooled, solve

PARAMS = SamplingParams(steps=4, w_cf=2.0, w_cg=1.0)


@pytest.fixture(scope="module")
def bundle(tiny_bundle: Path) -> Bundle:
    return Bundle.load(tiny_bundle)


def noise_and_masks(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(n, 1, 16, 16, generator=g)
    masks = torch.where(torch.randn(n, 1, 16, 16, generator=g) > 0, 1.0, -1.0)
    return noise, masks


@pytest.mark.parametrize("solver", ["dpmpp", "unipc"])
@pytest.mark.parametrize("order", [2, 3])
def test_solving_in_two_calls_is_solving_in_one(bundle: Bundle, solver: str, order: int) -> None:
    params = PARAMS.updated(solver=solver, order=order)
    noise, masks = noise_and_masks(4)
    eps = image_denoiser(bundle.dpm, bundle.segmenter, masks, params)
    with torch.no_grad():
        whole = solve(eps, noise, params_solver(params))
        s = params_solver(params)
        split = solve(eps, solve(eps, noise, s, stop=3), s, start=3)
    assert torch.equal(whole, split)


@pytest.mark.parametrize("solver", ["dpmpp", "unipc"])
def test_regrouping_part_way_changes_no_bit(bundle: Bundle, solver: str) -> None:
    """Pairs that go on come out identical to a run without any check, whichever pairs were dropped
    and whatever batches the survivors were regrouped into."""
    params = PARAMS.updated(solver=solver, order=3)
    noise, masks = noise_and_masks(7)
    plain = sample_images_pooled(bundle.dpm, bundle.segmenter, noise, masks, params, 3)
    assert not plain.dropped.any()

    def by_row(x0: torch.Tensor, m: torch.Tensor) -> torch.Tensor:  # a score of each row alone
        return x0.flatten(1).mean(dim=1)

    cut = float(by_row(plain.images, masks).median())  # drops about half, at step 2
    early = sample_images_pooled(
        bundle.dpm, bundle.segmenter, noise, masks, params, 3, score=by_row, cut=cut, check_step=2
    )
    assert 0 < int(early.dropped.sum()) < 7
    going = ~early.dropped
    assert torch.equal(early.images[going], plain.images[going])
    nothing = sample_images_pooled(
        bundle.dpm, bundle.segmenter, noise, masks, params, 3, score=by_row, cut=float("inf"), check_step=2
    )
    assert torch.equal(nothing.images, plain.images) and not nothing.dropped.any()


def rule_dropping_some(bundle: Bundle, params: SamplingParams, eta: float) -> EarlyRule:
    """A rule whose cut is the median estimate of the test's pairs: it drops some and keeps some."""
    from models.early_rejection import measure

    cal = measure(bundle, range(6), seed=5, params=params, eta=eta, batch_size=2, fractions=(0.5,))
    return EarlyRule(at=0.5, cut=float(np.median(cal.estimates[0.5])), sampling=params.to_dict(), eta=eta)


def signature(pairs: list[GeneratedPair]) -> list[tuple[int, bool, int | None, bytes, bytes]]:
    return [(p.index, p.kept, p.rejected_at, p.image.tobytes(), p.mask.tobytes()) for p in pairs]


@pytest.mark.slow
def test_early_rejection_is_the_same_across_shard_splits_and_only_drops(bundle: Bundle) -> None:
    eta = 1.0  # every finished pair is kept: what is dropped shows plainly
    rule = rule_dropping_some(bundle, PARAMS, eta)
    run = lambda idx: list(  # noqa: E731
        generate_pairs(bundle, idx, seed=5, params=PARAMS, eta=eta, batch_size=2, rule=rule)
    )
    whole = run(range(6))
    shards = run(range(0, 2)) + run(range(2, 6))  # two workers, shards of 2 and 4
    assert signature(whole) == signature(shards)
    dropped = [p.index for p in whole if p.rejected_at is not None]
    going = next(p.index for p in whole if p.rejected_at is None)
    singles = run([dropped[0]]) + run([going])  # a pair alone in its batch: decided and sampled alike
    assert signature(singles) == signature([whole[dropped[0]], whole[going]])
    assert 0 < len(dropped) < 6 and all(p.rejected_at == 2 for p in whole if p.rejected_at is not None)
    reference = {p.index: p for p in generate_pairs(bundle, range(6), seed=5, params=PARAMS.updated(early_reject=False), eta=eta, batch_size=2)}  # fmt: skip
    for p in whole:
        if p.rejected_at is None:  # never changes a kept pair's bits
            assert p.kept and np.array_equal(p.image, reference[p.index].image)
            assert p.dice_loss == reference[p.index].dice_loss
        else:
            assert not p.kept
    off = list(generate_pairs(bundle, range(4), seed=5, params=PARAMS.updated(early_reject=False), eta=eta, batch_size=2, rule=rule))  # fmt: skip
    assert not any(p.rejected_at is not None for p in off)  # a job can turn it off


def test_a_rule_applies_only_at_its_calibrated_settings() -> None:
    rule = EarlyRule(at=0.5, cut=0.3, sampling=PARAMS.to_dict(), eta=0.065)
    assert rule.applies_to(PARAMS, 0.065)
    assert not rule.applies_to(PARAMS, 0.1)
    assert not rule.applies_to(PARAMS.updated(steps=5), 0.065)
    assert not rule.applies_to(PARAMS.updated(tau=2.0), 0.065)
    assert not rule.applies_to(PARAMS.updated(solver="unipc"), 0.065)
    assert not rule.applies_to(PARAMS.updated(early_reject=False), 0.065)
    assert [rule.check_step(n) for n in (2, 4, 10, 20)] == [1, 2, 5, 10]


def test_the_cut_drops_at_most_the_allowed_share_of_kept_pairs() -> None:
    est = [0.1, 0.9, 0.2, 0.8, 0.05, 0.7, 0.3] * 10
    kept = [True, False, True, False, True, True, False] * 10  # 40 kept; the kept 0.7s are the worst
    cut = choose_cut(est, kept, 0.02)  # floor(0.8) = 0 allowed: keep every kept pair
    assert cut == 0.7 and evaluate_cut(est, kept, cut)["false_rejections"] == 0
    assert evaluate_cut(est, kept, cut)["dropped"] == pytest.approx(20 / 70)  # the 0.8s and 0.9s
    cut = choose_cut(est, kept, 0.25)  # 10 of 40 may go: all ten 0.7s
    assert cut == 0.2 and evaluate_cut(est, kept, cut)["false_rejections"] == 10
    assert choose_cut(est, [False] * 70, 0.02) == 1.0


def test_calibrate_writes_a_rule_the_bundle_then_uses(bundle: Bundle, tmp_path: Path) -> None:
    rule, cal = calibrate(bundle, pairs=4, seed=3, params=PARAMS, eta=1.0, batch_size=2, fractions=(0.5,))
    assert len(cal.finally_kept) == 4 and sorted(cal.estimates) == [0.5]
    if rule is not None:  # all kept at η = 1: the cut is the highest estimate, nothing above it
        assert rule.calibration["false_rejection"] == 0.0 and rule.applies_to(PARAMS, 1.0)
        meta = dict(bundle.meta, early_rejection=rule.to_dict())
        write_meta(tmp_path, meta)
        assert EarlyRule.from_dict(meta["early_rejection"]) == rule
