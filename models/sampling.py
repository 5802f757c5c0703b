"""Stage III: two-phase guided sampling with DPM-Solver++ (diffusers' DPMSolverMultistepScheduler).

Phase 1 draws a mask from noise, guided towards y1 = mask; phase 2 draws the image for that
(binarised) mask with classifier-free guidance w_cf and classifier guidance w_cg towards
y1 = image and y2 = mask. Networks run in eval mode and under no_grad, except the input gradient
of the segmenter that guidance needs (original defect 1). w_cf and w_cg are separate knobs
(original defect 5).

Reproducibility: every pair draws its two noise tensors from a generator seeded by (seed, index)
alone (original defect 6), and networks always run on batches padded to one fixed size, because
CPU kernels round differently for different batch sizes but not for different batch contents.
So pair i of seed S comes out bit for bit the same in any batch, shard, worker or process that
uses the same batch size.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
from diffusers import UNet2DModel
from pydantic import ValidationError

from app.params import SamplingSettings
from models.guidance import GuidanceMode, classifier_free, classifier_guided, guidance_log_prob
from models.networks import Condition, NoisySegmenter
from models.schedule import make_solver

StepCallback = Callable[[dict[str, Any]], None]


_DEFAULTS = SamplingSettings()


@dataclass(frozen=True)
class SamplingParams:
    """Stage III settings. Defaults suit a briefly trained 64x64 bundle on the CPU: on the demo
    chest X-ray bundle, w_cf = 3 with w_cg = 1 at τ = 1 kept the most pairs at η = 0.065 (docs/results.md).

    Defaults and ranges come from ``app.params.SamplingSettings``, which validates every instance
    (a value out of range raises ``ValueError`` naming the field).

    Args:
        steps (`int`, defaults to 20): DPM-Solver++ steps per phase, 1 to 1000.
        order (`int`, defaults to 2): solver order, 1-3 (2 is recommended for guided sampling).
        w_cf (`float`, defaults to 3.0): classifier-free weight of the image phase, 0 to 20 (1 = conditional only).
        w_cg (`float`, defaults to 1.0): classifier-guidance weight, 0 to 50 (0 = no segmenter guidance).
        guidance (`GuidanceMode`, defaults to "tau"): "tau" divides logits by τ (the paper); "scale"
            multiplies log p by s (the Fig. 2 comparison).
        tau (`float`, defaults to 1.0): temperature τ in [0.05, 20] for mode "tau".
        scale (`float`, optional): s in [0.05, 20] for mode "scale"; defaults to 1/τ.
        clip_x0 (`bool`, defaults to True): clip predicted x0 to [-1, 1] at every step.
    """

    steps: int = _DEFAULTS.steps
    order: int = _DEFAULTS.order
    w_cf: float = _DEFAULTS.w_cf
    w_cg: float = _DEFAULTS.w_cg
    guidance: GuidanceMode = _DEFAULTS.guidance
    tau: float = _DEFAULTS.tau
    scale: float | None = _DEFAULTS.scale
    clip_x0: bool = _DEFAULTS.clip_x0

    def __post_init__(self) -> None:
        try:
            settings = SamplingSettings.model_validate(asdict(self))
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in e['loc'])} {e['msg'][0].lower()}{e['msg'][1:]} (got {e['input']!r})"
                for e in exc.errors()
            )
            raise ValueError(f"invalid sampling parameters: {problems}") from None
        object.__setattr__(self, "guidance", settings.guidance)

    def to_settings(self) -> SamplingSettings:
        return SamplingSettings.model_validate(self.to_dict())

    @classmethod
    def from_settings(cls, settings: SamplingSettings) -> SamplingParams:
        return cls.from_dict(settings.model_dump())

    @property
    def strength(self) -> float:
        """τ in mode tau, s in mode scale."""
        if self.guidance is GuidanceMode.TAU:
            return self.tau
        return self.scale if self.scale is not None else 1.0 / self.tau

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["guidance"] = str(self.guidance)
        d["scale"] = self.strength if self.guidance is GuidanceMode.SCALE else self.scale
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SamplingParams:
        """Settings from ``to_dict()`` output (a bundle's or a job's); keys it does not know are ignored."""
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in d.items() if k in known})

    def updated(self, **changes: Any) -> SamplingParams:
        return replace(self, **{k: v for k, v in changes.items() if v is not None})


def pair_seed(seed: int, index: int) -> int:
    """The 63-bit generator seed of pair ``index`` of a request with ``seed``."""
    digest = hashlib.sha256(f"diffuseexpand:{seed}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def pair_noise(seed: int, index: int, resolution: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The initial noise of one pair, ``(mask_noise, image_noise)`` each ``[1, R, R]``, drawn on the CPU."""
    g = torch.Generator(device="cpu").manual_seed(pair_seed(seed, index))
    mask_noise = torch.randn((1, resolution, resolution), generator=g)
    image_noise = torch.randn((1, resolution, resolution), generator=g)
    return mask_noise, image_noise


