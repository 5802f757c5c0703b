import tempfile
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, File, Form, Query, Request, Response, UploadFile

from app.api.deps import DatasetsDep, MultipartBody, OwnedDataset, PrincipalDep, SettingsDep
from app.archive import Limits, extract
from app.core.config import Settings
from app.dataset_check import CheckedDataset, check_folder, common_folder
from app.errors import ErrorResponses
from app.schemas import DatasetPublic, DatasetsPublic, dataset_public

router = APIRouter(prefix="/datasets", tags=["datasets"])

MAX_OFFSET = 1_000_000
NAME_PATTERN = r"^[^\x00-\x1f\x7f]+$"  # any text on one line


def public(request: Request, rec: dict[str, object]) -> DatasetPublic:
    return dataset_public(rec, request.app.state.settings.api_v1_str)


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
    )
    return root, checked


@router.post(
    "",
    status_code=201,
    response_model=DatasetPublic,
    dependencies=[MultipartBody],
    responses=ErrorResponses.UPLOAD,
    # one archive and a name; anything more is a 400 before a byte is spooled
    form_limits={"max_files": 1, "max_fields": 4, "max_part_size": 4096},
)
def create_dataset(
    request: Request,
    response: Response,
    file: Annotated[
        UploadFile,
        File(
            description="a .zip or .tar.gz holding images/NAME.ext and masks/NAME.ext (PNG, JPEG, TIFF, "
            "BMP, DICOM .dcm, NIfTI .nii/.nii.gz), optionally pairs.csv (columns name, group); "
            "at most DIFFEXP_MAX_UPLOAD_MB"
        ),
    ],
    datasets: DatasetsDep,
    settings: SettingsDep,
    who: PrincipalDep,
    name: Annotated[
        str | None,
        Form(min_length=1, max_length=128, pattern=NAME_PATTERN, description="a name for the dataset"),
    ] = None,
) -> DatasetPublic:
    """Upload image/mask pairs as one archive; 201 with the dataset once every file has passed the
    checks (docs/datasets.md), 422 naming every problem otherwise, and then nothing is stored."""
    with tempfile.TemporaryDirectory(prefix="diffexp-dataset-") as tmp:
        root, checked = unpack_and_check(file, Path(tmp), settings)
        rec = datasets.create(checked, root, owner=who.name, name=name)
    dataset = public(request, rec)
    response.headers["Location"] = dataset.links.self
    return dataset


@router.get("", response_model=DatasetsPublic, responses=ErrorResponses.LIST)
def list_datasets(
    request: Request,
    datasets: DatasetsDep,
    who: PrincipalDep,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0,
) -> DatasetsPublic:
    """The caller's datasets (the admin: every dataset), newest first."""
    recs, total = datasets.page(owner=None if who.admin else who.name, limit=limit, offset=offset)
    return DatasetsPublic(data=[public(request, r) for r in recs], count=total, limit=limit, offset=offset)


@router.get("/{dataset_id}", response_model=DatasetPublic, responses=ErrorResponses.DATASET)
def read_dataset(request: Request, rec: OwnedDataset) -> DatasetPublic:
    return public(request, rec)


@router.delete("/{dataset_id}", status_code=204, responses=ErrorResponses.DATASET_DELETE)
def delete_dataset(datasets: DatasetsDep, rec: OwnedDataset) -> Response:
    """Remove the dataset and its files; 409 while a training uses it."""
    datasets.delete(rec["id"])
    return Response(status_code=204)
