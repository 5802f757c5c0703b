"""Webhooks: when a job reaches a terminal state, POST its JSON to the job's ``callback_url``.

The request carries ``X-DiffuseExpand-Signature: t=UNIX_TIME,sha256=HEX``, an HMAC-SHA256 of
``"{t}." + body`` under the job's secret (given as ``callback_secret`` or drawn and shown once in the
create response): the receiver checks the body came from us and is fresh (``verify``).

A webhook must not become a way into the internal network (SSRF): only ``http``/``https``, no
credentials in the URL, and every address the host resolves to must be public unless
``DIFFEXP_WEBHOOK_ALLOW_PRIVATE`` is set. The request goes to the address that was checked (with the
host name in ``Host`` and in TLS SNI), so a DNS answer that changes between check and connect
(rebinding) cannot redirect it; redirects are not followed.

Delivery: ``JobStore._finish`` marks the webhook pending and puts the job in the ``P:webhooks`` sorted
set (score = when the next attempt is due). ``WebhookSender`` (a thread of the API) takes due jobs,
one process per job at a time (a short lease), and records every attempt in the job's ``webhook``
block; failures are retried with exponential backoff until ``DIFFEXP_WEBHOOK_RETRY_S`` after the
job ended, then the webhook is marked failed.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import logging
import secrets
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "X-DiffuseExpand-Signature"
MAX_URL_LEN = 2048
MIN_SECRET_LEN, MAX_SECRET_LEN = 16, 256
MAX_ATTEMPTS_SHOWN = 20  # the job keeps its latest attempts: a receiver down for a day must not bloat it
ATTEMPT_TIMEOUT_S = 10.0
LEASE_S = 30  # one process delivers a job's webhook at a time; longer than an attempt's timeout

Resolver = Callable[[str, int], list[str]]


class WebhookError(ValueError):
    """A callback URL we refuse to call; the message says why."""


class Unresolvable(WebhookError):
    """The host does not resolve (now): a delivery attempt fails, a request is not refused for it."""


def new_secret() -> str:
    return secrets.token_urlsafe(32)


def sign(secret: str, body: bytes, timestamp: int) -> str:
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},sha256={mac}"


def verify(
    secret: str, header: str, body: bytes, *, now: float | None = None, tolerance_s: int = 300
) -> bool:
    """Whether ``header`` signs ``body`` under ``secret`` and is at most ``tolerance_s`` old (replays)."""
    try:
        fields = dict(part.split("=", 1) for part in header.split(","))
        timestamp = int(fields["t"])
        given = fields["sha256"]
    except (KeyError, ValueError):
        return False
    now = time.time() if now is None else now
    if abs(now - timestamp) > tolerance_s:
        return False
    return hmac.compare_digest(sign(secret, body, timestamp), f"t={timestamp},sha256={given}")


def backoff_s(attempt: int) -> float:
    """Wait after the ``attempt``-th failed attempt (1-based): 5 s, 10 s, 20 s … capped at 10 min."""
    return float(min(5 * 2 ** (attempt - 1), 600))


#: IPv6 ranges whose low 32 bits are an IPv4 address that a gateway or host may reach on the
#: literal's behalf: IPv4-compatible (::/96, deprecated), IPv4-mapped, IPv4-translated (SIIT)
#: and the well-known NAT64 prefix (RFC 6052).
_LOW32_PREFIXES = tuple(
    ipaddress.IPv6Network(n) for n in ("::/96", "::ffff:0:0/96", "::ffff:0:0:0/96", "64:ff9b::/96")
)
#: The local-use NAT64 prefix (RFC 8215): an operator picks where the IPv4 address sits inside it,
#: so no embedded address can be checked; never a public destination, so always refused.
_LOCAL_NAT64 = ipaddress.IPv6Network("64:ff9b:1::/48")
_TEREDO = ipaddress.IPv6Network("2001::/32")


def embedded_ipv4(ip: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    """The IPv4 addresses an IPv6 literal carries (mapped, compatible, NAT64, 6to4, Teredo)."""
    out: list[ipaddress.IPv4Address] = []
    if any(ip in net for net in _LOW32_PREFIXES):
        out.append(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
    if ip.sixtofour is not None:
        out.append(ip.sixtofour)
    if ip in _TEREDO:
        server, client = ip.teredo or (None, None)
        out += [a for a in (server, client) if a is not None]
    return out


def is_public_address(address: str) -> bool:
    """Whether a webhook may be sent to ``address``: a global unicast address, and so is every
    IPv4 address it embeds (``[64:ff9b::7f00:1]`` is 127.0.0.1 through a NAT64 gateway)."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address):
        if ip in _LOCAL_NAT64 or ip in _TEREDO:
            return False
        inner = embedded_ipv4(ip)
        if inner:
            return all(a.is_global and not a.is_multicast for a in inner)
    return ip.is_global and not ip.is_multicast


@dataclass(frozen=True)
class Target:
    """A checked callback URL: where to connect (``address``) and what to call it (``host``)."""

    url: str
    scheme: str
    host: str
    port: int
    address: str

    def request_url(self) -> str:
        """The URL with the checked address in place of the host name."""
        parts = urlsplit(self.url)
        ip = ipaddress.ip_address(self.address)
        netloc = f"[{ip}]" if ip.version == 6 else str(ip)
        return urlunsplit((parts.scheme, f"{netloc}:{self.port}", parts.path or "/", parts.query, ""))

    def host_header(self) -> str:
        default = 443 if self.scheme == "https" else 80
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == default else f"{host}:{self.port}"


