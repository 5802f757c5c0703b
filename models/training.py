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

from app.params import DEFAULT_UNLABELLED_SHARE as _DEFAULT_UNLABELLED_SHARE
from models.augment import Augmenter, AugmentRecipe
from models.bundle import read_meta, write_meta
from models.data import PairDataset
from models.filtering import DEFAULT_ETA, score_pairs_by_class
from models.labels import mask_channels, one_hot01
from models.mask_source import save_training_masks
from models.networks import (
    DEFAULT_DPM_CHANNELS,
    Condition,
    FilterSegmenter,
    NoisySegmenter,
    build_dpm,
    count_parameters,
    default_segmenter_downsample,
    embed_image,
)
from models.schedule import NUM_TRAIN_TIMESTEPS, add_noise, alphas_cumprod

ProgressCallback = Callable[[int, int, float], None]  # (step, total, loss)

# The share of Stage I batch rows drawn from the unlabelled images, when a dataset has them
# (docs/results.md, "unlabelled share", gives the measurement behind it); its one home is app.params,
# which the API (no torch) shares.
DEFAULT_UNLABELLED_SHARE = _DEFAULT_UNLABELLED_SHARE


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


LossAt = Callable[[torch.Generator], torch.Tensor]  # the loss of one step, from that step's generator


