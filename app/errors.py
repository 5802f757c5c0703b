"""Every error the API answers is an RFC 9457 problem: ``application/problem+json`` with ``type``,
``title``, ``status``, ``detail`` and ``instance`` (the request path), and for validation errors an
``errors`` list naming where each problem is (``pointer`` into the body, or ``parameter``/``header``).

The handlers here are the only place that turns exceptions into responses: routes raise the domain
exceptions (``JobNotFound``, ``JobConflict``) or ``HTTPException`` and never map them by hand. An
``HTTPException`` keeps its headers (``Allow``, ``Retry-After``, ``WWW-Authenticate``), so any new
``HTTPException(401/403/429, headers=...)`` comes out as a problem with no change here. A backing
service that is down (Redis, S3) is a 503 with ``Retry-After``; anything else unexpected is a 500
that names nothing internal, its traceback logged.

``ErrorResponses`` documents these answers in OpenAPI for every route (``problem_responses``).
"""

from __future__ import annotations

import json
import logging
from http import HTTPStatus
from typing import Any

import redis
from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException
from starlette.routing import Match

from app.dataset_check import DatasetInvalid
from app.datasets import DatasetInUse, DatasetNotFound
from app.registry import DigestMismatch, InvalidBundle, ModelInUse, ModelNotFound, NameTaken
from app.schemas import is_job_id
from app.storage import StorageUnavailable
from app.store import JobConflict, JobNotFound
from app.trainings import TrainingConflict, TrainingNotFound

log = logging.getLogger(__name__)

PROBLEM_JSON = "application/problem+json"
RETRY_AFTER_S = 5  # what a 503 asks clients to wait before they try again
MAX_ECHO_CHARS = 200  # an input longer than this is never echoed back in an error


class ProblemError(BaseModel):
    """One validation error: where (``pointer`` into the body, or the ``parameter``/``header``), what."""

    detail: str = Field(description="what is wrong, e.g. 'Input should be less than or equal to 20'")
    type: str = Field(description="machine-readable kind (pydantic's error type), e.g. 'less_than_equal'")
    loc: list[str | int] = Field(description="location as FastAPI names it, e.g. ['body', 'tau']")
    pointer: str | None = Field(default=None, description="JSON Pointer into the request body, e.g. '#/tau'")
    parameter: str | None = Field(default=None, description="the query or path parameter at fault")
    header: str | None = Field(default=None, description="the request header at fault")
    member: str | None = Field(
        default=None, description="the file in the uploaded archive at fault (datasets)"
    )
    input: Any = Field(default=None, description="the offending value, only when short (≤ 200 characters)")


class Problem(BaseModel):
    """An RFC 9457 problem detail (``application/problem+json``)."""

    type: str = Field(default="about:blank", description="problem type URI; about:blank: see status")
    title: str = Field(description="the HTTP status phrase, e.g. 'Not Found'")
    status: int = Field(description="the HTTP status code")
    detail: str | None = Field(default=None, description="a human-readable explanation of this occurrence")
    instance: str | None = Field(default=None, description="the request path")
    errors: list[ProblemError] | None = Field(default=None, description="validation errors (422 only)")


class ProblemResponse(JSONResponse):
    media_type = PROBLEM_JSON


_DESCRIPTIONS = {
    400: "Malformed request (a body that is not JSON)",
    401: "Missing or invalid credentials",
    403: "Credentials without the needed permission",
    404: "No such job, dataset or training (ids are 32 lowercase hex digits), model or route",
    405: "Method not allowed (see the Allow header)",
    409: "Conflict with the job's state, an earlier use of the Idempotency-Key, a training using the dataset, "
    "jobs using the model, or a model name taken by a training or another key",
    413: "Request body larger than DIFFEXP_MAX_BODY_BYTES",
    415: "Request body is not application/json",
    422: "Invalid parameters: `errors` names each field and bound",
    429: "Too many requests (see Retry-After)",
    503: "Redis or storage unreachable; retry after Retry-After seconds",
}


