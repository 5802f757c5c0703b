"""Typed errors. Every HTTP error of the service is an RFC 9457 problem (``type``, ``title``,
``status``, ``detail``, and ``errors`` for validation); each exception carries it whole in
``problem`` and the parts as attributes, so callers can branch on the class and show ``str(exc)``."""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from http import HTTPStatus
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from diffuseexpand.types import Job


class DiffuseExpandError(Exception):
    """Base of every error this client raises. ``status`` is None when no HTTP answer came."""

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        title: str | None = None,
        detail: str | None = None,
        problem: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.title = title
        self.detail = detail
        self.problem: dict[str, Any] = problem or {}


class Unreachable(DiffuseExpandError):
    """The service could not be reached (connection refused, DNS, timeout), after the retries."""


class Unauthorized(DiffuseExpandError):
    """401: a missing, wrong or revoked API key."""


class Forbidden(DiffuseExpandError):
    """403: a key without the needed permission (managing keys needs the admin key)."""


class NotFound(DiffuseExpandError):
    """404: no such job for this key (another key's job is a 404 too), or no such route."""


class Conflict(DiffuseExpandError):
    """409: the job's state forbids it (cancel a finished job, download before success), or the
    Idempotency-Key was used with another body."""


class InvalidRequest(DiffuseExpandError):
    """400, 413, 415 or 422: the request itself is wrong; ``errors`` names each field at fault."""

    def __init__(self, message: str, *, errors: list[dict[str, Any]] | None = None, **kw: Any) -> None:
        super().__init__(message, **kw)
        self.errors: list[dict[str, Any]] = errors or []

    @property
    def fields(self) -> list[str]:
        """The names at fault: body fields (``count``, ``tau``), query parameters or headers."""
        return [field_name(e) for e in self.errors]


class RateLimited(DiffuseExpandError):
    """429: the key's request rate, active jobs or daily pairs are used up; try after ``retry_after`` s."""

    def __init__(self, message: str, *, retry_after: float | None = None, **kw: Any) -> None:
        super().__init__(message, **kw)
        self.retry_after = retry_after


class ServiceUnavailable(DiffuseExpandError):
    """503 (and 502/504): a backing service is down; the calls that may be repeated were retried."""

    def __init__(self, message: str, *, retry_after: float | None = None, **kw: Any) -> None:
        super().__init__(message, **kw)
        self.retry_after = retry_after


class ServerError(DiffuseExpandError):
    """Any other 5xx: a defect on the service's side, logged there."""


class JobFailed(DiffuseExpandError):
    """``wait`` ended on a job that failed or was canceled; ``job`` is its last state."""

    def __init__(self, job: Job) -> None:
        what = "was canceled" if job.status == "canceled" else f"failed: {job.error or 'no reason given'}"
        super().__init__(f"job {job.id} {what}", detail=job.error)
        self.job = job


class WaitTimeout(DiffuseExpandError, TimeoutError):
    """``wait(timeout=...)`` ran out before the job finished; ``job`` is its last known state."""

    def __init__(self, job_id: str, timeout: float, job: Job | None = None) -> None:
        super().__init__(f"job {job_id} not finished after {timeout:g} s")
        self.job = job


class UnsafeArchive(DiffuseExpandError, ValueError):
    """A zip member would land outside the destination folder (absolute path, ``..``, a link)."""


_BY_STATUS: dict[int, type[DiffuseExpandError]] = {
    400: InvalidRequest,
    401: Unauthorized,
    403: Forbidden,
    404: NotFound,
    409: Conflict,
    413: InvalidRequest,
    415: InvalidRequest,
    422: InvalidRequest,
    429: RateLimited,
    502: ServiceUnavailable,
    503: ServiceUnavailable,
    504: ServiceUnavailable,
}


def field_name(error: dict[str, Any]) -> str:
    """Where one validation error is: ``tau`` for pointer ``#/tau``, else its parameter or header."""
    pointer = error.get("pointer")
    if isinstance(pointer, str) and pointer not in ("", "#"):
        return pointer.removeprefix("#/").replace("~1", "/").replace("~0", "~")
    for key in ("parameter", "header"):
        if error.get(key):
            return str(error[key])
    loc = error.get("loc") or []
    return ".".join(str(p) for p in loc[1:] or loc) or "request"


def retry_after_s(value: str | None) -> float | None:
    """``Retry-After`` in seconds: delta-seconds or an HTTP date (RFC 9110 10.2.3)."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


def _describe(error: dict[str, Any]) -> str:
    text = f"{field_name(error)}: {error.get('detail') or error.get('msg') or 'invalid'}"
    if "input" in error and error["input"] is not None:
        text += f" (got {json.dumps(error['input'])})"
    return text


def error_from_response(status: int, body: bytes, headers: Mapping[str, str]) -> DiffuseExpandError:
    """The typed error for an HTTP error answer; its body is a problem, or any text from a proxy."""
    try:
        parsed = json.loads(body) if body else None
    except ValueError:
        parsed = None
    if isinstance(parsed, dict):
        problem = parsed
    else:  # not the service talking (a proxy, a load balancer): keep a short excerpt
        text = body[:200].decode("utf-8", "replace").strip()
        problem = {"status": status, "detail": text or None}
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = "Error"
    title = str(problem.get("title") or phrase)
    detail = problem.get("detail")
    detail = str(detail) if detail is not None else None
    errors = [e for e in problem.get("errors") or [] if isinstance(e, dict)]
    if errors:  # "2 invalid parameters; see errors": say which, and what is wrong with them
        detail = "; ".join(_describe(e) for e in errors)
    message = f"{status} {title}" + (f": {detail}" if detail else "")
    kind = _BY_STATUS.get(status, ServerError if status >= 500 else DiffuseExpandError)
    kw: dict[str, Any] = {"status": status, "title": title, "detail": detail, "problem": problem}
    if kind in (RateLimited, ServiceUnavailable):
        retry = retry_after_s(headers.get("retry-after"))
        if retry is not None:
            message += f" (retry after {retry:g} s)"
        kw["retry_after"] = retry
    if kind is InvalidRequest:
        kw["errors"] = errors
    return kind(message, **kw)
