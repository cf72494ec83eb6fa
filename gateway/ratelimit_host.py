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
from typing import Any

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
        self._spent: dict[str, tuple[Rate, int]] = {}  # stock spent this loop turn, per key
        self._closed = False

    async def acquire(self, rates: Sequence[Rate], scopes: Sequence[Scope]) -> Verdict:
        """As ``LocalLimits.acquire``, for the whole host; ``Overloaded`` (503) when the
        supervisor cannot be asked."""
        ahead = self.stock.take(rates, scopes)
        if ahead is not None:
            self._note_spent(rates)
        self._restock(rates, scopes)
        if ahead is not None:
            return Verdict(True, ahead)
        try:
            admitted, ahead, kind, retry_after = await self._channel.call(
                self._timeout, "limit", [_rate(r) for r in rates], [_scope(s) for s in scopes],
                late=lambda answer: self._admitted_late(answer, scopes),
            )  # fmt: skip
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
        closes); stock that comes after is given back at once."""
        self._closed = True
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._flush_spent()
        self._give_back(self.stock.expire(everything=True))

    def _admitted_late(self, answer: list[object], scopes: Sequence[Scope]) -> None:
        """The keeper admitted a request this process had already refused (503): its slots
        go back (its charge stays: never more lenient)."""
        if answer and answer[0] and scopes:
            self._channel.note("release", [scope.key for scope in scopes])

    def _note_spent(self, rates: Sequence[Rate]) -> None:
        """Stock spent is told to the keeper once per loop turn, per key."""
        spent = self._spent
        if not spent:
            asyncio.get_running_loop().call_soon(self._flush_spent)
        for rate in rates:
            before = spent.get(rate.key)
            spent[rate.key] = (rate, rate.cost + (before[1] if before else 0))

    def _flush_spent(self) -> None:
        if self._spent:
            spent, self._spent = self._spent, {}
            self._channel.note("spend", [[_rate(rate), units] for rate, units in spent.values()])

    def _restock(self, rates: Sequence[Rate], scopes: Sequence[Scope]) -> None:
        """Ask for stock in the background where the request found none or little."""
        if self._asking or self._closed:
            return
        wants = self.stock.wanted(rates, scopes)
        if wants is None:
            return
        self._asking = True
        task = asyncio.create_task(self._ask(list(rates), list(scopes), *wants))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _ask(
        self,
        rates: list[Rate],
        scopes: list[Scope],
        rate_wants: list[bool],
        scope_wants: list[bool],
    ) -> None:
        try:
            answer = await self._channel.call(
                self._timeout, "stock", [_rate(r) for r in rates], [_scope(s) for s in scopes],
                rate_wants, scope_wants, late=lambda late: self._stocked(rates, scopes, late),
            )  # fmt: skip
        except ChannelClosed:
            return  # requests ask one by one meanwhile; a late answer is still taken
        finally:
            self._asking = False
        self._stocked(rates, scopes, answer)

    def _stocked(self, rates: list[Rate], scopes: list[Scope], answer: list[Any]) -> None:
        ahead, units, slots = answer
        self._give_back(self.stock.add(rates, scopes, ahead, units, slots))
        if self._closed:
            self._give_back(self.stock.expire(everything=True))
        else:
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
        self._flush_spent()  # spent before given back: the keeper counts them in that order
        self._give_back(self.stock.expire())
        self._arm()

    def _give_back(self, returns: Returns) -> None:
        if returns.units:
            self._channel.note("unstock", [list(unit) for unit in returns.units])
        if returns.slots:
            counts: dict[str, int] = {}
            for key in returns.slots:
                counts[key] = counts.get(key, 0) + 1
            self._channel.note("release", list(counts), list(counts.values()))


def _rate(rate: Rate) -> list[object]:
    return [rate.key, rate.kind, rate.limit, rate.cost]


def _scope(scope: Scope) -> list[object]:
    return [scope.key, scope.limit]
