"""A bundle: one folder per trained model, loadable offline from a local path.

BUNDLE/
  bundle.json          resolution, schedule, split, data fingerprint, training, metrics, defaults
  dpm/                 Stage I UNet2DModel (EMA weights), diffusers save_pretrained, safetensors
  segmenter/           Stage II NoisySegmenter, save_pretrained, safetensors
  filter/              Stage IV FilterSegmenter (MONAI UNet), config.json + model.safetensors
  .checkpoints/        training state for exact resumption (not needed to sample)
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from diffusers import UNet2DModel

from models import __version__
from models.early_rejection import EarlyRule
from models.filtering import DEFAULT_ETA
from models.labels import check_num_classes, mask_channels
from models.networks import FilterSegmenter, NoisySegmenter
from models.sampling import SamplingParams
from models.schedule import BETA_END, BETA_START, NUM_TRAIN_TIMESTEPS

BUNDLE_FORMAT = 1
META_FILE = "bundle.json"
STAGES = {"dpm": "train-dpm", "segmenter": "train-segmenter", "filter": "train-filter"}

# Nothing is ever fetched from a model hub: weights come from local folders only.
os.environ.setdefault("HF_HUB_OFFLINE", "1")


class BundleError(ValueError):
    """A bundle folder is missing, incomplete or unreadable; the message says which part."""


def new_meta(resolution: int, num_classes: int = 2) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "format": BUNDLE_FORMAT,
        "package_version": __version__,
        "resolution": resolution,
        "schedule": {
            "num_train_timesteps": NUM_TRAIN_TIMESTEPS,
            "beta_schedule": "linear",
            "beta_start": BETA_START,
            "beta_end": BETA_END,
            "prediction_type": "epsilon",
        },
        "training": {},
        "metrics": {},
        "sampling_defaults": SamplingParams().to_dict(),
        "eta_default": DEFAULT_ETA,
    }
    if num_classes != 2:  # binary bundles keep the format they always had
        meta["num_classes"] = check_num_classes(num_classes)
    return meta


def read_meta(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    meta_file = path / META_FILE
    if not meta_file.is_file():
        raise BundleError(f"{path}: not a bundle (no {META_FILE}); create one with `diffuseexpand train`")
    try:
        meta: dict[str, Any] = json.loads(meta_file.read_text())
    except json.JSONDecodeError as exc:
        raise BundleError(f"{meta_file}: unreadable JSON ({exc})") from exc
    if meta.get("format") != BUNDLE_FORMAT:
        raise BundleError(
            f"{meta_file}: bundle format {meta.get('format')} is not supported (need {BUNDLE_FORMAT})"
        )
    return meta


def write_meta(path: str | Path, meta: dict[str, Any]) -> None:
    """Write bundle.json atomically, so a crash never leaves a half-written file."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tmp = path / (META_FILE + ".tmp")
    tmp.write_text(json.dumps(meta, indent=2, sort_keys=False) + "\n")
    tmp.replace(path / META_FILE)


def missing_stages(path: str | Path) -> list[str]:
    path = Path(path)
    return [s for s in STAGES if not (path / s).is_dir()]


