"""The supervisor's shared state: per-key rate limits kept once for all serving processes of
one host, so that ``rpm``, ``tpm`` and ``max_concurrent`` hold for the gateway as a whole.

The arithmetic is ``ratelimit_local.LocalLimits``, run here, in the one process that every
serving process asks (``ratelimit_host`` is the asking end). It stays exact because the
supervisor's loop handles one message at a time. Each serving process has a ``Holdings``:
what it holds in flight is given back when it dies or is replaced, so a crash never leaks
a key's in-flight slot.

Operations, as messages on a ``channel.Channel``:

- call ``["limit", rates, scopes]`` -> ``[admitted, ahead, kind, retry_after]``
- call ``["stock", rates, scopes]`` -> ``[ahead, units, slots]``: stock (below) per rate
  (its units, and the seconds spent ahead after the charge; 0 and null: none) and per scope
- note ``["hold", scopes]``, ``["release", keys]``, ``["adjust", rate, delta]``

where a rate is ``[key, kind, limit, cost]`` and a scope ``[key, limit]``.

**Stock.** Asking for every admission put this process in every limited request's path: a
process the scheduler leaves waiting for milliseconds on busy cores (the p99 TTFT of paced
streams with limited keys was 40-49 ms against 25-26 without limits). So a serving process
may take a small stock of a key's allowance (``units`` of each rate, charged here at once)
and of its in-flight slots (``slots``, counted here at once) and admit from it on its own
(``ratelimit_stock``). Stock is counted as spent the moment it is given, so a key is never
admitted beyond its limits. It is given only while the key has more than half of each
allowance and cap left, a 64th of the limit shared among the serving processes at a time,
and what a process has not used comes back within ``STOCK_SECONDS``; so the only cost is
that a key going from half its allowance to none within that time may be refused while
another process still holds stock it has not used: at most about 1/32 of its limit
(1.5 shares of units, or 2 of slots, per process).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from gateway.channel import Message
from gateway.ratelimit_local import PERIOD, LocalLimits, Rate, Scope


def rate_of(fields: list[Any]) -> Rate:
    key, kind, limit, cost = fields
    return Rate(str(key), str(kind), int(limit), int(cost))


def scope_of(fields: list[Any]) -> Scope:
    key, limit = fields
    return Scope(str(key), int(limit))


# Stock is given while at most half of a rate's minute or of a cap is spent, in shares of
# 1/STOCK_SHARE of the limit divided among the serving processes, and none smaller than
# STOCK_MIN (a small limit is asked for every request, as before).
STOCK_SHARE = 64
STOCK_MIN = 2
STOCK_CEILING = 0.5


class Keeper:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.limits = LocalLimits(clock)
        self.processes = 0  # serving processes with live holdings: stock is split among them

    def holdings(self) -> Holdings:
        """The state one serving process holds, for its channel's messages."""
        return Holdings(self)


class Holdings:
    """One serving process's in-flight slots; ``handle`` takes its channel's messages."""

    def __init__(self, keeper: Keeper) -> None:
        self._keeper = keeper
        self._limits = keeper.limits
        self._held: dict[str, int] = {}
        self._live = True
        keeper.processes += 1

    def handle(self, message: Message) -> Message | None:
        op = message[0]
        if op == "limit":
            rates = [rate_of(r) for r in message[1]]
            scopes = [scope_of(s) for s in message[2]]
            verdict = self._limits.acquire(rates, scopes)
            if verdict.admitted:
                self._count(scopes)
            return [verdict.admitted, list(verdict.ahead), verdict.kind, verdict.retry_after]
        if op == "stock":
            rates = [rate_of(r) for r in message[1]]
            scopes = [scope_of(s) for s in message[2]]
            return list(self._stock(rates, scopes))
        if op == "hold":
            scopes = [scope_of(s) for s in message[1]]
            self._limits.hold(scopes)
            self._count(scopes)
        elif op == "release":
            self._release([str(key) for key in message[1]])
        elif op == "adjust":
            self._limits.adjust(rate_of(message[1]), int(message[2]))
        return None

    def release_all(self) -> None:
        """The process is gone: whatever it held in flight is free again (its stock of slots
        included; stock of a rate stays spent, as its requests may have been served)."""
        self._release([key for key, count in self._held.items() for _ in range(count)])
        if self._live:
            self._live = False
            self._keeper.processes -= 1

    def _stock(
        self, rates: list[Rate], scopes: list[Scope]
    ) -> tuple[list[float | None], list[int], list[int]]:
        """Set stock aside for each rate and scope where the key is far enough from its
        limit: per rate the seconds spent ahead after the charge (None: no stock) and the
        units, per scope the slots."""
        limits = self._limits
        split = STOCK_SHARE * max(self._keeper.processes, 1)
        ahead: list[float | None] = []
        units: list[int] = []
        for rate in rates:
            share = rate.limit // split
            spent = (
                limits.set_aside(rate, share, STOCK_CEILING * PERIOD)
                if share >= STOCK_MIN
                else None
            )
            ahead.append(spent)
            units.append(share if spent is not None else 0)
        slots: list[int] = []
        for scope in scopes:
            share = scope.limit // split
            given = share >= STOCK_MIN and limits.set_aside_slots(
                scope, share, int(scope.limit * STOCK_CEILING)
            )
            if given:
                self._held[scope.key] = self._held.get(scope.key, 0) + share
            slots.append(share if given else 0)
        return ahead, units, slots

    def _count(self, scopes: list[Scope]) -> None:
        held = self._held
        for scope in scopes:
            held[scope.key] = held.get(scope.key, 0) + 1

    def _release(self, keys: list[str]) -> None:
        # Only what this process holds: a late release from a replaced process, or a
        # duplicate, must not free another process's slot.
        held = self._held
        mine = []
        for key in keys:
            count = held.get(key, 0)
            if count > 1:
                held[key] = count - 1
            elif count == 1:
                del held[key]
            else:
                continue
            mine.append(Scope(key, 0))
        self._limits.release(mine)
