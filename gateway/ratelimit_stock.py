"""A serving process's stock of per-key allowance, given by the supervisor's ``keeper``: the
units of each rate and the in-flight slots it may spend without asking. Sync, no I/O, clock
injected; ``ratelimit_host`` does the asking.

The keeper charges stock as spent when it gives it, so spending it here never admits a key
beyond its limits. Stock not topped up for ``STOCK_SECONDS`` goes back (``expire``): rates'
unused units as a refund, free slots as releases. A slot a request held is kept for the next
request while its stock lives, and given back to the keeper otherwise.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from gateway.ratelimit_local import Rate, Scope

STOCK_SECONDS = 1.0  # stock not topped up within this long goes back to the keeper
LOW = 0.5  # a stock below this share of what was given (or of its time) is topped up
REFUSED_PAUSE = 0.25  # seconds before stock the keeper refused for a key is asked for again


@dataclass(slots=True)
class Units:
    rate: Rate  # the rate the stock was given for (its key, limit and kind)
    left: int
    size: int  # the last share given: the stock is low below LOW of it
    tat: float  # the keeper's spent-ahead point right after it gave stock (this clock)
    until: float


@dataclass(slots=True)
class Slots:
    free: int
    size: int
    until: float


@dataclass(frozen=True, slots=True)
class Returns:
    """What goes back to the keeper: unused units per rate, free slots per scope key."""

    refunds: tuple[tuple[Rate, int], ...] = ()
    releases: tuple[str, ...] = ()  # one key per slot


class Stock:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._units: dict[str, Units] = {}
        self._slots: dict[str, Slots] = {}
        self._refused: dict[str, float] = {}  # key -> when it may be asked for again

    def take(self, rates: Sequence[Rate], scopes: Sequence[Scope]) -> tuple[float, ...] | None:
        """Admit from stock when every rate and scope has enough; then the seconds spent
        ahead per rate, as the keeper's verdict gives them. None: ask the keeper."""
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
            ahead.append(max(held.tat - now - held.left * rate.interval, 0.0))
        for scope in scopes:
            slots[scope.key].free -= 1
        return tuple(ahead)

    def wanted(
        self, rates: Sequence[Rate], scopes: Sequence[Scope]
    ) -> tuple[list[Rate], list[Scope]]:
        """The rates and scopes of a request to ask stock for: those without stock or low on
        it, unless the keeper refused stock for one of the request's keys a moment ago (then
        none: stock for the rest could not be spent without it)."""
        now = self._clock()
        refused = self._refused
        if refused:
            for key in [*(r.key for r in rates), *(s.key for s in scopes)]:
                until = refused.get(key)
                if until is not None:
                    if until > now:
                        return [], []
                    del refused[key]
        soon = now + STOCK_SECONDS * LOW
        low_rates = [
            rate
            for rate in rates
            if (held := self._units.get(rate.key)) is None
            or held.left < held.size * LOW
            or held.until < soon
        ]
        low_scopes = [
            scope
            for scope in scopes
            if (free := self._slots.get(scope.key)) is None
            or free.free < free.size * LOW
            or free.until < soon
        ]
        return low_rates, low_scopes

    def add(
        self,
        rates: Sequence[Rate],
        scopes: Sequence[Scope],
        ahead: Sequence[float | None],
        units: Sequence[int],
        slots: Sequence[int],
    ) -> None:
        """The keeper's answer to a stock call; a zero (or None) is a refusal for that key."""
        now = self._clock()
        until = now + STOCK_SECONDS
        for rate, spent, given in zip(rates, ahead, units, strict=True):
            if spent is None or given <= 0:
                self._refused[rate.key] = now + REFUSED_PAUSE
                continue
            held = self._units.get(rate.key)
            if held is None:
                self._units[rate.key] = Units(rate, given, given, now + spent, until)
            else:
                held.rate, held.size, held.tat, held.until = rate, given, now + spent, until
                held.left += given
        for scope, given in zip(scopes, slots, strict=True):
            if given <= 0:
                self._refused[scope.key] = now + REFUSED_PAUSE
                continue
            free = self._slots.get(scope.key)
            if free is None:
                self._slots[scope.key] = Slots(given, given, until)
            else:
                free.free += given
                free.size, free.until = given, until

    def give_back(self, scope: Scope) -> bool:
        """A request's slot is free: kept as stock (True) while its stock lives and is not
        over twice its size; else it goes back to the keeper (False)."""
        free = self._slots.get(scope.key)
        if free is None or free.until <= self._clock() or free.free >= 2 * free.size:
            return False
        free.free += 1
        return True

    def expire(self, *, everything: bool = False) -> Returns:
        """Stock whose time is up (or all of it): dropped here, and what is unused returned."""
        now = float("inf") if everything else self._clock()
        refunds = []
        for key, held in list(self._units.items()):
            if held.until <= now:
                del self._units[key]
                if held.left > 0:
                    refunds.append((held.rate, held.left))
        releases: list[str] = []
        for key, free in list(self._slots.items()):
            if free.until <= now:
                del self._slots[key]
                releases.extend([key] * free.free)
        return Returns(tuple(refunds), tuple(releases))

    def next_expiry(self) -> float | None:
        """When the next stock's time is up (this clock); None when none is held."""
        times = [h.until for h in self._units.values()] + [f.until for f in self._slots.values()]
        return min(times) if times else None

    def __len__(self) -> int:
        return len(self._units) + len(self._slots)
