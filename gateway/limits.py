"""Admission control: a global in-flight limit with a bounded wait, then shed at once.

Beyond ``max_in_flight`` a request waits at most ``queue_timeout`` for a slot and is then shed
with 503 + ``Retry-After`` (``Overloaded``). A zero timeout sheds without waiting. Waiting
requests hold only a future each, so memory stays bounded by the connection count. Slots go
to waiters in arrival order: a released slot is handed to the oldest waiter directly, so a
newcomer cannot take it first.

Our own counter and queue rather than ``asyncio.Semaphore``: on Python 3.11 its ``locked()``
and ``acquire()`` scan the waiters on every call, a cost paid by every request.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from types import TracebackType

from gateway.errors import Overloaded


class Admission:
    def __init__(self, max_in_flight: int, queue_timeout: float, retry_after: int) -> None:
        self._queue_timeout = queue_timeout
        self._retry_after = retry_after
        self._waiters: deque[asyncio.Future[None]] = deque()
        self.limit = max_in_flight
        self.in_flight = 0

    @property
    def waiting(self) -> int:
        """Requests queued for a slot now."""
        return sum(1 for w in self._waiters if not w.done())

    def slot(self) -> _Slot:
        """``async with admission.slot():`` holds one slot for the block."""
        return _Slot(self)

    async def _acquire(self) -> None:
        if self.in_flight < self.limit and not self._waiters:
            self.in_flight += 1
            return
        if self._queue_timeout <= 0:
            raise Overloaded(retry_after=self._retry_after)
        granted = asyncio.get_running_loop().create_future()
        self._waiters.append(granted)
        try:
            async with asyncio.timeout(self._queue_timeout):
                await granted
        except BaseException as exc:
            if granted.done() and not granted.cancelled():
                self._release()  # handed a slot just as the wait ended: pass it on
            else:
                granted.cancel()
                self._forget(granted)
            if isinstance(exc, TimeoutError):
                raise Overloaded(retry_after=self._retry_after) from None
            raise

    def _release(self) -> None:
        """The slot goes to the oldest live waiter (``in_flight`` unchanged), else back."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self.in_flight -= 1

    def _forget(self, waiter: asyncio.Future[None]) -> None:
        with contextlib.suppress(ValueError):
            self._waiters.remove(waiter)


class _Slot:
    """A class, not ``@asynccontextmanager``: a third of the cost on every request (0.7 vs
    2.0 us, measured)."""

    __slots__ = ("_admission",)

    def __init__(self, admission: Admission) -> None:
        self._admission = admission

    async def __aenter__(self) -> None:
        await self._admission._acquire()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._admission._release()
