from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Request, Response
from fastapi.responses import RedirectResponse, StreamingResponse

from app.api.deps import JobIdDep, JsonBody, SettingsDep, StoreDep
from app.bundles import resolve_params
from app.errors import ErrorResponses
from app.schemas import JobCreate, JobPublic, JobsPublic
from app.store import JobConflict, zip_key
from app.zipstream import job_zip

router = APIRouter(prefix="/jobs", tags=["jobs"])

MAX_OFFSET = 1_000_000  # deeper pages are refused (422): Redis ranges are 64-bit


def public(request: Request, rec: dict[str, Any]) -> JobPublic:
    base = f"{request.app.state.settings.api_v1_str}/jobs/{rec['id']}"
    links = {"self": base, "pairs_zip": f"{base}/pairs.zip", "download": f"{base}/download"}
    return JobPublic.model_validate({**rec, "links": links})


@router.post(
    "", status_code=202, response_model=JobPublic, dependencies=[JsonBody], responses=ErrorResponses.CREATE
)
def create_job(
    body: JobCreate,
    request: Request,
    response: Response,
    store: StoreDep,
    settings: SettingsDep,
    idempotency_key: Annotated[str | None, Header(max_length=255)] = None,
) -> JobPublic:
    """Queue an expansion job; poll the ``Location`` it answers with."""
    params = resolve_params(body, settings)  # 422 before anything is stored
    rec, _ = store.create(
        body=body.model_dump(exclude_none=True), params=params, idempotency_key=idempotency_key
    )
    job = public(request, rec)
    response.headers["Location"] = job.links.self
    return job


@router.get("", response_model=JobsPublic, responses=ErrorResponses.LIST)
def list_jobs(
    request: Request,
    store: StoreDep,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0,
) -> JobsPublic:
    """Jobs, newest first."""
    recs, total = store.list_jobs(limit=limit, offset=offset)
    return JobsPublic(data=[public(request, r) for r in recs], count=total, limit=limit, offset=offset)


@router.get("/{job_id}", response_model=JobPublic, responses=ErrorResponses.JOB)
def read_job(job_id: JobIdDep, request: Request, store: StoreDep) -> JobPublic:
    return public(request, store.get(job_id))


@router.post("/{job_id}/cancel", response_model=JobPublic, responses=ErrorResponses.JOB_CHANGE)
def cancel_job(job_id: JobIdDep, request: Request, store: StoreDep) -> JobPublic:
    """Stop the job within one sampling batch; finished pairs stay downloadable with ``?partial=true``."""
    return public(request, store.cancel(job_id))


@router.delete("/{job_id}", status_code=204, responses=ErrorResponses.JOB)
def delete_job(job_id: JobIdDep, store: StoreDep) -> Response:
    """Remove the job, its record and every object it stored."""
    store.delete(job_id)
    return Response(status_code=204)


@router.get(
    "/{job_id}/pairs.zip",
    response_class=StreamingResponse,
    responses={
        200: {"content": {"application/zip": {}}, "description": "the pairs, streamed"},
        **ErrorResponses.JOB_CHANGE,
        **ErrorResponses.JOB_QUERY,
    },
)
def download_zip(
    job_id: JobIdDep, store: StoreDep, partial: Annotated[bool, Query()] = False
) -> StreamingResponse:
    """The pairs as a streamed zip; ``409`` until the job has a result unless ``partial=true``."""
    rec = store.get(job_id)
    result = store.result_rows(job_id, partial=partial)
    if result is None:
        raise JobConflict(f"job is {rec['status']}; no result yet (try ?partial=true)")
    rows, final = result
    return StreamingResponse(
        job_zip(store.storage, job_id, rows, rec["params"], final=final),
        media_type="application/zip",
        headers={"Content-Disposition": f'attachment; filename="{job_id}.zip"'},
    )


@router.get(
    "/{job_id}/download",
    status_code=307,
    response_class=RedirectResponse,
    responses={307: {"description": "to a presigned S3 URL, or to pairs.zip"}, **ErrorResponses.JOB_CHANGE},
)
def download(job_id: JobIdDep, store: StoreDep, settings: SettingsDep) -> RedirectResponse:
    """Redirect to a presigned S3 URL of the zip (written once), or to ``pairs.zip`` on local storage."""
    rec = store.get(job_id)
    result = store.result_rows(job_id, partial=False)
    if result is None:
        raise JobConflict(f"job is {rec['status']}; no result yet")
    rows, _ = result
    key = zip_key(job_id)
    url = store.storage.presigned_url(key, settings.s3_presign_expiry_s)
    if url is None:
        return RedirectResponse(f"{settings.api_v1_str}/jobs/{job_id}/pairs.zip", status_code=307)
    if not store.storage.exists(key):
        store.storage.put_stream(
            key, job_zip(store.storage, job_id, rows, rec["params"], final=True), "application/zip"
        )
    return RedirectResponse(url, status_code=307)
