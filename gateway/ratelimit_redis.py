"""Rate limits shared by every gateway replica, kept in Redis by atomic Lua scripts.

The scripts run the GCRA of ``ratelimit_local`` on Redis's own clock (``TIME``), so replicas
with skewed clocks agree. One script checks all of a request's limits and, only if every one
admits it, charges them: one round trip, all or nothing. Requests in flight are leases in a
sorted set per scope, scored by their expiry: ``LEASE_SECONDS`` after they were taken or last
renewed. The limiter renews the leases of its requests while they run, so a replica that dies
mid-request frees its share within ``LEASE_SECONDS``.

This module is the one boundary that knows redis-py: every call is bounded by
``redis.timeout`` (connection, pool wait and reply), and every failure (down, slow, an error
reply) becomes ``RedisUnavailable``. Scripts go by ``EVALSHA``, falling back to ``EVAL`` on
``NOSCRIPT`` (a restarted Redis has forgotten them; ``EVAL`` teaches them again).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections.abc import AsyncIterator, Awaitable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import NoScriptError, RedisError

from gateway.ratelimit_local import (
    LEASE_SECONDS,
    PERIOD,
    SLACK,
    Rate,
    RedisUnavailable,
    Scope,
    Verdict,
    refusal,
)
from gateway.settings import RedisSettings

PREFIX = "vllm-gateway:"
MAX_CONNECTIONS = 32  # Redis calls in flight at once; more wait for a connection (bounded)
CLOSE_TIMEOUT = 2.0


@dataclass(frozen=True, slots=True)
class Script:
    text: str
    sha: str = field(init=False)

    def __post_init__(self) -> None:
        digest = hashlib.sha1(self.text.encode(), usedforsecurity=False).hexdigest()
        object.__setattr__(self, "sha", digest)


# KEYS: the rates' keys, then the in-flight scopes' keys.
# ARGV: period, slack, number of rates, lease id, lease seconds,
#       then interval and cost per rate, then the limit per scope.
# Returns {admitted (1/0), the refusing rate's index (0: none), 1 if an in-flight cap is full,
#          the refusing rate's wait in seconds, then per rate the seconds of allowance spent
#          ahead (after the charge when admitted)}.
# Floats travel as strings: Redis truncates Lua numbers to integers.
ACQUIRE = Script("""
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local period, slack, n = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local lease, ttl = ARGV[4], tonumber(ARGV[5])
local wait, refused, full, charged, ahead = 0, 0, 0, {}, {}
for i = 1, n do
  local interval, cost = tonumber(ARGV[4 + 2 * i]), tonumber(ARGV[5 + 2 * i])
  local tat = tonumber(redis.call('GET', KEYS[i]) or now)
  if tat < now then tat = now end
  charged[i] = tat + cost * interval
  ahead[i] = string.format('%.6f', tat - now)
  if charged[i] - period - now > math.max(wait, slack) then
    wait, refused = charged[i] - period - now, i
  end
end
for j = n + 1, #KEYS do
  redis.call('ZREMRANGEBYSCORE', KEYS[j], '-inf', now)
  if redis.call('ZCARD', KEYS[j]) >= tonumber(ARGV[5 + n + j]) then full = 1 end
end
if refused ~= 0 or full ~= 0 then
  return {0, refused, full, string.format('%.6f', wait), unpack(ahead)}
end
for i = 1, n do
  local spent = charged[i] - now
  redis.call('SET', KEYS[i], string.format('%.6f', charged[i]),
             'PX', math.ceil(spent * 1000) + 1000)
  ahead[i] = string.format('%.6f', spent)
end
for j = n + 1, #KEYS do
  redis.call('ZADD', KEYS[j], now + ttl, lease)
  redis.call('EXPIRE', KEYS[j], math.ceil(ttl) + 1)
end
return {1, 0, 0, '0', unpack(ahead)}
""")

# KEYS: token rates to correct, then the in-flight scopes to leave.
# ARGV: number of rates, lease id, then interval and token delta per rate.
SETTLE = Script("""
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local n, lease = tonumber(ARGV[1]), ARGV[2]
for i = 1, n do
  local interval, delta = tonumber(ARGV[1 + 2 * i]), tonumber(ARGV[2 + 2 * i])
  local tat = tonumber(redis.call('GET', KEYS[i]) or now)
  if tat < now then tat = now end
  tat = tat + delta * interval
  if tat > now then
    local px = math.ceil((tat - now) * 1000) + 1000
    redis.call('SET', KEYS[i], string.format('%.6f', tat), 'PX', px)
  else
    redis.call('DEL', KEYS[i])
  end