def problem_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` for these error statuses, each a ``Problem`` (application/problem+json)."""
    return {
        s: {"model": Problem, "description": _DESCRIPTIONS.get(s, HTTPStatus(s).phrase)} for s in statuses
    }


class ErrorResponses:
    """The error statuses of each kind of route, for ``responses=`` in route declarations."""

    LIST = problem_responses(422, 503)  # query parameters
    JOB = problem_responses(404, 503)  # a job id in the path
    JOB_QUERY = problem_responses(404, 422, 503)
    JOB_CHANGE = problem_responses(404, 409, 503)
    CREATE = problem_responses(400, 409, 413, 415, 422, 429, 503)
    AUTH = problem_responses(401, 429)  # every /v1 route: a missing, wrong or revoked key; its rate
    ADMIN = problem_responses(401, 403, 429)  # /v1/keys
    DATASET = problem_responses(404, 503)
    DATASET_DELETE = problem_responses(404, 409, 503)
    MODEL = problem_responses(503)
    MODEL_READ = problem_responses(404, 503)
    MODEL_DELETE = problem_responses(404, 409, 503)
    MODEL_UPLOAD = {  # POST /v1/models/{name}/versions: a multipart body, up to DIFFEXP_MAX_UPLOAD_MB
        **problem_responses(400, 409, 415, 422, 503),
        413: {"model": Problem, "description": "Upload larger than DIFFEXP_MAX_UPLOAD_MB"},
        422: {"model": Problem, "description": "Not a complete bundle, or an archive refused (`errors`)"},
    }
    TRAINING_CREATE = problem_responses(400, 404, 409, 413, 415, 422, 429, 503)  # POST /v1/models
    TRAINING = problem_responses(404, 503)
    TRAINING_QUERY = problem_responses(404, 422, 503)
    TRAINING_CHANGE = problem_responses(404, 409, 503)
    UPLOAD = {  # POST /v1/datasets: a multipart body, up to DIFFEXP_MAX_UPLOAD_MB
        **problem_responses(400, 415, 422, 503),
        413: {"model": Problem, "description": "Upload larger than DIFFEXP_MAX_UPLOAD_MB"},
        422: {
            "model": Problem,
            "description": "Not a usable dataset: `errors` names each problem (`type`) and archive `member`",
        },
    }


def problem(
    status: int,
    detail: str | None = None,
    *,
    instance: str | None = None,
    headers: dict[str, str] | None = None,
    errors: list[dict[str, Any]] | None = None,
) -> Response:
    """A problem response; 204 and 304 carry no body."""
    if status in (204, 304):
        return Response(status_code=status, headers=headers)
    body: dict[str, Any] = {"type": "about:blank", "title": _phrase(status), "status": status}
    if detail is not None:
        body["detail"] = detail
    if instance is not None:
        body["instance"] = instance
    if errors is not None:
        body["errors"] = errors
    return ProblemResponse(body, status_code=status, headers=headers)


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


def _short(value: Any) -> tuple[bool, Any]:
    """``(True, value)`` when the value may be echoed: finite, JSON-encodable and short."""
    if isinstance(value, str):
        return True, value if len(value) <= MAX_ECHO_CHARS else value[:MAX_ECHO_CHARS] + "…"
    try:  # NaN, Infinity and integers of thousands of digits do not encode: never echoed
        encoded = json.dumps(jsonable_encoder(value), allow_nan=False)
    except (TypeError, ValueError):
        return False, None
    return len(encoded) <= MAX_ECHO_CHARS, value


def _escape(part: str | int) -> str:
    return str(part).replace("~", "~0").replace("/", "~1")


def validation_errors(raw: list[Any]) -> list[dict[str, Any]]:
    """FastAPI/pydantic errors as problem entries: where, what, and the input only when short."""
    out = []
    for err in raw:
        loc = [p if isinstance(p, int) else str(p) for p in err.get("loc", ())]
        kind = str(err.get("type", "value_error"))
        entry: dict[str, Any] = {"detail": str(err.get("msg", "")), "type": kind, "loc": loc}
        where = loc[0] if loc else None
        if kind == "json_invalid":  # loc holds a character offset, not a path
            reason = (err.get("ctx") or {}).get("error", "")
            entry["detail"] = f"Invalid JSON at character {loc[-1]}: {reason}" if reason else "Invalid JSON"
            entry["pointer"] = "#"
        elif where == "body":
            entry["pointer"] = "#" + "".join("/" + _escape(p) for p in loc[1:])
        elif where in ("query", "path") and len(loc) > 1:
            entry["parameter"] = str(loc[1])
        elif where == "header" and len(loc) > 1:
            entry["header"] = str(loc[1])
        if "input" in err and kind not in ("missing", "json_invalid"):
            ok, value = _short(err["input"])
            if ok:
                entry["input"] = value
        out.append(entry)
    return out


METHODS = ("DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT")


def allowed_methods(request: Request) -> str:
    """Every method some route serves at this path. Starlette's ``Allow`` names the methods of the
    first route whose path matches only, so each method is probed through the routes' ``matches``."""
    allowed = []
    for method in METHODS:
        probe = {
            "type": "http",
            "method": method,
            "path": request.scope["path"],
            "root_path": request.scope.get("root_path", ""),
            "headers": [],
            "query_string": b"",
        }
        if any(route.matches(dict(probe))[0] is Match.FULL for route in request.app.router.routes):
            allowed.append(method)
    return ", ".join(allowed)


async def on_validation_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    errors = validation_errors(list(exc.errors()))
    n = len(errors)
    return problem(
        422,
        f"{n} invalid parameter{'s' if n != 1 else ''}; see errors",
        instance=request.url.path,
        errors=errors,
    )


async def on_http_exception(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    headers = dict(exc.headers or {})
    detail: Any = exc.detail
    if detail == _phrase(exc.status_code):
        detail = None  # Starlette's default detail repeats the title
    if exc.status_code == 405:
        headers["Allow"] = allowed_methods(request) or headers.get("Allow", "")
        detail = detail or f"{request.method} is not allowed here; allowed: {headers['Allow']}"
    elif detail is not None and not isinstance(detail, str):
        detail = json.dumps(jsonable_encoder(detail))
    return problem(exc.status_code, detail, instance=request.url.path, headers=headers)


async def on_job_not_found(request: Request, exc: Exception) -> Response:
    job_id = str(exc.args[0]) if exc.args else ""
    detail = (
        f"job {job_id} not found" if is_job_id(job_id) else "job not found (ids are 32 lowercase hex digits)"
    )
    return problem(404, detail, instance=request.url.path)


async def on_training_not_found(request: Request, exc: Exception) -> Response:
    training_id = str(exc.args[0]) if exc.args else ""
    detail = (
        f"training {training_id} not found"
        if is_job_id(training_id)
        else "training not found (ids are 32 lowercase hex digits)"
    )
    return problem(404, detail, instance=request.url.path)


async def on_dataset_invalid(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, DatasetInvalid)
    errors = []
    for issue in exc.issues:
        entry: dict[str, Any] = {"detail": issue.detail, "type": issue.kind, "loc": ["body", "file"]}
        if issue.member is not None:
            entry["loc"].append(issue.member)
            entry["member"] = issue.member
        errors.append(entry)
    return problem(422, exc.summary(), instance=request.url.path, errors=errors)


async def on_dataset_not_found(request: Request, exc: Exception) -> Response:
    dataset_id = str(exc.args[0]) if exc.args else ""
    detail = (
        f"dataset {dataset_id} not found"
        if is_job_id(dataset_id)
        else "dataset not found (ids are 32 lowercase hex digits)"
    )
    return problem(404, detail, instance=request.url.path)


async def on_model_not_found(request: Request, exc: Exception) -> Response:
    ref = str(exc.args[0]) if exc.args else ""
    return problem(404, f"model {ref[:MAX_ECHO_CHARS]!r} not found", instance=request.url.path)


async def on_invalid_bundle(request: Request, exc: Exception) -> Response:
    error = {"detail": str(exc), "type": "invalid_bundle", "loc": ["body", "file"]}
    return problem(422, f"not a publishable bundle: {exc}", instance=request.url.path, errors=[error])


async def on_job_conflict(request: Request, exc: Exception) -> Response:
    return problem(409, str(exc), instance=request.url.path)


async def on_unavailable(request: Request, exc: Exception) -> Response:
    log.warning("%s %s: backing service unavailable: %r", request.method, request.url.path, exc)
    return problem(
        503,
        "a backing service (job store or storage) is unavailable; try again later",
        instance=request.url.path,
        headers={"Retry-After": str(RETRY_AFTER_S)},
    )


async def on_unexpected(request: Request, exc: Exception) -> Response:
    log.error("%s %s: unhandled error", request.method, request.url.path, exc_info=exc)
    return problem(500, "internal error; it has been logged", instance=request.url.path)


def unavailable_errors() -> tuple[type[Exception], ...]:
    """Exceptions that mean Redis or S3 cannot be reached (or is busy): 503, not 500."""
    kinds: list[type[Exception]] = [
        redis.ConnectionError,
        redis.TimeoutError,
        redis.exceptions.LockError,
        StorageUnavailable,
    ]
    try:
        from botocore import exceptions as boto

        kinds += [boto.ConnectionError, boto.ReadTimeoutError, boto.ConnectionClosedError]
    except ImportError:  # pragma: no cover - boto3 is a dependency of the API
        pass
    return tuple(kinds)


def install_error_handlers(app: FastAPI) -> None:
    """Register the one set of exception handlers (``create_app`` calls this)."""
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(HTTPException, on_http_exception)
    app.add_exception_handler(JobNotFound, on_job_not_found)
    app.add_exception_handler(JobConflict, on_job_conflict)
    app.add_exception_handler(DatasetInvalid, on_dataset_invalid)
    app.add_exception_handler(DatasetNotFound, on_dataset_not_found)
    app.add_exception_handler(DatasetInUse, on_job_conflict)
    app.add_exception_handler(ModelNotFound, on_model_not_found)
    app.add_exception_handler(ModelInUse, on_job_conflict)
    app.add_exception_handler(NameTaken, on_job_conflict)
    app.add_exception_handler(InvalidBundle, on_invalid_bundle)
    app.add_exception_handler(DigestMismatch, on_unexpected)
    app.add_exception_handler(TrainingNotFound, on_training_not_found)
    app.add_exception_handler(TrainingConflict, on_job_conflict)
    for kind in unavailable_errors():
        app.add_exception_handler(kind, on_unavailable)
    app.add_exception_handler(Exception, on_unexpected)