def _solve(
    eps_fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    noise: torch.Tensor,
    params: SamplingParams,
    phase: str,
    callback: StepCallback | None,
) -> torch.Tensor:
    """Run DPM-Solver++ from ``noise`` to x0, with ``eps_fn(x, t, sigma_t)`` as the noise predictor."""
    solver = make_solver(params.steps, params.order, params.clip_x0)
    acp = solver.alphas_cumprod
    x = noise * solver.init_noise_sigma
    timesteps = solver.timesteps
    for i, t in enumerate(timesteps):
        sigma = (1.0 - acp[int(t)]).sqrt().to(x.device, x.dtype)
        eps = eps_fn(x, t.to(x.device).repeat(x.shape[0]), sigma)
        x = solver.step(eps, t, x).prev_sample
        if callback is not None:
            callback({"phase": phase, "step": i + 1, "steps": len(timesteps)})
    return x


def _guidance_grad(
    segmenter: NoisySegmenter,
    x: torch.Tensor,
    t: torch.Tensor,
    *,
    want_image: bool,
    mask01: torch.Tensor | None,
    params: SamplingParams,
) -> torch.Tensor:
    """∇ₓ [log p(y1 | x_t) (+ log p(y2 = mask | x_t))], the only gradient taken while sampling."""
    with torch.enable_grad():
        x_in = x.detach().requires_grad_(True)
        out = segmenter(x_in, t)
        log_p = guidance_log_prob(
            out.y1_logit,
            out.mask_logits,
            want_image=want_image,
            mask=mask01,
            mode=params.guidance,
            strength=params.strength,
        )
        (grad,) = torch.autograd.grad(log_p.sum(), x_in)
    return grad


@torch.no_grad()
def sample_masks(
    dpm: UNet2DModel,
    segmenter: NoisySegmenter | None,
    noise: torch.Tensor,
    params: SamplingParams,
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """Phase 1: masks ``[B, 1, R, R]`` of -1/+1 from noise, guided towards y1 = mask."""
    b = noise.shape[0]
    zeros = torch.zeros_like(noise)
    labels = torch.full((b,), int(Condition.MASK), device=noise.device, dtype=torch.long)
    use_cg = params.w_cg > 0 and segmenter is not None

    def eps_fn(x: torch.Tensor, t: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        eps: torch.Tensor = dpm(torch.cat([x, zeros], dim=1), t, class_labels=labels).sample
        if use_cg:
            assert segmenter is not None
            grad = _guidance_grad(segmenter, x, t, want_image=False, mask01=None, params=params)
            eps = classifier_guided(eps, grad, sigma, params.w_cg)
        return eps

    x0 = _solve(eps_fn, noise, params, "mask", callback)
    return binarize(x0)


@torch.no_grad()
def sample_images(
    dpm: UNet2DModel,
    segmenter: NoisySegmenter | None,
    noise: torch.Tensor,
    masks: torch.Tensor,
    params: SamplingParams,
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """Phase 2: images ``[B, 1, R, R]`` in [-1, 1] for -1/+1 ``masks``, with CFG and segmenter guidance."""
    b = noise.shape[0]
    zeros = torch.zeros_like(masks)
    cond = torch.full((b,), int(Condition.IMAGE_GIVEN_MASK), device=noise.device, dtype=torch.long)
    uncond = torch.full((b,), int(Condition.IMAGE_UNCOND), device=noise.device, dtype=torch.long)
    mask01 = (masks > 0).to(noise.dtype)
    use_cg = params.w_cg > 0 and segmenter is not None

    def eps_fn(x: torch.Tensor, t: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        if params.w_cf == 1.0:  # the unconditional branch would be multiplied by zero
            eps: torch.Tensor = dpm(torch.cat([x, masks], dim=1), t, class_labels=cond).sample
        else:
            both = torch.cat([torch.cat([x, masks], dim=1), torch.cat([x, zeros], dim=1)])
            out = dpm(both, t.repeat(2), class_labels=torch.cat([cond, uncond])).sample
            eps = classifier_free(out[b:], out[:b], params.w_cf)
        if use_cg:
            assert segmenter is not None
            grad = _guidance_grad(segmenter, x, t, want_image=True, mask01=mask01, params=params)
            eps = classifier_guided(eps, grad, sigma, params.w_cg)
        return eps

    return _solve(eps_fn, noise, params, "image", callback).clamp(-1.0, 1.0)


def binarize(x: torch.Tensor) -> torch.Tensor:
    """A sampled mask in [-1, 1] to -1/+1 (foreground where x0 > 0)."""
    return torch.where(x > 0, 1.0, -1.0).to(x.dtype)
