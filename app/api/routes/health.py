import logging

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from app.api.deps import SettingsDep, StoreDep
from app.heartbeats import live_beats
from app.schemas import Check, Readiness

router = APIRouter(tags=["health"])
log = logging.getLogger(__name__)

UNREACHABLE = "unreachable"  # what a failed check reports: no host, bucket or exception text leaks


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """The process is alive."""
    return {"status": "ok"}


@router.get(
    "/readyz",
    response_model=Readiness,
    responses={503: {"model": Readiness, "description": "Redis, storage or every worker unreachable"}},
)
def readyz(store: StoreDep, settings: SettingsDep) -> JSONResponse:
    """Redis, storage and at least one worker are reachable (503 otherwise)."""
    checks: dict[str, Check] = {}
    try:
        store.r.ping()
        checks["redis"] = Check(ok=True)
    except Exception:
        log.warning("readyz: redis unreachable", exc_info=True)
        checks["redis"] = Check(ok=False, detail=UNREACHABLE)
    try:
        store.storage.ping()
        checks["storage"] = Check(ok=True, detail=settings.storage_backend)
    except Exception:
        log.warning("readyz: storage unreachable", exc_info=True)
        checks["storage"] = Check(ok=False, detail=UNREACHABLE)
    try:
        n = len(live_beats(store.r, store.keys.workers_pattern()))
        # a count, not the workers' names: those are host names, and this probe is open
        checks["workers"] = Check(
            ok=n > 0, detail=f"{n} worker{'s' if n != 1 else ''}" if n else "no worker heartbeat"
        )
    except Exception:
        log.warning("readyz: cannot list worker heartbeats", exc_info=True)
        checks["workers"] = Check(ok=False, detail=UNREACHABLE)
    ready = all(c.ok for c in checks.values())
    body = Readiness(ready=ready, checks=checks)
    return JSONResponse(body.model_dump(), status_code=200 if ready else 503)
