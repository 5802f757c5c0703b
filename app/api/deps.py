"""Dependencies, declared once as ``Annotated`` aliases so handlers state their needs in the signature.

Those that do no I/O are ``async def``: FastAPI runs a plain ``def`` dependency in its thread pool, and
a dozen thread hops per request cost more CPU than the request itself (bench/load.py)."""

from __future__ import annotations

import hmac
from email.message import Message
from typing import Annotated, Any

from fastapi import Depends, HTTPException, Path, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from app.auth import ADMIN_PRINCIPAL, KEY_FORMAT, KeyStore, Principal, QuotaExceeded, Quotas
from app.authlimit import FailureLimiter, client_address, key_digest
from app.core.config import Settings
from app.datasets import DatasetNotFound, DatasetStore
from app.layout import owner_id_of
from app.schemas import JOB_ID_PATTERN, is_job_id
from app.store import JobNotFound, JobStore

bearer = HTTPBearer(auto_error=False, description="an API key (`dx_...`) or the admin key")


async def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


async def get_store(request: Request) -> JobStore:
    store: JobStore = request.app.state.store
    return store


async def get_keys(request: Request) -> KeyStore:
    keys: KeyStore = request.app.state.keys
    return keys


async def get_datasets(request: Request) -> DatasetStore:
    datasets: DatasetStore = request.app.state.datasets
    return datasets


async def get_quotas(request: Request) -> Quotas:
    quotas: Quotas = request.app.state.quotas
    return quotas


_declared_query: dict[int, frozenset[str]] = {}


def _query_names(route: Any) -> frozenset[str]:
    """The query parameters a route declares (its dependencies' included), computed once per route."""
    names = _declared_query.get(id(route))
    if names is None:
        found: set[str] = set()
        stack = [route.dependant]
        while stack:
            dependant = stack.pop()
            found.update(p.alias for p in dependant.query_params)
            stack.extend(dependant.dependencies)
        names = frozenset(found)
        _declared_query[id(route)] = names
    return names


async def known_query(request: Request) -> None:
    """A query parameter the route does not know is a 422, not silently ignored: a typo such as
    ``?fromat=nnunet`` would otherwise download another format than asked for."""
    route = request.scope.get("route")
    if route is None or not hasattr(route, "dependant") or not request.query_params:
        return
    unknown = sorted(set(request.query_params.keys()) - _query_names(route))
    if unknown:
        from fastapi.exceptions import RequestValidationError

        raise RequestValidationError(
            [
                {
                    "type": "extra_forbidden",
                    "loc": ("query", name[:64]),
                    "msg": f"unknown query parameter; known: {', '.join(sorted(_query_names(route))) or 'none'}",
                    "input": request.query_params.get(name, "")[:64],
                }
                for name in unknown[:10]
            ]
        )


async def valid_job_id(
    job_id: Annotated[
        str,
        Path(
            description="job id: 32 lowercase hex digits; any other string names no job (404)",
            json_schema_extra={"pattern": JOB_ID_PATTERN},
            examples=["3f2b9c1e0d4a4e6f8a7b6c5d4e3f2a1b"],
        ),
    ],
) -> str:
    """The job id of the path, checked before it reaches a Redis key or a storage path."""
    if not is_job_id(job_id):
        raise JobNotFound(job_id)
    return job_id


async def valid_dataset_id(
    dataset_id: Annotated[
        str,
        Path(
            description="dataset id: 32 lowercase hex digits; any other string names no dataset (404)",
            json_schema_extra={"pattern": JOB_ID_PATTERN},
            examples=["9c1e0d4a4e6f8a7b6c5d4e3f2a1b3f2b"],
        ),
    ],
) -> str:
    if not is_job_id(dataset_id):
        raise DatasetNotFound(dataset_id)
    return dataset_id