end
for j = n + 1, #KEYS do redis.call('ZREM', KEYS[j], lease) end
return 1
""")

# KEYS: in-flight scopes. ARGV: lease seconds, then the lease id per key.
# XX: a lease already left (or expired and swept) is not brought back.
RENEW = Script("""
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local ttl = tonumber(ARGV[1])
for i = 1, #KEYS do
  redis.call('ZADD', KEYS[i], 'XX', now + ttl, ARGV[1 + i])
  redis.call('EXPIRE', KEYS[i], math.ceil(ttl) + 1)
end
return 1
""")


class RedisLimits:
    def __init__(self, settings: RedisSettings, lease_seconds: float = LEASE_SECONDS) -> None:
        assert settings.url is not None
        self._timeout = settings.timeout
        self.lease_seconds = lease_seconds
        pool = aioredis.BlockingConnectionPool.from_url(
            settings.url,
            max_connections=MAX_CONNECTIONS,
            timeout=settings.timeout,
            socket_timeout=settings.timeout,
            socket_connect_timeout=settings.timeout,
            retry=Retry(NoBackoff(), 0),  # we fall back at once; redis-py would sleep and retry
        )
        self._client = aioredis.Redis.from_pool(pool)

    async def close(self) -> None:
        with contextlib.suppress(RedisError, OSError, TimeoutError):
            async with asyncio.timeout(CLOSE_TIMEOUT):
                await self._client.aclose()

    async def ping(self) -> None:
        async with self._bounded():
            await cast(Awaitable[bool], self._client.ping())

    async def acquire(self, rates: Sequence[Rate], scopes: Sequence[Scope], lease: str) -> Verdict:
        """Check every rate and in-flight cap; if all admit, charge the rates and take a lease
        named ``lease`` in every scope."""
        args: list[str | float | int] = [PERIOD, SLACK, len(rates), lease, self.lease_seconds]
        for rate in rates:
            args += [rate.interval, rate.cost]
        args += [scope.limit for scope in scopes]
        keys = [PREFIX + r.key for r in rates] + [PREFIX + s.key for s in scopes]
        reply = await self._eval(ACQUIRE, keys, args)
        ahead = tuple(float(x) for x in reply[4:])
        if int(reply[0]):
            return Verdict(True, ahead)
        refused, full, wait = int(reply[1]), bool(int(reply[2])), float(reply[3])
        waits = [wait if i == refused - 1 else 0.0 for i in range(len(rates))]
        kind, wait = refusal(rates, waits, full)
        return Verdict(False, ahead, kind, wait)

    async def settle(
        self, corrections: Sequence[tuple[Rate, int]], lease: str, scopes: Sequence[str]
    ) -> None:
        """Correct token rates by ``(rate, delta)`` and give the lease back in ``scopes``."""
        args: list[str | float | int] = [len(corrections), lease]
        for rate, delta in corrections:
            args += [rate.interval, delta]
        keys = [PREFIX + rate.key for rate, _ in corrections] + [PREFIX + s for s in scopes]
        await self._eval(SETTLE, keys, args)

    async def renew(self, leases: Mapping[str, Sequence[str]]) -> None:
        """Push back the expiry of every lease id in ``leases`` (id -> its scopes)."""
        keys = [PREFIX + scope for scopes in leases.values() for scope in scopes]
        ids = [lease for lease, scopes in leases.items() for _ in scopes]
        if keys:
            await self._eval(RENEW, keys, [self.lease_seconds, *ids])

    async def _eval(self, script: Script, keys: list[str], args: Sequence[Any]) -> Any:
        async with self._bounded():
            try:
                # redis-py types its commands for both of its clients: Awaitable | value.
                return await cast(
                    Awaitable[Any], self._client.evalsha(script.sha, len(keys), *keys, *args)
                )
            except NoScriptError:
                return await cast(
                    Awaitable[Any], self._client.eval(script.text, len(keys), *keys, *args)
                )

    @contextlib.asynccontextmanager
    async def _bounded(self) -> AsyncIterator[None]:
        try:
            async with asyncio.timeout(self._timeout):
                yield
        except (RedisError, OSError, TimeoutError) as exc:
            raise RedisUnavailable(str(exc) or type(exc).__name__) from exc
