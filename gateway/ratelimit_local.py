"""The arithmetic of rate limits, and one replica's own state: sync, no I/O, clock injected.

Every per-minute limit is a GCRA (generic cell rate algorithm): a token bucket of ``limit``
units that refills one unit every ``60 / limit`` seconds, kept as a single number, the
"theoretical arrival time" (TAT). ``TAT - now`` is how much of the minute's allowance is spent
ahead; a request costing ``c`` units is admitted when ``TAT + c * interval - now <= 60``, so a
key may spend its whole allowance at once (burst = the per-minute limit) and gets it back
steadily. ``ratelimit_redis`` runs the same arithmetic in Lua on Redis's clock.

Requests in flight are plain counters here (and leases in Redis).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

PERIOD = 60.0  # every rate limit is per minute
# Shared limits (ratelimit_redis) are named here, where the request path can use them without
# importing the Redis client, which costs 17 MB in every process that has no Redis configured.
LEASE_SECONDS = 30.0  # an in-flight lease lives this long unless renewed


class RedisUnavailable(Exception):
    """Redis could not be asked: unreachable, slower than ``redis.timeout``, or an error."""


# Seconds of float rounding forgiven: `limit` intervals of 60 / limit may sum to 60.000...01,
# which must not refuse the limit-th request of a minute.
SLACK = 1e-6
CONCURRENCY_RETRY_AFTER = 1.0  # a request in flight ends at an unknown time: ask again soon
KINDS = ("requests", "tokens")  # OpenAI's names, in the order its headers come


@dataclass(frozen=True, slots=True)
class Rate:
    """One per-minute limit a request is checked against, and what the request costs in it."""

    key: str  # the state's name, e.g. "{team-a}:tpm" or "{team-a}:tpm:model"
    kind: str  # "requests" or "tokens"
    limit: int
    cost: int  # at most `limit`: a request bigger than the whole allowance costs all of it

    @property
    def interval(self) -> float:
        return PERIOD / self.limit


@dataclass(frozen=True, slots=True)
class Scope:
    """A cap on one key's (or key and model's) requests in flight."""

    key: str
    limit: int


@dataclass(frozen=True, slots=True)
class Verdict:
    """Admitted or not; when not, which limit refused and in how many seconds it would admit.

    ``ahead`` holds, per rate checked, the seconds of allowance spent ahead of now: after
    this request's charge when admitted, before it when refused (nothing was charged).
    """

    admitted: bool
    ahead: tuple[float, ...]
    kind: str = ""  # "requests", "tokens" or "concurrency"; "" when admitted
    retry_after: float = 0.0


def refusal(rates: Sequence[Rate], waits: Sequence[float], full: bool) -> tuple[str, float]:
    """The limit to name in a 429 and its wait: in-flight caps first, else the longest wait;
    ("", 0.0) when every limit admits."""
    wait, kind = 0.0, ""
    for rate, rate_wait in zip(rates, waits, strict=True):
        if rate_wait > max(wait, SLACK):
            wait, kind = rate_wait, rate.kind
    if full:
        return "concurrency", max(wait, CONCURRENCY_RETRY_AFTER)
    return kind, wait


class LocalLimits:
    """One replica's limits: a TAT per rate key and a count per in-flight scope.

    Memory is bounded by the configured keys (and their configured models); a TAT in the past
    means the same as none, so such entries are dropped once a minute, and a count of zero is
    dropped at once.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._tat: dict[str, float] = {}
        # Units set aside for a serving process's stock (``keeper``): spent as far as every
        # check is concerned, and not refilled by time, until spent (then charged to the TAT)
        # or given back.
        self._reserved: dict[str, int] = {}
        self._in_flight: dict[str, int] = {}
        self._next_prune = clock() + PERIOD

    def acquire(self, rates: Sequence[Rate], scopes: Sequence[Scope]) -> Verdict:
        """Check every limit; only when all of them admit, charge the rates and hold the
        scopes (all or nothing)."""
        now = self._clock()
        self._prune(now)
        tats = [max(self._tat.get(rate.key, now), now) for rate in rates]
        held = [self._reserved.get(rate.key, 0) * rate.interval for rate in rates]
        charged = [tat + rate.cost * rate.interval for rate, tat in zip(rates, tats, strict=True)]
        ahead = [new + aside - now for new, aside in zip(charged, held, strict=True)]
        full = any(self._in_flight.get(scope.key, 0) >= scope.limit for scope in scopes)
        kind, wait = refusal(rates, [spent - PERIOD for spent in ahead], full)
        if kind:
            before = [tat + aside - now for tat, aside in zip(tats, held, strict=True)]
            return Verdict(False, tuple(before), kind, wait)
        for rate, new in zip(rates, charged, strict=True):
            self._tat[rate.key] = new
        self.hold(scopes)
        return Verdict(True, tuple(ahead))

    def adjust(self, rate: Rate, delta: int) -> None:
        """Charge (``delta > 0``) or refund (``delta < 0``) tokens after the fact; never a
        refusal, and never credit beyond a full allowance."""
        now = self._clock()
        tat = max(self._tat.get(rate.key, now), now) + delta * rate.interval
        if tat > now:
            self._tat[rate.key] = tat
        else:
            self._tat.pop(rate.key, None)

    def hold(self, scopes: Sequence[Scope]) -> None:
        """Count requests in flight without checking (the caps were checked elsewhere)."""
        for scope in scopes:
            self._in_flight[scope.key] = self._in_flight.get(scope.key, 0) + 1

    def release(self, scopes: Sequence[Scope]) -> None:
        for scope in scopes:
            left = self._in_flight.get(scope.key, 0) - 1
            if left > 0:
                self._in_flight[scope.key] = left
            else:
                self._in_flight.pop(scope.key, None)

    def set_aside(self, rate: Rate, units: int, ceiling: float) -> tuple[float, int] | None:
        """Reserve ``units`` of ``rate`` for requests to be admitted elsewhere, only when the
        allowance spent (reserved units included) stays within ``ceiling`` seconds; then the
        seconds the charged part is ahead (which time refills) and the units reserved in all
        (which it does not), else None (nothing reserved)."""
        now = self._clock()
        reserved = self._reserved.get(rate.key, 0) + units
        charged = max(self._tat.get(rate.key, now), now) - now
        if charged + reserved * rate.interval > ceiling + SLACK:
            return None
        self._reserved[rate.key] = reserved
        return charged, reserved

    def spend(self, rate: Rate, units: int) -> None:
        """Reserved units were spent: charged now (never earlier than they were spent, so
        never more lenient than charging each request as it came)."""
        self.unreserve(rate.key, units)
        now = self._clock()
        self._tat[rate.key] = max(self._tat.get(rate.key, now), now) + units * rate.interval

    def unreserve(self, key: str, units: int) -> None:
        """Reserved units given back unspent."""
        left = self._reserved.get(key, 0) - units
        if left > 0:
            self._reserved[key] = left
        else:
            self._reserved.pop(key, None)

    def reserved(self, key: str) -> int:
        return self._reserved.get(key, 0)

    def set_aside_slots(self, scope: Scope, slots: int, ceiling: int) -> bool:
        """Count ``slots`` of ``scope`` in flight ahead of the requests that will use them,
        only when the count stays within ``ceiling``."""
        held = self._in_flight.get(scope.key, 0) + slots
        if held > ceiling:
            return False
        self._in_flight[scope.key] = held
        return True

    def in_flight(self, key: str) -> int:
        return self._in_flight.get(key, 0)

    def __len__(self) -> int:
        """Entries held (rates with allowance spent or reserved, scopes with requests in
        flight)."""
        return len(self._tat) + len(self._reserved) + len(self._in_flight)

    def _prune(self, now: float) -> None:
        if now < self._next_prune:
            return
        self._next_prune = now + PERIOD
        self._tat = {key: tat for key, tat in self._tat.items() if tat > now}


