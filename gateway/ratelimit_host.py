"""Per-key limits of one host, as a serving process asks for them: ``LocalLimits``'
operations sent to the supervisor's ``keeper`` over this process's channel.

Used when ``server.processes`` is above 1, so that all serving processes share one
allowance per key. Only the admission waits for an answer (one round trip on a Unix socket);
holds, releases and token corrections are notes, sent without waiting.
"""

from __future__ import annotations

from collections.abc import Sequence

from gateway.channel import Channel, ChannelClosed
from gateway.errors import Overloaded
from gateway.ratelimit_local import Rate, Scope, Verdict

# The supervisor answers from memory, in well under a millisecond; this bound only matters
# when it is gone or stuck, and then the request is refused rather than left waiting.
CALL_TIMEOUT = 1.0


class HostLimits:
    def __init__(self, channel: Channel, timeout: float = CALL_TIMEOUT) -> None:
        self._channel = channel
        self._timeout = timeout

    async def acquire(self, rates: Sequence[Rate], scopes: Sequence[Scope]) -> Verdict:
        """As ``LocalLimits.acquire``, for the whole host; ``Overloaded`` (503) when the
        supervisor cannot be asked."""
        try:
            admitted, ahead, kind, retry_after = await self._channel.call(
                self._timeout, "limit", [_rate(r) for r in rates], [_scope(s) for s in scopes]
            )
        except ChannelClosed:
            raise Overloaded("Rate limits cannot be checked right now; retry shortly.") from None
        return Verdict(bool(admitted), tuple(ahead), str(kind), float(retry_after))

    def hold(self, scopes: Sequence[Scope]) -> None:
        if scopes:
            self._channel.note("hold", [_scope(s) for s in scopes])

    def release(self, scopes: Sequence[Scope]) -> None:
        if scopes:
            self._channel.note("release", [s.key for s in scopes])

    def adjust(self, rate: Rate, delta: int) -> None:
        self._channel.note("adjust", _rate(rate), delta)


def _rate(rate: Rate) -> list[object]:
    return [rate.key, rate.kind, rate.limit, rate.cost]


def _scope(scope: Scope) -> list[object]:
    return [scope.key, scope.limit]
