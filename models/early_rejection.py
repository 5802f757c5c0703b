"""Early rejection: stop paying for pairs that Stage IV will discard.

The image phase predicts x0 at every step. At one step ``k`` (a fraction ``at`` of the image steps),
the Stage IV filter scores the predicted x0 against the pair's mask; a pair whose estimated Dice
loss is above ``cut`` is dropped and its remaining steps are not run. The cut is calibrated per
bundle on a run at the bundle's default settings (``calibrate``), so that at most a chosen share
(2 %) of the pairs the final filter would keep are dropped; the rule is applied only to jobs that
sample with those settings, where that false-rejection rate was measured.

A rule is a pure decision per pair on that pair's own predicted x0: which pairs it drops does not
depend on how pairs are grouped into batches, shards or workers, and a pair it does not drop comes
out bit for bit as without it (``models.sampling.sample_images_pooled``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from models.filtering import score_pairs
from models.sampling import SamplingParams

# The settings a rule is tied to: sampling with any other value of these is not what was calibrated.
CALIBRATED_FIELDS = (
    "steps",
    "order",
    "solver",
    "karras",
    "w_cf",
    "w_cg",
    "guidance",
    "tau",
    "scale",
    "clip_x0",
)
DEFAULT_FRACTIONS = (0.25, 0.4, 0.5, 0.6, 0.75)
MAX_FALSE_REJECTION = 0.02


@dataclass(frozen=True)
class EarlyRule:
    """Drop a pair at image step ``check_step(steps)`` when the filter's Dice loss on its predicted x0 is above ``cut``."""

    at: float  # fraction of the image phase's steps
    cut: float
    sampling: dict[str, Any]  # the settings it was calibrated at (``SamplingParams.to_dict()``)
    eta: float
    calibration: dict[str, Any] = field(default_factory=dict)  # what the calibrating run measured

    def check_step(self, steps: int) -> int:
        """The step (1 .. steps-1) after which pairs are scored."""
        return step_at(self.at, steps)

    def applies_to(self, params: SamplingParams, eta: float) -> bool:
        """Only at the calibrated settings and η: elsewhere its false-rejection rate is unknown."""
        if not params.early_reject or params.steps < 2 or not math.isclose(eta, self.eta):
            return False
        mine = params.to_dict()
        return all(_same(mine.get(k), self.sampling.get(k)) for k in CALIBRATED_FIELDS)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EarlyRule:
        return cls(
            at=float(d["at"]),
            cut=float(d["cut"]),
            sampling=dict(d["sampling"]),
            eta=float(d["eta"]),
            calibration=dict(d.get("calibration", {})),
        )


def step_at(at: float, steps: int) -> int:
    """The image step (1 .. steps-1) a fraction ``at`` of ``steps`` falls on: where a check scores pairs."""
    return min(max(1, round(at * steps)), steps - 1)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return a is not None and b is not None and math.isclose(float(a), float(b))
    return bool(a == b)


def filter_score(filter_net: torch.nn.Module) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The estimate: Stage IV's own Dice loss, on the predicted x0 instead of the final image."""
    return lambda x0, masks: score_pairs(filter_net, x0, masks)


def choose_cut(estimates: list[float], finally_kept: list[bool], max_false_rejection: float) -> float:
    """The lowest cut that drops at most ``floor(max_false_rejection x kept)`` of the finally kept pairs.

    Pairs are dropped when their estimate is strictly above the cut, so the cut is one of the kept
    pairs' estimates: with none allowed, the highest one (only pairs scored above every kept pair go).
    """
    kept = sorted((e for e, k in zip(estimates, finally_kept, strict=True) if k), reverse=True)
    if not kept:
        return 1.0
    allowed = math.floor(max_false_rejection * len(kept))
    return kept[allowed] if allowed < len(kept) else kept[-1]


def evaluate_cut(estimates: list[float], finally_kept: list[bool], cut: float) -> dict[str, float]:
    """False rejections (finally kept, dropped) over the kept pairs, and the share of all pairs dropped."""
    kept = sum(finally_kept)
    false = sum(1 for e, k in zip(estimates, finally_kept, strict=True) if k and e > cut)
    dropped = sum(1 for e in estimates if e > cut)
    return {
        "false_rejection": false / kept if kept else 0.0,
        "dropped": dropped / len(estimates) if estimates else 0.0,
        "false_rejections": false,
        "kept": kept,
    }


