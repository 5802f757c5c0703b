"""The discrete VP noise schedule shared by training and sampling (pure functions)."""

from __future__ import annotations

from typing import Any, TypeAlias

import torch
from diffusers import DPMSolverMultistepScheduler, UniPCMultistepScheduler

from app.params import Solver

NUM_TRAIN_TIMESTEPS = 1000
BETA_START = 1e-4
BETA_END = 0.02


def linear_betas(
    num_timesteps: int = NUM_TRAIN_TIMESTEPS, beta_start: float = BETA_START, beta_end: float = BETA_END
) -> torch.Tensor:
    """DDPM's linear betas, float64 for exact cumulative products."""
    return torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64)


def alphas_cumprod(betas: torch.Tensor | None = None) -> torch.Tensor:
    """ᾱ_t = Π_{s≤t} (1 - β_s)."""
    b = linear_betas() if betas is None else betas
    return torch.cumprod(1.0 - b, dim=0)


def alpha_sigma(t: torch.Tensor, acp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """α_t = √ᾱ_t and σ_t = √(1 - ᾱ_t) for integer timesteps ``t``, as float32 ``[B, 1, 1, 1]``."""
    a = acp.to(t.device)[t.long()]
    return a.sqrt().float().view(-1, 1, 1, 1), (1.0 - a).sqrt().float().view(-1, 1, 1, 1)


def add_noise(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, acp: torch.Tensor) -> torch.Tensor:
    """x_t = α_t x_0 + σ_t ε (Eq. 1's forward process)."""
    alpha, sigma = alpha_sigma(t, acp)
    return alpha * x0 + sigma * noise


Scheduler: TypeAlias = DPMSolverMultistepScheduler | UniPCMultistepScheduler


def make_solver(
    steps: int,
    order: int = 2,
    clip_x0: bool = True,
    solver: Solver | str = Solver.DPMPP,
    karras: bool = False,
) -> Scheduler:
    """A fresh multistep solver on the training schedule, its timesteps already set: DPM-Solver++
    (``order`` 2 is 2M, 3 is 3M) or UniPC (bh2, predicting x0), on evenly spaced timesteps or Karras
    sigmas.

    ``clip_x0`` clips the predicted x0 to [-1, 1] at every step (diffusers' thresholding with
    ``sample_max_value=1``); without it a briefly trained model diverges into noise.
    """
    if order not in (1, 2, 3):
        raise ValueError(f"solver order must be 1, 2 or 3, got {order}")
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    common: dict[str, Any] = {
        "num_train_timesteps": NUM_TRAIN_TIMESTEPS,
        "beta_start": BETA_START,
        "beta_end": BETA_END,
        "beta_schedule": "linear",
        "solver_order": order,
        "prediction_type": "epsilon",
        "thresholding": clip_x0,
        "dynamic_thresholding_ratio": 0.995,
        "sample_max_value": 1.0,
        "lower_order_final": True,
    }
    if karras:
        common["use_karras_sigmas"] = True
    kind = Solver(solver)
    scheduler: Scheduler
    if kind is Solver.DPMPP:
        scheduler = DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", **common)
    else:
        scheduler = UniPCMultistepScheduler(predict_x0=True, solver_type="bh2", **common)
    scheduler.set_timesteps(steps)
    return scheduler


def batch_state_fields(scheduler: Scheduler) -> tuple[str, ...]:
    """The attributes of a solver that hold per-sample state (tensors ``[B, ...]`` or lists of them):
    what moves with a sample when a batch is split or regrouped part-way (see ``models.sampling``)."""
    if isinstance(scheduler, UniPCMultistepScheduler):
        return ("model_outputs", "last_sample")
    return ("model_outputs",)
