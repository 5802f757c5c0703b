"""A job's kept pairs one by one (the web page's preview grid): the list, each PNG and its preview."""

from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Path, Query, Request, Response

from app.api.deps import OwnedJob, StoreDep
from app.api.routes.jobs import MAX_OFFSET
from app.errors import ErrorResponses
from app.pairs import PAIR_NAME_PATTERN, PairNotFound, etag, is_pair_name, pair_file, pair_rows
from app.schemas import PairsPublic

router = APIRouter(prefix="/jobs", tags=["pairs"])

# Pair bytes never change (a re-run shard writes the same pair under the same name) and a job id is
# never reused: the browser may keep them. Private: they are answered only with the owner's key.
CACHE_CONTROL = "private, max-age=31536000, immutable"
PNG_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"content": {"image/png": {}}, "description": "the PNG; `ETag` and a long `Cache-Control`"},
    304: {"description": "Not Modified: the `If-None-Match` ETag is current"},
    **ErrorResponses.JOB,
}
PairName = Annotated[
    str,
    Path(
        description="the pair's name, `s<seed>-<index>` as listed; any other string names no pair (404)",
        json_schema_extra={"pattern": PAIR_NAME_PATTERN},
        examples=["s1234-000007"],
    ),
]


def _links(request: Request, job_id: str, name: str) -> dict[str, str]:
    base = f"{request.app.state.settings.api_v1_str}/jobs/{job_id}/pairs/{name}"
    return {"image": f"{base}/image.png", "mask": f"{base}/mask.png", "preview": f"{base}/preview.png"}


@router.get("/{job_id}/pairs", response_model=PairsPublic, responses=ErrorResponses.JOB_QUERY)
def list_pairs(
    request: Request,
    store: StoreDep,
    rec: OwnedJob,
    offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
) -> PairsPublic:
    """The job's kept pairs by index: the final result's once the job is decided (``final``), else
    those kept so far (they may be more than ``count``: the result takes the first shards' pairs)."""
    rows, final = pair_rows(store, rec["id"])
    page = rows[offset : offset + limit]
    return PairsPublic.model_validate(
        {
            "data": [{**row, "links": _links(request, rec["id"], row["name"])} for row in page],
            "count": len(rows),
            "offset": offset,
            "limit": limit,
            "final": final,
        }
    )


def _png(request: Request, store: StoreDep, rec: dict[str, Any], name: str, file: str) -> Response:
    try:
        data = pair_file(store, rec["id"], name, file)
    except PairNotFound:
        shown = f"pair {name}" if is_pair_name(name) else "pair (names look like s<seed>-<index>)"
        raise HTTPException(status_code=404, detail=f"{shown} not found in job {rec['id']}") from None
    tag = etag(data)
    headers = {"ETag": tag, "Cache-Control": CACHE_CONTROL}
    if tag in (t.strip() for t in request.headers.get("if-none-match", "").split(",")):
        return Response(status_code=304, headers=headers)
    return Response(content=data, media_type="image/png", headers=headers)


@router.get("/{job_id}/pairs/{name}/image.png", response_class=Response, responses=PNG_RESPONSES)
def pair_image(request: Request, store: StoreDep, rec: OwnedJob, name: PairName) -> Response:
    """The pair's image (grey PNG at the model's resolution)."""
    return _png(request, store, rec, name, "image.png")


@router.get("/{job_id}/pairs/{name}/mask.png", response_class=Response, responses=PNG_RESPONSES)
def pair_mask(request: Request, store: StoreDep, rec: OwnedJob, name: PairName) -> Response:
    """The pair's mask (PNG): 0 background, 255 foreground; a K-class model's (K > 2): label values 0..K-1."""
    return _png(request, store, rec, name, "mask.png")


@router.get("/{job_id}/pairs/{name}/preview.png", response_class=Response, responses=PNG_RESPONSES)
def pair_preview(request: Request, store: StoreDep, rec: OwnedJob, name: PairName) -> Response:
    """The image in grey with the mask's outline in red (K classes: one colour per class; RGB PNG), made
    once and kept with the job."""
    return _png(request, store, rec, name, "preview.png")