async def require_multipart(request: Request) -> None:
    """415 unless the body is declared ``multipart/form-data`` (a file upload)."""
    value = request.headers.get("content-type")
    if value:
        message = Message()
        message["content-type"] = value
        if message.get_content_type() == "multipart/form-data":
            return
    raise HTTPException(
        status_code=415,
        detail=f"send the archive as multipart/form-data (got {value[:100] if value else 'no Content-Type'})",
        headers={"Accept-Post": "multipart/form-data"},
    )


async def require_json(request: Request) -> None:
    """415 unless the body is declared JSON (``application/json`` or ``application/*+json``)."""
    value = request.headers.get("content-type")
    if value:
        message = Message()
        message["content-type"] = value
        subtype = message.get_content_subtype()
        if message.get_content_maintype() == "application" and (
            subtype == "json" or subtype.endswith("+json")
        ):
            return
    raise HTTPException(
        status_code=415,
        detail=f"send the body as application/json (got {value[:100] if value else 'no Content-Type'})",
        headers={"Accept-Post": "application/json"},
    )


SettingsDep = Annotated[Settings, Depends(get_settings)]
StoreDep = Annotated[JobStore, Depends(get_store)]
JobIdDep = Annotated[str, Depends(valid_job_id)]
JsonBody = Depends(require_json)
KeysDep = Annotated[KeyStore, Depends(get_keys)]
QuotasDep = Annotated[Quotas, Depends(get_quotas)]
DatasetsDep = Annotated[DatasetStore, Depends(get_datasets)]
DatasetIdDep = Annotated[str, Depends(valid_dataset_id)]
MultipartBody = Depends(require_multipart)


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
    A failure counts against the client's address (``app.authlimit``); a malformed key costs no
    Redis call.
    """
    if settings.auth == "off":
        return ADMIN_PRINCIPAL
    limiter: FailureLimiter = request.app.state.auth_limiter
    if credentials is None:
        limiter.fail(client_address(request.scope))
        raise unauthorized("missing bearer key: send 'Authorization: Bearer KEY'")
    key = credentials.credentials
    admin_key: str | None = request.app.state.admin_key
    if admin_key is not None and hmac.compare_digest(key.encode(), admin_key.encode()):
        return ADMIN_PRINCIPAL
    rec = keys.lookup(key) if KEY_FORMAT.match(key) else None
    if rec is None:
        limiter.fail(client_address(request.scope))
        raise unauthorized("invalid or revoked key", "invalid_token")
    limiter.remember(key_digest(key))
    who = Principal.from_record(rec)
    try:
        quotas.hit(who)
    except QuotaExceeded as exc:
        raise too_many(exc) from None
    return who


PrincipalDep = Annotated[Principal, Depends(get_principal)]


async def require_admin(who: PrincipalDep) -> Principal:
    if not who.admin:
        raise HTTPException(status_code=403, detail="only the admin key may manage API keys")
    return who


def owned_job(job_id: JobIdDep, store: StoreDep, who: PrincipalDep) -> dict[str, Any]:
    """The job's record if the caller may see it: its owner or the admin. Anyone else gets the same
    404 as for a job that does not exist, so job ids of other keys cannot be probed."""
    rec = store.get(job_id)  # JobNotFound: 404
    if not (who.admin or owner_id_of(rec) == who.id):  # the key's id, never its name
        raise JobNotFound(job_id)
    return rec


OwnedJob = Annotated[dict[str, Any], Depends(owned_job)]


def owned_dataset(dataset_id: DatasetIdDep, datasets: DatasetsDep, who: PrincipalDep) -> dict[str, Any]:
    """The dataset's record if the caller may see it (its owner or the admin); anyone else gets the
    404 of a dataset that does not exist."""
    rec = datasets.get(dataset_id)  # DatasetNotFound: 404
    if not (who.admin or owner_id_of(rec) == who.id):
        raise DatasetNotFound(dataset_id)
    return rec


OwnedDataset = Annotated[dict[str, Any], Depends(owned_dataset)]
