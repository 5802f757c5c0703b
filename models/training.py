"""Training of Stages I, II and IV, each resumable bit for bit from its checkpoint.

Every random draw of step k (batch rows, timesteps, noise, condition dropout) comes from a
generator seeded by (seed, stage, k), so a run resumed from a checkpoint at step k continues
exactly as the uninterrupted run would have.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers.training_utils import EMAModel
from monai.losses import DiceLoss
from safetensors.torch import load_file
from torch.nn import functional as F

from models.bundle import read_meta, write_meta
from models.data import PairDataset
from models.filtering import DEFAULT_ETA, dice_loss
from models.networks import (
    Condition,
    FilterSegmenter,
    NoisySegmenter,
    build_dpm,
    count_parameters,
    default_segmenter_downsample,
)
from models.schedule import NUM_TRAIN_TIMESTEPS, add_noise, alphas_cumprod

ProgressCallback = Callable[[int, int, float], None]  # (step, total, loss)


@dataclass
class TrainConfig:
    """Settings shared by the three stages; each stage has its own defaults for steps and lr."""

    steps: int
    batch_size: int = 16
    lr: float = 2e-4
    seed: int = 0
    warmup_steps: int = 100
    grad_clip: float = 1.0
    checkpoint_every: int = 250

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")


def step_generator(seed: int, stage: str, step: int) -> torch.Generator:
    digest = hashlib.sha256(f"train:{seed}:{stage}:{step}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def _seeded_init(seed: int, stage: str, build: Callable[[], torch.nn.Module]) -> Any:
    """Build a network with initial weights that depend on (seed, stage) only, not on global RNG state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(step_generator(seed, stage + ":init", 0).initial_seed())
        return build()


def _lr_at(cfg: TrainConfig, step: int) -> float:
    return cfg.lr * min(1.0, (step + 1) / max(1, cfg.warmup_steps))


def _save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def _load_checkpoint(path: Path, config: dict[str, Any]) -> dict[str, Any] | None:
    """The saved state when it exists and was made with the same configuration (steps may grow)."""
    if not path.is_file():
        return None
    state: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=False)
    saved = {k: v for k, v in state.get("config", {}).items() if k != "steps"}
    if saved != {k: v for k, v in config.items() if k != "steps"}:
        return None
    return state


def load_pretrained_weights(model: torch.nn.Module, source: str | Path) -> list[str]:
    """Copy matching tensors from a local checkpoint (a diffusers folder or a .safetensors/.pt file).

    Returns the names of the model's tensors that were re-initialised because the checkpoint
    lacks them or has another shape (as when fine-tuning an RGB ImageNet DPM on greyscale pairs).
    """
    source = Path(source)
    if source.is_dir():
        candidates = sorted(source.glob("*.safetensors")) or sorted(source.glob("*.bin"))
        if not candidates:
            raise FileNotFoundError(f"{source}: no *.safetensors or *.bin weights in this folder")
        source = candidates[0]
    if not source.is_file():
        raise FileNotFoundError(f"{source}: pretrained checkpoint not found")
    theirs: dict[str, torch.Tensor]
    if source.suffix == ".safetensors":
        theirs = load_file(str(source))
    else:
        loaded = torch.load(source, map_location="cpu", weights_only=True)
        theirs = loaded.get("state_dict", loaded) if isinstance(loaded, dict) else {}
    ours = model.state_dict()
    usable = {k: v for k, v in theirs.items() if k in ours and ours[k].shape == v.shape}
    model.load_state_dict(usable, strict=False)
    return sorted(k for k in ours if k not in usable)


def _batch_rows(n: int, batch_size: int, g: torch.Generator) -> torch.Tensor:
    return torch.randint(0, n, (batch_size,), generator=g)


