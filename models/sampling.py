"""Stage III: two-phase guided sampling with a multistep solver (diffusers' DPM-Solver++ or UniPC).

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

import copy
import hashlib
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
from diffusers import UNet2DModel
from pydantic import ValidationError

from app.params import SamplingSettings, Solver
from models.denoisers import ClassifierGuided, Denoiser, EpsFn, ImageDenoiser, MaskDenoiser
from models.guidance import GuidanceMode
from models.labels import snap
from models.networks import NoisySegmenter, image_part
from models.schedule import Scheduler, batch_state_fields, make_solver

StepCallback = Callable[[dict[str, Any]], None]


_DEFAULTS = SamplingSettings()


@dataclass(frozen=True)
class SamplingParams:
    """Stage III settings. Defaults suit a briefly trained 64x64 bundle on the CPU: on the demo
    chest X-ray bundle, w_cf = 3 with w_cg = 1 at τ = 1 kept the most pairs at η = 0.065 (docs/results.md).

    Defaults and ranges come from ``app.params.SamplingSettings``, which validates every instance
    (a value out of range raises ``ValueError`` naming the field).

    Args:
        steps (`int`, defaults to 20): solver steps per phase, 1 to 1000.
        order (`int`, defaults to 2): solver order, 1-3 (2 is recommended for guided sampling).
        w_cf (`float`, defaults to 3.0): classifier-free weight of the image phase, 0 to 20 (1 = conditional only).
        w_cg (`float`, defaults to 1.0): classifier-guidance weight, 0 to 50 (0 = no segmenter guidance).
        guidance (`GuidanceMode`, defaults to "tau"): "tau" divides logits by τ (the paper); "scale"
            multiplies log p by s (the Fig. 2 comparison).
        tau (`float`, defaults to 1.0): temperature τ in [0.05, 20] for mode "tau".
        scale (`float`, optional): s in [0.05, 20] for mode "scale"; defaults to 1/τ.
        clip_x0 (`bool`, defaults to True): clip predicted x0 to [-1, 1] at every step.
        solver (`Solver`, defaults to "dpmpp"): "dpmpp" (DPM-Solver++ multistep) or "unipc" (UniPC).
        karras (`bool`, defaults to False): Karras sigmas instead of evenly spaced timesteps.
        early_reject (`bool`, defaults to True): apply the bundle's early-rejection rule when it was
            calibrated for these settings (``models.early_rejection``).
    """

    steps: int = _DEFAULTS.steps
    order: int = _DEFAULTS.order
    w_cf: float = _DEFAULTS.w_cf
    w_cg: float = _DEFAULTS.w_cg
    guidance: GuidanceMode = _DEFAULTS.guidance
    tau: float = _DEFAULTS.tau
    scale: float | None = _DEFAULTS.scale
    clip_x0: bool = _DEFAULTS.clip_x0
    solver: Solver = _DEFAULTS.solver
    karras: bool = _DEFAULTS.karras
    early_reject: bool = _DEFAULTS.early_reject

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
        object.__setattr__(self, "solver", settings.solver)

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
        d["solver"] = str(self.solver)
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


def pair_noise(
    seed: int, index: int, resolution: int, channels: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """The initial noise of one pair, ``(mask_noise, image_noise)`` each ``[C, R, R]``, drawn on the CPU
    (C: the DPM's channels, 1 for binary masks)."""
    g = torch.Generator(device="cpu").manual_seed(pair_seed(seed, index))
    mask_noise = torch.randn((channels, resolution, resolution), generator=g)
    image_noise = torch.randn((channels, resolution, resolution), generator=g)
    return mask_noise, image_noise


def solve(
    eps_fn: EpsFn,
    x: torch.Tensor,
    solver: Scheduler,
    *,
    start: int = 0,
    stop: int | None = None,
    phase: str = "",
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """Run steps ``[start, stop)`` of ``solver`` (all by default) on ``x``, with ``eps_fn(x, t, sigma_t)``
    as the noise predictor; ``x`` is the initial noise when ``start`` is 0.

    The one sampling loop: both phases, every solver and every denoiser (eager or compiled networks)
    go through it. A solver keeps its multistep history between calls, so running ``[0, k)`` then
    ``[k, N)`` is the same computation as ``[0, N)`` (what early rejection relies on).
    """
    acp = solver.alphas_cumprod
    timesteps = solver.timesteps
    stop = len(timesteps) if stop is None else stop
    if start == 0:
        x = x * solver.init_noise_sigma
    for i in range(start, stop):
        t = timesteps[i]
        sigma = (1.0 - acp[int(t)]).sqrt().to(x.device, x.dtype)
        eps = eps_fn(x, t.to(x.device).repeat(x.shape[0]), sigma)
        x = solver.step(eps, t, x).prev_sample
        if callback is not None:
            callback({"phase": phase, "step": i + 1, "steps": len(timesteps)})
    return x


def params_solver(params: SamplingParams) -> Scheduler:
    """A fresh solver for ``params`` (both phases use the same kind)."""
    return make_solver(params.steps, params.order, params.clip_x0, params.solver, params.karras)


def mask_denoiser(
    dpm: UNet2DModel | Callable[..., Any],
    segmenter: NoisySegmenter | Callable[..., Any] | None,
    params: SamplingParams,
) -> Denoiser:
    """Phase 1's noise predictor: ε(x_t, y1 = mask), guided towards y1 = mask when w_cg > 0."""
    eps: Denoiser = MaskDenoiser(dpm)
    if params.w_cg > 0 and segmenter is not None:
        eps = ClassifierGuided(eps, segmenter, params.w_cg, False, params.guidance, params.strength)
    return eps


def image_denoiser(
    dpm: UNet2DModel | Callable[..., Any],
    segmenter: NoisySegmenter | Callable[..., Any] | None,
    masks: torch.Tensor,
    params: SamplingParams,
) -> Denoiser:
    """Phase 2's noise predictor for encoded ``masks``: classifier-free w_cf, then segmenter guidance
    towards y1 = image and y2 = mask when w_cg > 0."""
    eps: Denoiser = ImageDenoiser(dpm, masks, params.w_cf)
    if params.w_cg > 0 and segmenter is not None:
        mask01 = (masks > 0).to(masks.dtype)  # the foreground, or the one-hot classes of a K-class mask
        eps = ClassifierGuided(eps, segmenter, params.w_cg, True, params.guidance, params.strength, mask01)
    return eps


@torch.no_grad()
def sample_masks(
    dpm: UNet2DModel | Callable[..., Any],
    segmenter: NoisySegmenter | Callable[..., Any] | None,
    noise: torch.Tensor,
    params: SamplingParams,
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """Phase 1: encoded masks ``[B, C, R, R]`` from noise ``[B, C, R, R]``, guided towards y1 = mask:
    -1/+1 for one channel, one-hot (of the argmax) for K channels."""
    x0 = solve(
        mask_denoiser(dpm, segmenter, params), noise, params_solver(params), phase="mask", callback=callback
    )
    return binarize(x0) if x0.shape[1] == 1 else snap(x0, x0.shape[1])


@torch.no_grad()
def sample_images(
    dpm: UNet2DModel | Callable[..., Any],
    segmenter: NoisySegmenter | Callable[..., Any] | None,
    noise: torch.Tensor,
    masks: torch.Tensor,
    params: SamplingParams,
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """Phase 2: images ``[B, 1, R, R]`` in [-1, 1] for encoded ``masks``, with CFG and segmenter guidance
    (``noise`` has the DPM's C channels; the image is channel 0)."""
    eps = image_denoiser(dpm, segmenter, masks, params)
    x = solve(eps, noise, params_solver(params), phase="image", callback=callback)
    return image_part(x).clamp(-1.0, 1.0)


def binarize(x: torch.Tensor) -> torch.Tensor:
    """A sampled mask in [-1, 1] to -1/+1 (foreground where x0 > 0)."""
    return torch.where(x > 0, 1.0, -1.0).to(x.dtype)


@dataclass
class PooledImages:
    """What ``sample_images_pooled`` returns for ``P`` pairs."""

    images: torch.Tensor  # [P, 1, R, R] in [-1, 1]: final images; predicted x0 at the check for dropped pairs
    dropped: torch.Tensor  # [P] bool: dropped at the check (not run to the end)
    checked: torch.Tensor | None  # [P] the check's score (None without a check)


def _take_rows(solver: Scheduler, index: torch.Tensor) -> Scheduler:
    """A copy of ``solver`` (same step, same history) for the samples ``index`` of its batch."""
    out = copy.deepcopy(solver)
    for field in batch_state_fields(solver):
        value = getattr(out, field)
        if isinstance(value, list):
            setattr(out, field, [None if v is None else v[index] for v in value])
        elif value is not None:
            setattr(out, field, value[index])
    return out


def _stack_rows(template: Scheduler, parts: list[Scheduler]) -> Scheduler:
    """``template`` with the per-sample state of ``parts`` concatenated along the batch."""
    out = copy.deepcopy(template)
    for field in batch_state_fields(template):
        values = [getattr(p, field) for p in parts]
        if isinstance(values[0], list):
            merged = []
            for k in range(len(values[0])):
                column = [v[k] for v in values]
                merged.append(None if column[0] is None else torch.cat(column))
            setattr(out, field, merged)
        elif values[0] is not None:
            setattr(out, field, torch.cat(values))
    return out


def slot_batches(indices: list[int], batch_size: int) -> list[list[int | None]]:
    """Pair ``indices`` laid out in batches of ``batch_size`` rows: pair i always sits at row
    ``i % batch_size`` (None: a padded row). Batches follow ``i // batch_size`` in order.

    CPU kernels process a batch in blocks, so a row's rounding can depend on its position in the
    batch (not on the other rows' contents): a pair keeps one position everywhere, whatever the
    shard, worker or regrouping that runs it.
    """
    batches: dict[int, list[int | None]] = {}
    for i in indices:
        row = batches.setdefault(i // batch_size, [None] * batch_size)
        if row[i % batch_size] is not None:
            raise ValueError(f"pair index {i} given twice")
        row[i % batch_size] = i
    return [batches[k] for k in sorted(batches)]


def regroup_by_slot(indices: list[int], batch_size: int) -> list[list[int | None]]:
    """Batches for the pairs ``indices`` that go on after a check: each keeps its row ``i % batch_size``,
    and batch g takes the g-th remaining pair of every row (padded where a row has run out)."""
    queues: list[list[int]] = [[] for _ in range(batch_size)]
    for i in sorted(indices):
        queues[i % batch_size].append(i)
    depth = max((len(q) for q in queues), default=0)
    return [[q[g] if g < len(q) else None for q in queues] for g in range(depth)]


@torch.no_grad()
def sample_images_pooled(
    dpm: UNet2DModel | Callable[..., Any],
    segmenter: NoisySegmenter | Callable[..., Any] | None,
    noise: torch.Tensor,
    masks: torch.Tensor,
    params: SamplingParams,
    batch_size: int,
    *,
    indices: list[int] | None = None,
    score: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    cut: float = float("inf"),
    check_step: int | None = None,
    skip: torch.Tensor | None = None,
    callback: StepCallback | None = None,
) -> PooledImages:
    """Phase 2 for ``P`` pairs (pair indices ``indices``, default 0..P-1) in batches of exactly
    ``batch_size`` rows laid out by ``slot_batches``, dropping pairs part-way.

    Steps ``[0, check_step)`` run first. Then ``score(x0_pred, masks)`` scores each pair's predicted
    x0 (``[B]``, an estimated Dice loss) and pairs scoring above ``cut`` are dropped; the others are
    regrouped (``regroup_by_slot``) and run ``[check_step, N)``, so most of the steps of dropped pairs
    are not paid for. ``skip`` ([P] bool) drops pairs before any step (their image is zeros).

    Each row's arithmetic depends on that row alone at a fixed batch size and row position: a pair
    that goes on comes out bit for bit as it does without the check (tests check it).
    """
    p, b = noise.shape[0], batch_size
    indices = list(range(p)) if indices is None else list(indices)
    at = {index: k for k, index in enumerate(indices)}  # pair index -> position in the inputs
    steps = params.steps
    if score is None or check_step is None or not 0 < check_step < steps:
        score, check_step = None, steps
    skip = torch.zeros(p, dtype=torch.bool) if skip is None else skip.cpu()
    images = torch.zeros_like(image_part(noise))
    dropped = skip.clone()
    scores = torch.full((p,), float("nan")) if score is not None else None
    padded_noise, padded_masks = (
        torch.cat([noise, torch.zeros_like(noise[:1])]),
        torch.cat([masks, torch.zeros_like(masks[:1])]),
    )
    full = image_denoiser(dpm, segmenter, padded_masks, params)

    def rows_of(batch: list[int | None]) -> torch.Tensor:
        return torch.tensor([p if i is None else at[i] for i in batch], dtype=torch.long)  # p: the zero row

    todo = [i for i in indices if not skip[at[i]]]
    # Phase 2a: every pair not skipped, up to the check (or to the end without one).
    xs: dict[int, torch.Tensor] = {}
    states: dict[int, tuple[Scheduler, int]] = {}
    template: Scheduler | None = None
    for batch in slot_batches(todo, b):
        rows = rows_of(batch)
        solver = params_solver(params)
        x = solve(
            full.rows(rows), padded_noise[rows], solver, stop=check_step, phase="image", callback=callback
        )
        if score is None:
            for k, i in enumerate(batch):
                if i is not None:
                    images[at[i]] = x[k, :1].clamp(-1.0, 1.0)
            continue
        x0 = solver.model_outputs[-1]
        assert x0 is not None and scores is not None
        estimate = score(image_part(x0).clamp(-1.0, 1.0), padded_masks[rows]).cpu()
        template = solver
        for k, i in enumerate(batch):
            if i is None:
                continue
            scores[at[i]] = estimate[k]
            if estimate[k] <= cut:
                xs[i], states[i] = x[k : k + 1], (solver, k)
            else:
                images[at[i]], dropped[at[i]] = x0[k, :1].clamp(-1.0, 1.0), True
    if score is None or template is None:
        return PooledImages(images, dropped, scores)
    # Phase 2b: the pairs that passed, regrouped by row position, from the check to the end.
    for batch in regroup_by_slot(sorted(xs), b):
        rows = rows_of(batch)
        parts = [
            _take_rows(states[i][0], torch.tensor([states[i][1]])) if i is not None else _zero_rows(template)
            for i in batch
        ]
        solver = _stack_rows(template, parts)
        x = torch.cat([xs[i] if i is not None else torch.zeros_like(noise[:1]) for i in batch])
        x = solve(full.rows(rows), x, solver, start=check_step, phase="image", callback=callback)
        for k, i in enumerate(batch):
            if i is not None:
                images[at[i]] = x[k, :1].clamp(-1.0, 1.0)
    return PooledImages(images, dropped, scores)


def _zero_rows(template: Scheduler) -> Scheduler:
    """One padded row's solver state: zeros, like its input."""
    out = _take_rows(template, torch.zeros(1, dtype=torch.long))
    for field in batch_state_fields(template):
        value = getattr(out, field)
        if isinstance(value, list):
            setattr(out, field, [None if v is None else torch.zeros_like(v) for v in value])
        elif value is not None:
            setattr(out, field, torch.zeros_like(value))
    return out
