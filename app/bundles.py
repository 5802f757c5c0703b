"""Bundles as the API sees them: folders holding a ``bundle.json``, read as plain JSON (no torch here),
and the merge of a request over a bundle's defaults into the parameters a job runs with."""

from __future__ import annotations

import json
import secrets
from pathlib import Path
from typing import Any

from fastapi.exceptions import RequestValidationError

from app.core.config import Settings
from app.schemas import JobCreate, JobParams, ModelPublic

META_FILE = "bundle.json"


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
        if isinstance(meta, dict) and "resolution" in meta:
            out[meta_file.parent.name] = meta
    return out


def model_public(name: str, meta: dict[str, Any]) -> ModelPublic:
    data = {k: v for k, v in meta.get("data", {}).items() if k != "folder"}
    return ModelPublic(
        name=name,
        resolution=int(meta["resolution"]),
        sampling_defaults=meta.get("sampling_defaults", {}),
        eta_default=float(meta.get("eta_default", 0.065)),
        metrics=meta.get("metrics", {}),
        training=meta.get("training", {}),
        data=data,
    )


def _error(field: str, msg: str, value: Any, kind: str = "value_error", **ctx: Any) -> dict[str, Any]:
    return {"type": kind, "loc": ("body", field), "msg": msg, "input": value, "ctx": ctx}


def resolve_params(body: JobCreate, settings: Settings) -> JobParams:
    """Check the bounds that depend on settings and on the bundle, then merge over the bundle's defaults.

    Raises ``RequestValidationError`` (422) naming the field and the bound.
    """
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
    bundles = list_bundles(settings)
    name = body.model or settings.default_model
    if name not in bundles:
        known = ", ".join(sorted(bundles)) or "none"
        errors.append(_error("model", f"Unknown model {name!r}; available: {known}", name))
    if errors:
        raise RequestValidationError(errors)

    meta = bundles[name]
    sampling = dict(meta.get("sampling_defaults", {}))
    overrides = {
        "tau": body.tau,
        "steps": body.steps,
        "w_cf": body.w_cf,
        "w_cg": body.w_cg,
        "guidance": body.guidance,
    }
    sampling.update({k: v for k, v in overrides.items() if v is not None})
    if sampling.get("guidance") == "tau" and body.tau is not None:
        sampling["scale"] = None  # a scale saved with the defaults would not follow the new τ
    return JobParams(
        model=name,
        count=body.count,
        seed=body.seed if body.seed is not None else secrets.randbits(32),
        eta=body.eta if body.eta is not None else float(meta.get("eta_default", 0.065)),
        max_attempts=body.max_attempts or min(settings.max_attempts_factor * body.count, max_attempts_limit),
        sampling=sampling,
        batch_size=settings.batch_size,
        shard_size=settings.shard_size,
    )
