from typing import Annotated, Any

from fastapi import APIRouter, Header, HTTPException, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import RedirectResponse, StreamingResponse

from app import counters
from app.api.deps import JsonBody, OwnedJob, PrincipalDep, QuotasDep, SettingsDep, StoreDep, too_many
from app.auth import QuotaExceeded
from app.bundles import resolve_params
from app.core.config import Settings
from app.errors import ErrorResponses
from app.exports import ExportFormat, Labels
from app.layout import owner_id_of, rows_num_classes, zip_key
from app.schemas import JobCreate, JobCreated, JobPublic, JobsPublic, job_public
from app.store import JobConflict
from app.webhooks import Unresolvable, WebhookError, new_secret, resolve_target
from app.zipstream import job_zip

router = APIRouter(prefix="/jobs", tags=["jobs"])

MAX_OFFSET = 1_000_000  # deeper pages are refused (422): Redis ranges are 64-bit


def public(request: Request, rec: dict[str, Any]) -> JobPublic:
    return job_public(rec, request.app.state.settings.api_v1_str)


def callback(body: JobCreate, settings: Settings) -> dict[str, str] | None:
    """The job's webhook (url, secret), or a 422 naming why the URL is refused."""
    if body.callback_url is None:
        if body.callback_secret is not None:
            raise _invalid("callback_secret", "callback_secret needs a callback_url", "***")
        return None
    try:
        resolve_target(body.callback_url, allow_private=settings.webhook_allow_private)
    except Unresolvable:
        pass  # DNS may be down for a moment: checked again at every delivery attempt
    except WebhookError as exc:
        raise _invalid("callback_url", str(exc), body.callback_url) from None
    return {"url": body.callback_url, "secret": body.callback_secret or new_secret()}


def model_meta(request: Request, params: dict[str, Any]) -> dict[str, Any] | None:
    """The bundle.json of the job's model version, or None when it has been deleted since."""
    from app.registry import ModelNotFound

    try:
        rec = request.app.state.registry.get(str(params["model"]), params.get("model_version"))
    except ModelNotFound:
        return None
    meta: dict[str, Any] = rec["meta"]
    return meta


def _invalid(field: str, message: str, value: str) -> RequestValidationError:
    error = {"type": "value_error", "loc": ("body", field), "msg": message, "input": value}
    return RequestValidationError([error])


@router.post(
    "", status_code=202, response_model=JobCreated, dependencies=[JsonBody], responses=ErrorResponses.CREATE
)
def create_job(
    body: JobCreate,
    request: Request,
    response: Response,
    store: StoreDep,
    settings: SettingsDep,
    who: PrincipalDep,
    quotas: QuotasDep,
    idempotency_key: Annotated[str | None, Header(max_length=255)] = None,
) -> JobCreated:
    """Queue an expansion job; poll the ``Location`` it answers with (or give a ``callback_url``).

    ``429`` (with ``Retry-After``) when the key has ``max_active_jobs`` jobs queued or running, or
    the job would take it past ``pairs_per_day``."""
    registry = request.app.state.registry
    viewer = None if who.admin else who.id
    params = resolve_params(body, settings, registry, viewer)  # 422 before anything is stored
    label = counters.model_label(
        params.model, owner_id_of(registry.get(params.model, params.model_version, viewer))
    )  # what /metrics may show: a shared model's name, else "other"
    webhook = callback(body, settings)
    if who.pairs_per_day is not None and params.count > who.pairs_per_day:
        raise HTTPException(
            status_code=422,
            detail=f"count {params.count} is more than this key's pairs_per_day ({who.pairs_per_day})",
        )
    # An Idempotency-Key is scoped to the key using it: another key's same header is another job.
    scoped_key = f"{who.id}:{idempotency_key}" if idempotency_key is not None else None

    def create() -> tuple[dict[str, Any], bool]:
        return store.create(
            body=body.model_dump(exclude_none=True, exclude={"callback_secret"}),
            params=params,
            idempotency_key=scoped_key,
            owner=who.name,
            owner_id=who.id,
            model_label=label,
            webhook=webhook,
        )

    try:
        if scoped_key is not None and store.idempotency_claimed(scoped_key):
            rec, _ = create()  # a replay (or 409 for another body) creates nothing: no quota applies
        else:
            rec, _ = quotas.create_job(who, params.count, store, create)
    except QuotaExceeded as exc:
        raise too_many(exc) from None
    secret = (rec.get("webhook") or {}).get("secret")
    job = JobCreated.model_validate({**public(request, rec).model_dump(), "callback_secret": secret})
    response.headers["Location"] = job.links.self
    return job


