"""The event stream of a job (``GET /v1/jobs/{id}/events``), as Server-Sent Events.

Every change a client can see increments the job's version ``J:ver`` (``app.store``); the stream
sends the job whenever its version grew, with the version as the event's ``id``:

- ``event: progress``: the job (``JobPublic`` JSON) changed and is still queued or running;
- ``event: succeeded`` | ``failed`` | ``canceled``: sent once, when the job is finished, and the
  stream ends. A client that resumes a finished job's stream gets this event again, whatever its
  ``Last-Event-ID``, so it always learns the outcome.

``Last-Event-ID`` resumes: versions up to it are not sent again. Ids only grow, also when Redis lost
the job's version (it restarts at 1): the next event then gets ``Last-Event-ID + 1``.

The stream ends, without a terminal event, when the job is deleted (a reconnect answers 404), when
Redis or storage fails (a reconnect answers 503 until they are back), and after ``events_max_s``
(the client reconnects with ``Last-Event-ID`` and misses nothing).

Why polling the version rather than Redis pub/sub: the API's Redis client is synchronous, so each
poll is one GET of one small key in a worker thread (``anyio.to_thread``, never blocking the event
loop), and the stream needs no Redis connection of its own. Pub/sub would hold a connection per
stream, and a message published while the client reconnects is lost, so the stream would have to
read the version on every (re)connect anyway. At ``events_poll_s`` = 0.5 s a thousand open streams
cost Redis 2 000 GETs a second, a small fraction of what it serves.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
import redis
from anyio import to_thread
from sse_starlette import ServerSentEvent

from app.schemas import JobStatus
from app.storage import StorageUnavailable
from app.store import JobNotFound, JobStore

MAX_EVENT_ID = 2**53 - 1  # ids travel as JSON-safe integers (the version counter never gets near)


def next_event(
    status: JobStatus, version: int | None, seen: int | None, last_sent: int | None
) -> tuple[str, int] | None:
    """The event to send for a job in ``status`` at ``version``, as ``(name, id)``, or None.

    ``seen``: the version the client has (``Last-Event-ID`` at first); ``last_sent``: the last id it
    got. A finished job always gets its terminal event; a running one a ``progress`` event when its
    version changed (None: the job has no version in Redis yet, nothing to number it with).
    """
    if status.is_terminal():
        return status.value, max(version or 0, last_sent or 0)
    if version is None or version == seen:
        return None
    return "progress", version if last_sent is None or version > last_sent else last_sent + 1


async def job_events(
    store: JobStore,
    job_id: str,
    *,
    render: Callable[[dict[str, Any]], str],
    last_event_id: int | None = None,
    poll_s: float = 0.5,
    max_s: float = 300.0,
) -> AsyncIterator[ServerSentEvent]:
    """The events of job ``job_id`` (``render`` turns its record into the ``data`` of an event)."""
    seen = last_sent = last_event_id
    deadline = anyio.current_time() + max_s
    first = True  # the record is read at once: a finished job answers whatever the client saw
    while True:
        try:
            version = await to_thread.run_sync(store.version, job_id)
            # the record is read after the version, so it is at least as new: no change is missed
            changed = first or version is None or version != seen
            rec = await to_thread.run_sync(store.get, job_id) if changed else None
            first = False
        except JobNotFound:
            return  # deleted
        except (redis.RedisError, StorageUnavailable):
            return
        if rec is not None:
            event = next_event(JobStatus(rec["status"]), version, seen, last_sent)
            if event is not None:
                name, event_id = event
                yield ServerSentEvent(render(rec), event=name, id=str(event_id))
                if name != "progress":
                    return
                seen, last_sent = version, event_id
        if anyio.current_time() >= deadline:
            return
        await anyio.sleep(poll_s)
