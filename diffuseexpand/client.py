"""A client for the DiffuseExpand service: httpx, tqdm and the standard library only (no torch).

    from diffuseexpand import Client

    with Client("http://localhost:8000", api_key="dx_...") as client:
        job = client.submit(count=100, tau=1.0)
        client.wait(job.id)  # a progress bar of kept/target pairs
        client.download(job.id, "synthetic/", unpack=True)

``Client`` is synchronous, ``AsyncClient`` the same calls awaited. Both build requests and read
answers through ``_Base``; only the sending (and sleeping) differs. Errors are the typed exceptions
of ``diffuseexpand.errors``.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Literal, Self
from urllib.parse import quote

import httpx
from tqdm import tqdm

from diffuseexpand import sse
from diffuseexpand.errors import (
    DiffuseExpandError,
    JobFailed,
    RateLimited,
    ServerError,
    ServiceUnavailable,
    Unreachable,
    WaitTimeout,
    error_from_response,
)
from diffuseexpand.types import Job, Model, PairsPage
from diffuseexpand.unpack import safe_extract

__all__ = ["AsyncClient", "Client"]

VERSION = "0.1.0"
DEFAULT_TIMEOUT_S = 30.0
STREAM_READ_TIMEOUT_S = 60.0  # longest silence on the event stream before it is reopened
MAX_BACKOFF_S = 30.0
CHUNK = 1 << 20
Format = Literal["plain", "nnunet", "monai"]
SUBMIT_FIELDS = frozenset(
    "count model tau eta steps w_cf w_cg seed guidance solver karras early_reject max_attempts size callback_url "
    "callback_secret mask_source real_share clean_masks".split()
)

# A request that surely never reached the service may always be sent again; one that may have
# (a read error, a 503 from a proxy after forwarding) only when repeating it changes nothing.
_NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)


@dataclass(frozen=True)
class _Call:
    method: str
    path: str
    params: dict[str, Any] | None = None
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    idempotent: bool = True
    ok_on_retry: frozenset[int] = frozenset()  # DELETE: a 404 after a lost answer means it was done


class _Bar:
    """The tqdm bar of ``wait``: kept of target pairs, with generated/discarded, the phase and the
    service's own rate (generated pairs per second of the job's running time). Not tqdm's rate: that
    one divides the pairs that appeared while watching by the seconds watched, so a job that finished
    before ``wait`` read 16 pairs in a millisecond ("17272.36 pair/s")."""

    FORMAT = "{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]"

    def __init__(self, job_id: str, enabled: bool, file: IO[str] | None = None) -> None:
        self.job_id, self.enabled, self.file = job_id, enabled, file
        self.bar: tqdm[Any] | None = None

    def update(self, job: Job) -> None:
        if not self.enabled:
            return
        p = job.progress
        if self.bar is None:
            self.bar = tqdm(
                total=p.target,
                initial=p.kept_capped,
                desc=f"job {self.job_id[:8]}",
                unit="pair",
                bar_format=self.FORMAT,
                dynamic_ncols=True,
                file=self.file or sys.stderr,
            )
        self.bar.total = p.target
        self.bar.n = p.kept_capped
        postfix: dict[str, Any] = {"status": job.status, "generated": p.generated, "discarded": p.discarded}
        if p.phase:
            postfix["phase"] = p.phase
        if p.pairs_per_second:
            postfix["rate"] = f"{p.pairs_per_second:.2f} pair/s"
        if p.eta_seconds is not None and not job.done:
            postfix["eta"] = f"{p.eta_seconds:.0f} s"
        self.bar.set_postfix(postfix, refresh=False)
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class _Base:
    """Configuration, request building, retry policy and answer parsing, shared by both clients."""

    events_path = "/v1/jobs/{id}/events"  # a subclass (or a test) may point it elsewhere

    def __init__(
        self,
        url: str | None = None,
        api_key: str | None = None,
        *,
        timeout: float = DEFAULT_TIMEOUT_S,
        retries: int = 3,
        backoff: float = 0.5,
        events: bool = True,
    ) -> None:
        url = url or os.environ.get("DIFFEXP_URL")
        if not url:
            raise ValueError("no service URL: pass url= or set DIFFEXP_URL")
        self.url = _base_url(url)
        self.api_key = api_key if api_key is not None else os.environ.get("DIFFEXP_API_KEY") or None
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self.events = events

    def _headers(self) -> dict[str, str]:
        headers = {"User-Agent": f"diffuseexpand-client/{VERSION}", "Accept": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        return headers

    # ---- requests ----

    @staticmethod
    def _job_path(job_id: str, suffix: str = "") -> str:
        return f"/v1/jobs/{quote(str(job_id), safe='')}{suffix}"  # an id can never turn into another path

    def _submit_call(self, body: dict[str, Any], idempotency_key: str | None) -> _Call:
        unknown = sorted(set(body) - SUBMIT_FIELDS)
        if unknown:
            raise TypeError(f"submit() got unexpected parameters: {', '.join(unknown)}")
        body = {k: v for k, v in body.items() if v is not None}
        # the key makes a repeated POST (after a lost answer) return the first job, not a second one
        key = idempotency_key or uuid.uuid4().hex
        return _Call("POST", "/v1/jobs", body=body, headers={"Idempotency-Key": key})

    def _download_params(self, format: str, partial: bool) -> dict[str, str]:
        params = {"format": format}
        if partial:
            params["partial"] = "true"
        return params

    # ---- retries ----

    def _delay(self, call: _Call, attempt: int, *, exc: Exception) -> float | None:
        """Seconds to wait before sending ``call`` again after ``exc``, or None to give up."""
        if attempt >= self.retries:
            return None
        delay = min(MAX_BACKOFF_S, self.backoff * 2**attempt)
        if isinstance(exc, httpx.TransportError):
            return delay if call.idempotent or isinstance(exc, _NOT_SENT) else None
        if isinstance(exc, ServiceUnavailable) and call.idempotent:
            return min(MAX_BACKOFF_S, max(delay, exc.retry_after or 0.0))
        return None

    def _unreachable(self, exc: httpx.TransportError) -> Unreachable:
        reason = str(exc) or type(exc).__name__
        return Unreachable(f"cannot reach {self.url}: {reason}")

    @staticmethod
    def _error(response: httpx.Response) -> DiffuseExpandError:
        return error_from_response(response.status_code, response.content, response.headers)

    def _stream_timeout(self, deadline: float | None) -> httpx.Timeout:
        read = STREAM_READ_TIMEOUT_S
        if deadline is not None:
            read = max(0.1, min(read, deadline - time.monotonic() + 0.5))
        return httpx.Timeout(self.timeout, read=read)

    # ---- the event stream ----

    def _events_answer(self, response: httpx.Response) -> Literal["stream", "poll", "retry"]:
        """What to do with the event stream's answer (its body read when it is an error): read it,
        poll instead (no such route on this service), or reopen it. Other errors are raised."""
        status = response.status_code
        if status in (404, 405):
            return "poll"  # a service without the route; a job that does not exist 404s on polling too
        if status >= 400:
            error = self._error(response)
            if isinstance(error, ServiceUnavailable | ServerError):
                return "retry"
            raise error
        if not response.headers.get("content-type", "").startswith("text/event-stream"):
            return "poll"
        return "stream"

    @staticmethod
    def _event_job(event: sse.Event) -> Job | None:
        try:
            data = json.loads(event.data)
            return Job.from_json(data) if isinstance(data, dict) and "id" in data else None
        except (ValueError, KeyError, TypeError):
            return None  # not a job: an event kind this client does not know

    def _events_headers(self, decoder: sse.Decoder) -> dict[str, str]:
        headers = {"Accept": "text/event-stream", "Cache-Control": "no-cache"}
        if decoder.last_id is not None:
            headers["Last-Event-ID"] = decoder.last_id  # the service sends only what came after
        return headers

    @staticmethod
    def _check_deadline(deadline: float | None, job_id: str, timeout: float | None, job: Job | None) -> None:
        if deadline is not None and time.monotonic() >= deadline:
            raise WaitTimeout(job_id, timeout or 0.0, job)

    @staticmethod
    def _finished(job: Job) -> Job:
        if job.status in ("failed", "canceled"):
            raise JobFailed(job)
        return job

    @staticmethod
    def _zip_target(job_id: str, dest: str | os.PathLike[str], format: str) -> Path:
        """``dest`` itself, or in it when it is a folder or ends in ``/``: ``ID.zip``, ``ID-FORMAT.zip``
        for another format than plain (so a folder can hold both)."""
        path = Path(dest)
        if path.is_dir() or os.fspath(dest).endswith(("/", os.sep)):
            return path / (f"{job_id}.zip" if format == "plain" else f"{job_id}-{format}.zip")
        return path


def _base_url(url: str) -> str:
    """``url`` checked (http or https, with a host) without a trailing ``/`` or ``/v1``."""
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL as exc:
        raise ValueError(f"invalid service URL {url!r}: {exc}") from None
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise ValueError(f"invalid service URL {url!r}: expected http(s)://HOST[:PORT]")
    return str(parsed).rstrip("/").removesuffix("/v1")


class Client(_Base):
    """The DiffuseExpand API, synchronously. ``url`` and ``api_key`` default to ``DIFFEXP_URL`` and
    ``DIFFEXP_API_KEY``. Transport errors and 503s are retried ``retries`` times with exponential
    backoff on calls that are safe to repeat (every GET and DELETE, and ``submit``, which sends an
    Idempotency-Key). ``transport`` is handed to httpx (e.g. ``httpx.HTTPTransport(retries=...)``)."""

    def __init__(
        self,
        url: str | None = None,
        api_key: str | None = None,
        *,
        timeout: float = DEFAULT_TIMEOUT_S,
        retries: int = 3,
        backoff: float = 0.5,
        events: bool = True,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        super().__init__(url, api_key, timeout=timeout, retries=retries, backoff=backoff, events=events)
        self._http = httpx.Client(
            base_url=self.url, headers=self._headers(), timeout=timeout, transport=transport
        )

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _send(self, call: _Call) -> httpx.Response:
        attempt = 0
        while True:
            try:
                response = self._http.request(
                    call.method, call.path, params=call.params, json=call.body, headers=call.headers
                )
                if response.status_code < 400 or (attempt and response.status_code in call.ok_on_retry):
                    return response
                error: Exception = self._error(response)
            except httpx.TransportError as exc:
                error = exc
            delay = self._delay(call, attempt, exc=error)
            if delay is None:
                if isinstance(error, httpx.TransportError):
                    raise self._unreachable(error) from error
                raise error
            time.sleep(delay)
            attempt += 1

    def _json(self, call: _Call) -> Any:
        return self._send(call).json()

    # ---- jobs ----

    def submit(
        self,
        count: int,
        *,
        model: str | None = None,
        tau: float | None = None,
        eta: float | None = None,
        steps: int | None = None,
        w_cf: float | None = None,
        w_cg: float | None = None,
        seed: int | None = None,
        guidance: str | None = None,
        solver: str | None = None,
        karras: bool | None = None,
        early_reject: bool | None = None,
        max_attempts: int | None = None,
        size: str | None = None,
        mask_source: str | None = None,
        real_share: float | None = None,
        clean_masks: bool | None = None,
        callback_url: str | None = None,
        callback_secret: str | None = None,
        idempotency_key: str | None = None,
    ) -> Job:
        """Queue a job for ``count`` kept pairs; unset parameters take the model's defaults.
        ``callback_url`` is POSTed the job when it ends, signed with ``callback_secret`` (drawn by the
        service unless given, and then only in this answer: ``Job.callback_secret``). Sending it
        twice with the same ``idempotency_key`` returns the first job. ``size`` (``"256x192"``)
        crops and resizes each pair to that shape; default: the model's square output.
        ``mask_source`` is ``generated`` (default), ``real`` (a training mask of the model, deformed)
        or ``mixed`` (``real_share`` of the pairs real); ``clean_masks`` cleans generated masks. Each
        pair says where its mask came from (``Pair.mask_source``, the manifest's ``mask_source``)."""
        body = {
            "count": count,
            "model": model,
            "tau": tau,
            "eta": eta,
            "steps": steps,
            "w_cf": w_cf,
            "w_cg": w_cg,
            "seed": seed,
            "guidance": guidance,
            "solver": solver,
            "karras": karras,
            "early_reject": early_reject,
            "max_attempts": max_attempts,
            "size": size,
            "mask_source": mask_source,
            "real_share": real_share,
            "clean_masks": clean_masks,
            "callback_url": callback_url,
            "callback_secret": callback_secret,
        }
        return Job.from_json(self._json(self._submit_call(body, idempotency_key)))

    def get(self, job_id: str) -> Job:
        return Job.from_json(self._json(_Call("GET", self._job_path(job_id))))

    def jobs(self, *, page_size: int = 100) -> Iterator[Job]:
        """Every job of this key (the admin key: every job), newest first, page after page."""
        cursor: str | None = None
        while True:
            params: dict[str, Any] = {"limit": page_size}
            if cursor:
                params["cursor"] = cursor
            page = self._json(_Call("GET", "/v1/jobs", params=params))
            for item in page.get("data") or []:
                yield Job.from_json(item)
            cursor = page.get("next_cursor")
            if not cursor:
                return

    def cancel(self, job_id: str) -> Job:
        """Stop the job within one sampling batch; ``Conflict`` if it has finished already."""
        # not repeated after a lost answer: the repeat would say Conflict for a cancel that worked
        return Job.from_json(self._json(_Call("POST", self._job_path(job_id, "/cancel"), idempotent=False)))

    def delete(self, job_id: str) -> None:
        """Remove the job and everything it stored."""
        self._send(_Call("DELETE", self._job_path(job_id), ok_on_retry=frozenset({404})))

    def pairs(self, job_id: str, offset: int = 0, limit: int = 50) -> PairsPage:
        """One page of the job's kept pairs (its result once decided, else those stored so far)."""
        params = {"offset": offset, "limit": limit}
        return PairsPage.from_json(self._json(_Call("GET", self._job_path(job_id, "/pairs"), params=params)))

    def models(self) -> list[Model]:
        answer = self._json(_Call("GET", "/v1/models"))
        return [Model.from_json(m, answer.get("default")) for m in answer.get("data") or []]

    def push(self, bundle_dir: str | Path, name: str) -> dict[str, Any]:
        """Publish a locally trained bundle folder as the next version of ``name``
        (``POST /v1/models/{name}/versions``, a tar.gz of the folder without ``.checkpoints/``);
        returns the version as the service shows it (``name``, ``version``, ``digest``...).
        Sent once: a publish repeated after a lost answer would make another version."""
        import tempfile

        with tempfile.TemporaryFile() as archive:
            pack_bundle(Path(bundle_dir), archive)
            archive.seek(0)
            path = f"/v1/models/{quote(name, safe='')}/versions"
            try:
                response = self._http.post(
                    path, files={"file": ("bundle.tar.gz", archive, "application/gzip")}
                )
            except httpx.TransportError as exc:
                raise self._unreachable(exc) from exc
        if response.status_code >= 400:
            raise self._error(response)
        answer: dict[str, Any] = response.json()
        return answer

    # ---- datasets and trainings ----

    def upload_dataset(self, source: str | os.PathLike[str], *, name: str | None = None) -> dict[str, Any]:
        """Upload a dataset: a folder (``images/``, ``masks/``, optional ``unlabelled/``, ``pairs.csv``
        and notes; zipped here) or a ``.zip``/``.tar.gz``. Returns the dataset (``id``, ``pairs``, ...).
        Sent once: a repeat after a lost answer would store a second copy."""
        path = Path(source)
        data = pack_folder(path) if path.is_dir() else path.read_bytes()
        filename = f"{path.name}.zip" if path.is_dir() else path.name
        try:
            response = self._http.post(
                "/v1/datasets",
                files={"file": (filename, data, "application/octet-stream")},
                data={"name": name} if name else None,
                timeout=max(self.timeout, 300.0),
            )
        except httpx.TransportError as exc:
            raise self._unreachable(exc) from exc
        if response.status_code >= 400:
            raise self._error(response)
        answer: dict[str, Any] = response.json()
        return answer

    def train(self, dataset: str, name: str, **params: Any) -> dict[str, Any]:
        """Start a training of model ``name`` on dataset ``dataset`` (``POST /v1/models``); ``params``
        are the body's other fields (resolution, train_steps, segmenter_steps, filter_steps,
        batch_size, seed, unlabelled_share, ...). Returns the training (``id``, ``status``, ``links``)."""
        body = {"dataset": dataset, "name": name, **{k: v for k, v in params.items() if v is not None}}
        answer: dict[str, Any] = self._json(_Call("POST", "/v1/models", body=body, idempotent=False))
        return answer

    def training(self, training_id: str) -> dict[str, Any]:
        answer: dict[str, Any] = self._json(_Call("GET", f"/v1/trainings/{quote(training_id, safe='')}"))
        return answer

    def cancel_training(self, training_id: str) -> dict[str, Any]:
        path = f"/v1/trainings/{quote(training_id, safe='')}/cancel"
        answer: dict[str, Any] = self._json(_Call("POST", path, idempotent=False))
        return answer

    def wait_training(
        self,
        training_id: str,
        *,
        poll_s: float = 2.0,
        timeout: float | None = None,
        on_progress: Any = None,
    ) -> dict[str, Any]:
        """Poll the training until it ends; ``on_progress(training)`` at every poll. Returns the
        succeeded training (its ``model``: name, version, metrics); raises ``DiffuseExpandError``
        if it failed or was canceled, ``WaitTimeout`` after ``timeout`` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            training = self.training(training_id)
            if on_progress is not None:
                on_progress(training)
            if training["status"] == "succeeded":
                return training
            if training["status"] in ("failed", "canceled"):
                raise DiffuseExpandError(
                    f"training {training_id} {training['status']}: {training.get('error') or ''}".rstrip(
                        ": "
                    ),
                    detail=training.get("error"),
                )
            if deadline is not None and time.monotonic() >= deadline:
                raise WaitTimeout(training_id, timeout or 0.0)
            time.sleep(poll_s)

    # ---- waiting ----

    def wait(
        self,
        job_id: str,
        progress: bool = True,
        timeout: float | None = None,
        *,
        poll_interval: float = 1.0,
        file: IO[str] | None = None,
    ) -> Job:
        """Block until the job is finished and return it; ``JobFailed`` if it failed or was canceled,
        ``WaitTimeout`` after ``timeout`` seconds. Follows the job's event stream, resuming with
        Last-Event-ID when it drops, and polls instead where the service has no stream. With
        ``progress``, a tqdm bar of kept/target pairs on ``file`` (stderr)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        bar = _Bar(job_id, progress, file)
        try:
            job = self._wait_events(job_id, bar, deadline, timeout) if self.events else None
            if job is None:
                job = self._wait_poll(job_id, bar, deadline, timeout, poll_interval)
        finally:
            bar.close()
        return self._finished(job)

    def _wait_events(
        self, job_id: str, bar: _Bar, deadline: float | None, timeout: float | None
    ) -> Job | None:
        """The finished job from the event stream, or None when polling must take over."""
        decoder = sse.Decoder()
        path = self.events_path.format(id=quote(job_id, safe=""))
        failures, last = 0, None
        while failures <= self.retries:
            alive = False  # events came, or the stream was quiet or ended: not a failure
            try:
                with self._http.stream(
                    "GET", path, headers=self._events_headers(decoder), timeout=self._stream_timeout(deadline)
                ) as response:
                    if response.status_code >= 400:
                        response.read()
                    answer = self._events_answer(response)
                    if answer == "poll":
                        return None
                    if answer == "stream":
                        for event in decoder.events(response.iter_lines()):
                            alive = True
                            job = self._event_job(event)
                            if job is None:
                                continue
                            last = job
                            bar.update(job)
                            if job.done:
                                return job
                            self._check_deadline(deadline, job_id, timeout, last)
                        alive = True  # ended by the service (its time limit, a restart): resume
            except httpx.ReadTimeout:
                alive = True  # silent for long (a slow phase, no keep-alive): not a failure
            except httpx.TransportError:
                pass  # dropped: reopen from the last event id
            self._check_deadline(deadline, job_id, timeout, last)
            failures = 0 if alive else failures + 1
            time.sleep(min(MAX_BACKOFF_S, self.backoff * 2 ** max(0, failures - 1)))
        return None  # the stream keeps failing: poll instead

    def _wait_poll(
        self, job_id: str, bar: _Bar, deadline: float | None, timeout: float | None, interval: float
    ) -> Job:
        last = None
        while True:
            try:
                last = self.get(job_id)
            except RateLimited as exc:
                self._check_deadline(deadline, job_id, timeout, last)
                time.sleep(exc.retry_after or interval)
                continue
            bar.update(last)
            if last.done:
                return last
            self._check_deadline(deadline, job_id, timeout, last)
            pause = interval if deadline is None else max(0.0, min(interval, deadline - time.monotonic()))
            time.sleep(pause)

    # ---- results ----

    def download(
        self,
        job_id: str,
        dest: str | os.PathLike[str],
        format: Format | str = "plain",
        unpack: bool = False,
        partial: bool = False,
        *,
        progress: bool = False,
    ) -> Path:
        """Stream the job's zip to disk (never whole in memory). Without ``unpack``, ``dest`` is the
        zip's path, or a folder to put ``ID.zip`` in; with it, the folder to extract into (members
        checked: ``UnsafeArchive`` for any that would land outside it). ``partial`` takes the pairs
        kept so far of an unfinished job. Returns the zip's path or the folder."""
        call = _Call(
            "GET", self._job_path(job_id, "/pairs.zip"), params=self._download_params(format, partial)
        )
        if unpack:
            folder = Path(dest)
            folder.mkdir(parents=True, exist_ok=True)
            part = folder / f".{job_id}.zip.part"
            try:
                self._stream_to(call, part, progress)
                safe_extract(part, folder)
            finally:
                part.unlink(missing_ok=True)
            return folder
        target = self._zip_target(job_id, dest, format)
        target.parent.mkdir(parents=True, exist_ok=True)
        part = target.with_name(target.name + ".part")
        try:
            self._stream_to(call, part, progress)
            part.replace(target)  # a complete zip or none: never a truncated one under the real name
        finally:
            part.unlink(missing_ok=True)
        return target

    def _stream_to(self, call: _Call, path: Path, progress: bool) -> None:
        attempt = 0
        while True:
            try:
                with self._http.stream("GET", call.path, params=call.params) as response:
                    if response.status_code >= 400:
                        response.read()
                        raise self._error(response)
                    with path.open("wb") as out, _bytes_bar(progress, response) as bar:
                        for chunk in response.iter_bytes(CHUNK):
                            out.write(chunk)
                            bar.update(len(chunk))
                return
            except (httpx.TransportError, ServiceUnavailable) as exc:
                delay = self._delay(call, attempt, exc=exc)
                if delay is None:
                    if isinstance(exc, httpx.TransportError):
                        raise self._unreachable(exc) from exc
                    raise
            time.sleep(delay)
            attempt += 1


def _bytes_bar(enabled: bool, response: httpx.Response) -> tqdm[Any]:
    size = response.headers.get("content-length")
    return tqdm(
        total=int(size) if size and size.isdigit() else None,
        unit="B",
        unit_scale=True,
        desc="download",
        disable=not enabled,
        file=sys.stderr,
    )


class AsyncClient(_Base):
    """``Client``'s calls for asyncio: ``async with AsyncClient(url, key) as c: await c.submit(...)``."""

    def __init__(
        self,
        url: str | None = None,
        api_key: str | None = None,
        *,
        timeout: float = DEFAULT_TIMEOUT_S,
        retries: int = 3,
        backoff: float = 0.5,
        events: bool = True,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        super().__init__(url, api_key, timeout=timeout, retries=retries, backoff=backoff, events=events)
        self._http = httpx.AsyncClient(
            base_url=self.url, headers=self._headers(), timeout=timeout, transport=transport
        )

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _send(self, call: _Call) -> httpx.Response:
        attempt = 0
        while True:
            try:
                response = await self._http.request(
                    call.method, call.path, params=call.params, json=call.body, headers=call.headers
                )
                if response.status_code < 400 or (attempt and response.status_code in call.ok_on_retry):
                    return response
                error: Exception = self._error(response)
            except httpx.TransportError as exc:
                error = exc
            delay = self._delay(call, attempt, exc=error)
            if delay is None:
                if isinstance(error, httpx.TransportError):
                    raise self._unreachable(error) from error
                raise error
            await asyncio.sleep(delay)
            attempt += 1

    async def _json(self, call: _Call) -> Any:
        return (await self._send(call)).json()

    async def submit(self, count: int, *, idempotency_key: str | None = None, **params: Any) -> Job:
        """As ``Client.submit``: ``model``, ``tau``, ``eta``, ``steps``, ``w_cf``, ``w_cg``, ``seed``,
        ``guidance``, ``solver``, ``karras``, ``early_reject``, ``max_attempts``, ``size``,
        ``mask_source``, ``real_share``, ``clean_masks``, ``callback_url``, ``callback_secret``."""
        body = {"count": count, **params}
        return Job.from_json(await self._json(self._submit_call(body, idempotency_key)))

    async def get(self, job_id: str) -> Job:
        return Job.from_json(await self._json(_Call("GET", self._job_path(job_id))))

    async def jobs(self, *, page_size: int = 100) -> AsyncIterator[Job]:
        cursor: str | None = None
        while True:
            params: dict[str, Any] = {"limit": page_size}
            if cursor:
                params["cursor"] = cursor
            page = await self._json(_Call("GET", "/v1/jobs", params=params))
            for item in page.get("data") or []:
                yield Job.from_json(item)
            cursor = page.get("next_cursor")
            if not cursor:
                return

    async def cancel(self, job_id: str) -> Job:
        call = _Call("POST", self._job_path(job_id, "/cancel"), idempotent=False)
        return Job.from_json(await self._json(call))

    async def delete(self, job_id: str) -> None:
        await self._send(_Call("DELETE", self._job_path(job_id), ok_on_retry=frozenset({404})))

    async def pairs(self, job_id: str, offset: int = 0, limit: int = 50) -> PairsPage:
        call = _Call("GET", self._job_path(job_id, "/pairs"), params={"offset": offset, "limit": limit})
        return PairsPage.from_json(await self._json(call))

    async def models(self) -> list[Model]:
        answer = await self._json(_Call("GET", "/v1/models"))
        return [Model.from_json(m, answer.get("default")) for m in answer.get("data") or []]

    async def wait(
        self,
        job_id: str,
        progress: bool = False,
        timeout: float | None = None,
        *,
        poll_interval: float = 1.0,
        file: IO[str] | None = None,
    ) -> Job:
        """As ``Client.wait`` (no bar unless ``progress``: several jobs are often awaited at once)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        bar = _Bar(job_id, progress, file)
        try:
            job = await self._wait_events(job_id, bar, deadline, timeout) if self.events else None
            if job is None:
                job = await self._wait_poll(job_id, bar, deadline, timeout, poll_interval)
        finally:
            bar.close()
        return self._finished(job)

    async def _wait_events(
        self, job_id: str, bar: _Bar, deadline: float | None, timeout: float | None
    ) -> Job | None:
        decoder = sse.Decoder()
        path = self.events_path.format(id=quote(job_id, safe=""))
        failures, last = 0, None
        while failures <= self.retries:
            alive = False  # events came, or the stream was quiet or ended: not a failure
            try:
                async with self._http.stream(
                    "GET", path, headers=self._events_headers(decoder), timeout=self._stream_timeout(deadline)
                ) as response:
                    if response.status_code >= 400:
                        await response.aread()
                    answer = self._events_answer(response)
                    if answer == "poll":
                        return None
                    if answer == "stream":
                        async for line in response.aiter_lines():
                            event = decoder.feed(line.rstrip("\r"))
                            if event is None:
                                continue
                            alive = True
                            job = self._event_job(event)
                            if job is None:
                                continue
                            last = job
                            bar.update(job)
                            if job.done:
                                return job
                            self._check_deadline(deadline, job_id, timeout, last)
                        alive = True  # ended by the service (its time limit, a restart): resume
            except httpx.ReadTimeout:
                alive = True
            except httpx.TransportError:
                pass
            self._check_deadline(deadline, job_id, timeout, last)
            failures = 0 if alive else failures + 1
            await asyncio.sleep(min(MAX_BACKOFF_S, self.backoff * 2 ** max(0, failures - 1)))
        return None

    async def _wait_poll(
        self, job_id: str, bar: _Bar, deadline: float | None, timeout: float | None, interval: float
    ) -> Job:
        last = None
        while True:
            try:
                last = await self.get(job_id)
            except RateLimited as exc:
                self._check_deadline(deadline, job_id, timeout, last)
                await asyncio.sleep(exc.retry_after or interval)
                continue
            bar.update(last)
            if last.done:
                return last
            self._check_deadline(deadline, job_id, timeout, last)
            pause = interval if deadline is None else max(0.0, min(interval, deadline - time.monotonic()))
            await asyncio.sleep(pause)

    async def download(
        self,
        job_id: str,
        dest: str | os.PathLike[str],
        format: Format | str = "plain",
        unpack: bool = False,
        partial: bool = False,
    ) -> Path:
        """As ``Client.download`` (the extraction runs in a thread)."""
        call = _Call(
            "GET", self._job_path(job_id, "/pairs.zip"), params=self._download_params(format, partial)
        )
        if unpack:
            folder = Path(dest)
            folder.mkdir(parents=True, exist_ok=True)
            part = folder / f".{job_id}.zip.part"
            try:
                await self._stream_to(call, part)
                await asyncio.to_thread(safe_extract, part, folder)
            finally:
                part.unlink(missing_ok=True)
            return folder
        target = self._zip_target(job_id, dest, format)
        target.parent.mkdir(parents=True, exist_ok=True)
        part = target.with_name(target.name + ".part")
        try:
            await self._stream_to(call, part)
            part.replace(target)
        finally:
            part.unlink(missing_ok=True)
        return target

    async def _stream_to(self, call: _Call, path: Path) -> None:
        attempt = 0
        while True:
            try:
                async with self._http.stream("GET", call.path, params=call.params) as response:
                    if response.status_code >= 400:
                        await response.aread()
                        raise self._error(response)
                    with path.open("wb") as out:
                        async for chunk in response.aiter_bytes(CHUNK):
                            out.write(chunk)
                return
            except (httpx.TransportError, ServiceUnavailable) as exc:
                delay = self._delay(call, attempt, exc=exc)
                if delay is None:
                    if isinstance(exc, httpx.TransportError):
                        raise self._unreachable(exc) from exc
                    raise
            await asyncio.sleep(delay)
            attempt += 1


def pack_bundle(bundle_dir: Path, out: IO[bytes]) -> None:
    """A tar.gz of a bundle folder into ``out``: regular files only, without hidden parts
    (``.checkpoints/``, temporaries), paths relative to the folder."""
    import tarfile

    if not (bundle_dir / "bundle.json").is_file():
        raise ValueError(f"{bundle_dir}: not a bundle (no bundle.json)")
    with tarfile.open(fileobj=out, mode="w:gz") as tar:
        for path in sorted(bundle_dir.rglob("*")):
            rel = path.relative_to(bundle_dir)
            if any(p.startswith(".") for p in rel.parts) or path.is_symlink() or not path.is_file():
                continue
            tar.add(path, arcname=rel.as_posix(), recursive=False)


def pack_folder(root: Path) -> bytes:
    """A dataset folder as a zip in memory: ``images/``, ``masks/``, ``unlabelled/`` (images without
    masks) and the notes beside them (pairs.csv, SOURCE.md, LICENSE...), nothing else (no hidden files)."""
    import io
    import zipfile

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for path in sorted(root.rglob("*")):
            rel = path.relative_to(root)
            if not path.is_file() or any(part.startswith(".") for part in rel.parts):
                continue
            if rel.parts[0] in ("images", "masks", "unlabelled") or len(rel.parts) == 1:
                zf.write(path, rel.as_posix())
    return buf.getvalue()