def train_dpm(
    data: PairDataset,
    bundle_dir: str | Path,
    cfg: TrainConfig,
    *,
    cf_dropout: float = 0.2,
    ema_max_decay: float = 0.9999,
    pretrained: str | Path | None = None,
    device: torch.device | str = "cpu",
    callback: ProgressCallback | None = None,
) -> dict[str, Any]:
    """Stage I (Eq. 1): y1 ~ Bernoulli(0.5), ε-prediction MSE, mask condition dropped with ``cf_dropout``.

    Saves the EMA weights (diffusers EMAModel with warmup, so a short run is not dominated by the
    random initial weights) to ``bundle_dir/dpm``.
    """
    if not 0.0 <= cf_dropout < 1.0:
        raise ValueError(f"cf_dropout must be in [0, 1), got {cf_dropout}")
    bundle_dir = Path(bundle_dir)
    dev = torch.device(device)
    model = _seeded_init(cfg.seed, "dpm", lambda: build_dpm(data.resolution)).to(dev)
    reinitialised: list[str] = []
    if pretrained is not None:
        reinitialised = load_pretrained_weights(model, pretrained)
    ema = EMAModel(model.parameters(), decay=ema_max_decay, use_ema_warmup=True, inv_gamma=1.0, power=2 / 3)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    config = {
        **asdict(cfg),
        "cf_dropout": cf_dropout,
        "ema_max_decay": ema_max_decay,
        "pretrained": str(pretrained),
    }
    ckpt_path = bundle_dir / ".checkpoints" / "dpm.pt"
    start = 0
    state = _load_checkpoint(ckpt_path, config)
    if state is not None:
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["optimizer"])
        start = int(state["step"])
    acp = alphas_cumprod().to(dev)
    images, masks = data.images.to(dev), data.masks.to(dev)
    model.train()
    loss_value = float("nan")
    t0 = time.perf_counter()
    for step in range(start, cfg.steps):
        g = step_generator(cfg.seed, "dpm", step)
        rows = _batch_rows(len(data), cfg.batch_size, g)
        is_image = torch.rand(cfg.batch_size, generator=g) < 0.5
        dropped = torch.rand(cfg.batch_size, generator=g) < cf_dropout
        t = torch.randint(0, NUM_TRAIN_TIMESTEPS, (cfg.batch_size,), generator=g)
        noise = torch.randn((cfg.batch_size, 1, data.resolution, data.resolution), generator=g)
        is_image, dropped, t, noise = is_image.to(dev), dropped.to(dev), t.to(dev), noise.to(dev)
        x0 = torch.where(is_image.view(-1, 1, 1, 1), images[rows], masks[rows])
        keep_cond = (is_image & ~dropped).view(-1, 1, 1, 1)
        cond = torch.where(keep_cond, masks[rows], torch.zeros_like(x0))
        labels = torch.where(
            is_image,
            torch.where(dropped, int(Condition.IMAGE_UNCOND), int(Condition.IMAGE_GIVEN_MASK)),
            int(Condition.MASK),
        )
        x_t = add_noise(x0, noise, t, acp)
        pred = model(torch.cat([x_t, cond], dim=1), t, class_labels=labels).sample
        loss = F.mse_loss(pred, noise)
        for group in opt.param_groups:
            group["lr"] = _lr_at(cfg, step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        ema.step(model.parameters())
        loss_value = float(loss.detach())
        if callback is not None:
            callback(step + 1, cfg.steps, loss_value)
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps:
            _save_checkpoint(
                ckpt_path,
                {
                    "step": step + 1,
                    "config": config,
                    "model": model.state_dict(),
                    "ema": ema.state_dict(),
                    "optimizer": opt.state_dict(),
                },
            )
    ema_model = build_dpm(data.resolution)
    ema_model.load_state_dict(model.state_dict())
    ema.copy_to(ema_model.parameters())
    ema_model.save_pretrained(bundle_dir / "dpm", safe_serialization=True)
    summary = {
        **config,
        "steps": cfg.steps,
        "resumed_from": start,
        "final_loss": loss_value,
        "parameters": count_parameters(model),
        "reinitialised_from_pretrained": reinitialised,
        "seconds_this_run": round(time.perf_counter() - t0, 1),
        "ema_decay_at_end": float(ema.get_decay(ema.optimization_step)),
    }
    _record(bundle_dir, "dpm", summary)
    return summary


def _segmentation_loss(logits: torch.Tensor, target01: torch.Tensor, dice: DiceLoss) -> torch.Tensor:
    """Dice + BCE on per-pixel logits."""
    return dice(logits, target01) + F.binary_cross_entropy_with_logits(logits, target01)


def train_segmenter(
    data: PairDataset,
    bundle_dir: str | Path,
    cfg: TrainConfig,
    *,
    device: torch.device | str = "cpu",
    callback: ProgressCallback | None = None,
) -> dict[str, Any]:
    """Stage II (Eq. 2) at uniform t: Dice + BCE on noisy images, BCE of g_ω on y1 for images and masks."""
    bundle_dir = Path(bundle_dir)
    dev = torch.device(device)
    model = _seeded_init(
        cfg.seed,
        "segmenter",
        lambda: NoisySegmenter(
            sample_size=data.resolution, downsample=default_segmenter_downsample(data.resolution)
        ),
    ).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    config = {**asdict(cfg), "downsample": model.downsample}
    ckpt_path = bundle_dir / ".checkpoints" / "segmenter.pt"
    start = 0
    state = _load_checkpoint(ckpt_path, config)
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        start = int(state["step"])
    acp = alphas_cumprod().to(dev)
    dice = DiceLoss(sigmoid=True)
    images, masks = data.images.to(dev), data.masks.to(dev)
    model.train()
    loss_value = float("nan")
    for step in range(start, cfg.steps):
        g = step_generator(cfg.seed, "segmenter", step)
        rows = _batch_rows(len(data), cfg.batch_size, g)
        is_image = (torch.rand(cfg.batch_size, generator=g) < 0.5).to(dev)
        t = torch.randint(0, NUM_TRAIN_TIMESTEPS, (cfg.batch_size,), generator=g).to(dev)
        noise = torch.randn((cfg.batch_size, 1, data.resolution, data.resolution), generator=g).to(dev)
        x0 = torch.where(is_image.view(-1, 1, 1, 1), images[rows], masks[rows])
        out = model(add_noise(x0, noise, t, acp), t)
        loss = F.binary_cross_entropy_with_logits(out.y1_logit, is_image.float())
        if is_image.any():
            target = (masks[rows][is_image] > 0).float()
            loss = loss + _segmentation_loss(out.mask_logits[is_image], target, dice)
        for group in opt.param_groups:
            group["lr"] = _lr_at(cfg, step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        loss_value = float(loss.detach())
        if callback is not None:
            callback(step + 1, cfg.steps, loss_value)
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps:
            _save_checkpoint(
                ckpt_path,
                {
                    "step": step + 1,
                    "config": config,
                    "model": model.state_dict(),
                    "optimizer": opt.state_dict(),
                },
            )
    model.eval().save_pretrained(bundle_dir / "segmenter", safe_serialization=True)
    summary = {
        **config,
        "resumed_from": start,
        "final_loss": loss_value,
        "parameters": count_parameters(model),
    }
    _record(bundle_dir, "segmenter", summary)
    return summary


def _jitter_intensity(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random gamma and contrast, so the filter does not key on the exact intensity profile of the real scans."""
    b = x.shape[0]
    gamma = torch.exp((torch.rand(b, 1, 1, 1, generator=g) - 0.5) * 0.6).to(x.device)
    contrast = (0.8 + 0.4 * torch.rand(b, 1, 1, 1, generator=g)).to(x.device)
    unit = ((x + 1) / 2).clamp(0, 1) ** gamma
    return ((unit - 0.5) * contrast + 0.5).clamp(0, 1) * 2 - 1


@torch.no_grad()
def evaluate_filter(model: FilterSegmenter, data: PairDataset, eta: float = DEFAULT_ETA) -> dict[str, float]:
    """Held-out Dice of the filter (threshold 0.5) and the share of real pairs it would keep at η."""
    model.eval()
    dev = next(model.parameters()).device
    losses = []
    for i in range(0, len(data), 32):
        img = data.images[i : i + 32].to(dev)
        pred = (torch.sigmoid(model(img)) > 0.5).float()
        losses.append(dice_loss(pred, (data.masks[i : i + 32].to(dev) > 0).float()).cpu())
    loss = torch.cat(losses)
    return {
        "dice_mean": float((1 - loss).mean()),
        "dice_std": float((1 - loss).std()) if len(loss) > 1 else 0.0,
        "real_pass_rate": float((loss <= eta).float().mean()),
        "eta": eta,
        "n": len(loss),
    }


def train_filter(
    data: PairDataset,
    bundle_dir: str | Path,
    cfg: TrainConfig,
    *,
    test_data: PairDataset | None = None,
    device: torch.device | str = "cpu",
    callback: ProgressCallback | None = None,
) -> dict[str, Any]:
    """Stage IV's clean segmenter: Dice + BCE on real training pairs; reports held-out Dice on the test split."""
    bundle_dir = Path(bundle_dir)
    dev = torch.device(device)
    model = _seeded_init(cfg.seed, "filter", FilterSegmenter).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=1e-4)
    config = asdict(cfg)
    ckpt_path = bundle_dir / ".checkpoints" / "filter.pt"
    start = 0
    state = _load_checkpoint(ckpt_path, config)
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        start = int(state["step"])
    dice = DiceLoss(sigmoid=True)
    images, masks = data.images.to(dev), data.masks.to(dev)
    model.train()
    loss_value = float("nan")
    for step in range(start, cfg.steps):
        g = step_generator(cfg.seed, "filter", step)
        rows = _batch_rows(len(data), cfg.batch_size, g)
        x = _jitter_intensity(images[rows], g)
        loss = _segmentation_loss(model(x), (masks[rows] > 0).float(), dice)
        for group in opt.param_groups:
            group["lr"] = _lr_at(cfg, step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        loss_value = float(loss.detach())
        if callback is not None:
            callback(step + 1, cfg.steps, loss_value)
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps:
            _save_checkpoint(
                ckpt_path,
                {
                    "step": step + 1,
                    "config": config,
                    "model": model.state_dict(),
                    "optimizer": opt.state_dict(),
                },
            )
    model.eval()
    model.cpu().save_pretrained(bundle_dir / "filter")
    summary: dict[str, Any] = {
        **config,
        "resumed_from": start,
        "final_loss": loss_value,
        "parameters": count_parameters(model),
    }
    if test_data is not None and len(test_data):
        summary["test"] = evaluate_filter(model, test_data)
        meta = read_meta(bundle_dir)
        meta["metrics"]["filter_test"] = summary["test"]
        write_meta(bundle_dir, meta)
    _record(bundle_dir, "filter", summary)
    return summary


def _record(bundle_dir: Path, stage: str, summary: dict[str, Any]) -> None:
    meta = read_meta(bundle_dir)
    meta["training"][stage] = summary
    write_meta(bundle_dir, meta)
