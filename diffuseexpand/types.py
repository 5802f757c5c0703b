"""What the service answers, as dataclasses. Parsed leniently: fields this client does not know
are kept in ``raw`` and ignored, so an older client keeps working against a newer service."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

TERMINAL = frozenset({"succeeded", "failed", "canceled"})


def _time(value: Any) -> datetime | None:
    return datetime.fromisoformat(value) if isinstance(value, str) else None


def _float(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) else None


@dataclass(frozen=True)
class Progress:
    """Pair counts of a job: ``generated`` counts every pair any shard made, ``kept`` those Stage IV
    kept (which may pass ``target``: the result takes ``target`` of them)."""

    target: int
    generated: int = 0
    kept: int = 0
    discarded: int = 0
    pairs_per_second: float | None = None
    eta_seconds: float | None = None
    phase: str | None = None

    @property
    def kept_capped(self) -> int:
        """``kept`` up to ``target``: shards running alongside may keep more than the result takes."""
        return min(self.kept, self.target)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Progress:
        return cls(
            target=int(data.get("target", 0)),
            generated=int(data.get("generated", 0)),
            kept=int(data.get("kept", 0)),
            discarded=int(data.get("discarded", 0)),
            pairs_per_second=_float(data.get("pairs_per_second")),
            eta_seconds=_float(data.get("eta_seconds")),
            phase=data.get("phase"),
        )


@dataclass(frozen=True)
class Job:
    """A job as ``GET /v1/jobs/{id}`` answers it; ``params`` are the values it runs with."""

    id: str
    status: str
    progress: Progress
    params: dict[str, Any]
    input: dict[str, Any]
    owner: str | None = None
    error: str | None = None
    created_at: datetime | None = None
    started_at: datetime | None = None
    completed_at: datetime | None = None
    webhook: dict[str, Any] | None = None  # url, status, attempts (never the secret)
    callback_secret: str | None = field(default=None, repr=False)  # only in submit's answer
    links: dict[str, str] = field(default_factory=dict)
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def done(self) -> bool:
        """True once the job is succeeded, failed or canceled."""
        return self.status in TERMINAL

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Job:
        return cls(
            id=str(data["id"]),
            status=str(data["status"]),
            progress=Progress.from_json(data.get("progress") or {}),
            params=dict(data.get("params") or {}),
            input=dict(data.get("input") or {}),
            owner=data.get("owner"),
            error=data.get("error"),
            created_at=_time(data.get("created_at")),
            started_at=_time(data.get("started_at")),
            completed_at=_time(data.get("completed_at")),
            webhook=data.get("webhook"),
            callback_secret=data.get("callback_secret"),
            links=dict(data.get("links") or {}),
            raw=data,
        )


@dataclass(frozen=True)
class Model:
    """A bundle the service can sample from (``GET /v1/models``)."""

    name: str
    resolution: int
    sampling_defaults: dict[str, Any]
    eta_default: float | None
    default: bool = False
    metrics: dict[str, Any] = field(default_factory=dict)
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)
    num_classes: int = 2  # mask classes K (background included); 2: binary masks 0/255
    training_masks: bool = False  # it carries its training masks: mask_source real/mixed, clean_masks

    @classmethod
    def from_json(cls, data: dict[str, Any], default_name: str | None = None) -> Model:
        return cls(
            name=str(data["name"]),
            resolution=int(data.get("resolution", 0)),
            num_classes=int(data.get("num_classes") or 2),
            training_masks=bool(data.get("training_masks", False)),
            sampling_defaults=dict(data.get("sampling_defaults") or {}),
            eta_default=_float(data.get("eta_default")),
            default=data.get("name") == default_name,
            metrics=dict(data.get("metrics") or {}),
            raw=data,
        )


@dataclass(frozen=True)
class Pair:
    """One kept pair of a job (``GET /v1/jobs/{id}/pairs``); ``links`` name its image, mask and preview."""

    name: str
    index: int
    seed: int | None
    dice_loss: float | None
    links: dict[str, str] = field(default_factory=dict)
    # Stage IV's Dice loss per foreground class 1..K-1 of a K-class model (K > 2); None when binary
    class_dice_losses: list[float] | None = None
    # where its mask came from: "generated" or "real:NAME" (training pair NAME's mask, deformed)
    mask_source: str = "generated"
    cleaned: bool = False  # whether its generated mask was cleaned (clean_masks)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Pair:
        seed = data.get("seed")
        per_class = data.get("class_dice_losses")
        return cls(
            name=str(data["name"]),
            index=int(data.get("index", 0)),
            seed=int(seed) if seed is not None else None,
            dice_loss=_float(data.get("dice_loss")),
            links=dict(data.get("links") or {}),
            class_dice_losses=[float(v) for v in per_class] if isinstance(per_class, list) else None,
            mask_source=str(data.get("mask_source") or "generated"),
            cleaned=bool(data.get("cleaned", False)),
        )


@dataclass(frozen=True)
class PairsPage:
    """One page of kept pairs; ``final`` when they are the job's result, not pairs stored so far."""

    data: list[Pair]
    count: int
    offset: int
    limit: int
    final: bool

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> PairsPage:
        return cls(
            data=[Pair.from_json(p) for p in data.get("data") or []],
            count=int(data.get("count", 0)),
            offset=int(data.get("offset", 0)),
            limit=int(data.get("limit", 0)),
            final=bool(data.get("final", False)),
        )
