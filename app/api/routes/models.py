"""``/v1/models``: the bundle registry (``app.registry``): list, read, publish and delete versions.

A key sees its own models and the admin's (shared); another key's model is a 404, like one that does
not exist. ``POST /v1/models/{name}/versions`` publishes a bundle uploaded as a zip or tar.gz
(``diffuseexpand push``), unpacked with the datasets' safe extraction (``app.archive``) and limited
like them by DIFFEXP_MAX_UPLOAD_MB (``app.limits``).
"""

import tempfile
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Request, Response
from fastapi import Path as PathParam
from fastapi.responses import JSONResponse
from starlette.convertors import Convertor, register_url_convertor
from starlette.datastructures import UploadFile

from app.api.deps import MultipartBody, PrincipalDep, SettingsDep
from app.archive import Limits, extract
from app.auth import ADMIN, Principal
from app.bundles import links_of, model_public
from app.dataset_check import common_folder
from app.errors import ErrorResponses
from app.layout import owner_id_of
from app.openapi import upload_body
from app.registry import (
    GRID_FILE,
    NAME_PATTERN,
    VERSION_PATTERN,
    ModelNotFound,
    Registry,
    format_ref,
    version_prefix,
)
from app.schemas import ModelPublic, ModelsPublic
from app.storage import ObjectNotFound

router = APIRouter(prefix="/models", tags=["models"])


class VersionConvertor(Convertor[str]):
    """``{version:model_version}`` matches versions only, so ``/{name}/versions`` (POST) is not also
    ``/{name}/{version}`` (GET, DELETE): a 405 there names POST alone in ``Allow``."""

    regex = VERSION_PATTERN.strip("^$")

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


register_url_convertor("model_version", VersionConvertor())

NameParam = Annotated[
    str,
    PathParam(
        description="model name: lowercase letters, digits, '.', '_' and '-' (any other string names no model)",
        json_schema_extra={"pattern": NAME_PATTERN},
        examples=["cxr-lung-64"],
    ),
]
VersionParam = Annotated[
    str,
    PathParam(
        description="a published version (1, 2, ...) or 'local' (a folder under DIFFEXP_BUNDLES_DIR)",
        json_schema_extra={"pattern": VERSION_PATTERN},
        examples=["1"],
    ),
]
UPLOAD_BODY = upload_body(
    "a .zip or .tar.gz of a bundle folder (bundle.json, dpm/, segmenter/, filter/; .checkpoints/ is "
    "skipped); at most DIFFEXP_MAX_UPLOAD_MB"
)


def get_registry(request: Request) -> Registry:
    registry: Registry = request.app.state.registry
    return registry


RegistryDep = Annotated[Registry, Depends(get_registry)]


def viewer(who: Principal) -> str | None:
    return None if who.admin else who.id


@router.get("", response_model=ModelsPublic, responses=ErrorResponses.MODEL)
def read_models(settings: SettingsDep, registry: RegistryDep, who: PrincipalDep) -> ModelsPublic:
    """The latest version of every model the key may see (its own and the shared ones), with its
    versions, metrics and digest; ``default`` is DIFFEXP_DEFAULT_MODEL."""
    recs = registry.list_models(viewer(who))
    return ModelsPublic(data=[model_public(rec) for rec in recs], default=settings.default_model)


def training_status(request: Request, name: str, who: Principal) -> dict[str, Any] | None:
    """The status of a model that has no published version yet but a training under this name
    (``name``, ``status`` — training|failed — ``owner`` and the training's progress), or None (a 404)."""
    status: dict[str, Any] | None = request.app.state.trainings.status_of(name)
    if status is None or not (who.admin or owner_id_of(status) in (None, who.id, ADMIN)):
        return None
    return status


@router.get("/{name}", response_model=ModelPublic, responses=ErrorResponses.MODEL_READ)
def read_model(request: Request, name: NameParam, registry: RegistryDep, who: PrincipalDep) -> Any:
    """The latest version of the model (``status: ready``), or, while its first training runs, the
    training's status."""
    try:
        return model_public(registry.get(name, None, viewer(who)))
    except ModelNotFound:
        status = training_status(request, name, who)
        if status is None:
            raise
        return JSONResponse(status)


