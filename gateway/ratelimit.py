"""Per-key rate limits: requests per minute, tokens per minute, requests in flight.

Each limit of a key (and of a key for one model, when the key sets per-model limits) is a GCRA
over one minute (the generic cell rate algorithm: a token bucket kept as one timestamp, the
"theoretical arrival time"): a key may spend its whole per-minute allowance at once, and it
comes back steadily. Tokens are charged when a request is admitted at its estimate (body bytes
/ 4 plus the completion tokens asked for) and corrected when its usage is known: refunded when
it cost less, charged when it cost more (never refused afterwards: it was served).

With ``redis.url`` the same arithmetic runs inside Redis in atomic scripts (see
``ratelimit_redis``), so every replica shares one allowance. When Redis cannot be reached the
limiter keeps serving on these local limits (``on_error: open``: a gauge, a counter and one log
line per outage say so) or answers 503 (``closed``).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from gateway.auth import Client
from gateway.errors import Overloaded, RateLimited
from gateway.metrics import GatewayMetrics
from gateway.ratelimit_redis import RedisLimits, RedisUnavailable
from gateway.settings import RateLimits, RedisSettings

log = logging.getLogger(__name__)

PERIOD = 60.0  # every rate limit is per minute
KINDS = ("requests", "tokens")


@dataclass(frozen=True, slots=True)
class Rate:
    """One per-minute limit to check: its state key, what a unit costs, and the cost."""

    key: str
    kind: str  # "requests" or "tokens"
    limit: int
    cost: int

    @property
    def interval(self) -> float:
        return PERIOD / self.limit


@dataclass(frozen=True, slots=True)
class Verdict:
    """The outcome of checking a set of rates: admitted or not, and what the headers say."""

    admitted: bool
    retry_after: float  # seconds until the request would be admitted; 0 when admitted
    refused_kind: str
    ahead: dict[str, tuple[int, float]]  # kind -> (limit, seconds of allowance spent ahead)


class LocalWindows:
    """The GCRA state of one replica: a theoretical arrival time per limit key."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._tat: dict[str, float] = {}

    def check(self, rates: list[Rate]) -> Verdict:
        now = self._clock()
        worst, refused = 0.0, ""
        new_tats = []
        for rate in rates:
            tat = max(self._tat.get(rate.key, now), now)
            new_tat = tat + min(rate.cost, rate.limit) * rate.interval
            wait = new_tat - PERIOD - now
            if wait > worst:
                worst, refused = wait, rate.kind
            new_tats.append(new_tat)
        if worst > 0:
            return Verdict(
                False,
                worst,
                refused,
                _ahead(rates, [max(self._tat.get(r.key, now), now) for r in rates], now),
            )
        for rate, new_tat in zip(rates, new_tats, strict=True):
            self._tat[rate.key] = new_tat
        return Verdict(True, 0.0, "", _ahead(rates, new_tats, now))

    def adjust(self, rate: Rate, delta: int) -> None:
        """Charge (delta > 0) or refund (delta < 0) tokens after the fact."""
        now = self._clock()
        tat = max(self._tat.get(rate.key, now), now) + delta * rate.interval
        self._tat[rate.key] = max(tat, now)


def _ahead(rates: list[Rate], tats: list[float], now: float) -> dict[str, tuple[int, float]]:
    ahead: dict[str, tuple[int, float]] = {}
    for rate, tat in zip(rates, tats, strict=True):
        spent = max(tat - now, 0.0)
        limit, known = ahead.get(rate.kind, (rate.limit, -1.0))
        # Several limits of one kind (key and key+model): report the tighter one.
        if known < 0 or _remaining(rate.limit, spent) < _remaining(limit, known):
            ahead[rate.kind] = (rate.limit, spent)
    return ahead


def _remaining(limit: int, spent: float) -> int:
    return max(int((PERIOD - spent) / (PERIOD / limit)), 0)


def headers(ahead: dict[str, tuple[int, float]]) -> dict[str, str]:
    """OpenAI's rate-limit headers for the limits that exist."""
    out: dict[str, str] = {}
    for kind in KINDS:
        if kind in ahead:
            limit, spent = ahead[kind]
            out[f"x-ratelimit-limit-{kind}"] = str(limit)
            out[f"x-ratelimit-remaining-{kind}"] = str(_remaining(limit, spent))
            out[f"x-ratelimit-reset-{kind}"] = duration(spent)
    return out


def duration(seconds: float) -> str:
    """A duration the way OpenAI writes it: "120ms", "1s", "6m0s"."""
    if seconds < 1:
        return f"{math.ceil(seconds * 1000)}ms"
    minutes, rest = divmod(math.ceil(seconds), 60)
    return f"{minutes}m{rest}s" if minutes else f"{rest}s"


def rates_for(client: Client, model: str, tokens: int) -> list[Rate]:
    rates = []
    scopes = [(client.name, client.limits)]
    if model in client.models:
        scopes.append((f"{client.name}/{model}", client.models[model]))
    for scope, limits in scopes:
        if limits.rpm is not None:
            rates.append(Rate(f"rpm:{scope}", "requests", limits.rpm, 1))
        if limits.tpm is not None:
            rates.append(Rate(f"tpm:{scope}", "tokens", limits.tpm, max(tokens, 1)))
    return rates


def concurrency_scopes(client: Client, model: str) -> list[tuple[str, int]]:
    scopes = []
    if client.limits.max_concurrent is not None:
        scopes.append((f"conc:{client.name}", client.limits.max_concurrent))
    per_model = client.models.get(model)
    if per_model is not None and per_model.max_concurrent is not None:
        scopes.append((f"conc:{client.name}/{model}", per_model.max_concurrent))
    return scopes


