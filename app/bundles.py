"""Bundles as the API sees them: folders holding a ``bundle.json``, read as plain JSON (no torch here),
and the merge of a request over a bundle's defaults into the parameters a job runs with."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi.exceptions import RequestValidationError
from pydantic import TypeAdapter, ValidationError

from app.core.config import Settings
from app.params import (
    DEFAULT_ETA,
    DEFAULT_REAL_SHARE,
    TRAINING_MASKS_FILE,
    Eta,
    MaskSettings,
    MaskSource,
    SamplingSettings,
    merge_job_params,
)
from app.schemas import JobCreate, JobParams, ModelPublic

if TYPE_CHECKING:
    from app.registry import Registry

META_FILE = "bundle.json"
log = logging.getLogger(__name__)
_ETA = TypeAdapter(Eta)


def usable_meta(meta_file: Path, meta: Any) -> bool:
    """A bundle.json the API can serve: a resolution, and defaults within the parameter ranges."""
    if not isinstance(meta, dict) or "resolution" not in meta:
        return False
    try:
        SamplingSettings.model_validate(meta.get("sampling_defaults", {}))
        _ETA.validate_python(meta.get("eta_default", DEFAULT_ETA))
    except ValidationError as exc:
        log.warning("%s: defaults out of range, bundle skipped: %s", meta_file, exc)
        return False
    return True


_parsed: dict[Path, tuple[int, Any]] = {}  # bundle.json -> (mtime, parsed): read once per change


def _read_meta(meta_file: Path) -> Any:
    mtime = meta_file.stat().st_mtime_ns
    cached = _parsed.get(meta_file)
    if cached is None or cached[0] != mtime:
        cached = (mtime, json.loads(meta_file.read_text()))
        _parsed[meta_file] = cached
    return cached[1]


def list_bundles(settings: Settings) -> dict[str, dict[str, Any]]:
    """``name -> bundle.json`` of every loadable bundle under ``settings.bundles_dir`` (a bundle added,
    changed or removed shows at the next call; unchanged files are not parsed again)."""
    root = Path(settings.bundles_dir)
    out: dict[str, dict[str, Any]] = {}
    if not root.is_dir():
        return out
    for meta_file in sorted(root.glob(f"*/{META_FILE}")):
        try:
            meta = _read_meta(meta_file)
        except (OSError, ValueError):
            continue
        if usable_meta(meta_file, meta):
            out[meta_file.parent.name] = meta
    return out


def model_public(rec: dict[str, Any]) -> ModelPublic:
    """A registry record (``app.registry``: a published version or a local folder) as the API shows it."""
    from app.registry import metrics_of

    meta = rec.get("meta", {})
    data = {k: v for k, v in meta.get("data", {}).items() if k != "folder"}
    extra = {k: v for k, v in (rec.get("extra") or {}).items() if k != "metrics"}
    return ModelPublic(
        name=rec["name"],
        resolution=int(meta["resolution"]),
        num_classes=int(meta.get("num_classes", 2)),  # absent in binary (and older) bundles
        sampling_defaults=SamplingSettings.model_validate(meta.get("sampling_defaults", {})),
        eta_default=float(meta.get("eta_default", DEFAULT_ETA)),
        metrics=metrics_of(rec),
        training=meta.get("training", {}),
        data=data,
        version=str(rec["version"]),
        versions=[str(v) for v in rec.get("versions", [rec["version"]])],
        digest=rec.get("digest"),
        owner=str(rec.get("owner", "admin")),
        created_at=rec.get("created_at"),
        source=rec.get("source", "registry"),
        extra=extra,
        links=links_of(rec),
        training_masks=has_training_masks(rec),
    )


def links_of(rec: dict[str, Any]) -> dict[str, str]:
    """What a model version links to: its sample grid when a training drew one."""
    from app.registry import GRID_FILE

    if (
        rec.get("source", "registry") == "registry"
        and (rec.get("extra") or {}).get("sample_grid") == GRID_FILE
    ):
        return {"sample_grid": f"/v1/models/{rec['name']}/{rec['version']}/{GRID_FILE}"}
    return {}


def has_training_masks(rec: dict[str, Any]) -> bool:
    """Whether a registry record's bundle carries its training masks (``masks.npz``): a published
    version's file list says it, a local folder's record carries ``training_masks``."""
    if "training_masks" in rec:
        return bool(rec["training_masks"])
    return any(f.get("path") == TRAINING_MASKS_FILE for f in rec.get("files") or [])


def _mask_settings(body: JobCreate, rec: dict[str, Any] | None, errors: list[dict[str, Any]]) -> MaskSettings:
    """The job's mask settings; appends a 422 error naming the field when they do not fit the model."""
    source = body.mask_source or MaskSource.GENERATED
    if body.real_share is not None and source != MaskSource.MIXED:
        errors.append(_error("real_share", "real_share applies to mask_source mixed only", body.real_share))
    settings = MaskSettings(
        source=source,
        real_share=DEFAULT_REAL_SHARE if body.real_share is None else body.real_share,
        clean=bool(body.clean_masks),
    )
    if rec is not None and settings.needs_training_masks and not has_training_masks(rec):
        field = "mask_source" if source != MaskSource.GENERATED else "clean_masks"
        value = source.value if field == "mask_source" else True
        errors.append(
            _error(
                field,
                f"model {rec['name']}@{rec['version']} carries no training masks (masks.npz), which "
                f"mask_source real/mixed and clean_masks need; retrain its Stage I to add them",
                value,
            )
        )
    return settings


