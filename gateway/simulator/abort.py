"""The worker's shutdown signal, which every in-flight request's waits give way to.

On SIGTERM vLLM aborts the requests it is running: each stream ends at once with a chunk whose
choice has an empty delta and `finish_reason: "abort"`, then `[DONE]`. The app starts a
`Shutdown` from its `on_shutdown` hook, which aiohttp runs before it waits for the handlers
to finish: every pending `sleep`, `until` or `forever` returns at once, and the request
then sees `started` and writes its abort ending (see `generate.py`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable


class Shutdown:
    """A one-way switch; `sleep` costs what `asyncio.sleep` does (one future, one timer)."""

    def __init__(self) -> None:
        self.started = False
        self._waiters: set[asyncio.Future[None]] = set()

    def start(self) -> None:
        self.started = True
        for waiter in self._waiters:
            _wake(waiter)

    async def sleep(self, seconds: float) -> None:
        """Sleep `seconds`, or less if shutdown starts meanwhile."""
        if self.started:
            return
        loop = asyncio.get_running_loop()
        waiter = loop.create_future()
        timer = loop.call_later(seconds, _wake, waiter)
        try:
            await self._park(waiter)
        finally:
            timer.cancel()

    async def forever(self) -> None:
        """Wait until shutdown starts (or the caller is cancelled)."""
        if not self.started:
            await self._park(asyncio.get_running_loop().create_future())

    async def until(self, awaitable: Awaitable[None]) -> None:
        """Wait for `awaitable`, or until shutdown starts; either way it is done or cancelled."""
        task = asyncio.ensure_future(awaitable)
        try:
            if not self.started:
                waiter = asyncio.get_running_loop().create_future()
                task.add_done_callback(lambda _: _wake(waiter))
                await self._park(waiter)
            if task.done():
                task.result()
        finally:
            task.cancel()

    async def _park(self, waiter: asyncio.Future[None]) -> None:
        self._waiters.add(waiter)
        try:
            await waiter
        finally:
            self._waiters.discard(waiter)


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)
