"""Job and sampling parameters: their types, ranges and defaults, and the merge of a request over a
bundle's defaults. The one home of these values for the API, the workers and the library.

Why it lives under ``app/`` and imports nothing but pydantic and the standard library: the API image
carries ``app/`` only (no ``models/``, no torch; ``docker/Dockerfile.api``), while the worker image
and the library carry all three packages. So the torch side (``models.sampling.SamplingParams``,
``models.filtering``, ``models.expand``, ``worker.shard``) imports from here, never the reverse, and
importing this module never pulls in torch, FastAPI or anything of ``models`` (a test checks).

The ranges are where the method is meaningful, not merely where the arithmetic runs: below τ = 0.05
(or above s = 20) the guidance gradient overflows to NaN and every pair comes out black; past
w_cg = 50 or w_cf = 20 the guided noise prediction leaves the range the networks were trained on.
"""

from __future__ import annotations

import operator
import re
import secrets
from collections.abc import Mapping
from enum import StrEnum
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field

TAU_MIN, TAU_MAX = 0.05, 20.0
SCALE_MIN, SCALE_MAX = 0.05, 20.0
W_CF_MAX = 20.0
W_CG_MAX = 50.0
MAX_SOLVER_STEPS = 1000  # the training schedule's timesteps: a solver cannot take more steps
MAX_SEED = 2**63 - 1  # what a job record holds (pair seeds hash it, any size works)
# What a request may ask for: JSON numbers past 2^53 are not exact in most clients (JavaScript, and
# JSON Schema validators, compare them as doubles: 2^63 - 1 + 192 would pass a maximum of 2^63 - 1).
MAX_REQUEST_SEED = 2**53 - 1
SEED_BITS = 32  # seeds drawn when a request gives none
DEFAULT_ETA = 0.065  # the paper's Stage IV threshold
DEFAULT_MAX_ATTEMPTS_FACTOR = 20  # max_attempts defaults to this x count
MAX_SIDE = 4096  # the largest output side a size may ask for (an output PNG, not a training resolution)
# What parse_size accepts, as one regular expression for the OpenAPI schema: 1..4096, no leading zero,
# an ASCII lowercase "x" between (a test checks the two agree).
_SIDE = "(?:[1-9][0-9]{0,2}|[1-3][0-9]{3}|40[0-8][0-9]|409[0-6])"
SIZE_PATTERN = f"^{_SIDE}x{_SIDE}$"
_SIZE = re.compile(r"([0-9]+)x([0-9]+)", re.ASCII)


class Solver(StrEnum):
    """The multistep solver of both phases (diffusers' schedulers): DPM-Solver++ or UniPC (``order`` is
    either one's order: DPM-Solver++ 2M/3M, UniPC-2/3)."""

    DPMPP = "dpmpp"
    UNIPC = "unipc"


class GuidanceMode(StrEnum):
    """``tau`` divides the classifier's logits by τ (the paper); ``scale`` multiplies log p by s."""

    TAU = "tau"
    SCALE = "scale"


def _integral(value: Any) -> Any:
    """JSON Schema counts 2.0 as an integer: take it as 2, and numpy integers as ints (library callers);
    a strict int then refuses bools, strings and other floats."""
    if isinstance(value, float):
        return int(value) if value.is_integer() else value
    if isinstance(value, bool | str | int):
        return value
    try:
        return operator.index(value)  # numpy.int64 and friends
    except TypeError:
        return value


# Numbers are numbers: true, false and "3" are refused (pydantic's lax mode would take them), and 2.0 is
# taken as 2 (JSON Schema counts it as an integer). The integral check runs before the strict int one.
_INTEGRAL = BeforeValidator(_integral)
Float = Annotated[float, Field(strict=True, allow_inf_nan=False)]

