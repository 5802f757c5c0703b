"""Failed authentication, limited per client address: a flood of bad keys cannot starve valid ones.

Every /v1 request whose key fails (missing, malformed, unknown or revoked: a 401) takes a token from
its client address's bucket: DIFFEXP_AUTH_FAIL_BURST tokens, refilled at DIFFEXP_AUTH_FAIL_RATE per
second. While an address's bucket is empty, ``AuthFailureGuard`` (an ASGI middleware, before any
routing, dependency, thread or Redis call) answers its requests 429 with ``Retry-After``, at a cost
of a dictionary look-up, unless the request carries the admin key or a key that authenticated in
this process in the last GOOD_TTL_S (so a valid user behind the same NAT as an attacker keeps
working). The refusal is held DIFFEXP_AUTH_FAIL_HOLD_S before it is sent (an ``asyncio.sleep``: no
CPU, no thread): a client that ignores Retry-After and sends again as soon as it is answered then
sends at most one request per hold and connection, instead of as many as the event loop can answer,
which is what took the event loop from valid requests (bench/auth_flood.py). At most MAX_HELD
refusals are held at once; past that they are sent at once, with ``Connection: close``. The 401 path itself is cheap too: a key that is not ``dx_`` + 43 URL-safe characters is
refused without Redis, and an unknown one costs one Redis GET (``app.auth.KeyStore.lookup``).

Addresses: the ASGI client address (behind a reverse proxy run uvicorn with ``--proxy-headers`` and
``--forwarded-allow-ips``, else every client is the proxy); an IPv6 address counts by its /64, which
one host can fill with addresses. State is per API process (``uvicorn --workers N`` allows N times
the failures); at most MAX_ADDRESSES addresses are tracked, refilled buckets are dropped first, then
the oldest.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import math
import threading
import time
from typing import Any

from starlette.types import ASGIApp, Receive, Scope, Send

from app.errors import problem

MAX_ADDRESSES = 65_536
MAX_HELD = 10_000  # refusals held at once (each an idle coroutine and its connection)
GOOD_TTL_S = 300.0  # a key that authenticated lets its requests past an address's block this long
MAX_GOOD = 65_536


def client_address(scope: Scope) -> str:
    """The bucket of a request's client: its IPv4 address, its IPv6 /64, or the raw host string."""
    client = scope.get("client")
    host = str(client[0]) if client else "unknown"
    if ":" in host:
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            return host
        if isinstance(ip, ipaddress.IPv6Address):
            if ip.ipv4_mapped is not None:
                return str(ip.ipv4_mapped)
            return str(ipaddress.IPv6Network((int(ip) >> 64 << 64, 64)))
    return host


def key_digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class FailureLimiter:
    """Token buckets of failed authentications per address, and the digests of keys that passed."""

    def __init__(self, burst: int, per_s: float, *, max_addresses: int = MAX_ADDRESSES) -> None:
        self.burst = float(burst)
        self.per_s = per_s
        self.max_addresses = max_addresses
        self._buckets: dict[str, tuple[float, float]] = {}  # address -> (tokens, when)
        self._good: dict[str, float] = {}  # sha256 of a key that authenticated -> valid until
        self._lock = threading.Lock()  # failures are recorded from the thread pool

    def _tokens(self, address: str, now: float) -> float:
        tokens, when = self._buckets.get(address, (self.burst, now))
        return min(self.burst, tokens + (now - when) * self.per_s)

    def retry_after(self, address: str, now: float | None = None) -> int | None:
        """Seconds until ``address`` may fail again, or None: it may now (not blocked)."""
        if address not in self._buckets:
            return None
        now = time.monotonic() if now is None else now
        tokens = self._tokens(address, now)
        if tokens >= 1:
            return None
        return max(1, math.ceil((1 - tokens) / self.per_s)) if self.per_s > 0 else 3600

    def fail(self, address: str, now: float | None = None) -> None:
        """Count one failed authentication of ``address``."""
        now = time.monotonic() if now is None else now
        with self._lock:
            tokens = self._tokens(address, now)
            self._buckets.pop(address, None)  # re-inserted last: the dict's order is the age
            self._buckets[address] = (max(0.0, tokens - 1), now)
            if len(self._buckets) > self.max_addresses:
                self._prune(now)

    def _prune(self, now: float) -> None:
        full = [a for a in self._buckets if self._tokens(a, now) >= self.burst]
        for address in full:
            del self._buckets[address]
        while len(self._buckets) > self.max_addresses:
            del self._buckets[next(iter(self._buckets))]

    def remember(self, digest: str, now: float | None = None) -> None:
        """``digest`` (sha256 of a key) authenticated just now."""
        now = time.monotonic() if now is None else now
        with self._lock:
            if len(self._good) >= MAX_GOOD:
                self._good = {d: t for d, t in self._good.items() if t > now}
                if len(self._good) >= MAX_GOOD:
                    self._good.clear()
            self._good[digest] = now + GOOD_TTL_S

    def known_good(self, digest: str, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        until = self._good.get(digest)
        return until is not None and until > now


def bearer_of(scope: Scope) -> str | None:
    for name, value in scope.get("headers", ()):
        if name == b"authorization":
            scheme, _, credentials = value.decode("latin-1").partition(" ")
            return credentials.strip() if scheme.lower() == "bearer" else None
    return None


class AuthFailureGuard:
    """429 (``Retry-After``) for the requests of an address whose failed authentications are over
    the limit, before anything else is done for them; see the module's text."""

    def __init__(
        self, app: ASGIApp, limiter: FailureLimiter, prefix: str, admin_key: str | None, hold_s: float = 0.0
    ) -> None:
        self.app = app
        self.limiter = limiter
        self.hold_s = hold_s
        self.held = 0
        self.prefix = prefix.rstrip("/") + "/"
        self.admin_key = admin_key.encode() if admin_key is not None else None

    def _trusted(self, scope: Scope) -> bool:
        key = bearer_of(scope)
        if not key:
            return False
        if self.admin_key is not None and hmac.compare_digest(key.encode(), self.admin_key):
            return True
        return self.limiter.known_good(key_digest(key))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] != "OPTIONS" and scope["path"].startswith(self.prefix):
            wait = self.limiter.retry_after(client_address(scope))
            if wait is not None and not self._trusted(scope):
                headers = {"Retry-After": str(wait)}
                if self.hold_s > 0 and self.held < MAX_HELD:
                    self.held += 1
                    try:
                        await asyncio.sleep(self.hold_s)
                    finally:
                        self.held -= 1
                elif self.hold_s > 0:
                    headers["Connection"] = "close"
                response: Any = problem(
                    429,
                    "too many failed authentications from this address: wait Retry-After seconds, "
                    "and check the key (Authorization: Bearer KEY)",
                    instance=scope["path"],
                    headers=headers,
                )
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)
