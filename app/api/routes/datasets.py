"""``/v1/datasets``: upload an archive of image/mask pairs, list, read and delete datasets.

The upload is read by ``read_upload``, a dependency of the route that runs after the key has been
checked (``PrincipalDep``): a route with ``File``/``Form`` parameters has FastAPI read the whole
body before any dependency, so anyone without a key could make the API spool DIFFEXP_MAX_UPLOAD_MB.
Its request body is therefore declared by hand (``UPLOAD_BODY``).
"""

import functools
import shutil
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import anyio
import anyio.to_thread
from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from pydantic import StringConstraints, TypeAdapter, ValidationError
from starlette.datastructures import UploadFile

from app.api.deps import DatasetsDep, MultipartBody, OwnedDataset, PrincipalDep, SettingsDep
from app.archive import Limits, extract
from app.core.config import Settings
from app.dataset_check import CheckedDataset, check_folder, common_folder
from app.decodes import DecodeSlots
from app.errors import ErrorResponses, problem_responses
from app.openapi import upload_body
from app.schemas import DatasetPublic, DatasetsPublic, dataset_public

router = APIRouter(prefix="/datasets", tags=["datasets"])

MAX_OFFSET = 1_000_000
NAME_PATTERN = r"^[^\x00-\x1f\x7f]+$"  # any text on one line
DatasetName = Annotated[str, StringConstraints(min_length=1, max_length=128, pattern=NAME_PATTERN)]
_NAME = TypeAdapter(DatasetName)
UPLOAD_BODY = upload_body(
    "a .zip or .tar.gz holding images/NAME.ext and masks/NAME.ext (PNG, JPEG, TIFF, BMP, DICOM .dcm, NIfTI "
    ".nii/.nii.gz), optionally pairs.csv (columns name, group); at most DIFFEXP_MAX_UPLOAD_MB",
    name={
        "type": "string",
        "minLength": 1,
        "maxLength": 128,
        "pattern": NAME_PATTERN,
        "description": "a name for the dataset",
    },
)


def public(request: Request, rec: dict[str, Any]) -> DatasetPublic:
    return dataset_public(rec, request.app.state.settings.api_v1_str)


@dataclass
class Upload:
    file: UploadFile
    name: str | None


def _invalid(field: str, kind: str, message: str) -> RequestValidationError:
    return RequestValidationError([{"type": kind, "loc": ("body", field), "msg": message}])


async def read_upload(request: Request, who: PrincipalDep) -> AsyncIterator[Upload]:
    """The form (``file`` and an optional ``name``), read once the caller is known; the archive is
    spooled to a temporary file (Starlette: in memory up to 1 MB). 400 for a malformed or
    oversized form, 422 for a missing file, a bad name or another field."""
    del who  # a dependency only for its order: the key is checked before the body is read
    form = await request.form(max_files=1, max_fields=4, max_part_size=4096)
    try:
        unknown = sorted(k for k in form.keys() if k not in ("file", "name"))
        if unknown:
            raise _invalid(unknown[0], "extra_forbidden", "Extra inputs are not permitted")
        file = form.get("file")
        if file is None:
            raise _invalid("file", "missing", "Field required: the archive, as a file part named 'file'")
        if not isinstance(file, UploadFile):
            raise _invalid("file", "value_error", "Expected a file part (with a filename), not a text field")
        raw_name = form.get("name")
        if isinstance(raw_name, UploadFile):
            raise _invalid("name", "string_type", "Expected a text field, not a file")
        try:
            name = None if raw_name is None else _NAME.validate_python(raw_name)
        except ValidationError as exc:
            errors = [{**e, "loc": ("body", "name")} for e in exc.errors(include_url=False)]
            raise RequestValidationError(errors) from None
        yield Upload(file=file, name=name)
    finally:
        await form.close()


UploadDep = Annotated[Upload, Depends(read_upload)]


def unpack_and_check(upload: UploadFile, dest: Path, settings: Settings) -> tuple[Path, CheckedDataset]:
    """Unpack the archive into ``dest`` and check it: ``(dataset root, checked dataset)``, or
    ``DatasetInvalid`` (422) naming every problem. Nothing is stored here."""
    limits = Limits(
        max_bytes=settings.max_dataset_mb << 20,
        max_members=settings.max_dataset_members,
        max_ratio=settings.max_compression_ratio,
    )
    fileobj = upload.file
    size = upload.size if upload.size is not None else fileobj.seek(0, 2)
    members = extract(fileobj, size, dest, limits)
    top = common_folder(members)  # a zipped folder: data/images/..., data/masks/...
    root = dest / top if top else dest
    checked = check_folder(
        root,
        [m[len(top) :] for m in members],
        max_pixels=settings.max_image_pixels,
        min_pairs=settings.min_dataset_pairs,
        max_bytes=settings.decode_memory_mb << 20,
    )
    return root, checked


@router.post(
    "",
    status_code=201,
    response_model=DatasetPublic,
    dependencies=[MultipartBody],
    responses={**ErrorResponses.UPLOAD, **problem_responses(429)},
    openapi_extra={"requestBody": UPLOAD_BODY},
)
async def create_dataset(
    request: Request,
    response: Response,
    upload: UploadDep,
    datasets: DatasetsDep,
    settings: SettingsDep,
    who: PrincipalDep,
) -> DatasetPublic:
    """Upload image/mask pairs as one archive (multipart field ``file``, optional ``name``); 201
    with the dataset once every file has passed the checks (docs/datasets.md), 422 naming every
    problem otherwise, and then nothing is stored; 429 (``Retry-After``) when
    DIFFEXP_MAX_CONCURRENT_DECODES uploads are being checked and none finished within
    DIFFEXP_DECODE_WAIT_S. Unpacking and checking run in a worker thread, off the event loop."""
    decodes: DecodeSlots = request.app.state.decodes
    tmp = Path(tempfile.mkdtemp(prefix="diffexp-dataset-"))
    try:
        async with decodes.slot():
            root, checked = await anyio.to_thread.run_sync(unpack_and_check, upload.file, tmp, settings)
        rec = await anyio.to_thread.run_sync(
            functools.partial(
                datasets.create, checked, root, owner=who.name, owner_id=who.id, name=upload.name
            )
        )
    finally:
        await anyio.to_thread.run_sync(functools.partial(shutil.rmtree, tmp, ignore_errors=True))
    dataset = public(request, rec)
    response.headers["Location"] = dataset.links.self
    return dataset


@router.get(
    "",
    response_model=DatasetsPublic,
    responses=ErrorResponses.LIST,
)
def list_datasets(
    request: Request,
    datasets: DatasetsDep,
    who: PrincipalDep,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0,
) -> DatasetsPublic:
    """The caller's datasets (the admin: every dataset), newest first."""
    recs, total = datasets.page(owner=None if who.admin else who.id, limit=limit, offset=offset)
    return DatasetsPublic(data=[public(request, r) for r in recs], count=total, limit=limit, offset=offset)


@router.get("/{dataset_id}", response_model=DatasetPublic, responses=ErrorResponses.DATASET)
def read_dataset(request: Request, rec: OwnedDataset) -> DatasetPublic:
    return public(request, rec)


@router.delete("/{dataset_id}", status_code=204, responses=ErrorResponses.DATASET_DELETE)
def delete_dataset(datasets: DatasetsDep, rec: OwnedDataset) -> Response:
    """Remove the dataset and its files; 409 while a training uses it."""
    datasets.delete(rec["id"])
    return Response(status_code=204)