@dataclass
class Bundle:
    """The trained networks of one bundle, in eval mode on one device."""

    path: Path
    meta: dict[str, Any]
    dpm: UNet2DModel
    segmenter: NoisySegmenter
    filter: FilterSegmenter
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    compiled: tuple[Any, Any, Any] | None = None  # torch.compile'd (dpm, segmenter, filter), see compile()

    def networks(self) -> tuple[Any, Any, Any]:
        """The networks to sample with: the compiled ones once ``compile()`` ran, else the modules."""
        return self.compiled or (self.dpm, self.segmenter, self.filter)

    def compile(
        self, batch_size: int, params: SamplingParams | None = None, backend: str = "inductor"
    ) -> float:
        """``torch.compile`` the DPM and the filter for ``batch_size`` (static shapes) and warm them up on
        one pair of every phase, so no job pays for compiling; returns the seconds it took.

        Worth it where a process keeps its bundle for long (a worker): on the 2-core CPU here the DPM
        runs ~1.3x faster and compiling costs a few minutes (docs/speed.md, bench/expand.py). Compiled
        kernels round differently from eager ones: a job's pairs are bit-reproducible for a fixed
        batch size, device and compile setting.
        """
        import time

        from models.expand import generate_pairs

        t0 = time.perf_counter()
        # The noisy segmenter stays eager: under inductor its input gradient (the guidance) came out
        # all zeros on torch 2.13 CPU, which silently turned guided sampling into unguided sampling
        # (tests/bench/test_gpu_bench.py checks the guidance survives compiling). It costs ~7 % of a step.
        dpm, filt = (torch.compile(net, dynamic=False, backend=backend) for net in (self.dpm, self.filter))
        self.compiled = (dpm, self.segmenter, filt)
        warm = (params or self.default_params()).updated(steps=2, early_reject=False)
        for w_cf in {warm.w_cf, 1.0}:  # the doubled CFG batch, and the conditional one alone
            list(
                generate_pairs(
                    self, [0], seed=0, params=warm.updated(w_cf=w_cf), eta=1.0, batch_size=batch_size
                )
            )
        return time.perf_counter() - t0

    @property
    def early_rule(self) -> EarlyRule | None:
        """The calibrated early-rejection rule in bundle.json (``diffuseexpand calibrate``), if any."""
        d = self.meta.get("early_rejection")
        return EarlyRule.from_dict(d) if d else None

    @property
    def resolution(self) -> int:
        return int(self.meta["resolution"])

    @property
    def num_classes(self) -> int:
        """K, background included (2: a binary bundle; bundles from before multi-class have no key)."""
        return int(self.meta.get("num_classes", 2))

    @property
    def mask_channels(self) -> int:
        """Channels of the DPM's signal (``models.labels.mask_channels``)."""
        return mask_channels(self.num_classes)

    @property
    def name(self) -> str:
        return self.path.name

    def default_params(self) -> SamplingParams:
        return SamplingParams.from_dict(self.meta.get("sampling_defaults", {}))

    @property
    def default_eta(self) -> float:
        return float(self.meta.get("eta_default", DEFAULT_ETA))

    @property
    def allows_empty_masks(self) -> bool:
        """Whether Stage IV may keep a pair with an empty mask: only when the training data had some."""
        return int(self.meta.get("data", {}).get("empty_masks", 0)) > 0

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> Bundle:
        path = Path(path)
        meta = read_meta(path)
        missing = missing_stages(path)
        if missing:
            hints = ", ".join(f"{m} (run `diffuseexpand {STAGES[m]}`)" for m in missing)
            raise BundleError(f"{path}: incomplete bundle, missing {hints}")
        dev = torch.device(device)
        try:
            dpm = UNet2DModel.from_pretrained(path / "dpm", local_files_only=True, low_cpu_mem_usage=False)
            segmenter = NoisySegmenter.from_pretrained(
                path / "segmenter", local_files_only=True, low_cpu_mem_usage=False
            )
            filt = FilterSegmenter.from_pretrained(path / "filter")
        except (OSError, ValueError, RuntimeError, KeyError) as exc:
            raise BundleError(f"{path}: cannot load the networks ({exc})") from exc
        for net in (dpm, segmenter, filt):
            # channels_last lets oneDNN pick faster convolution kernels: 1.7x on the CPU here
            net.to(dev).to(memory_format=torch.channels_last).eval()  # type: ignore[call-overload]
            net.requires_grad_(False)  # guidance needs input gradients only
        return cls(path=path, meta=meta, dpm=dpm, segmenter=segmenter, filter=filt, device=dev)


def resolve_device(device: str | None) -> torch.device:
    """``None``/"auto" picks CUDA when present; anything else must be a valid torch device."""
    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise ValueError(f"invalid device {device!r} ({exc})") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but CUDA is not available on this machine")
    return dev