def check_url(url: str, *, allow_private: bool) -> tuple[str, str, int]:
    """Syntax checks (what a request can be refused for at once): ``(scheme, host, port)``."""
    if len(url) > MAX_URL_LEN:
        raise WebhookError(f"callback_url is longer than {MAX_URL_LEN} characters")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise WebhookError(f"callback_url is not a valid URL: {exc}") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise WebhookError("callback_url must be an http:// or https:// URL")
    host = (parts.hostname or "").rstrip(".")
    if not host:
        raise WebhookError("callback_url has no host")
    if parts.username is not None or parts.password is not None:
        raise WebhookError("callback_url must not carry credentials; sign requests with callback_secret")
    if parts.fragment:
        raise WebhookError("callback_url must not have a #fragment")
    if not allow_private:
        try:
            literal = ipaddress.ip_address(host)
        except ValueError:
            literal = None
        if (literal is not None and not is_public_address(str(literal))) or host.lower() == "localhost":
            raise WebhookError(
                "callback_url points to a private, loopback or reserved address "
                "(allowed only with DIFFEXP_WEBHOOK_ALLOW_PRIVATE)"
            )
    return scheme, host, port or (443 if scheme == "https" else 80)


def system_resolver(host: str, port: int) -> list[str]:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [str(info[4][0]) for info in infos]


def resolve_target(url: str, *, allow_private: bool, resolver: Resolver = system_resolver) -> Target:
    """Check the URL and every address its host resolves to; raises ``WebhookError``."""
    scheme, host, port = check_url(url, allow_private=allow_private)
    try:
        addresses = resolver(host, port)
    except OSError as exc:
        raise Unresolvable(f"cannot resolve {host}: {exc}") from None
    if not addresses:
        raise Unresolvable(f"{host} resolves to no address")
    if not allow_private:
        private = [a for a in addresses if not is_public_address(a)]
        if private:
            raise WebhookError(
                f"{host} resolves to a private, loopback or reserved address ({private[0]}); "
                "allowed only with DIFFEXP_WEBHOOK_ALLOW_PRIVATE"
            )
    return Target(url=url, scheme=scheme, host=host, port=port, address=addresses[0])


def payload(public_job: dict[str, Any]) -> bytes:
    return json.dumps(public_job, sort_keys=True, separators=(",", ":")).encode()


def attempt(
    url: str,
    secret: str,
    body: bytes,
    event: str,
    *,
    allow_private: bool,
    resolver: Resolver = system_resolver,
    transport: httpx.BaseTransport | None = None,
    now: Callable[[], float] = time.time,
) -> dict[str, Any]:
    """One delivery attempt; returns what the job records of it (never raises)."""
    started = now()
    record: dict[str, Any] = {"at": started, "status_code": None, "error": None}
    try:
        target = resolve_target(url, allow_private=allow_private, resolver=resolver)
        headers = {
            "Content-Type": "application/json",
            "User-Agent": "DiffuseExpand-Webhook/1",
            "Host": target.host_header(),
            "X-DiffuseExpand-Event": event,
            "X-DiffuseExpand-Delivery": uuid.uuid4().hex,
            SIGNATURE_HEADER: sign(secret, body, int(started)),
        }
        extensions = {"sni_hostname": target.host} if target.scheme == "https" else {}
        with httpx.Client(timeout=ATTEMPT_TIMEOUT_S, follow_redirects=False, transport=transport) as client:
            response = client.post(target.request_url(), content=body, headers=headers, extensions=extensions)
        record["status_code"] = response.status_code
        if not 200 <= response.status_code < 300:
            record["error"] = f"HTTP {response.status_code}"
    except WebhookError as exc:
        record["error"] = str(exc)
    except httpx.HTTPError as exc:
        record["error"] = f"{type(exc).__name__}: {exc}"[:300]
    record["duration_ms"] = round((now() - started) * 1000, 1)
    return record


def after_attempt(
    hook: dict[str, Any], record: dict[str, Any], *, ended_at: float, retry_s: float
) -> dict[str, Any]:
    """The job's ``webhook`` block after an attempt: delivered, retried later, or given up."""
    attempts = [*hook.get("attempts", []), record][-MAX_ATTEMPTS_SHOWN:]
    n = int(hook.get("attempt_count", 0)) + 1
    out = {**hook, "attempts": attempts, "attempt_count": n}
    if record["error"] is None:
        return {**out, "status": "delivered", "next_attempt_at": None}
    due = record["at"] + backoff_s(n)
    if due > ended_at + retry_s:
        return {**out, "status": "failed", "next_attempt_at": None}
    return {**out, "status": "pending", "next_attempt_at": due}


class WebhookSender:
    """Delivers due webhooks every ``webhook_interval_s`` in a daemon thread of the API."""

    def __init__(self, store: Any, *, transport: httpx.BaseTransport | None = None) -> None:
        self.store = store
        self.interval = store.settings.webhook_interval_s
        self.transport = transport
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def tick(self, now: float | None = None) -> int:
        """Deliver every webhook that is due; returns how many attempts were made."""
        made = 0
        now = time.time() if now is None else now
        for job_id in self.store.due_webhooks(now):
            if self.store.deliver_webhook(job_id, self._attempt, now=now):
                made += 1
        return made

    def _attempt(self, url: str, secret: str, body: bytes, event: str) -> dict[str, Any]:
        return attempt(
            url,
            secret,
            body,
            event,
            allow_private=self.store.settings.webhook_allow_private,
            transport=self.transport,
        )

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.tick()
            except Exception:  # Redis or storage down: the next tick tries again
                log.warning("webhook delivery failed", exc_info=True)

    def start(self) -> None:
        if self.interval > 0 and self._thread is None:
            self._thread = threading.Thread(target=self._run, name="webhooks", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=ATTEMPT_TIMEOUT_S + 5)
            self._thread = None
