"""Dependencies, declared once as ``Annotated`` aliases so handlers state their needs in the signature."""

from __future__ import annotations

import hmac
from typing import Annotated, Any

from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from app.auth import ADMIN_PRINCIPAL, KeyStore, Principal, QuotaExceeded, Quotas
from app.core.config import Settings
from app.store import JobNotFound, JobStore

bearer = HTTPBearer(auto_error=False, description="an API key (`dx_...`) or the admin key")


def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def get_store(request: Request) -> JobStore:
    store: JobStore = request.app.state.store
    return store


def get_keys(request: Request) -> KeyStore:
    keys: KeyStore = request.app.state.keys
    return keys


def get_quotas(request: Request) -> Quotas:
    quotas: Quotas = request.app.state.quotas
    return quotas


SettingsDep = Annotated[Settings, Depends(get_settings)]
StoreDep = Annotated[JobStore, Depends(get_store)]
KeysDep = Annotated[KeyStore, Depends(get_keys)]
QuotasDep = Annotated[Quotas, Depends(get_quotas)]


def too_many(exc: QuotaExceeded) -> HTTPException:
    return HTTPException(status_code=429, detail=exc.detail, headers={"Retry-After": str(exc.retry_after)})


def unauthorized(detail: str, error: str | None = None) -> HTTPException:
    challenge = f'Bearer error="{error}"' if error else "Bearer"
    return HTTPException(status_code=401, detail=detail, headers={"WWW-Authenticate": challenge})


def get_principal(
    request: Request,
    settings: SettingsDep,
    keys: KeysDep,
    quotas: QuotasDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> Principal:
    """The caller, from ``Authorization: Bearer KEY``; counts the request against the key's rate.

    Every /v1 route depends on it (once per request: FastAPI caches a dependency within a request).
    """
    if settings.auth == "off":
        return ADMIN_PRINCIPAL
    if credentials is None:
        raise unauthorized("missing bearer key: send 'Authorization: Bearer KEY'")
    key = credentials.credentials
    admin_key: str | None = request.app.state.admin_key
    if admin_key is not None and hmac.compare_digest(key.encode(), admin_key.encode()):
        return ADMIN_PRINCIPAL
    rec = keys.lookup(key)
    if rec is None:
        raise unauthorized("invalid or revoked key", "invalid_token")
    who = Principal.from_record(rec)
    try:
        quotas.hit(who)
    except QuotaExceeded as exc:
        raise too_many(exc) from None
    return who


PrincipalDep = Annotated[Principal, Depends(get_principal)]


def require_admin(who: PrincipalDep) -> Principal:
    if not who.admin:
        raise HTTPException(status_code=403, detail="only the admin key may manage API keys")
    return who


def owned_job(job_id: str, store: StoreDep, who: PrincipalDep) -> dict[str, Any]:
    """The job's record if the caller may see it: its owner or the admin. Anyone else gets the same
    404 as for a job that does not exist, so job ids of other keys cannot be probed."""
    try:
        rec = store.get(job_id)
    except JobNotFound:
        rec = None
    if rec is None or not (who.admin or rec.get("owner") == who.name):
        raise HTTPException(status_code=404, detail=f"job {job_id} not found")
    return rec


OwnedJob = Annotated[dict[str, Any], Depends(owned_job)]
