"""Training jobs: ``POST /v1/models`` trains a bundle on a dataset (202 with the training);
``/v1/trainings`` lists, reads, cancels and streams them (``app.trainings``, docs/training.md)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, cast

from fastapi import APIRouter, Depends, Header, Path, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, Field
from sse_starlette import EventSourceResponse

from app.api.deps import DatasetsDep, JsonBody, PrincipalDep, SettingsDep, too_many
from app.api.routes.events import events_200
from app.auth import QuotaExceeded
from app.errors import ErrorResponses
from app.events import MAX_EVENT_ID, job_events
from app.layout import owner_id_of
from app.registry import Registry
from app.schemas import JOB_ID_PATTERN, JobStatus, is_job_id
from app.trainings import (
    STAGE_LABELS,
    TrainingConflict,
    TrainingCreate,
    TrainingNotFound,
    TrainingStore,
    check_dataset,
    too_many_steps,
)

router = APIRouter(tags=["trainings"])


class TrainingProgress(BaseModel):
    stage: str | None = Field(default=None, description="dpm (Stage I), segmenter (II) or filter (IV)")
    stage_label: str | None = Field(default=None, description="I, II or IV")
    step: int = Field(default=0, description="steps done in this stage")
    steps: int = Field(default=0, description="steps of this stage")
    loss: float | None = Field(default=None, description="the loss of the last step")
    eta_seconds: float | None = Field(default=None, description="time left at the current rate")
    pairs: int | None = Field(default=None, description="labelled training pairs (the split's train side)")
    unlabelled: int | None = Field(
        default=None,
        description="unlabelled images Stage I learns appearance from (the dataset's unlabelled/)",
    )
    updated_at: datetime | None = None


class TrainingLinks(BaseModel):
    self: str
    events: str
    model: str = Field(description="GET it: the model's status (training, ready or failed)")


class TrainingPublic(BaseModel):
    id: str = Field(description="32 lowercase hex digits")
    owner: str
    name: str = Field(description="the model name it publishes")
    dataset: str
    params: dict[str, Any] = Field(description="the body's training settings with defaults filled in")
    status: JobStatus
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    error: str | None = None
    attempts: int = Field(default=0, description="runs started (a worker that died counts)")
    progress: TrainingProgress | None = None
    model: dict[str, Any] | None = Field(
        default=None, description="once succeeded: the published model (name, version, digest, metrics)"
    )
    links: TrainingLinks


class TrainingsPublic(BaseModel):
    data: list[TrainingPublic]
    count: int
    limit: int
    offset: int


def public(request: Request, rec: dict[str, Any]) -> TrainingPublic:
    v1 = request.app.state.settings.api_v1_str
    progress = rec.get("progress")
    if progress:
        progress = {**progress, "stage_label": STAGE_LABELS.get(progress.get("stage", ""))}
    links = {
        "self": f"{v1}/trainings/{rec['id']}",
        "events": f"{v1}/trainings/{rec['id']}/events",
        "model": f"{v1}/models/{rec['name']}",
    }
    return TrainingPublic.model_validate({**rec, "progress": progress, "links": links})


async def get_trainings(request: Request) -> TrainingStore:
    trainings: TrainingStore = request.app.state.trainings
    return trainings


TrainingsDep = Annotated[TrainingStore, Depends(get_trainings)]


async def valid_training_id(
    training_id: Annotated[
        str,
        Path(
            description="training id: 32 lowercase hex digits; any other string names no training (404)",
            json_schema_extra={"pattern": JOB_ID_PATTERN},
        ),
    ],
) -> str:
    if not is_job_id(training_id):
        raise TrainingNotFound(training_id)
    return training_id


def owned_training(
    training_id: Annotated[str, Depends(valid_training_id)], trainings: TrainingsDep, who: PrincipalDep
) -> dict[str, Any]:
    """The training if the caller may see it (its owner or the admin); else the 404 of no training."""
    rec = trainings.get(training_id)
    if not (who.admin or owner_id_of(rec) == who.id):
        raise TrainingNotFound(training_id)
    return rec


OwnedTraining = Annotated[dict[str, Any], Depends(owned_training)]


def published_owner(trainings: TrainingStore, name: str) -> str | None:
    """The id of the key that owns ``name`` in the registry (the admin for a reserved name: the
    default model, a local bundle), or None when nobody does."""
    return Registry(trainings.storage, trainings.r, trainings.settings).owner_of(name)


@router.post(
    "/models",
    status_code=202,
    response_model=TrainingPublic,
    dependencies=[JsonBody],
    responses=ErrorResponses.TRAINING_CREATE,
)
def create_training(
    request: Request,
    response: Response,
    body: TrainingCreate,
    trainings: TrainingsDep,
    datasets: DatasetsDep,
    settings: SettingsDep,
    who: PrincipalDep,
) -> TrainingPublic:
    """Train a bundle named ``name`` on one of the caller's datasets, on a worker of the training
    queue; 202 with the training. Follow ``GET /v1/trainings/{id}`` (or its events), or
    ``GET /v1/models/{name}``. 404: no such dataset of the caller's; 409: the name is being trained,
    or was published by another key (its publisher may train new versions); 429: the key has
    ``DIFFEXP_TRAIN_MAX_ACTIVE`` trainings queued or running."""
    if errors := too_many_steps(body, settings):
        raise RequestValidationError(errors)
    if not who.admin and (active := trainings.active_count(who.id)) >= settings.train_max_active:
        raise too_many(
            QuotaExceeded(
                "train_max_active",
                f"quota: this key may have {settings.train_max_active} trainings queued or running "
                f"(DIFFEXP_TRAIN_MAX_ACTIVE) and has {active}; wait for one to finish or cancel one",
                retry_after=60,
            )
        )
    check_dataset(datasets, body.dataset, who.id, who.admin)
    rec = trainings.create(
        body,
        owner=who.name,
        owner_id=who.id,
        admin=who.admin,
        published_owner=published_owner(trainings, body.name),
    )
    training = public(request, trainings.get(rec["id"]))
    response.headers["Location"] = training.links.self
    return training


@router.get(
    "/trainings",
    response_model=TrainingsPublic,
    responses=ErrorResponses.LIST,
)
def list_trainings(
    request: Request,
    trainings: TrainingsDep,
    who: PrincipalDep,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    offset: Annotated[int, Query(ge=0, le=1_000_000)] = 0,
) -> TrainingsPublic:
    """The caller's trainings (the admin: every one), newest first."""
    recs, total = trainings.page(owner=None if who.admin else who.id, limit=limit, offset=offset)
    return TrainingsPublic(data=[public(request, r) for r in recs], count=total, limit=limit, offset=offset)