def _error(field: str, msg: str, value: Any, kind: str = "value_error", **ctx: Any) -> dict[str, Any]:
    return {"type": kind, "loc": ("body", field), "msg": msg, "input": value, "ctx": ctx}


def shard_size_for(count: int, settings: Settings) -> int:
    """``DIFFEXP_SHARD_SIZE``, or less for a job smaller than a shard: ``count`` rounded up to whole
    batches, so a job of 1 pair does not sample a shard of 16. Always a multiple of the batch size:
    pair i comes out bit for bit the same for one batch size, whatever the shard that samples it."""
    return min(settings.shard_size, math.ceil(count / settings.batch_size) * settings.batch_size)


def resolve_params(
    body: JobCreate, settings: Settings, registry: Registry | None = None, viewer: str | None = None
) -> JobParams:
    """Check the bounds that depend on settings and on the bundle, then merge over the bundle's defaults.

    ``body.model`` is ``NAME`` (the latest version, recorded in ``model_version``) or ``NAME@VERSION``,
    among the models ``viewer`` may see (None: every model). Raises ``RequestValidationError`` (422)
    naming the field and the bound.
    """
    from app.registry import ModelNotFound
    from app.registry import Registry as _Registry

    errors: list[dict[str, Any]] = []
    if body.count > settings.max_count:
        errors.append(
            _error(
                "count",
                f"Input should be less than or equal to {settings.max_count}",
                body.count,
                "less_than_equal",
                le=settings.max_count,
            )
        )
    if body.steps is not None and body.steps > settings.max_steps:
        errors.append(
            _error(
                "steps",
                f"Input should be less than or equal to {settings.max_steps}",
                body.steps,
                "less_than_equal",
                le=settings.max_steps,
            )
        )
    max_attempts_limit = settings.max_attempts_factor * settings.max_count
    if body.max_attempts is not None and not body.count <= body.max_attempts <= max_attempts_limit:
        errors.append(
            _error(
                "max_attempts",
                f"Input should be between count ({body.count}) and {max_attempts_limit}",
                body.max_attempts,
                ge=body.count,
                le=max_attempts_limit,
            )
        )
    registry = registry or _Registry.from_settings(settings)
    ref = body.model or settings.default_model
    rec: dict[str, Any] | None
    try:
        name, version, rec = registry.resolve(ref, viewer)
    except ModelNotFound:
        known = ", ".join(m["name"] for m in registry.list_models(viewer)) or "none"
        errors.append(_error("model", f"Unknown model {ref!r}; available: {known}", ref))
        rec = None
    masks = _mask_settings(body, rec, errors)
    if errors:
        raise RequestValidationError(errors)
    assert rec is not None  # no model: an error above

    meta = rec["meta"]
    return merge_job_params(
        model=name,
        model_version=version,
        count=body.count,
        sampling_defaults=meta.get("sampling_defaults", {}),
        eta_default=meta.get("eta_default"),
        batch_size=settings.batch_size,
        shard_size=shard_size_for(body.count, settings),
        max_attempts_factor=settings.max_attempts_factor,
        seed=body.seed,
        eta=body.eta,
        max_attempts=body.max_attempts,
        tau=body.tau,
        steps=body.steps,
        w_cf=body.w_cf,
        w_cg=body.w_cg,
        guidance=body.guidance,
        solver=body.solver,
        karras=body.karras,
        early_reject=body.early_reject,
        size=body.size,
        masks=masks,
    )
