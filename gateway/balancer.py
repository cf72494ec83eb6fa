"""Worker selection policies: pure and synchronous, no I/O, no clocks.

A policy gets the workers that may take the request (healthy, serving the model, not yet tried
by this request) and returns one, or None when the list is empty.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, TypeVar


class Pickable(Protocol):
    in_flight: int
    last_pick: int  # the balancer's sequence number when it last chose this worker; 0: never


W = TypeVar("W", bound=Pickable)


class LeastInFlight:
    """Fewest requests in flight; among equals, the one chosen longest ago.

    The tie-break lives on the workers, not in one counter, so it is fair per pool even when
    picks for several models interleave.
    """

    def __init__(self) -> None:
        self._seq = 0

    def pick(self, candidates: Sequence[W]) -> W | None:
        if not candidates:
            return None
        chosen = min(candidates, key=_load_then_age)
        self._seq += 1
        chosen.last_pick = self._seq
        return chosen


def _load_then_age(worker: Pickable) -> tuple[int, int]:
    return worker.in_flight, worker.last_pick
