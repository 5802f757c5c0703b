"""Dependencies, declared once as ``Annotated`` aliases so handlers state their needs in the signature."""

from __future__ import annotations

from email.message import Message
from typing import Annotated

from fastapi import Depends, HTTPException, Path, Request

from app.core.config import Settings
from app.schemas import JOB_ID_PATTERN, is_job_id
from app.store import JobNotFound, JobStore


def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def get_store(request: Request) -> JobStore:
    store: JobStore = request.app.state.store
    return store


def valid_job_id(
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


def require_json(request: Request) -> None:
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
