"""The supervisor's shared state: per-key rate limits kept once for all serving processes of
one host, so that ``rpm``, ``tpm`` and ``max_concurrent`` hold for the gateway as a whole.

The arithmetic is ``ratelimit_local.LocalLimits``, run here, in the one process that every
serving process asks (``ratelimit_host`` is the asking end). It stays exact because the
supervisor's loop handles one message at a time. Each serving process has a ``Holdings``:
what it holds in flight is given back when it dies or is replaced, so a crash never leaks
a key's in-flight slot.

Operations, as messages on a ``channel.Channel``:

- call ``["limit", rates, scopes]`` -> ``[admitted, ahead, kind, retry_after]``
- call ``["stock", rates, scopes, rate_wants, scope_wants]`` -> ``[ahead, units, slots]``:
  stock (below) for the wanted ones of a request's limits, all or none: per rate its units
  and ``[seconds charged ahead, units reserved in all]`` after them (0 and null: none), per
  scope its slots
- note ``["hold", scopes]``, ``["release", keys]`` (or ``[..., keys, counts]``),
  ``["adjust", rate, delta]``,
  ``["spend", [[rate, units], ...]]`` (stock spent), ``["unstock", [[key, units], ...]]``
  (stock given back; slots go back with ``release``)

where a rate is ``[key, kind, limit, cost]`` and a scope ``[key, limit]``.

**Stock.** Asking for every admission put this process in every limited request's path: a
process the scheduler leaves waiting for milliseconds on busy cores (the p99 TTFT of paced
streams with limited keys was 40-49 ms against 25-26 without limits). So a serving process
may take a small stock of a key's allowance and admit from it on its own
(``ratelimit_stock``): units of a rate are reserved here, where every check counts them as
spent and time does not refill them, until the process says it spent them (they are charged
then) or gives them back; slots are counted in flight here. So a key is never admitted beyond
its limits. Stock is a 64th of each limit, split among the serving processes; it is given
only while the key has more than half of each allowance and cap left, and a process keeps at
most two shares and gives back what it has not topped up within ``STOCK_SECONDS``. The cost:
a key that goes from half its allowance to none while other processes hold stock they have
not used is refused up to that stock early, at most 1/32 of the limit.
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
        self._reserved: dict[str, int] = {}  # units of its stock, per rate key
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
            wants = [bool(w) for w in message[3]], [bool(w) for w in message[4]]
            return list(self._stock(rates, scopes, *wants))
        if op == "spend":
            self._spend(message[1])
        elif op == "unstock":
            self._unstock(message[1])
        elif op == "hold":
            scopes = [scope_of(s) for s in message[1]]
            self._limits.hold(scopes)
            self._count(scopes)
        elif op == "release":
            counts = message[2] if len(message) > 2 else [1] * len(message[1])
            self._release(
                [str(k) for k, n in zip(message[1], counts, strict=True) for _ in range(int(n))]
            )
        elif op == "adjust":
            self._limits.adjust(rate_of(message[1]), int(message[2]))
        return None

    def release_all(self) -> None:
        """The process is gone: whatever it held in flight is free again, and its stock given
        back (units it spent but had not said so are lost with it: a few requests' worth)."""
        self._release([key for key, count in self._held.items() for _ in range(count)])
        for key, count in list(self._reserved.items()):
            self._limits.unreserve(key, count)
        self._reserved.clear()
        if self._live:
            self._live = False
            self._keeper.processes -= 1

    def _stock(
        self,
        rates: list[Rate],
        scopes: list[Scope],
        rate_wants: list[bool],
        scope_wants: list[bool],
    ) -> tuple[list[tuple[float, int] | None], list[int], list[int]]:
        """A share of each wanted rate (reserved) and scope (counted in flight), all or none:
        none when a limit of the request is too small to share (or its share below the
        request's cost), or when a wanted one is past ``STOCK_CEILING``. Per rate what
        ``set_aside`` says of it (None: none given) and the units, per scope the slots."""
        limits = self._limits
        split = STOCK_SHARE * max(self._keeper.processes, 1)
        rate_shares = [rate.limit // split for rate in rates]
        scope_shares = [scope.limit // split for scope in scopes]
        ahead: list[tuple[float, int] | None] = [None] * len(rates)
        units = [0] * len(rates)
        slots = [0] * len(scopes)
        if any(s < max(STOCK_MIN, r.cost) for r, s in zip(rates, rate_shares, strict=True)) or any(
            s < STOCK_MIN for s in scope_shares
        ):
            return ahead, units, slots
        whole = True
        for i, rate in enumerate(rates):
            if whole and rate_wants[i]:
                point = limits.set_aside(rate, rate_shares[i], STOCK_CEILING * PERIOD)
                whole = point is not None
                if point is not None:
                    ahead[i], units[i] = point, rate_shares[i]
        for i, scope in enumerate(scopes):
            if whole and scope_wants[i]:
                ceiling = int(scope.limit * STOCK_CEILING)
                whole = limits.set_aside_slots(scope, scope_shares[i], ceiling)
                if whole:
                    slots[i] = scope_shares[i]
        if whole:
            for rate, given in zip(rates, units, strict=True):
                if given:
                    self._reserved[rate.key] = self._reserved.get(rate.key, 0) + given
            for scope, given in zip(scopes, slots, strict=True):
                if given:
                    self._held[scope.key] = self._held.get(scope.key, 0) + given
            return ahead, units, slots
        # One of them could not be given: none is.
        for rate, given in zip(rates, units, strict=True):
            if given:
                limits.unreserve(rate.key, given)
        for scope, given in zip(scopes, slots, strict=True):
            if given:
                limits.release([scope] * given)
        return [None] * len(rates), [0] * len(rates), [0] * len(scopes)

    def _spend(self, spent: list[Any]) -> None:
        for fields, count in spent:
            rate = rate_of(fields)
            count = min(int(count), self._reserved.get(rate.key, 0))
            if count > 0:
                self._limits.spend(rate, count)
                self._unreserve(rate.key, count)

    def _unstock(self, returned: list[Any]) -> None:
        for key, count in returned:
            count = min(int(count), self._reserved.get(str(key), 0))
            if count > 0:
                self._limits.unreserve(str(key), count)
                self._unreserve(str(key), count)

    def _unreserve(self, key: str, count: int) -> None:
        left = self._reserved[key] - count
        if left > 0:
            self._reserved[key] = left
        else:
            del self._reserved[key]

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
