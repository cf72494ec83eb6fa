"""The supervisor's shared state: per-key rate limits kept once for all serving processes of
one host, so that ``rpm``, ``tpm`` and ``max_concurrent`` hold for the gateway as a whole.

The arithmetic is ``ratelimit_local.LocalLimits``, run here, in the one process that every
serving process asks (``ratelimit_host`` is the asking end). It stays exact because the
supervisor's loop handles one message at a time. Each serving process has a ``Holdings``:
what it holds in flight is given back when it dies or is replaced, so a crash never leaks
a key's in-flight slot.

Operations, as messages on a ``channel.Channel``:

- call ``["limit", rates, scopes]`` -> ``[admitted, ahead, kind, retry_after]``
- note ``["hold", scopes]``, ``["release", keys]``, ``["adjust", rate, delta]``

where a rate is ``[key, kind, limit, cost]`` and a scope ``[key, limit]``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from gateway.channel import Message
from gateway.ratelimit_local import LocalLimits, Rate, Scope


def rate_of(fields: list[Any]) -> Rate:
    key, kind, limit, cost = fields
    return Rate(str(key), str(kind), int(limit), int(cost))


def scope_of(fields: list[Any]) -> Scope:
    key, limit = fields
    return Scope(str(key), int(limit))


class Keeper:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.limits = LocalLimits(clock)

    def holdings(self) -> Holdings:
        """The state one serving process holds, for its channel's messages."""
        return Holdings(self.limits)


class Holdings:
    """One serving process's in-flight slots; ``handle`` takes its channel's messages."""

    def __init__(self, limits: LocalLimits) -> None:
        self._limits = limits
        self._held: dict[str, int] = {}

    def handle(self, message: Message) -> Message | None:
        op = message[0]
        if op == "limit":
            rates = [rate_of(r) for r in message[1]]
            scopes = [scope_of(s) for s in message[2]]
            verdict = self._limits.acquire(rates, scopes)
            if verdict.admitted:
                self._count(scopes)
            return [verdict.admitted, list(verdict.ahead), verdict.kind, verdict.retry_after]
        if op == "hold":
            scopes = [scope_of(s) for s in message[1]]
            self._limits.hold(scopes)
            self._count(scopes)
        elif op == "release":
            self._release([str(key) for key in message[1]])
        elif op == "adjust":
            self._limits.adjust(rate_of(message[1]), int(message[2]))
        return None

    def release_all(self) -> None:
        """The process is gone: whatever it held in flight is free again."""
        self._release([key for key, count in self._held.items() for _ in range(count)])

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