Steps = Annotated[
    int,
    Field(strict=True, ge=1, le=MAX_SOLVER_STEPS, description="DPM-Solver++ steps per phase, 1 to 1000"),
    _INTEGRAL,
]
Order = Annotated[
    int,
    Field(strict=True, ge=1, le=3, description="solver order, 1 to 3 (2 suits guided sampling)"),
    _INTEGRAL,
]
Count = Annotated[int, Field(strict=True, ge=1, description="pairs to keep (Stage IV)"), _INTEGRAL]
MaxAttempts = Annotated[int, Field(strict=True, ge=1, description="most pairs generated"), _INTEGRAL]
WCf = Annotated[
    Float,
    Field(
        ge=0.0,
        le=W_CF_MAX,
        description="classifier-free guidance weight w_cf, 0 to 20 (1 = conditional model only)",
    ),
]
WCg = Annotated[
    Float,
    Field(
        ge=0.0,
        le=W_CG_MAX,
        description="classifier guidance weight w_cg, 0 to 50 (0 = no segmenter guidance)",
    ),
]
Tau = Annotated[
    Float,
    Field(
        ge=TAU_MIN,
        le=TAU_MAX,
        description="guidance temperature τ, 0.05 to 20 (mode tau; mode scale uses s = 1/τ unless scale is set)",
    ),
]
Scale = Annotated[
    Float,
    Field(
        ge=SCALE_MIN,
        le=SCALE_MAX,
        description="guidance scale s, 0.05 to 20 (mode scale)",
    ),
]
Eta = Annotated[
    Float,
    Field(
        gt=0.0,
        le=1.0,
        description="Stage IV threshold η: a pair is kept when its Dice loss is at most η, 0 < η ≤ 1",
    ),
]
Seed = Annotated[
    int,
    Field(
        strict=True,
        ge=0,
        le=MAX_REQUEST_SEED,
        description="request seed, 0 to 2^53-1 (exact in every JSON client); pair i draws from (seed, i)",
    ),
    _INTEGRAL,
]
RecordSeed = Annotated[int, Field(strict=True, ge=0, le=MAX_SEED, description="the seed the job runs with")]


def parse_size(text: str) -> tuple[int, int]:
    """``"256x192"`` as ``(width, height)``: two whole numbers from 1 to MAX_SIDE joined by an ASCII
    lowercase ``x`` (not ``×``, ``X`` or spaces). Raises ValueError naming the value."""
    m = _SIZE.fullmatch(text) if isinstance(text, str) else None
    if m is None:
        raise ValueError(f"size {text!r} is not WIDTHxHEIGHT (e.g. 256x192, with an ASCII lowercase x)")
    for side in m.groups():
        if side.startswith("0"):
            raise ValueError(f"size {text!r}: sides must be whole numbers from 1 to {MAX_SIDE}, no leading 0")
        if int(side) > MAX_SIDE:
            raise ValueError(f"size {text!r}: sides must be at most {MAX_SIDE} pixels")
    return int(m.group(1)), int(m.group(2))


def _valid_size(text: str) -> str:
    parse_size(text)
    return text


# An output shape: the square sample is centre-cropped to W:H and resized (models.shape.restore_shape).
Size = Annotated[
    str,
    AfterValidator(_valid_size),
    Field(
        description=f"output WIDTHxHEIGHT, e.g. 256x192 (ASCII x, sides 1 to {MAX_SIDE}): each pair is "
        "centre-cropped to that aspect and resized (masks nearest); null: the square R x R output",
        json_schema_extra={"pattern": SIZE_PATTERN},
    ),
]


class SamplingSettings(BaseModel):
    """Stage III settings of a job or of a bundle's defaults (``models.sampling.SamplingParams`` on the
    torch side is validated by this model). Keys it does not know are ignored."""

    model_config = ConfigDict(extra="ignore", frozen=True, allow_inf_nan=False)

    steps: Steps = 20
    order: Order = 2
    w_cf: WCf = 3.0
    w_cg: WCg = 1.0
    guidance: GuidanceMode = GuidanceMode.TAU
    tau: Tau = 1.0
    scale: Scale | None = Field(default=None, description="guidance scale s, 0.05 to 20; null: s = 1/τ")
    clip_x0: bool = Field(default=True, description="clip the predicted x0 to [-1, 1] at every step")
    solver: Solver = Field(
        default=Solver.DPMPP, description="multistep solver: dpmpp (DPM-Solver++) or unipc"
    )
    karras: bool = Field(default=False, description="Karras sigmas instead of evenly spaced timesteps")
    early_reject: bool = Field(
        default=True,
        description="drop pairs whose image, predicted part-way, will fail Stage IV (the bundle's "
        "calibrated rule; only at the settings it was calibrated for)",
    )


