"""Worker records and the fleet: membership, pools by model, in-flight counts, health.

Health has three inputs, each with its own field:
- ``healthy``: the last active probe (``GET /health``). A failed probe takes the worker out at
  once; a passing one brings it back (the engine answers again).
- ``ejected_until``: passive outlier ejection. ``failures_to_eject`` consecutive failed requests
  (connect errors, 5xx, timeouts, broken streams; never a 4xx, never a busy 429/503) eject the
  worker for ``ejection_time``, doubled for each repeat up to ``max_ejection_time``. When that
  time has passed the worker is half-open: exactly one request may try it. Success re-admits
  it; failure ejects it again, for longer. A probe does not end an ejection: a worker whose
  ``/health`` passes while its requests fail is the very case ejection is for.
  The last worker in rotation for a model is never ejected: a slow answer beats none.
- ``not_before``: a worker that answered 429/503 with ``Retry-After`` gets no request before then.

Workers come from settings (static) or from discovery (DNS), which adds and removes them while
requests run: a removed worker leaves the pools at once, and requests already on it finish
(they hold the record, not the pool).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from gateway.loadsignals import LoadSignals
from gateway.settings import HealthSettings, WorkerSettings

log = logging.getLogger(__name__)

ModelCard = dict[str, Any]


@dataclass(eq=False)
class Worker:
    url: str
    configured_models: tuple[str, ...] = ()
    cap: int = 256  # requests in flight at most
    source: str = ""  # "" for a configured worker, else the discovery service's URL
    discovered: tuple[ModelCard, ...] = ()
    in_flight: int = 0
    finished: int = 0  # requests this gateway process has ended with it, ever (see monitor.py)
    last_pick: int = 0
    load: LoadSignals | None = None  # the last scrape of its /metrics; None: unknown or stale
    healthy: bool = True  # the last active probe's verdict
    consecutive_failures: int = 0
    ejected_until: float | None = None
    ejections: int = 0  # in a row: sets the next ejection's length
    recovered_at: float = 0.0
    trial: bool = False  # a half-open trial request is in flight
    not_before: float = 0.0  # Retry-After: no request before this time
    # Answers being read from it now: cut when it stops listening (see Fleet.apply_probe).
    reading: set[Closable] = field(default_factory=set, repr=False)
    api_key: str | None = field(default=None, repr=False)  # sent to the worker, never logged

    @property
    def models(self) -> tuple[str, ...]:
        if self.configured_models:
            return self.configured_models
        return tuple(str(card.get("id")) for card in self.discovered)

    @property
    def in_rotation(self) -> bool:
        """Up and not ejected: what the health gauge, /v1/models and /ready report."""
        return self.healthy and self.ejected_until is None

    def available(self, now: float) -> bool:
        """May take a new request now (the per-worker cap is checked by the caller)."""
        if not self.healthy or now < self.not_before:
            return False
        if self.ejected_until is None:
            return True
        return now >= self.ejected_until and not self.trial  # half-open: one trial at a time

    def model_cards(self) -> Iterable[ModelCard]:
        by_id = {str(card.get("id")): card for card in self.discovered}
        for name in self.models:
            yield by_id.get(name) or {"id": name, "object": "model", "owned_by": "vllm"}


@dataclass(frozen=True, slots=True)
class ProbeResult:
    healthy: bool
    models: tuple[ModelCard, ...] | None = None  # None: not asked or not answered
    refused: bool = False  # nothing listens at its address: the server has stopped or is stopping


class Closable(Protocol):
    def close(self) -> None: ...


def worker_from_settings(settings: WorkerSettings, default_cap: int) -> Worker:
    cap = settings.max_in_flight or default_cap
    key = settings.api_key.get_secret_value() if settings.api_key is not None else None
    return Worker(settings.base_url, settings.models, cap=cap, api_key=key)


class Fleet:
    def __init__(
        self,
        workers: Iterable[Worker],
        health: HealthSettings,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.workers = list(workers)
        self._health = health
        self.clock = clock
        self._pools: dict[str, list[Worker]] = {}
        self.on_health_change: Callable[[Worker], None] = lambda worker: None
        self.on_eject: Callable[[Worker], None] = lambda worker: None  # passive ejection only
        self.on_added: Callable[[Worker], None] = lambda worker: None
        self.on_removed: Callable[[Worker], None] = lambda worker: None
        self._rebuild_pools()

    # --- routing views ---------------------------------------------------------------------

    def serves(self, model: str) -> bool:
        return model in self._pools

    def candidates(self, model: str, exclude: Sequence[Worker] = ()) -> list[Worker]:
        now = self.clock()
        return [w for w in self._pools.get(model, ()) if w.available(now) and w not in exclude]

    def pool(self, model: str) -> Sequence[Worker]:
        return self._pools.get(model, ())

    def any_healthy(self) -> bool:
        return any(w.in_rotation and w.models for w in self.workers)

    def model_cards(self) -> list[ModelCard]:
        seen: dict[str, ModelCard] = {}
        for worker in self.workers:
            if worker.in_rotation:
                for card in worker.model_cards():
                    seen.setdefault(str(card["id"]), card)
        return list(seen.values())

    # --- passive health --------------------------------------------------------------------

    def begin_attempt(self, worker: Worker) -> None:
        """A request goes to ``worker``; if it is half-open, this request is its one trial."""
        if worker.ejected_until is not None:
            worker.trial = True

    def end_attempt(self, worker: Worker) -> None:
        worker.trial = False

    def record_success(self, worker: Worker) -> None:
        worker.consecutive_failures = 0
        if worker.trial and worker.ejected_until is not None:
            worker.ejected_until = None
            worker.recovered_at = self.clock()
            log.warning("worker %s passed its half-open trial and is back", worker.url)
            self.on_health_change(worker)

    def record_failure(self, worker: Worker) -> None:
        worker.consecutive_failures += 1
        if worker.ejected_until is not None:
            if worker.trial:
                self._eject(worker)  # the half-open trial failed: out again, for longer
            return
        if worker.consecutive_failures >= self._health.failures_to_eject:
            if self._is_last_in_rotation(worker):
                log.warning("worker %s is failing but is the last for a model: kept", worker.url)
                return
            self._eject(worker)

    def retry_later(self, worker: Worker, seconds: float) -> None:
        worker.not_before = max(worker.not_before, self.clock() + seconds)

    def _eject(self, worker: Worker) -> None:
        now = self.clock()
        in_rotation_since = worker.recovered_at if worker.ejected_until is None else now
        if now - in_rotation_since >= self._health.max_ejection_time:
            worker.ejections = 0  # healthy for long enough: earlier ejections are forgiven
        worker.ejections += 1
        length = self._health.ejection_time * 2 ** min(worker.ejections - 1, 30)
        length = min(length, self._health.max_ejection_time)
        worker.ejected_until = now + length
        worker.trial = False
        log.warning("worker %s ejected for %.1fs", worker.url, length)
        self.on_eject(worker)
        self.on_health_change(worker)

    def _is_last_in_rotation(self, worker: Worker) -> bool:
        for model in worker.models:
            if not any(w.in_rotation for w in self._pools.get(model, ()) if w is not worker):
                return True
        return False

    # --- active probes and membership -------------------------------------------------------

    def apply_probe(self, worker: Worker, result: ProbeResult) -> None:
        if result.models is not None and result.models != worker.discovered:
            worker.discovered = result.models
            self._rebuild_pools()
        if worker.healthy != result.healthy:
            worker.healthy = result.healthy
            log.warning("worker %s is now %s", worker.url, "up" if result.healthy else "down")
        if result.refused and worker.reading:
            # A vLLM told to stop closes its listener first, then aborts what it runs or
            # falls silent. Either way its answers will not finish: cut them now, so they fail
            # over or resume at once instead of at the idle timeout.
            log.warning(
                "worker %s stopped listening: cutting %d answers", worker.url, len(worker.reading)
            )
            for answer in list(worker.reading):
                answer.close()
        self.on_health_change(worker)

    def add(self, worker: Worker) -> None:
        self.workers.append(worker)
        self._rebuild_pools()
        log.info("worker %s added", worker.url)
        self.on_added(worker)

    def remove(self, worker: Worker) -> None:
        self.workers.remove(worker)
        self._rebuild_pools()
        log.info("worker %s removed", worker.url)
        self.on_removed(worker)

    def _rebuild_pools(self) -> None:
        pools: dict[str, list[Worker]] = {}
        for worker in self.workers:
            for model in worker.models:
                pools.setdefault(model, []).append(worker)
        self._pools = pools
