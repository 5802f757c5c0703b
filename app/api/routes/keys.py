from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Path, Request, Response

from app.api.deps import JsonBody, KeysDep, StoreDep, require_admin
from app.auth import ADMIN, KeyExists, KeyNotFound, cancel_jobs, key_id
from app.errors import ErrorResponses, problem_responses
from app.schemas import KEY_NAME_PATTERN, KeyCreate, KeyCreated, KeyLimits, KeyPublic, KeysPublic

router = APIRouter(
    prefix="/keys",
    tags=["keys"],
    dependencies=[Depends(require_admin)],
    responses=problem_responses(403, 503),
)


@router.post(
    "", status_code=201, response_model=KeyCreated, dependencies=[JsonBody], responses=ErrorResponses.CREATE
)
def create_key(body: KeyCreate, keys: KeysDep) -> KeyCreated:
    """A new API key with its limits (admin only). The key is in this answer and nowhere else."""
    if body.name == ADMIN:
        raise HTTPException(status_code=422, detail=f"the key name {ADMIN!r} is reserved")
    limits = body.model_dump(include=set(KeyLimits.model_fields))
    try:
        rec, key = keys.create(body.name, limits)
    except KeyExists:
        raise HTTPException(status_code=409, detail=f"a key named {body.name!r} exists") from None
    return KeyCreated.model_validate({**rec, "id": key_id(rec), "key": key})


@router.get("", response_model=KeysPublic)
def list_keys(keys: KeysDep) -> KeysPublic:
    """Every key's name, limits and creation time (admin only); never a key or its hash."""
    return KeysPublic(data=[KeyPublic.model_validate({**rec, "id": key_id(rec)}) for rec in keys.records()])


@router.delete("/{name}", status_code=204, responses=problem_responses(404, 422))
def revoke_key(
    request: Request, name: Annotated[str, Path(pattern=KEY_NAME_PATTERN)], keys: KeysDep, store: StoreDep
) -> Response:
    """Revoke a key (admin only): it fails from the next request on, and its queued and running jobs
    and trainings are canceled. Its finished jobs stay, visible to the admin. What it owned stays its
    id's: a key created later under the same name does not see it."""
    try:
        rec = keys.revoke(name)
    except KeyNotFound:
        raise HTTPException(status_code=404, detail=f"no key named {name!r}") from None
    owner = key_id(rec)
    cancel_jobs(store, owner)
    request.app.state.trainings.cancel_all_of(owner)
    return Response(status_code=204)
