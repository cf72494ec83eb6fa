"""``Deadline``: ``asyncio.timeout`` for the request path, cheap to move later.

The relay pushes a stream's idle deadline out after every chunk. asyncio's
``Timeout.reschedule`` cancels its timer and makes a new one each time, so the relay used to
move it only every hundredth of the idle period. Here moving a deadline later only records
the time: the timer, when it fires, sees that the deadline moved and re-arms for it. Moving it
earlier re-arms at once.

The semantics are asyncio's: when the deadline passes the task is cancelled, and the block
raises ``TimeoutError`` unless the task was also cancelled by someone else, whose
cancellation then goes on. ``expired()`` tells the two apart after the block.
"""

from __future__ import annotations

import asyncio
import math
from types import TracebackType

_CREATED, _ENTERED, _EXPIRING, _EXPIRED, _EXITED = range(5)


class Deadline:
    """``async with Deadline(when):`` bounds the block by ``when`` (the loop's clock; None:
    no bound until ``reschedule``)."""

    __slots__ = ("_armed", "_cancelling", "_given", "_handle", "_loop", "_state", "_task", "_when")

    def __init__(self, when: float | None, loop: asyncio.AbstractEventLoop | None = None) -> None:
        """``loop``: the running loop, when the caller has it (asking costs a getpid() call)."""
        self._when = when
        self._given = loop
        self._state = _CREATED
        self._handle: asyncio.Handle | None = None
        self._armed = math.inf  # when the timer fires

    def when(self) -> float | None:
        return self._when

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The loop this deadline runs on (inside the block)."""
        return self._loop

    def now(self) -> float:
        """The clock of the loop this deadline runs on (inside the block), without asking
        asyncio for the running loop, which costs a ``getpid()`` call on Python 3.11."""
        return self._loop.time()

    def expired(self) -> bool:
        """The deadline passed (and cancelled the block)."""
        return self._state == _EXPIRING or self._state == _EXPIRED

    def reschedule(self, when: float | None) -> None:
        if self._state != _ENTERED:
            raise RuntimeError("a deadline moves only inside its block")
        self._when = when
        if when is None:
            self._disarm()
        elif when < self._armed:
            self._disarm()
            self._arm(when)
        # else the timer fires first and re-arms then

    def extend(self, when: float) -> None:
        """Push the deadline out to ``when``; never pull it in (a relay's idle bound, which
        must not cut short a first-token bound still in force)."""
        current = self._when
        if current is None or when > current:
            self.reschedule(when)

    async def __aenter__(self) -> Deadline:
        if self._state != _CREATED:
            raise RuntimeError("a deadline is entered once")
        self._loop = loop = self._given or asyncio.get_running_loop()
        task = asyncio.current_task(loop)
        if task is None:
            raise RuntimeError("a deadline bounds a task")
        self._task = task
        self._cancelling = task.cancelling()
        self._state = _ENTERED
        if self._when is not None:
            self._arm(self._when)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._disarm()
        if self._state == _EXPIRING:
            self._state = _EXPIRED
            if self._task.uncancel() <= self._cancelling and exc_type is asyncio.CancelledError:
                raise TimeoutError from exc
        elif self._state == _ENTERED:
            self._state = _EXITED

    def _arm(self, when: float) -> None:
        self._armed = when
        if when <= self._loop.time():
            self._handle = self._loop.call_soon(self._fire)
        else:
            self._handle = self._loop.call_at(when, self._fire)

    def _disarm(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
            self._armed = math.inf

    def _fire(self) -> None:
        armed = self._armed
        self._handle = None
        self._armed = math.inf
        when = self._when
        if when is None or self._state != _ENTERED:
            return
        if when > armed:  # moved later since the timer was set
            self._arm(when)
            return
        self._task.cancel()
        self._state = _EXPIRING
