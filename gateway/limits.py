"""Admission control: a global in-flight limit with a bounded wait, then shed at once.

Beyond ``max_in_flight`` a request waits at most ``queue_timeout`` for a slot and is then shed
with 503 + ``Retry-After`` (``Overloaded``). A zero timeout sheds without waiting. Waiting
requests hold only a future each, so memory stays bounded by the connection count.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from gateway.errors import Overloaded


class Admission:
    def __init__(self, max_in_flight: int, queue_timeout: float, retry_after: int) -> None:
        self._slots = asyncio.Semaphore(max_in_flight)
        self._queue_timeout = queue_timeout
        self._retry_after = retry_after
        self.limit = max_in_flight
        self.in_flight = 0

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        await self._acquire()
        self.in_flight += 1
        try:
            yield
        finally:
            self.in_flight -= 1
            self._slots.release()

    async def _acquire(self) -> None:
        if not self._slots.locked():
            await self._slots.acquire()  # returns without suspending: a slot is free
            return
        if self._queue_timeout <= 0:
            raise Overloaded(retry_after=self._retry_after)
        try:
            async with asyncio.timeout(self._queue_timeout):
                await self._slots.acquire()
        except TimeoutError:
            raise Overloaded(retry_after=self._retry_after) from None
