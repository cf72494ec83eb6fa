"""Per-key rate limits: requests per minute, tokens per minute, requests in flight.

A key's limits apply to all its requests; when the key also sets limits for a model, a request
for that model must pass both. Requests and tokens per minute are GCRAs over one minute (see
``ratelimit_local``): a key may spend its whole allowance at once and gets it back steadily.
Tokens are charged when a request is admitted, at its estimate (body bytes / 4 plus the
completion tokens asked for), and corrected when it is over by its usage: refunded when it cost
less, charged when it cost more (never refused afterwards: it was served). In-flight caps hold
a slot from admission until ``Grant.settle``, which the proxy calls however the request ended.

Every grant and every 429 carries OpenAI's ``x-ratelimit-*`` headers for the limits that exist;
a 429 also says when the request would be admitted (``Retry-After``, whole seconds, and
``retry-after-ms``, which the OpenAI SDKs prefer).

With several serving processes (``server.processes``) the arithmetic runs once, in the
supervisor (``keeper``, asked through ``ratelimit_host``), so the limits hold for the whole
gateway. With ``redis.url`` the same arithmetic runs in Redis (``ratelimit_redis``), so all replicas
share one allowance. When a Redis call fails the request is limited here instead
(``on_error: open``) or refused with 503 (``closed``), Redis is left alone until a background
PING answers again (once a second), ``gateway_ratelimit_redis_up`` is 0 meanwhile, and the log
says so once when it goes and once when it is back; in-flight slots that could not be given
back meanwhile are given back then (token corrections of that time are lost).
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import time
from collections import deque
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from gateway.auth import Client
from gateway.errors import Overloaded, RateLimited
from gateway.metrics import GatewayMetrics
from gateway.ratelimit_local import (
    LEASE_SECONDS,
    LocalLimits,
    Rate,
    RedisUnavailable,
    Scope,
    Verdict,
    headers,
)
from gateway.settings import RateLimits, RedisSettings

if TYPE_CHECKING:
    from gateway.ratelimit_host import HostLimits
    from gateway.ratelimit_redis import RedisLimits

log = logging.getLogger(__name__)

RECONNECT_INTERVAL = 1.0  # seconds between PINGs while Redis is unreachable
UNSETTLED_MAX = 10_000  # slots kept to give back in Redis when it returns
SETTLE_AT_CLOSE = 1.0  # seconds closing waits for the settles under way


def rates_for(client: Client, model: str, tokens: int) -> list[Rate]:
    """The per-minute limits a request of ``client`` for ``model`` costing ``tokens`` meets."""
    rates = []
    for scope, limits in _scopes(client, model):
        if limits.rpm is not None:
            rates.append(Rate(f"{scope}:rpm", "requests", limits.rpm, 1))
        if limits.tpm is not None:
            cost = min(max(tokens, 1), limits.tpm)
            rates.append(Rate(f"{scope}:tpm", "tokens", limits.tpm, cost))
    return rates


def caps_for(client: Client, model: str) -> list[Scope]:
    """The in-flight caps a request of ``client`` for ``model`` meets."""
    return [
        Scope(f"{scope}:conc", limits.max_concurrent)
        for scope, limits in _scopes(client, model)
        if limits.max_concurrent is not None
    ]


def _scopes(client: Client, model: str) -> list[tuple[str, RateLimits]]:
    # "{name}": a Redis hash tag, so all of one key's state lives in one cluster slot. State
    # per model exists only for the models the key configures: memory bounded by the config.
    scopes = [(f"{{{client.name}}}", client.limits)]
    if model in client.models:
        scopes.append((f"{{{client.name}}}:{model}", client.models[model]))
    return scopes


@dataclass(frozen=True, slots=True)
class Unsettled:
    """A shared grant's in-flight slots that could not be given back in Redis yet. Its token
    correction is not kept: a call that timed out may have run, and a second run would
    correct the tokens twice, where giving a slot back twice is harmless."""

    lease: str
    scopes: tuple[str, ...]
    at: float  # when the request ended (the clock of the limiter)


@dataclass(slots=True, eq=False)
class Grant:
    """One admitted request's share of its key's limits, given back by ``settle``."""

    headers: dict[str, str] = field(default_factory=dict)  # x-ratelimit-* for the response
    limiter: RateLimiter | None = None
    tokens: tuple[Rate, ...] = ()  # token rates charged at the estimate
    caps: tuple[Scope, ...] = ()  # in-flight slots held
    shared: bool = False  # admitted by Redis (else by this replica alone)
    lease: str = ""  # the Redis lease id of `caps`
    settled: bool = False

    async def settle(self, tokens: int | None) -> None:
        """The request is over: ``tokens`` is what it really cost (its usage), None when
        unknown (then the estimate stands). Raises nothing but cancellation; a second call
        does nothing."""
        if self.limiter is not None and not self.settled:
            self.settled = True
            await self.limiter.settle(self, tokens)


class RateLimiter:
    """Admits requests against their key's limits: in Redis when configured and reachable,
    else on this replica's own: the supervisor's (``HostLimits``) when there are several
    serving processes, this process's ``LocalLimits`` when it is the only one."""

    def __init__(
        self,
        redis: RedisSettings,
        metrics: GatewayMetrics,
        clock: Callable[[], float] = time.monotonic,
        lease_seconds: float = LEASE_SECONDS,
        host: HostLimits | None = None,
    ) -> None:
        """``host``: the supervisor's limits, shared by this host's serving processes; else
        this process keeps its own (``LocalLimits``)."""
        self._on_error = redis.on_error
        self._metrics = metrics
        self._clock = clock
        self._local = LocalLimits(clock)
        self._host = host
        self._redis: RedisLimits | None = None
        if redis.url:
            from gateway.ratelimit_redis import RedisLimits  # only then: see LEASE_SECONDS

            self._redis = RedisLimits(redis, lease_seconds)
        self._up = self._redis is not None
        self._leases: dict[str, tuple[str, ...]] = {}  # our shared leases: id -> scope keys
        self._lease_prefix = os.urandom(6).hex()  # lease ids unique across replicas
        self._lease_count = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False
        # Slots a shared settle could not give back, given back when Redis answers again;
        # bounded: past UNSETTLED_MAX the oldest go (their leases expire on their own).
        self._unsettled: deque[Unsettled] = deque(maxlen=UNSETTLED_MAX)
        self._settling: set[asyncio.Task[None]] = set()  # shared settles under way

    @property
    def shared(self) -> bool:
        """True while limits are kept in Redis."""
        return self._up

    async def start(self) -> None:
        """Renew leases from now on, and find out whether Redis answers (bounded by
        ``redis.timeout``; an unreachable Redis does not hold the start up)."""
        if self._redis is None:
            return
        self._metrics.ratelimit_redis_up.set(1)
        self._spawn(self._renew_forever())
        try:
            await self._redis.ping()
        except RedisUnavailable as exc:
            self._failed(exc)

    async def close(self) -> None:
        self._closed = True
        if self._host is not None:
            await self._host.close()
        if self._settling:  # the last requests' slots, given back if Redis answers in time
            await asyncio.wait(self._settling, timeout=SETTLE_AT_CLOSE)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._redis is not None:
            await self._redis.close()

    async def acquire(self, client: Client, model: str, tokens: int) -> Grant:
        """Admit one request of ``client`` for ``model`` estimated at ``tokens`` tokens, or
        raise ``RateLimited`` (429); ``Overloaded`` (503) when Redis is down and
        ``on_error`` is closed."""
        rates = rates_for(client, model, tokens)
        caps = caps_for(client, model)
        if not rates and not caps:
            return Grant()
        if self._redis is not None:
            if self._up:
                try:
                    return await self._acquire_shared(self._redis, client, rates, caps)
                except RedisUnavailable as exc:
                    self._failed(exc)
            if self._on_error == "closed":
                raise Overloaded("Rate limits cannot be checked right now; retry shortly.")
        if self._host is not None:
            verdict = await self._host.acquire(rates, caps)
        else:
            verdict = self._local.acquire(rates, caps)
        if not verdict.admitted:
            self._refuse(client, rates, verdict)
        return self._grant(rates, caps, verdict, shared=False, lease="")

    async def _acquire_shared(
        self, redis: RedisLimits, client: Client, rates: list[Rate], caps: list[Scope]
    ) -> Grant:
        lease = ""
        if caps:
            self._lease_count += 1
            lease = f"{self._lease_prefix}-{self._lease_count}"
        verdict = await redis.acquire(rates, caps, lease)
        if not verdict.admitted:
            self._refuse(client, rates, verdict)
        # Counted here too, so that if Redis goes away the local caps know what is running.
        self._hold(caps)
        if caps:
            self._leases[lease] = tuple(cap.key for cap in caps)
        return self._grant(rates, caps, verdict, shared=True, lease=lease)

    def _grant(
        self, rates: list[Rate], caps: list[Scope], verdict: Verdict, *, shared: bool, lease: str
    ) -> Grant:
        return Grant(
            headers=headers(rates, verdict.ahead),
            limiter=self,
            tokens=tuple(rate for rate in rates if rate.kind == "tokens"),
            caps=tuple(caps),
            shared=shared,
            lease=lease,
        )

    def _refuse(self, client: Client, rates: list[Rate], verdict: Verdict) -> None:
        self._metrics.rate_limited.labels(client.name, verdict.kind).inc()
        hdrs = headers(rates, verdict.ahead)
        # Rounded to the microsecond first: float noise must not add a whole second or ms.
        wait = round(verdict.retry_after, 6)
        hdrs["retry-after-ms"] = str(math.ceil(wait * 1000))
        raise RateLimited(verdict.kind, wait, hdrs)

    async def settle(self, grant: Grant, tokens: int | None) -> None:
        """Give back ``grant``'s in-flight slots and correct its token charge; never raises
        (the request has been answered). A shared grant's Redis part runs to its end even
        when the caller is cancelled. When Redis cannot be reached, the slots are given back
        once it answers again (``_settle_late``) and the token correction is lost; the lease,
        no longer renewed, expires there within ``lease_seconds`` in any case."""
        corrections = [
            (rate, tokens - rate.cost)
            for rate in grant.tokens
            if tokens is not None and tokens != rate.cost
        ]
        if self._host is not None:
            self._host.release(grant.caps)
        else:
            self._local.release(grant.caps)
        if not grant.shared:
            for rate, delta in corrections:
                if self._host is not None:
                    self._host.adjust(rate, delta)
                else:
                    self._local.adjust(rate, delta)
            return
        scopes = self._leases.pop(grant.lease, ())
        if self._redis is None or self._closed or not (corrections or scopes):
            return
        unsettled = Unsettled(grant.lease, scopes, self._clock())
        if not self._up:
            if scopes:
                self._unsettled.append(unsettled)
            return
        # Shielded: aiohttp cancels the handler when the client closes its connection, which
        # clients do the moment they have the answer, so usually while this call is out. A
        # cancelled settle left the slot taken in Redis, for every replica, until the lease
        # expired.
        task = asyncio.create_task(self._settle_shared(self._redis, corrections, unsettled))
        self._settling.add(task)
        task.add_done_callback(self._settling.discard)
        await asyncio.shield(task)

    async def _settle_shared(
        self, redis: RedisLimits, corrections: list[tuple[Rate, int]], unsettled: Unsettled
    ) -> None:
        try:
            await redis.settle(corrections, unsettled.lease, unsettled.scopes)
        except RedisUnavailable as exc:
            if unsettled.scopes:
                self._unsettled.append(unsettled)
            self._failed(exc)

    async def _settle_late(self, redis: RedisLimits) -> bool:
        """Redis answers again: give back the slots that could not be given back while it was
        away (those of leases older than ``lease_seconds`` have expired there already). False
        when Redis fails again; what is left stays for the next try."""
        now = self._clock()
        while self._unsettled:
            unsettled = self._unsettled.popleft()
            if now - unsettled.at > redis.lease_seconds:
                continue
            try:
                await redis.settle((), unsettled.lease, unsettled.scopes)
            except RedisUnavailable:
                self._unsettled.appendleft(unsettled)
                return False
        return True

    def _hold(self, caps: list[Scope]) -> None:
        if self._host is not None:
            self._host.hold(caps)
        else:
            self._local.hold(caps)

    def _failed(self, exc: RedisUnavailable) -> None:
        self._metrics.ratelimit_redis_errors.inc()
        if not self._up:
            return
        self._up = False
        self._metrics.ratelimit_redis_up.set(0)
        then = (
            "rate limits are local to this replica"
            if self._on_error == "open"
            else "requests of rate-limited keys are refused (503)"
        )
        log.warning("redis unreachable (%s): %s until it is back", exc, then)
        self._spawn(self._reconnect())

    async def _reconnect(self) -> None:
        assert self._redis is not None
        while True:
            await asyncio.sleep(RECONNECT_INTERVAL)
            try:
                await self._redis.ping()
            except RedisUnavailable:
                self._metrics.ratelimit_redis_errors.inc()
                continue
            # Slots first, so that the first requests admitted in Redis again do not meet
            # slots that were given back here long ago.
            if not await self._settle_late(self._redis):
                self._metrics.ratelimit_redis_errors.inc()
                continue
            self._up = True
            self._metrics.ratelimit_redis_up.set(1)
            log.info("redis reachable again: rate limits are shared")
            return

    async def _renew_forever(self) -> None:
        assert self._redis is not None
        while True:
            await asyncio.sleep(self._redis.lease_seconds / 3)
            if not self._up or not self._leases:
                continue
            try:
                await self._redis.renew(dict(self._leases))
            except RedisUnavailable as exc:
                self._failed(exc)

    def _spawn(self, work: Coroutine[None, None, None]) -> None:
        if self._closed:
            work.close()
            return
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


__all__ = ["Grant", "RateLimiter"]