def image_steps_saved(dropped: float, at: float) -> float:
    """Share of image-phase network calls a rule saves: its dropped pairs skip ``1 - at`` of them."""
    return dropped * (1.0 - at)


@dataclass
class Calibration:
    """Per-pair estimates at each candidate fraction, and what Stage IV finally decided."""

    estimates: dict[float, list[float]]
    finally_kept: list[bool]
    seconds: float

    def candidates(self, max_false_rejection: float) -> list[dict[str, float]]:
        rows = []
        for at, est in sorted(self.estimates.items()):
            cut = choose_cut(est, self.finally_kept, max_false_rejection)
            stats = evaluate_cut(est, self.finally_kept, cut)
            rows.append({"at": at, "cut": cut, **stats, "saved": image_steps_saved(stats["dropped"], at)})
        return rows


@torch.no_grad()
def measure(
    bundle: Any,
    indices: range,
    *,
    seed: int,
    params: SamplingParams,
    eta: float,
    batch_size: int,
    fractions: tuple[float, ...] = DEFAULT_FRACTIONS,
) -> Calibration:
    """Sample ``indices`` in full at ``params`` and score every pair's predicted x0 at each fraction."""
    import time

    from models.expand import batch_noise
    from models.filtering import empty_masks, keep
    from models.networks import image_part
    from models.sampling import image_denoiser, params_solver, sample_masks, slot_batches, solve

    t0 = time.perf_counter()
    steps_at = {at: step_at(at, params.steps) for at in fractions}
    estimates: dict[float, list[float]] = {at: [] for at in fractions}
    finally_kept: list[bool] = []
    score = filter_score(bundle.filter)
    for batch in slot_batches(list(indices), batch_size):
        real = [k for k, i in enumerate(batch) if i is not None]
        noise_m, noise_i = batch_noise(seed, batch, bundle.resolution, batch_size, bundle.mask_channels)
        masks = sample_masks(bundle.dpm, bundle.segmenter, noise_m.to(bundle.device), params)
        solver = params_solver(params)
        eps = image_denoiser(bundle.dpm, bundle.segmenter, masks, params)
        x, done = noise_i.to(bundle.device), 0
        for at, k in sorted(steps_at.items(), key=lambda kv: kv[1]):
            if k > done:
                x, done = solve(eps, x, solver, start=done, stop=k, phase="image"), k
            x0 = solver.model_outputs[-1]
            assert x0 is not None
            estimates[at].extend(score(image_part(x0).clamp(-1.0, 1.0), masks)[real].tolist())
        x = image_part(solve(eps, x, solver, start=done, phase="image")).clamp(-1.0, 1.0)
        losses = score_pairs(bundle.filter, x, masks).cpu()
        kept = keep(losses, eta, empty=empty_masks(masks).cpu(), allow_empty=bundle.allows_empty_masks)
        finally_kept.extend(bool(k) for k in kept[real])
    return Calibration(estimates, finally_kept, time.perf_counter() - t0)


def calibrate(
    bundle: Any,
    *,
    pairs: int = 128,
    seed: int = 1_000_003,
    params: SamplingParams | None = None,
    eta: float | None = None,
    batch_size: int = 8,
    max_false_rejection: float = MAX_FALSE_REJECTION,
    fractions: tuple[float, ...] = DEFAULT_FRACTIONS,
) -> tuple[EarlyRule | None, Calibration]:
    """The rule that saves the most image steps with at most ``max_false_rejection`` false rejections
    on ``pairs`` pairs of ``seed`` (None when no fraction drops anything)."""
    params = (params or bundle.default_params()).updated(early_reject=True)
    eta = bundle.default_eta if eta is None else eta
    cal = measure(
        bundle, range(pairs), seed=seed, params=params, eta=eta, batch_size=batch_size, fractions=fractions
    )
    rows = cal.candidates(max_false_rejection)
    best = max(rows, key=lambda r: r["saved"])
    if best["saved"] <= 0:
        return None, cal
    rule = EarlyRule(
        at=best["at"],
        cut=best["cut"],
        sampling=params.to_dict(),
        eta=eta,
        calibration={
            "pairs": pairs,
            "seed": seed,
            "batch_size": batch_size,
            "max_false_rejection": max_false_rejection,
            "false_rejection": best["false_rejection"],
            "dropped": best["dropped"],
            "image_steps_saved": best["saved"],
            "yield": sum(cal.finally_kept) / max(1, len(cal.finally_kept)),
            "candidates": rows,
        },
    )
    return rule, cal
