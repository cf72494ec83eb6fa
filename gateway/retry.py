"""Retry policy pieces: backoff with full jitter, reading a worker's ``Retry-After``, and the
retry budget that keeps an outage from being multiplied by retries.

All pure and synchronous; clocks and randomness are passed in so tests drive them.

The budget follows Finagle's and Linkerd's: over a sliding window, retries may be at most
``ratio`` of the requests seen plus a small floor (so a quiet gateway can still retry). When
every worker fails, a gateway that retries each request N times sends N times the load to a
fleet that is already down; with the budget, the extra load is at most ``ratio``.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from email.utils import parsedate_to_datetime


def backoff(attempt: int, base: float, cap: float, rng: random.Random) -> float:
    """Seconds to wait before retry number ``attempt`` (1 for the first retry): full jitter,
    uniform in [0, min(cap, base * 2**(attempt-1))] (AWS Architecture Blog, "Exponential
    Backoff And Jitter")."""
    if attempt < 1 or base <= 0 or cap <= 0:
        return 0.0
    return rng.uniform(0.0, min(cap, base * 2 ** min(attempt - 1, 30)))


def parse_retry_after(value: str | None, now_epoch: float) -> float | None:
    """Seconds from now that a ``Retry-After`` header asks for (delta-seconds or an HTTP date);
    None when absent or unreadable. Never negative."""
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            return None
        return max(when.timestamp() - now_epoch, 0.0)
    if not math.isfinite(seconds):
        return None
    return max(seconds, 0.0)


class RetryBudget:
    """Retries allowed at most ``ratio`` of requests over ``window`` seconds, plus ``floor``.

    Counts live in one-second buckets, so the memory is fixed and the window slides.
    """

    def __init__(self, ratio: float, floor: int, window: float, clock: Callable[[], float]) -> None:
        self._ratio = ratio
        self._floor = floor
        self._size = max(math.ceil(window), 1)
        self._clock = clock
        self._requests = [0] * self._size
        self._retries = [0] * self._size
        self._stamp = [-1] * self._size

    def record_request(self) -> None:
        self._requests[self._bucket()] += 1

    def try_spend(self) -> bool:
        """Take one retry from the budget; False (and nothing taken) when it is spent."""
        index = self._bucket()
        requests = sum(self._requests)
        retries = sum(self._retries)
        if retries >= self._floor + self._ratio * requests:
            return False
        self._retries[index] += 1
        return True

    def _bucket(self) -> int:
        second = int(self._clock())
        index = second % self._size
        if self._stamp[index] != second:
            self._stamp[index] = second
            self._requests[index] = 0
            self._retries[index] = 0
            # Buckets not touched for a whole window still hold old counts: clear them (once
            # a second: within it, none can go stale).
            for i in range(self._size):
                if self._stamp[i] != -1 and second - self._stamp[i] >= self._size:
                    self._stamp[i], self._requests[i], self._retries[i] = -1, 0, 0
        return index
