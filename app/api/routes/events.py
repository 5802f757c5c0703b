"""``GET /v1/jobs/{id}/events``: the job's progress as Server-Sent Events (``app.events``)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Header, Request
from sse_starlette import EventSourceResponse

from app.api.deps import OwnedJob, SettingsDep, StoreDep
from app.api.routes.jobs import public
from app.errors import ErrorResponses
from app.events import MAX_EVENT_ID, job_events

router = APIRouter(prefix="/jobs", tags=["jobs"])


def events_200(model: str) -> dict[int | str, dict[str, Any]]:
    """The 200 of an event stream. The body is text; each event in it is described by
    ``x-itemSchema`` (OpenAPI 3.2's ``itemSchema``, which a 3.1 document cannot name): its ``data``
    is one line of JSON, an object of schema ``model``, not a free string."""
    event = {
        "type": "object",
        "required": ["event", "id", "data"],
        "properties": {
            "event": {"type": "string", "enum": ["progress", "succeeded", "failed", "canceled"]},
            "id": {"type": "string", "pattern": "^[0-9]+$", "description": "an increasing integer"},
            "data": {
                "type": "string",
                "contentMediaType": "application/json",
                "contentSchema": {"$ref": f"#/components/schemas/{model}"},
            },
        },
    }
    return {
        200: {
            "description": "a stream of `progress` events, then one `succeeded`, `failed` or `canceled` "
            f"event; each `id:` an increasing integer, each `data:` a {model} object as one line of JSON",
            "content": {
                "text/event-stream": {
                    "schema": {"type": "string", "description": "Server-Sent Events"},
                    "x-itemSchema": event,
                }
            },
        }
    }


@router.get(
    "/{job_id}/events",
    response_class=EventSourceResponse,
    responses={**events_200("JobPublic"), **ErrorResponses.JOB_QUERY},
)
async def job_event_stream(
    request: Request,
    store: StoreDep,
    settings: SettingsDep,
    rec: OwnedJob,
    last_event_id: Annotated[
        int | None,
        Header(
            alias="Last-Event-ID",
            ge=0,
            le=MAX_EVENT_ID,
            description="the id of the last event received: resume after it (a finished job's "
            "terminal event is sent again)",
        ),
    ] = None,
) -> EventSourceResponse:
    """The job's changes as Server-Sent Events: `event: progress` whenever it changed (at once on
    connecting without `Last-Event-ID`), then exactly one `event: succeeded|failed|canceled`, and
    the stream ends. Keep-alive comments every `DIFFEXP_EVENTS_PING_S`. The stream also ends, with
    no terminal event, when the job is deleted and after `DIFFEXP_EVENTS_MAX_S`: reconnect with
    `Last-Event-ID` to resume. Send the key as a header (`fetch()` streaming in a browser: the
    `EventSource` API cannot send one); polling `GET /v1/jobs/{id}` works as well."""
    events = job_events(
        store,
        rec["id"],
        render=lambda r: public(request, r).model_dump_json(),
        last_event_id=last_event_id,
        poll_s=settings.events_poll_s,
        max_s=settings.events_max_s,
    )
    return EventSourceResponse(events, ping=settings.events_ping_s)