def _optimise(
    stage: str,
    model: torch.nn.Module,
    opt: torch.optim.Optimizer,
    cfg: TrainConfig,
    config: dict[str, Any],
    bundle_dir: Path,
    loss_at: LossAt,
    *,
    ema: EMAModel | None = None,
    callback: ProgressCallback | None = None,
) -> tuple[int, float]:
    """The training loop every stage shares: resume, warm-up lr, clip, (EMA), checkpoint.

    Returns ``(step resumed from, last loss)``.
    """
    ckpt_path = bundle_dir / ".checkpoints" / f"{stage}.pt"
    start = 0
    state = _load_checkpoint(ckpt_path, config)
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        if ema is not None:
            ema.load_state_dict(state["ema"])
        start = int(state["step"])
    model.train()
    loss_value = float("nan")
    for step in range(start, cfg.steps):
        loss = loss_at(step_generator(cfg.seed, stage, step))
        for group in opt.param_groups:
            group["lr"] = _lr_at(cfg, step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        if ema is not None:
            ema.step(model.parameters())
        loss_value = float(loss.detach())
        if callback is not None:
            callback(step + 1, cfg.steps, loss_value)
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps:
            checkpoint = {
                "step": step + 1,
                "config": config,
                "model": model.state_dict(),
                "optimizer": opt.state_dict(),
            }
            if ema is not None:
                checkpoint["ema"] = ema.state_dict()
            _save_checkpoint(ckpt_path, checkpoint)
    model.eval()
    return start, loss_value


def train_dpm(
    data: PairDataset,
    bundle_dir: str | Path,
    cfg: TrainConfig,
    *,
    cf_dropout: float = 0.2,
    ema_max_decay: float = 0.9999,
    pretrained: str | Path | None = None,
    block_out_channels: tuple[int, ...] | None = None,
    augment: AugmentRecipe | None = None,
    unlabelled: torch.Tensor | None = None,
    unlabelled_share: float = DEFAULT_UNLABELLED_SHARE,
    device: torch.device | str = "cpu",
    callback: ProgressCallback | None = None,
) -> dict[str, Any]:
    """Stage I (Eq. 1): y1 ~ Bernoulli(0.5), ε-prediction MSE, mask condition dropped with ``cf_dropout``.

    Saves the EMA weights (diffusers EMAModel with warmup, so a short run is not dominated by the
    random initial weights) to ``bundle_dir/dpm``. ``block_out_channels`` sizes the UNet (default:
    ``build_dpm``'s); ``augment`` applies the augmentation recipe to each batch's pairs (geometry to
    image and mask together), for few-pair training sets the DPM would otherwise memorise.

    ``unlabelled`` images ``[U, 1, R, R]`` (images without masks) teach the image phase appearance:
    each batch row is, with probability ``unlabelled_share``, one of them, trained as an image with
    the mask condition dropped (the classifier-free null condition, ``Condition.IMAGE_UNCOND``).
    The labelled pairs keep training the mask phase and the mask-conditioned image phase.
    """
    if not 0.0 <= cf_dropout < 1.0:
        raise ValueError(f"cf_dropout must be in [0, 1), got {cf_dropout}")
    if not 0.0 <= unlabelled_share < 1.0:
        raise ValueError(f"unlabelled_share must be in [0, 1), got {unlabelled_share}")
    pool = unlabelled if unlabelled is not None and len(unlabelled) and unlabelled_share > 0 else None
    bundle_dir = Path(bundle_dir)
    dev = torch.device(device)
    channels = tuple(block_out_channels) if block_out_channels else DEFAULT_DPM_CHANNELS
    c = mask_channels(data.num_classes)
    model = _seeded_init(cfg.seed, "dpm", lambda: build_dpm(data.resolution, channels, channels=c)).to(dev)
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
    if block_out_channels:  # recorded only when set, so checkpoints of earlier bundles still resume
        config["block_out_channels"] = list(channels)
    if data.num_classes != 2:
        config["num_classes"] = data.num_classes
    if augment is not None:
        config["augment"] = augment.to_dict()
    if pool is not None:  # recorded only when used, so earlier checkpoints still resume
        config["unlabelled"] = len(pool)
        config["unlabelled_share"] = unlabelled_share
    augmenter = Augmenter(augment, data.resolution) if augment is not None else None
    acp = alphas_cumprod().to(dev)
    images, masks = data.images.to(dev), data.masks.to(dev)
    pool_images = pool.to(dev) if pool is not None else None
    b, r = cfg.batch_size, data.resolution

    def loss_at(g: torch.Generator) -> torch.Tensor:
        rows = _batch_rows(len(data), b, g)
        is_image = (torch.rand(b, generator=g) < 0.5).to(dev)
        dropped = (torch.rand(b, generator=g) < cf_dropout).to(dev)
        t = torch.randint(0, NUM_TRAIN_TIMESTEPS, (b,), generator=g).to(dev)
        noise = torch.randn((b, c, r, r), generator=g).to(dev)
        img, msk = images[rows], masks[rows]
        if pool_images is not None:  # drawn after the labelled draws: without a pool, runs are unchanged
            from_pool = (torch.rand(b, generator=g) < unlabelled_share).to(dev)
            pool_rows = torch.randint(0, len(pool_images), (b,), generator=g).to(dev)
            img = torch.where(from_pool.view(-1, 1, 1, 1), pool_images[pool_rows], img)
            is_image, dropped = is_image | from_pool, dropped | from_pool
        if augmenter is not None:
            aug_seed = int(torch.randint(0, 2**31 - 1, (1,), generator=g))
            img, msk = augmenter.batch(img, msk, aug_seed)
        x0 = torch.where(is_image.view(-1, 1, 1, 1), embed_image(img, c), msk)
        cond = torch.where((is_image & ~dropped).view(-1, 1, 1, 1), msk, torch.zeros_like(x0))
        labels = torch.where(
            is_image,
            torch.where(dropped, int(Condition.IMAGE_UNCOND), int(Condition.IMAGE_GIVEN_MASK)),
            int(Condition.MASK),
        )
        pred = model(torch.cat([add_noise(x0, noise, t, acp), cond], dim=1), t, class_labels=labels).sample
        return F.mse_loss(pred, noise)

    t0 = time.perf_counter()
    start, loss_value = _optimise(
        "dpm", model, opt, cfg, config, bundle_dir, loss_at, ema=ema, callback=callback
    )
    ema_model = build_dpm(data.resolution, channels, channels=c)
    ema_model.load_state_dict(model.state_dict())
    ema.copy_to(ema_model.parameters())
    ema_model.save_pretrained(bundle_dir / "dpm", safe_serialization=True)
    # the masks Stage I learned from travel with it: real mask sources and the clean-up use them
    save_training_masks(bundle_dir, list(data.names), data.labels)
    summary = {
        **config,
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
    """Dice + BCE on one channel of per-pixel logits; Dice + cross-entropy on K softmax channels
    (``target01`` one-hot, ``dice`` built by ``_dice_for``)."""
    if logits.shape[1] == 1:
        return dice(logits, target01) + F.binary_cross_entropy_with_logits(logits, target01)
    return dice(logits, target01) + F.cross_entropy(logits, target01.argmax(dim=1))


def _dice_for(num_classes: int) -> DiceLoss:
    """MONAI's Dice loss on sigmoid (binary) or softmax (K classes) outputs, background excluded for K."""
    if num_classes == 2:
        return DiceLoss(sigmoid=True)
    return DiceLoss(softmax=True, include_background=False)


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
            sample_size=data.resolution,
            downsample=default_segmenter_downsample(data.resolution),
            num_classes=data.num_classes,
        ),
    ).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    config = {**asdict(cfg), "downsample": model.downsample}
    if data.num_classes != 2:
        config["num_classes"] = data.num_classes
    acp = alphas_cumprod().to(dev)
    dice = _dice_for(data.num_classes)
    images, masks = data.images.to(dev), data.masks.to(dev)
    targets = one_hot01(data.labels, data.num_classes).to(dev)
    b, r, c = cfg.batch_size, data.resolution, mask_channels(data.num_classes)

    def loss_at(g: torch.Generator) -> torch.Tensor:
        rows = _batch_rows(len(data), b, g)
        is_image = (torch.rand(b, generator=g) < 0.5).to(dev)
        t = torch.randint(0, NUM_TRAIN_TIMESTEPS, (b,), generator=g).to(dev)
        noise = torch.randn((b, c, r, r), generator=g).to(dev)
        x0 = torch.where(is_image.view(-1, 1, 1, 1), embed_image(images[rows], c), masks[rows])
        out = model(add_noise(x0, noise, t, acp), t)
        loss = F.binary_cross_entropy_with_logits(out.y1_logit, is_image.float())
        if is_image.any():
            loss = loss + _segmentation_loss(out.mask_logits[is_image], targets[rows][is_image], dice)
        return loss

    t0 = time.perf_counter()
    start, loss_value = _optimise(
        "segmenter", model, opt, cfg, config, bundle_dir, loss_at, callback=callback
    )
    model.save_pretrained(bundle_dir / "segmenter", safe_serialization=True)
    summary = {
        **config,
        "resumed_from": start,
        "final_loss": loss_value,
        "parameters": count_parameters(model),
        "seconds_this_run": round(time.perf_counter() - t0, 1),
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
def evaluate_filter(model: FilterSegmenter, data: PairDataset, eta: float = DEFAULT_ETA) -> dict[str, Any]:
    """Held-out Dice of the filter (threshold 0.5; argmax for K classes, averaged over the foreground
    classes, each also in ``dice_by_class``) and the share of real pairs it would keep at η."""
    model.eval()
    dev = next(model.parameters()).device
    by_class = torch.cat(
        [
            score_pairs_by_class(model, data.images[i : i + 32].to(dev), data.masks[i : i + 32].to(dev)).cpu()
            for i in range(0, len(data), 32)
        ]
    )
    loss = by_class.mean(dim=1)
    out: dict[str, Any] = {
        "dice_mean": float((1 - loss).mean()),
        "dice_std": float((1 - loss).std()) if len(loss) > 1 else 0.0,
        "real_pass_rate": float((loss <= eta).float().mean()),
        "eta": eta,
        "n": len(loss),
    }
    if data.num_classes > 2:
        out["dice_by_class"] = {
            str(k + 1): float((1 - by_class[:, k]).mean()) for k in range(by_class.shape[1])
        }
    return out


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
    model = _seeded_init(cfg.seed, "filter", lambda: FilterSegmenter(num_classes=data.num_classes)).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=1e-4)
    config = asdict(cfg)
    if data.num_classes != 2:
        config["num_classes"] = data.num_classes
    dice = _dice_for(data.num_classes)
    images = data.images.to(dev)
    targets = one_hot01(data.labels, data.num_classes).to(dev)

    def loss_at(g: torch.Generator) -> torch.Tensor:
        rows = _batch_rows(len(data), cfg.batch_size, g)
        return _segmentation_loss(model(_jitter_intensity(images[rows], g)), targets[rows], dice)

    t0 = time.perf_counter()
    start, loss_value = _optimise("filter", model, opt, cfg, config, bundle_dir, loss_at, callback=callback)
    model.cpu().save_pretrained(bundle_dir / "filter")
    summary: dict[str, Any] = {
        **config,
        "resumed_from": start,
        "final_loss": loss_value,
        "parameters": count_parameters(model),
        "seconds_this_run": round(time.perf_counter() - t0, 1),
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
