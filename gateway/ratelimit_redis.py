"""Rate limits shared by every gateway replica, kept in Redis by atomic Lua scripts.

The scripts run the GCRA of ``ratelimit`` on Redis's own clock (``TIME``), so replicas with
skewed clocks agree: all of a request's limits are checked and, only if every one admits it,
charged, in one step. Requests in flight are leases in a sorted set per scope, scored by
their expiry, so a replica that dies mid-request cannot hold its leases for ever.

Every call is bounded by ``redis.timeout``; any failure is ``RedisUnavailable``, and after one
the next calls fail at once for ``RETRY_AFTER`` seconds instead of each waiting out the timeout.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any

import redis.asyncio as aioredis
from redis.exceptions import NoScriptError, RedisError

from gateway.settings import RedisSettings

if TYPE_CHECKING:
    from gateway.ratelimit import Rate, Verdict

RETRY_AFTER = 1.0
PREFIX = "vllm-gateway:"

# KEYS: one per rate. ARGV: period, then interval and cost per rate.
# Returns {admitted (1/0), wait, then per rate: seconds of allowance spent ahead}.
_RATES = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local period = tonumber(ARGV[1])
local wait, refused, tats, out = 0, 0, {}, {}
for i = 1, #KEYS do
  local interval, cost = tonumber(ARGV[2 * i]), tonumber(ARGV[2 * i + 1])
  local tat = tonumber(redis.call('GET', KEYS[i]) or now)
  if tat < now then tat = now end
  local new = tat + cost * interval
  if new - period - now > wait then wait, refused = new - period - now, i end
  tats[i] = new
  out[i] = tostring(tat - now)
end
if wait > 0 then return {0, tostring(wait), refused, unpack(out)} end
for i = 1, #KEYS do
  redis.call('SET', KEYS[i], tostring(tats[i]), 'PX', math.ceil(period * 1000) + 1000)
  out[i] = tostring(tats[i] - now)
end
return {1, '0', 0, unpack(out)}
"""

# KEYS: one per rate to correct. ARGV: interval and token delta per key.
_ADJUST = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
for i = 1, #KEYS do
  local interval, delta = tonumber(ARGV[2 * i - 1]), tonumber(ARGV[2 * i])
  local tat = tonumber(redis.call('GET', KEYS[i]) or now)
  if tat < now then tat = now end
  tat = tat + delta * interval
  if tat < now then tat = now end
  redis.call('SET', KEYS[i], tostring(tat), 'PX', 61000)
end
return 1
"""

# KEYS: one sorted set per scope. ARGV: lease id, lease seconds, then the limit per scope.
# Returns the index of the full scope, or 0 when every lease was taken.
_LEASE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
for i = 1, #KEYS do
  redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', now)
  if redis.call('ZCARD', KEYS[i]) >= tonumber(ARGV[2 + i]) then return i end
end
for i = 1, #KEYS do
  redis.call('ZADD', KEYS[i], now + tonumber(ARGV[2]), ARGV[1])
  redis.call('EXPIRE', KEYS[i], math.ceil(tonumber(ARGV[2])) + 1)
end
return 0
"""


class RedisUnavailable(Exception):
    """Redis could not be asked (down, slow, or an error)."""


class RedisLimits:
    def __init__(self, settings: RedisSettings, lease_seconds: float) -> None:
        assert settings.url is not None
        self._timeout = settings.timeout
        self._lease_seconds = lease_seconds
        self._client: aioredis.Redis = aioredis.from_url(
            settings.url,
            socket_timeout=settings.timeout,
            socket_connect_timeout=settings.timeout,
            retry_on_timeout=False,
        )
        self._shas: dict[str, str] = {}
        self._quiet_until = 0.0

    async def close(self) -> None:
        await self._client.aclose()

    async def acquire(
        self, rates: list[Rate], scopes: list[tuple[str, int]], lease: str
    ) -> tuple[Verdict, list[str]]:
        """Check and charge every rate, then take a lease in every scope; all or nothing."""
        from gateway.ratelimit import Verdict, _ahead

        leased: list[str] = []
        if scopes:
            full = await self._run(
                _LEASE,
                [PREFIX + s for s, _ in scopes],
                [lease, self._lease_seconds, *(limit for _, limit in scopes)],
            )
            if int(full):
                return Verdict(False, 1.0, "concurrency", {}), []
            leased = [s for s, _ in scopes]
        if not rates:
            return Verdict(True, 0.0, "", {}), leased
        args: list[Any] = [60.0]
        for rate in rates:
            args += [rate.interval, min(rate.cost, rate.limit)]
        reply = await self._run(_RATES, [PREFIX + r.key for r in rates], args)
        admitted, wait, refused = int(reply[0]), float(reply[1]), int(reply[2])
        spent = [float(x) for x in reply[3:]]
        ahead = _ahead(rates, spent, 0.0)
        if not admitted:
            if leased:
                await self.settle([], [(s, lease) for s in leased])
            return Verdict(False, wait, rates[refused - 1].kind, ahead), []
        return Verdict(True, 0.0, "", ahead), leased

    async def settle(
        self, corrections: list[tuple[Rate, int]], leases: list[tuple[str, str]]
    ) -> None:
        if corrections:
            args: list[Any] = []
            for rate, delta in corrections:
                args += [rate.interval, delta]
            await self._run(_ADJUST, [PREFIX + rate.key for rate, _ in corrections], args)
        for scope, lease in leases:
            await self._call(self._client.zrem(PREFIX + scope, lease))

    async def _run(self, script: str, keys: list[str], args: list[Any]) -> Any:
        sha = self._shas.get(script)
        if sha is not None:
            try:
                return await self._call(self._client.evalsha(sha, len(keys), *keys, *args))
            except NoScriptError:
                pass  # Redis restarted and forgot it
        self._shas[script] = await self._call(self._client.script_load(script))
        return await self._call(self._client.evalsha(self._shas[script], len(keys), *keys, *args))

    async def _call(self, command: Any) -> Any:
        if time.monotonic() < self._quiet_until:
            command.close()
            raise RedisUnavailable("not retried yet after the last failure")
        try:
            async with asyncio.timeout(self._timeout):
                return await command
        except NoScriptError:
            raise
        except (RedisError, OSError, TimeoutError) as exc:
            self._quiet_until = time.monotonic() + RETRY_AFTER
            raise RedisUnavailable(str(exc) or type(exc).__name__) from exc