def remaining(rate: Rate, ahead: float) -> int:
    """Units of ``rate`` a request could still spend now, ``ahead`` seconds being spent."""
    units = math.floor((PERIOD - ahead) / rate.interval + SLACK)
    return min(max(units, 0), rate.limit)


def headers(rates: Sequence[Rate], ahead: Sequence[float]) -> dict[str, str]:
    """OpenAI's ``x-ratelimit-*`` headers for the kinds of limit that exist; where a key and a
    key+model limit of one kind both apply, the one with less remaining is reported."""
    tightest: dict[str, tuple[Rate, float, int]] = {}
    for rate, spent in zip(rates, ahead, strict=True):
        left = remaining(rate, spent)
        if rate.kind not in tightest or left < tightest[rate.kind][2]:
            tightest[rate.kind] = (rate, spent, left)
    out: dict[str, str] = {}
    for kind in KINDS:
        if kind in tightest:
            rate, spent, left = tightest[kind]
            out[f"x-ratelimit-limit-{kind}"] = str(rate.limit)
            out[f"x-ratelimit-remaining-{kind}"] = str(left)
            out[f"x-ratelimit-reset-{kind}"] = duration(spent)  # until the allowance is whole
    return out


def duration(seconds: float) -> str:
    """A duration as OpenAI writes it (Go's style): "0s", "120ms", "1s", "6m0s", "1h0m0s".

    Rounded up: below a second to the millisecond, above it to the second.
    """
    if seconds <= 0:
        return "0s"
    millis = math.ceil(seconds * 1000 - SLACK)
    if millis < 1000:
        return f"{max(millis, 1)}ms"
    hours, rest = divmod(math.ceil(seconds - SLACK), 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    return f"{minutes}m{secs}s" if minutes else f"{secs}s"
