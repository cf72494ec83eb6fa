"""Per-key rate limits: requests per minute, tokens per minute, requests in flight.

STUB: the interface the proxy uses; the limiting itself is being written.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from gateway.auth import Client
from gateway.metrics import GatewayMetrics
from gateway.settings import RedisSettings


@dataclass(slots=True)
class Grant:
    """One admitted request's share of its key's limits."""

    headers: dict[str, str] = field(default_factory=dict)  # x-ratelimit-* for the response

    async def settle(self, tokens: int | None) -> None:
        """The request is over: ``tokens`` is what it really cost (usage), None if unknown."""


class RateLimiter:
    def __init__(self, redis: RedisSettings, metrics: GatewayMetrics) -> None:
        self._redis = redis
        self._metrics = metrics

    async def start(self) -> None:
        """Connect to Redis when configured (never fails: Redis down means local limits)."""

    async def close(self) -> None:
        """Close the Redis connection."""

    async def acquire(self, client: Client, model: str, tokens: int) -> Grant:
        """Admit one request of ``client`` for ``model`` estimated at ``tokens`` tokens, or
        raise ``RateLimited`` (429 with Retry-After and x-ratelimit-* headers)."""
        return Grant()
