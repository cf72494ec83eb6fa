"""Shared run state of one gateway process: draining, accepting, and the requests in flight.

``server.py`` drives it through SIGTERM; handlers read it (``/ready``) and the proxy registers
every request so that a drain can wait for them, and abort the stragglers at its deadline.
"""

from __future__ import annotations

import asyncio


class Lifecycle:
    def __init__(self) -> None:
        self.draining = False  # /ready answers 503; requests are still served
        self.accepting = True  # False after the grace period: new requests get 503 at once
        self._active: dict[asyncio.Task[object], bool] = {}  # task -> aborted by the drain
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def active(self) -> int:
        return len(self._active)

    def enter(self, task: asyncio.Task[object]) -> None:
        self._active[task] = False
        self._idle.clear()

    def leave(self, task: asyncio.Task[object]) -> None:
        self._active.pop(task, None)
        if not self._active:
            self._idle.set()

    def aborted(self, task: asyncio.Task[object]) -> bool:
        return self._active.get(task, False)

    async def wait_idle(self, timeout: float) -> bool:  # noqa: ASYNC109 - a bound, not a deadline to leak
        """Wait until no request is in flight; False if some still are after ``timeout``."""
        try:
            async with asyncio.timeout(timeout):
                await self._idle.wait()
        except TimeoutError:
            return False
        return True

    def abort_all(self) -> int:
        """Cancel every request in flight; each ends with a ``ShuttingDown`` error."""
        for task in self._active:
            self._active[task] = True
            task.cancel()
        return len(self._active)
