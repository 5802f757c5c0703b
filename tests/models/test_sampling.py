"""Stage III sampling: agreement with a plain diffusers loop, per-pair seeds, determinism."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from models.bundle import Bundle
from models.expand import generate_pairs
from models.networks import Condition
from models.sampling import SamplingParams, pair_noise, pair_seed, sample_images, sample_masks
from models.schedule import make_solver


@pytest.fixture(scope="module")
def bundle(tiny_bundle: Path) -> Bundle:
    return Bundle.load(tiny_bundle)


def plain_diffusers_loop(
    dpm, noise: torch.Tensor, cond: torch.Tensor, label: Condition, steps: int
) -> torch.Tensor:  # type: ignore[no-untyped-def]
    solver = make_solver(steps, order=2)
    x = noise
    labels = torch.full((noise.shape[0],), int(label))
    with torch.no_grad():
        for t in solver.timesteps:
            eps = dpm(torch.cat([x, cond], dim=1), t, class_labels=labels).sample
            x = solver.step(eps, t, x).prev_sample
    return x


def test_unguided_sampler_matches_plain_diffusers_loop(bundle: Bundle) -> None:
    params = SamplingParams(steps=5, w_cf=1.0, w_cg=0.0)
    noise_m = torch.randn(3, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    noise_i = torch.randn(3, 1, 16, 16, generator=torch.Generator().manual_seed(1))

    masks = sample_masks(bundle.dpm, bundle.segmenter, noise_m, params)
    ref_m = plain_diffusers_loop(bundle.dpm, noise_m, torch.zeros_like(noise_m), Condition.MASK, 5)
    torch.testing.assert_close(masks, torch.where(ref_m > 0, 1.0, -1.0), rtol=0, atol=0)

    images = sample_images(bundle.dpm, bundle.segmenter, noise_i, masks, params)
    ref_i = plain_diffusers_loop(bundle.dpm, noise_i, masks, Condition.IMAGE_GIVEN_MASK, 5)
    torch.testing.assert_close(images, ref_i.clamp(-1, 1), rtol=0, atol=1e-6)


def test_guidance_changes_the_samples(bundle: Bundle) -> None:
    noise = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    masks = torch.where(noise > 0, 1.0, -1.0)
    plain = sample_images(
        bundle.dpm, bundle.segmenter, noise, masks, SamplingParams(steps=4, w_cf=1.0, w_cg=0.0)
    )
    cfg = sample_images(
        bundle.dpm, bundle.segmenter, noise, masks, SamplingParams(steps=4, w_cf=3.0, w_cg=0.0)
    )
    cg = sample_images(
        bundle.dpm, bundle.segmenter, noise, masks, SamplingParams(steps=4, w_cf=1.0, w_cg=50.0)
    )
    assert not torch.equal(plain, cfg)
    assert not torch.equal(plain, cg)


def pair_bytes(
    bundle: Bundle, indices: list[int], batch_size: int = 8
) -> dict[int, tuple[bytes, bytes, float]]:
    params = SamplingParams(steps=3)
    return {
        p.index: (p.image.tobytes(), p.mask.tobytes(), p.dice_loss)
        for p in generate_pairs(bundle, indices, seed=42, params=params, eta=1.0, batch_size=batch_size)
    }


@pytest.mark.slow
def test_pair_is_identical_alone_in_a_batch_and_in_another_process(bundle: Bundle, tiny_bundle: Path) -> None:
    alone = pair_bytes(bundle, [5])[5]
    in_batch_of_7 = pair_bytes(bundle, list(range(7)))[5]
    other_position = pair_bytes(bundle, list(range(2, 9)))[5]
    assert alone == in_batch_of_7 == other_position
    code = (
        "import sys, torch; torch.set_num_threads(1);"
        "from models.bundle import Bundle; from models.expand import generate_pairs; from models.sampling import SamplingParams;"
        f"b = Bundle.load({str(tiny_bundle)!r});"
        "p = next(generate_pairs(b, [5], seed=42, params=SamplingParams(steps=3), eta=1.0, batch_size=8));"
        "sys.stdout.write((p.image.tobytes() + p.mask.tobytes()).hex())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})  # fmt: skip
    assert bytes.fromhex(out.stdout) == alone[0] + alone[1]


def test_different_pairs_and_seeds_differ(bundle: Bundle) -> None:
    pairs = pair_bytes(bundle, [0, 1])
    assert pairs[0][0] != pairs[1][0]
    assert pair_seed(42, 0) != pair_seed(43, 0) != pair_seed(42, 1)
    a, b = pair_noise(42, 0, 16)
    assert not torch.equal(a, b)


def test_sampling_twice_is_identical_and_networks_are_in_eval_mode(bundle: Bundle) -> None:
    assert not any(m.training for net in (bundle.dpm, bundle.segmenter, bundle.filter) for m in net.modules())
    first = pair_bytes(bundle, [0, 1, 2], batch_size=4)
    bundle.dpm.train()  # generate_pairs must put it back into eval mode
    second = pair_bytes(bundle, [0, 1, 2], batch_size=4)
    assert first == second
    assert not bundle.dpm.training


def test_masks_are_binary_and_images_in_range(bundle: Bundle) -> None:
    for p in generate_pairs(bundle, range(3), seed=1, params=SamplingParams(steps=3), eta=1.0, batch_size=4):
        assert set(np.unique(p.mask).tolist()) <= {0, 255}
        assert p.image.dtype == np.uint8 and p.image.shape == (16, 16)
        assert 0.0 <= p.dice_loss <= 1.0


@pytest.mark.parametrize("order", [1, 2, 3])
def test_all_solver_orders_give_finite_samples(bundle: Bundle, order: int) -> None:
    noise = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(order))
    masks = sample_masks(bundle.dpm, bundle.segmenter, noise, SamplingParams(steps=4, order=order))
    images = sample_images(bundle.dpm, bundle.segmenter, noise, masks, SamplingParams(steps=4, order=order))
    assert torch.isfinite(images).all()
    assert set(masks.unique().tolist()) <= {-1.0, 1.0}


def test_callback_sees_every_step_and_can_cancel(bundle: Bundle) -> None:
    events: list[dict] = []
    list(generate_pairs(bundle, [0], seed=0, params=SamplingParams(steps=3), eta=1.0, batch_size=2,
                        callback=events.append))  # fmt: skip
    assert [(e["phase"], e["step"]) for e in events] == [("mask", 1), ("mask", 2), ("mask", 3),
                                                        ("image", 1), ("image", 2), ("image", 3)]  # fmt: skip

    class Stop(Exception):
        pass

    def stop(event: dict) -> None:
        if event["phase"] == "image":
            raise Stop

    with pytest.raises(Stop):
        list(generate_pairs(bundle, [0], seed=0, params=SamplingParams(steps=3), eta=1.0, callback=stop))


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("tau", 5e-324),
        ("tau", 0.01),
        ("w_cg", 1e308),
        ("w_cf", 25.0),
        ("scale", 100.0),
        ("tau", float("nan")),
    ],
)
def test_sampling_params_are_validated_by_the_shared_ranges(field: str, value: float) -> None:
    """SamplingParams takes its ranges from app.params.SamplingSettings (τ = 5e-324 gave black pairs)."""
    with pytest.raises(ValueError, match=f"invalid sampling parameters: {field} "):
        SamplingParams(**{field: value})


def test_sampling_params_round_trip_through_the_shared_settings() -> None:
    from app.params import SamplingSettings

    assert SamplingParams().to_settings() == SamplingSettings()
    p = SamplingParams(steps=3, guidance="scale", tau=0.5, w_cg=0.0)  # type: ignore[arg-type]
    assert SamplingParams.from_settings(p.to_settings()) == p.updated(scale=2.0)
    assert p.to_dict() == p.to_settings().model_dump(mode="json")
