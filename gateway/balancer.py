"""Worker selection policies: pure and synchronous, no I/O, no clocks.

A policy gets the workers that may take the request (healthy, serving the model, not yet tried
by this request) and returns one, or None when the list is empty.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Protocol, TypeVar


class Loaded(Protocol):
    @property
    def in_flight(self) -> int: ...


W = TypeVar("W", bound=Loaded)


class LeastInFlight:
    """Fewest requests in flight; ties rotate so equal workers share the load evenly."""

    def __init__(self) -> None:
        self._turn = itertools.count()

    def pick(self, candidates: Sequence[W]) -> W | None:
        if not candidates:
            return None
        least = min(worker.in_flight for worker in candidates)
        tied = [worker for worker in candidates if worker.in_flight == least]
        return tied[next(self._turn) % len(tied)]
