"""How many uploads are unpacked and checked at once (``DIFFEXP_MAX_CONCURRENT_DECODES``).

Checking an upload decodes its images, one file at a time, in at most about
``DIFFEXP_DECODE_MEMORY_MB`` (``app.pixels.check_file``); this bounds how many uploads do so at
once, so the API's decoding memory is about the product of the two whatever number of clients
upload together. The work runs in a worker thread, off the event loop. An upload that finds every
slot taken waits for one (on the event loop, holding no thread; its archive stays spooled on disk)
for up to ``DIFFEXP_DECODE_WAIT_S``, then is answered 429 with ``Retry-After``.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
from starlette.exceptions import HTTPException

RETRY_AFTER_S = 10


class DecodeSlots:
    def __init__(self, limit: int, wait_s: float) -> None:
        self.limit = limit
        self.wait_s = wait_s
        self._semaphore: anyio.Semaphore | None = None  # made on first use, inside the event loop

    @property
    def semaphore(self) -> anyio.Semaphore:
        if self._semaphore is None:
            self._semaphore = anyio.Semaphore(self.limit)
        return self._semaphore

    @property
    def busy(self) -> int:
        """Slots taken now."""
        return self.limit - self.semaphore.value

    def _refusal(self) -> HTTPException:
        return HTTPException(
            status_code=429,
            detail=(
                f"{self.limit} uploads are being checked already (DIFFEXP_MAX_CONCURRENT_DECODES) and none "
                f"finished within {self.wait_s:g} s (DIFFEXP_DECODE_WAIT_S); send it again later"
            ),
            headers={"Retry-After": str(max(RETRY_AFTER_S, math.ceil(self.wait_s)))},
        )

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Hold one slot for the block; raises a 429 ``HTTPException`` when none frees in time."""
        semaphore = self.semaphore
        try:
            semaphore.acquire_nowait()
        except anyio.WouldBlock:
            acquired = False
            if self.wait_s > 0:
                with anyio.move_on_after(self.wait_s):
                    await semaphore.acquire()
                    acquired = True
            if not acquired:
                raise self._refusal() from None
        try:
            yield
        finally:
            semaphore.release()