@router.get(
    "/{name}/{version:model_version}", response_model=ModelPublic, responses=ErrorResponses.MODEL_READ
)
def read_model_version(
    name: NameParam, version: VersionParam, registry: RegistryDep, who: PrincipalDep
) -> ModelPublic:
    return model_public(registry.get(name, version, viewer(who)))


@router.get(
    "/{name}/{version:model_version}/" + GRID_FILE,
    response_class=Response,
    responses={
        200: {
            "description": "the version's sample grid: generated pairs, image over mask",
            "content": {"image/png": {}},
        },
        **ErrorResponses.MODEL_READ,
    },
)
def read_sample_grid(
    name: NameParam, version: VersionParam, registry: RegistryDep, who: PrincipalDep
) -> Response:
    """The PNG a training drew when it published the version (``links.sample_grid`` of the model);
    404 for a version without one (pushed, or local)."""
    rec = registry.get(name, version, viewer(who))
    none = HTTPException(status_code=404, detail=f"model {format_ref(name, version)!r} has no sample grid")
    if not links_of(rec):
        raise none
    try:
        data = registry.storage.get(version_prefix(name, str(rec["version"])) + GRID_FILE)
    except ObjectNotFound:
        raise none from None
    # a version never changes: its grid may be cached (privately: it may be a key's own model)
    return Response(data, media_type="image/png", headers={"Cache-Control": "private, max-age=86400"})


@router.delete("/{name}", status_code=204, responses=ErrorResponses.MODEL_DELETE)
def delete_model(name: NameParam, registry: RegistryDep, who: PrincipalDep) -> Response:
    """Delete every published version of the model; 409 while queued or running jobs use it."""
    registry.delete(name, None, viewer(who))
    return Response(status_code=204)


@router.delete("/{name}/{version:model_version}", status_code=204, responses=ErrorResponses.MODEL_DELETE)
def delete_model_version(
    name: NameParam, version: VersionParam, registry: RegistryDep, who: PrincipalDep
) -> Response:
    """Delete one version; 409 while queued or running jobs use it."""
    registry.delete(name, version, viewer(who))
    return Response(status_code=204)


async def read_bundle_upload(request: Request, who: PrincipalDep) -> Any:
    """The ``file`` part, read once the key is known (see app/api/routes/datasets.py)."""
    from app.api.routes.datasets import _invalid

    del who
    form = await request.form(max_files=1, max_fields=2, max_part_size=4096)
    try:
        unknown = sorted(k for k in form.keys() if k != "file")
        if unknown:
            raise _invalid(unknown[0], "extra_forbidden", "Extra inputs are not permitted")
        file = form.get("file")
        if not isinstance(file, UploadFile):
            raise _invalid(
                "file", "missing", "Field required: the bundle archive, as a file part named 'file'"
            )
        yield file
    finally:
        await form.close()


@router.post(
    "/{name}/versions",
    status_code=201,
    response_model=ModelPublic,
    dependencies=[MultipartBody],
    responses=ErrorResponses.MODEL_UPLOAD,
    openapi_extra={"requestBody": UPLOAD_BODY},
)
def publish_model(
    name: NameParam,
    request: Request,
    response: Response,
    upload: Annotated[UploadFile, Depends(read_bundle_upload)],
    registry: RegistryDep,
    settings: SettingsDep,
    who: PrincipalDep,
) -> ModelPublic:
    """Publish a locally trained bundle (a zip or tar.gz of its folder) as the next version of
    ``name``; 201 with the version. 409 when the name belongs to another key, or is reserved for the
    admin (the default model, a local bundle), 422 when the archive is not a complete bundle."""
    limits = Limits(
        max_bytes=settings.max_dataset_mb << 20,
        max_members=settings.max_dataset_members,
        max_ratio=settings.max_compression_ratio,
    )
    with tempfile.TemporaryDirectory(prefix="diffexp-bundle-") as tmp:
        fileobj = upload.file
        size = upload.size if upload.size is not None else fileobj.seek(0, 2)
        members = extract(fileobj, size, Path(tmp), limits)
        top = common_folder(members)
        rec = registry.publish(Path(tmp) / top if top else Path(tmp), name, owner=who.id, owner_name=who.name)
    model = model_public(registry.get(name, rec["version"], viewer(who)))
    response.headers["Location"] = f"{settings.api_v1_str}/models/{name}/{rec['version']}"
    return model
