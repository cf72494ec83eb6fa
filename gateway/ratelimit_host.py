"""Per-key limits of one host, as a serving process asks for them: ``LocalLimits``'
operations sent to the supervisor's ``keeper`` over this process's channel.

Used when ``server.processes`` is above 1, so that all serving processes share one
allowance per key. A request is admitted from this process's stock (``ratelimit_stock``)
when it holds enough, without asking; else the admission waits for the keeper's answer (one
round trip on a Unix socket). Stock is asked for in the background, after a request finds
its key without stock or low on it. Holds, releases, token corrections and returned stock are
notes, sent without waiting.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence

from gateway.channel import Channel, ChannelClosed
from gateway.errors import Overloaded
from gateway.ratelimit_local import Rate, Scope, Verdict
from gateway.ratelimit_stock import Returns, Stock

# The supervisor answers from memory, in well under a millisecond; this bound only matters
# when it is gone or stuck, and then the request is refused rather than left waiting.
CALL_TIMEOUT = 1.0


class HostLimits:
    def __init__(
        self,
        channel: Channel,
        timeout: float = CALL_TIMEOUT,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._channel = channel
        self._timeout = timeout
        self._clock = clock
        self.stock = Stock(clock)
        self._asking = False  # a stock call is out: one at a time
        self._expiry: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def acquire(self, rates: Sequence[Rate], scopes: Sequence[Scope]) -> Verdict:
        """As ``LocalLimits.acquire``, for the whole host; ``Overloaded`` (503) when the
        supervisor cannot be asked."""
        ahead = self.stock.take(rates, scopes)
        self._restock(rates, scopes)
        if ahead is not None:
            return Verdict(True, ahead)
        try:
            admitted, ahead, kind, retry_after = await self._channel.call(
                self._timeout, "limit", [_rate(r) for r in rates], [_scope(s) for s in scopes]
            )
        except ChannelClosed:
            raise Overloaded("Rate limits cannot be checked right now; retry shortly.") from None
        return Verdict(bool(admitted), tuple(ahead), str(kind), float(retry_after))

    def hold(self, scopes: Sequence[Scope]) -> None:
        if scopes:
            self._channel.note("hold", [_scope(s) for s in scopes])

    def release(self, scopes: Sequence[Scope]) -> None:
        keys = [scope.key for scope in scopes if not self.stock.give_back(scope)]
        if keys:
            self._channel.note("release", keys)

    def adjust(self, rate: Rate, delta: int) -> None:
        self._channel.note("adjust", _rate(rate), delta)

    async def close(self) -> None:
        """Stop asking, and give back all stock (its notes go out before the channel
        closes)."""
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._give_back(self.stock.expire(everything=True))

    def _restock(self, rates: Sequence[Rate], scopes: Sequence[Scope]) -> None:
        """Ask for stock in the background where the request found none or little."""
        if self._asking:
            return
        low_rates, low_scopes = self.stock.wanted(rates, scopes)
        if not low_rates and not low_scopes:
            return
        self._asking = True
        task = asyncio.create_task(self._ask(low_rates, low_scopes))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _ask(self, rates: list[Rate], scopes: list[Scope]) -> None:
        try:
            ahead, units, slots = await self._channel.call(
                self._timeout, "stock", [_rate(r) for r in rates], [_scope(s) for s in scopes]
            )
        except ChannelClosed:
            return  # asked again by a later request; meanwhile requests ask one by one
        finally:
            self._asking = False
        self.stock.add(rates, scopes, ahead, units, slots)
        self._arm()

    def _arm(self) -> None:
        """Return expired stock when the next one's time is up."""
        if self._expiry is not None:
            return
        when = self.stock.next_expiry()
        if when is None:
            return
        loop = asyncio.get_running_loop()
        self._expiry = loop.call_at(loop.time() + max(when - self._clock(), 0.0), self._expire)

    def _expire(self) -> None:
        self._expiry = None
        self._give_back(self.stock.expire())
        self._arm()

    def _give_back(self, returns: Returns) -> None:
        for rate, unused in returns.refunds:
            self._channel.note("adjust", _rate(rate), -unused)
        if returns.releases:
            self._channel.note("release", list(returns.releases))


def _rate(rate: Rate) -> list[object]:
    return [rate.key, rate.kind, rate.limit, rate.cost]


def _scope(scope: Scope) -> list[object]:
    return [scope.key, scope.limit]
