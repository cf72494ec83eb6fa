"""A serving process's stock of per-key allowance, given by the supervisor's ``keeper``: the
units of each rate and the in-flight slots it may spend without asking. Sync, no I/O, clock
injected; ``ratelimit_host`` does the asking and sends what this returns.

Units of a rate are reserved at the keeper, where they count as spent, and are not refilled
by time, until this process says it spent them (then they are charged, at that moment) or
gives them back: so admitting from stock is never more lenient than asking for each request.
Slots are counted in flight at the keeper; a slot a request held is kept for the next request
while its stock lives. Stock is asked for when a request finds it missing or low, for all the
limits of that request at once (the keeper gives all or none: stock of one limit is no use
without the others), and at most twice a share is kept: more goes back at once. Stock not
topped up within ``STOCK_SECONDS`` goes back.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from gateway.ratelimit_local import Rate, Scope

STOCK_SECONDS = 1.0  # stock not topped up within this long goes back to the keeper
LOW = 0.5  # a stock below this share of what was given last is topped up
KEEP = 2  # at most this many shares are kept; what is over goes back at once
REFUSED_PAUSE = 0.25  # seconds before stock the keeper refused for a key is asked for again


@dataclass(slots=True)
class Units:
    left: int
    size: int  # the last share given
    tat: float  # the keeper's charged-ahead point when it last gave stock (this clock)
    reserved: int  # the units reserved there in all then, ours included
    until: float


@dataclass(slots=True)
class Slots:
    free: int
    size: int
    until: float


@dataclass(frozen=True, slots=True)
class Returns:
    """What goes back to the keeper: reserved units per rate key, free slots (a key each)."""

    units: tuple[tuple[str, int], ...] = ()
    slots: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.units or self.slots)


class Stock:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._units: dict[str, Units] = {}
        self._slots: dict[str, Slots] = {}
        self._refused: dict[str, float] = {}  # key -> when it may be asked for again

    def take(self, rates: Sequence[Rate], scopes: Sequence[Scope]) -> tuple[float, ...] | None:
        """Admit from stock when every rate and scope has enough; then the seconds spent
        ahead per rate, as the keeper's verdict gives them (as of the last stock it gave, and
        less what this process holds unspent). None: ask the keeper."""
        now = self._clock()
        units = self._units
        slots = self._slots
        for rate in rates:
            held = units.get(rate.key)
            if held is None or held.until <= now or held.left < rate.cost:
                return None
        for scope in scopes:
            free = slots.get(scope.key)
            if free is None or free.until <= now or free.free < 1:
                return None
        ahead = []
        for rate in rates:
            held = units[rate.key]
            held.left -= rate.cost
            unspent = held.reserved - held.left  # reserved there, but not ours to spend
            ahead.append(max(held.tat - now, 0.0) + unspent * rate.interval)
        for scope in scopes:
            slots[scope.key].free -= 1
        return tuple(ahead)

    def wanted(
        self, rates: Sequence[Rate], scopes: Sequence[Scope]
    ) -> tuple[list[bool], list[bool]] | None:
        """Which of a request's rates and scopes to ask stock for (those without stock, or
        low on it); None when none is, or when the keeper refused stock for one of its keys a
        moment ago."""
        now = self._clock()
        refused = self._refused
        if refused:
            for key in [*(r.key for r in rates), *(s.key for s in scopes)]:
                until = refused.get(key)
                if until is not None:
                    if until > now:
                        return None
                    del refused[key]
        rate_wants = [
            (held := self._units.get(rate.key)) is None
            or held.until <= now
            or held.left < max(held.size * LOW, rate.cost)
            for rate in rates
        ]
        scope_wants = [
            (free := self._slots.get(scope.key)) is None
            or free.until <= now
            or free.free < free.size * LOW
            for scope in scopes
        ]
        if not any(rate_wants) and not any(scope_wants):
            return None
        return rate_wants, scope_wants

    def add(
        self,
        rates: Sequence[Rate],
        scopes: Sequence[Scope],
        ahead: Sequence[Sequence[float] | None],
        units: Sequence[int],
        slots: Sequence[int],
    ) -> Returns:
        """The keeper's answer to a stock call (all zero: refused); what is over ``KEEP``
        shares goes back (returned)."""
        now = self._clock()
        if not any(units) and not any(slots):
            for key in [*(r.key for r in rates), *(s.key for s in scopes)]:
                self._refused[key] = now + REFUSED_PAUSE
            return Returns()
        until = now + STOCK_SECONDS
        over_units: list[tuple[str, int]] = []
        over_slots: list[str] = []
        for rate, point, given in zip(rates, ahead, units, strict=True):
            if point is None or given <= 0:
                continue
            charged, reserved = point
            held = self._units.get(rate.key)
            if held is None:
                held = self._units[rate.key] = Units(0, given, 0.0, 0, until)
            held.left += given
            held.size, held.until = given, until
            held.tat, held.reserved = now + charged, int(reserved)
            if held.left > KEEP * given:
                over = held.left - KEEP * given
                over_units.append((rate.key, over))
                held.left -= over
                held.reserved -= over
        for scope, given in zip(scopes, slots, strict=True):
            if given <= 0:
                continue
            free = self._slots.get(scope.key)
            if free is None:
                free = self._slots[scope.key] = Slots(0, given, until)
            free.free += given
            free.size, free.until = given, until
            if free.free > KEEP * given:
                over_slots.extend([scope.key] * (free.free - KEEP * given))
                free.free = KEEP * given
        return Returns(tuple(over_units), tuple(over_slots))

    def give_back(self, scope: Scope) -> bool:
        """A request's slot is free: kept as stock (True) while its stock lives and holds
        under ``KEEP`` shares; else it goes back to the keeper (False)."""
        free = self._slots.get(scope.key)
        if free is None or free.until <= self._clock() or free.free >= KEEP * free.size:
            return False
        free.free += 1
        return True

    def expire(self, *, everything: bool = False) -> Returns:
        """Stock whose time is up (or all of it): dropped here, and what is unused returned."""
        now = float("inf") if everything else self._clock()
        units = []
        for key, held in list(self._units.items()):
            if held.until <= now:
                del self._units[key]
                if held.left > 0:
                    units.append((key, held.left))
        slots: list[str] = []
        for key, free in list(self._slots.items()):
            if free.until <= now:
                del self._slots[key]
                slots.extend([key] * free.free)
        return Returns(tuple(units), tuple(slots))

    def next_expiry(self) -> float | None:
        """When the next stock's time is up (this clock); None when none is held."""
        times = [h.until for h in self._units.values()] + [f.until for f in self._slots.values()]
        return min(times) if times else None

    def __len__(self) -> int:
        return len(self._units) + len(self._slots)
