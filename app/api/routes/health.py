from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from app.api.deps import SettingsDep, StoreDep
from app.schemas import Check, Readiness

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz() -> dict[str, str]:
    """The process is alive."""
    return {"status": "ok"}


@router.get(
    "/readyz",
    response_model=Readiness,
    responses={503: {"model": Readiness, "description": "Redis, storage or every worker unreachable"}},
)
def readyz(request: Request, store: StoreDep, settings: SettingsDep) -> JSONResponse:
    """Redis, storage and at least one worker are reachable (503 otherwise)."""
    checks: dict[str, Check] = {}
    try:
        store.r.ping()
        checks["redis"] = Check(ok=True)
    except Exception as exc:
        checks["redis"] = Check(ok=False, detail=repr(exc))
    try:
        store.storage.ping()
        checks["storage"] = Check(ok=True, detail=settings.storage_backend)
    except Exception as exc:
        checks["storage"] = Check(ok=False, detail=repr(exc))
    try:
        workers = sorted(
            (k.decode() if isinstance(k, bytes) else k).rsplit(":", 1)[-1]
            for k in store.r.scan_iter(f"{settings.redis_prefix}:worker:*")
        )
        checks["workers"] = Check(ok=bool(workers), detail=", ".join(workers) or "no worker heartbeat")
    except Exception as exc:
        checks["workers"] = Check(ok=False, detail=repr(exc))
    ready = all(c.ok for c in checks.values())
    body = Readiness(ready=ready, checks=checks)
    return JSONResponse(body.model_dump(), status_code=200 if ready else 503)