@router.get("", response_model=JobsPublic, responses=ErrorResponses.LIST)
def list_jobs(
    request: Request,
    store: StoreDep,
    who: PrincipalDep,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0,
    cursor: Annotated[
        str | None, Query(max_length=200, description="next_cursor of the previous page")
    ] = None,
) -> JobsPublic:
    """The caller's jobs (the admin: every job), newest first. Page with ``cursor`` (stable while jobs
    are added or deleted) or ``offset``."""
    index = None if who.admin else store.keys.owner_jobs(who.id)
    try:
        recs, total, next_cursor = store.list_jobs(limit=limit, offset=offset, cursor=cursor, index=index)
    except ValueError:  # a bad parameter like any other: 422 naming it
        error = {"type": "value_error", "loc": ("query", "cursor"), "msg": "not a cursor this service issued"}
        raise RequestValidationError([{**error, "input": cursor}]) from None
    return JobsPublic(
        data=[public(request, r) for r in recs],
        count=total,
        limit=limit,
        offset=offset,
        next_cursor=next_cursor,
    )


@router.get("/{job_id}", response_model=JobPublic, responses=ErrorResponses.JOB)
async def read_job(request: Request, rec: OwnedJob) -> JobPublic:
    return public(request, rec)


@router.post("/{job_id}/cancel", response_model=JobPublic, responses=ErrorResponses.JOB_CHANGE)
def cancel_job(request: Request, store: StoreDep, rec: OwnedJob) -> JobPublic:
    """Stop the job within one sampling batch; finished pairs stay downloadable with ``?partial=true``."""
    return public(request, store.cancel(rec["id"]))


@router.delete("/{job_id}", status_code=204, responses=ErrorResponses.JOB)
def delete_job(store: StoreDep, rec: OwnedJob) -> Response:
    """Remove the job, its record and every object it stored."""
    store.delete(rec["id"])
    return Response(status_code=204)


FormatQuery = Annotated[
    ExportFormat,
    Query(
        alias="format",
        description="plain: images/, masks/ (0/255); nnunet: a raw nnU-Net v2 dataset (imagesTr/NAME_0000.png, "
        "labelsTr/NAME.png with labels 0/1, dataset.json); monai: images/, labels/ (0/1) and a decathlon "
        "datalist.json. Every format has manifest.csv and job.json (docs/exports.md).",
    ),
]


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
    request: Request,
    store: StoreDep,
    settings: SettingsDep,
    rec: OwnedJob,
    partial: Annotated[bool, Query()] = False,
    fmt: FormatQuery = ExportFormat.PLAIN,
) -> StreamingResponse:
    """The pairs as a streamed zip, the same bytes on every download; ``409`` until the job has a result
    unless ``partial=true``. ``format`` picks the layout (``plain``, ``nnunet``, ``monai``)."""
    job_id = rec["id"]
    result = store.result_rows(job_id, partial=partial)
    if result is None:
        raise JobConflict(f"job is {rec['status']}; no result yet (try ?partial=true)")
    rows, final = result
    suffix = "" if fmt is ExportFormat.PLAIN else f"-{fmt.value}"
    headers = {"Content-Disposition": f'attachment; filename="{job_id}{suffix}.zip"'}
    if fmt is ExportFormat.PLAIN and final and store.storage.exists(zip_key(job_id)):  # written at decision
        return StreamingResponse(
            store.storage.iter_chunks(zip_key(job_id)), media_type="application/zip", headers=headers
        )
    # nnunet / monai are streamed on demand, not cached: only masks are re-encoded (a few kB each), and a
    # cached copy per format would double the job's storage for what the same bytes rebuild.
    meta = model_meta(request, rec["params"])
    if meta is None:  # the model is gone: its pairs' class losses still say K
        meta = {"num_classes": rows_num_classes(rows)}
    labels = Labels.from_bundle(meta)
    return StreamingResponse(
        job_zip(store.storage, rec, rows, final=final, fmt=fmt, labels=labels),
        media_type="application/zip",
        headers=headers,
    )


@router.get(
    "/{job_id}/download",
    status_code=307,
    response_class=RedirectResponse,
    responses={
        307: {"description": "to a presigned S3 URL, or to pairs.zip"},
        **ErrorResponses.JOB_CHANGE,
        **ErrorResponses.JOB_QUERY,
    },
)
def download(
    store: StoreDep, settings: SettingsDep, rec: OwnedJob, fmt: FormatQuery = ExportFormat.PLAIN
) -> RedirectResponse:
    """Redirect to a presigned S3 URL of the zip (written when the job was decided; valid
    ``DIFFEXP_S3_PRESIGN_EXPIRY_S``), or to ``pairs.zip`` (always for ``format`` other than plain:
    those are streamed on demand)."""
    job_id = rec["id"]
    if store.result_rows(job_id, partial=False) is None:
        raise JobConflict(f"job is {rec['status']}; no result yet")
    zip_url = f"{settings.api_v1_str}/jobs/{job_id}/pairs.zip"
    if fmt is not ExportFormat.PLAIN:
        return RedirectResponse(f"{zip_url}?format={fmt.value}", status_code=307)
    key = zip_key(job_id)
    url = store.storage.presigned_url(key, settings.s3_presign_expiry_s)
    if url is None or not store.storage.exists(key):  # local storage, or a job decided before zips
        return RedirectResponse(zip_url, status_code=307)
    return RedirectResponse(url, status_code=307)