@router.get("/trainings/{training_id}", response_model=TrainingPublic, responses=ErrorResponses.TRAINING)
def read_training(request: Request, rec: OwnedTraining) -> TrainingPublic:
    return public(request, rec)


@router.post(
    "/trainings/{training_id}/cancel",
    response_model=TrainingPublic,
    responses=ErrorResponses.TRAINING_CHANGE,
)
def cancel_training(request: Request, trainings: TrainingsDep, rec: OwnedTraining) -> TrainingPublic:
    """Stop the training within about a second of its worker's next step; 409 once it has ended."""
    if JobStatus(rec["status"]).is_terminal():
        raise TrainingConflict(f"training {rec['id']} has already ended ({rec['status']})")
    return public(request, trainings.cancel(rec["id"]))


@router.get(
    "/trainings/{training_id}/events",
    response_class=EventSourceResponse,
    responses={**events_200("TrainingPublic"), **ErrorResponses.TRAINING_QUERY},
)
async def training_event_stream(
    request: Request,
    trainings: TrainingsDep,
    settings: SettingsDep,
    rec: OwnedTraining,
    last_event_id: Annotated[
        int | None,
        Header(alias="Last-Event-ID", ge=0, le=MAX_EVENT_ID, description="resume after this event id"),
    ] = None,
) -> EventSourceResponse:
    """The training's changes as Server-Sent Events, like ``GET /v1/jobs/{id}/events``: `progress`
    events (the training as `data`), then one `succeeded`, `failed` or `canceled` event."""
    events = job_events(
        cast(Any, trainings),  # the same version/get interface as the job store
        rec["id"],
        render=lambda r: public(request, r).model_dump_json(),
        last_event_id=last_event_id,
        poll_s=settings.events_poll_s,
        max_s=settings.events_max_s,
    )
    return EventSourceResponse(events, ping=settings.events_ping_s)
