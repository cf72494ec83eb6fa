"""Worker records and the fleet: in-flight counts, health, and the models each worker serves.

Health has two inputs: active probes (``GET /health`` and, for workers without configured
models, ``GET /v1/models``) run concurrently on an interval, and passive failures reported by
the proxy (connect errors, 5xx, first-token timeouts). ``failures_to_eject`` consecutive
failures take a worker out; one successful probe brings it back.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from gateway.settings import WorkerSettings

log = logging.getLogger(__name__)

ModelCard = dict[str, Any]


@dataclass(eq=False)
class Worker:
    url: str
    configured_models: tuple[str, ...] = ()
    discovered: tuple[ModelCard, ...] = ()
    in_flight: int = 0
    last_pick: int = 0
    healthy: bool = True
    consecutive_failures: int = 0

    @property
    def models(self) -> tuple[str, ...]:
        if self.configured_models:
            return self.configured_models
        return tuple(str(card.get("id")) for card in self.discovered)

    def model_cards(self) -> Iterable[ModelCard]:
        by_id = {str(card.get("id")): card for card in self.discovered}
        for name in self.models:
            yield by_id.get(name) or {"id": name, "object": "model", "owned_by": "vllm"}


@dataclass(frozen=True, slots=True)
class ProbeResult:
    healthy: bool
    models: tuple[ModelCard, ...] | None = None  # None: not asked or not answered


class Fleet:
    def __init__(self, workers: Sequence[WorkerSettings], failures_to_eject: int) -> None:
        self.workers = [Worker(w.base_url, w.models) for w in workers]
        self._failures_to_eject = failures_to_eject
        self._pools: dict[str, list[Worker]] = {}
        self.on_health_change: Callable[[Worker], None] = lambda worker: None
        self.on_eject: Callable[[Worker], None] = lambda worker: None  # passive ejection only
        self._rebuild_pools()

    def serves(self, model: str) -> bool:
        return model in self._pools

    def candidates(self, model: str, exclude: Sequence[Worker] = ()) -> list[Worker]:
        return [w for w in self._pools.get(model, ()) if w.healthy and w not in exclude]

    def any_healthy(self) -> bool:
        return any(w.healthy and w.models for w in self.workers)

    def model_cards(self) -> list[ModelCard]:
        seen: dict[str, ModelCard] = {}
        for worker in self.workers:
            if worker.healthy:
                for card in worker.model_cards():
                    seen.setdefault(str(card["id"]), card)
        return list(seen.values())

    def record_success(self, worker: Worker) -> None:
        worker.consecutive_failures = 0

    def record_failure(self, worker: Worker) -> None:
        worker.consecutive_failures += 1
        if worker.healthy and worker.consecutive_failures >= self._failures_to_eject:
            self._set_health(worker, False)
            self.on_eject(worker)

    def apply_probe(self, worker: Worker, result: ProbeResult) -> None:
        if result.models is not None and result.models != worker.discovered:
            worker.discovered = result.models
            self._rebuild_pools()
        if result.healthy:
            worker.consecutive_failures = 0
        self._set_health(worker, result.healthy)

    def _set_health(self, worker: Worker, healthy: bool) -> None:
        if worker.healthy != healthy:
            worker.healthy = healthy
            log.warning("worker %s is now %s", worker.url, "healthy" if healthy else "unhealthy")
        self.on_health_change(worker)

    def _rebuild_pools(self) -> None:
        pools: dict[str, list[Worker]] = {}
        for worker in self.workers:
            for model in worker.models:
                pools.setdefault(model, []).append(worker)
        self._pools = pools


Prober = Callable[[Worker], Awaitable[ProbeResult]]


async def probe_all(fleet: Fleet, probe: Prober) -> None:
    """Probe every worker at once; each result applies as soon as it is in, so one slow or
    failing worker never delays the others."""

    async def probe_one(worker: Worker) -> None:
        try:
            result = await probe(worker)
        except Exception:
            log.exception("probe of %s failed unexpectedly", worker.url)
            result = ProbeResult(healthy=False)
        fleet.apply_probe(worker, result)

    await asyncio.gather(*(probe_one(w) for w in fleet.workers))


async def probe_forever(fleet: Fleet, probe: Prober, interval: float) -> None:
    while True:
        await asyncio.sleep(interval)
        await probe_all(fleet, probe)