@dataclass(slots=True)
class Grant:
    """One admitted request's share of its key's limits."""

    headers: dict[str, str] = field(default_factory=dict)  # x-ratelimit-* for the response
    _limiter: RateLimiter | None = None
    _tokens: Rate | None = None  # the per-key token rate, corrected by the usage
    _model_tokens: Rate | None = None
    _leases: list[tuple[str, str]] = field(default_factory=list)  # (scope, lease id)
    _shared: bool = False

    async def settle(self, tokens: int | None) -> None:
        """The request is over: ``tokens`` is what it really cost (usage), None if unknown."""
        if self._limiter is not None:
            await self._limiter.settle(self, tokens)


class RateLimiter:
    def __init__(
        self,
        redis: RedisSettings,
        metrics: GatewayMetrics,
        clock: Callable[[], float] = time.monotonic,
        lease_seconds: float = 660.0,
    ) -> None:
        self._settings = redis
        self._metrics = metrics
        self._local = LocalWindows(clock)
        self._in_flight: dict[str, int] = {}
        self._redis = RedisLimits(redis, lease_seconds) if redis.url else None
        self._redis_down = False
        self._lease_counter = 0

    async def start(self) -> None:
        if self._redis is not None:
            self._metrics.ratelimit_redis_up.set(1)

    async def close(self) -> None:
        if self._redis is not None:
            await self._redis.close()

    async def acquire(self, client: Client, model: str, tokens: int) -> Grant:
        """Admit one request of ``client`` for ``model`` estimated at ``tokens`` tokens, or
        raise ``RateLimited`` (429 with Retry-After and x-ratelimit-* headers)."""
        rates = rates_for(client, model, tokens)
        scopes = concurrency_scopes(client, model)
        if not rates and not scopes:
            return Grant()
        if self._redis is not None:
            try:
                grant = await self._acquire_shared(client, rates, scopes)
            except RedisUnavailable as exc:
                self._redis_failed(exc)
            else:
                self._redis_ok()
                return grant
        return self._acquire_local(client, rates, scopes)

    def _acquire_local(
        self, client: Client, rates: list[Rate], scopes: list[tuple[str, int]]
    ) -> Grant:
        for scope, limit in scopes:
            if self._in_flight.get(scope, 0) >= limit:
                self._refuse(client, "concurrency", 1.0, {})
        verdict = self._local.check(rates)
        if not verdict.admitted:
            self._refuse(client, verdict.refused_kind, verdict.retry_after, headers(verdict.ahead))
        for scope, _ in scopes:
            self._in_flight[scope] = self._in_flight.get(scope, 0) + 1
        return self._grant(
            rates, [(scope, "") for scope, _ in scopes], headers(verdict.ahead), False
        )

    async def _acquire_shared(
        self, client: Client, rates: list[Rate], scopes: list[tuple[str, int]]
    ) -> Grant:
        assert self._redis is not None
        self._lease_counter += 1
        lease = f"{id(self)}-{self._lease_counter}"
        verdict, leased = await self._redis.acquire(rates, scopes, lease)
        if not verdict.admitted:
            kind = verdict.refused_kind
            self._refuse(client, kind, verdict.retry_after, headers(verdict.ahead))
        return self._grant(
            rates, [(scope, lease) for scope in leased], headers(verdict.ahead), True
        )

    def _grant(
        self, rates: list[Rate], leases: list[tuple[str, str]], hdrs: dict[str, str], shared: bool
    ) -> Grant:
        tokens = [r for r in rates if r.kind == "tokens"]
        return Grant(
            headers=hdrs,
            _limiter=self,
            _tokens=tokens[0] if tokens else None,
            _model_tokens=tokens[1] if len(tokens) > 1 else None,
            _leases=leases,
            _shared=shared,
        )

    def _refuse(self, client: Client, kind: str, retry_after: float, hdrs: dict[str, str]) -> None:
        self._metrics.rate_limited.labels(client.name, kind).inc()
        raise RateLimited(kind, retry_after, hdrs)

    async def settle(self, grant: Grant, tokens: int | None) -> None:
        corrections = [
            (rate, tokens - min(rate.cost, rate.limit))
            for rate in (grant._tokens, grant._model_tokens)
            if rate is not None and tokens is not None and tokens != rate.cost
        ]
        if grant._shared and self._redis is not None:
            try:
                await self._redis.settle(corrections, grant._leases)
                return
            except RedisUnavailable as exc:
                self._redis_failed(exc)  # the leases expire on their own
                return
        for rate, delta in corrections:
            self._local.adjust(rate, delta)
        for scope, _ in grant._leases:
            self._in_flight[scope] = max(self._in_flight.get(scope, 0) - 1, 0)

    def _redis_failed(self, exc: Exception) -> None:
        self._metrics.ratelimit_redis_errors.inc()
        if self._settings.on_error == "closed":
            raise Overloaded("Rate limits cannot be checked right now; retry shortly.") from exc
        if not self._redis_down:
            self._redis_down = True
            self._metrics.ratelimit_redis_up.set(0)
            log.warning("redis unreachable (%s): rate limits are local to this replica", exc)

    def _redis_ok(self) -> None:
        if self._redis_down:
            self._redis_down = False
            self._metrics.ratelimit_redis_up.set(1)
            log.warning("redis reachable again: rate limits are shared")


__all__ = ["Grant", "RateLimiter", "RateLimits"]