class MaskSource(StrEnum):
    """Where a pair's mask comes from (``models.mask_source``): Stage III's mask phase, a real training
    mask deformed by a seeded random transform, or a per-pair mix of the two."""

    GENERATED = "generated"
    REAL = "real"
    MIXED = "mixed"


# The share of Stage I batch rows drawn from a dataset's unlabelled images, when it has them
# (models.training.train_dpm; docs/results.md, "unlabelled share", gives the measurement behind it).
DEFAULT_UNLABELLED_SHARE = 0.5
DEFAULT_REAL_SHARE = 0.5
# The bundle file holding the training masks Stage I saw (models.mask_source): what real/mixed mask
# sources and the clean-up need. The registry and the API tell from it whether a model has them.
TRAINING_MASKS_FILE = "masks.npz"
RealShare = Annotated[
    Float,
    Field(ge=0.0, le=1.0, description="with mask_source mixed: the share of pairs on real masks, 0 to 1"),
]


class MaskSettings(BaseModel):
    """Where masks come from and whether generated ones are cleaned (``models.mask_cleanup``)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    source: MaskSource = Field(
        default=MaskSource.GENERATED,
        description="generated (the paper's mask phase), real (a deformed training mask) or mixed",
    )
    real_share: RealShare = DEFAULT_REAL_SHARE
    clean: bool = Field(
        default=False,
        description="drop specks far smaller than the training masks' components and fill holes in "
        "generated masks, before the image phase",
    )

    @property
    def needs_training_masks(self) -> bool:
        return self.source != MaskSource.GENERATED or self.clean


class JobParams(BaseModel):
    """The values a job runs with: the request merged over the bundle's defaults (``merge_job_params``)."""

    model_config = ConfigDict(allow_inf_nan=False)

    model: str
    # The registry version the job runs with (app.registry): the latest when the request named none.
    # None in jobs created before the registry (workers then take the latest).
    model_version: str | None = None
    count: Count
    seed: RecordSeed
    eta: Eta
    max_attempts: MaxAttempts
    sampling: SamplingSettings
    batch_size: int = Field(ge=1)
    shard_size: int = Field(ge=1)
    size: Size | None = None  # output shape; None (and in jobs created before it): the square output
    # where masks come from; jobs created before it: generated, not cleaned
    masks: MaskSettings = Field(default_factory=MaskSettings)


def draw_seed() -> int:
    """The seed of a request that gives none (recorded in the job, so the job stays reproducible)."""
    return secrets.randbits(SEED_BITS)


def default_max_attempts(count: int, factor: int = DEFAULT_MAX_ATTEMPTS_FACTOR) -> int:
    return factor * count


def merge_sampling(defaults: Mapping[str, Any], **overrides: Any) -> SamplingSettings:
    """The bundle's ``sampling_defaults`` with the overrides that are not None.

    A new τ without a new scale drops the default scale, so that s = 1/τ follows the new τ.
    Raises ``pydantic.ValidationError`` when the result is out of range.
    """
    merged = dict(defaults)
    given = {k: v for k, v in overrides.items() if v is not None}
    merged.update(given)
    if "tau" in given and "scale" not in given:
        merged["scale"] = None
    return SamplingSettings.model_validate(merged)


def merge_job_params(
    *,
    model: str,
    count: int,
    model_version: str | None = None,
    sampling_defaults: Mapping[str, Any],
    eta_default: float | None,
    batch_size: int,
    shard_size: int,
    max_attempts_factor: int = DEFAULT_MAX_ATTEMPTS_FACTOR,
    seed: int | None = None,
    eta: float | None = None,
    max_attempts: int | None = None,
    size: str | None = None,
    masks: MaskSettings | None = None,
    **sampling_overrides: Any,
) -> JobParams:
    """A request's values over a bundle's defaults: what a job runs with (its seed drawn if not given)."""
    return JobParams(
        model=model,
        model_version=model_version,
        count=count,
        seed=draw_seed() if seed is None else seed,
        eta=eta if eta is not None else (eta_default if eta_default is not None else DEFAULT_ETA),
        max_attempts=max_attempts or default_max_attempts(count, max_attempts_factor),
        sampling=merge_sampling(sampling_defaults, **sampling_overrides),
        batch_size=batch_size,
        shard_size=shard_size,
        size=size,
        masks=masks or MaskSettings(),
    )
