"""The fleet's background loops: active health probes and load scrapes, one round at a time.

Every round asks all workers at once (``asyncio.gather``), and each result is applied as soon as
it is in, so one slow or dead worker never delays what the others report. Every request is
bounded by its own timeout (in ``upstream``); a round that raises for one worker marks only
that worker.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace

from gateway.loadsignals import LoadSignals
from gateway.workers import Fleet, ProbeResult, Worker

log = logging.getLogger(__name__)

Prober = Callable[[Worker], Awaitable[ProbeResult]]
Scraper = Callable[[Worker], Awaitable[LoadSignals | None]]


async def probe_all(fleet: Fleet, probe: Prober, workers: Sequence[Worker] | None = None) -> None:
    """Probe every worker (or the given ones) at once, applying each result as it arrives."""

    async def probe_one(worker: Worker) -> None:
        try:
            result = await probe(worker)
        except Exception:
            log.exception("probe of %s failed unexpectedly", worker.url)
            result = ProbeResult(healthy=False)
        fleet.apply_probe(worker, result)

    await asyncio.gather(*(probe_one(w) for w in list(workers or fleet.workers)))


async def probe_forever(fleet: Fleet, probe: Prober, interval: float) -> None:
    while True:
        await asyncio.sleep(interval)
        await probe_all(fleet, probe)


async def scrape_all(
    fleet: Fleet, scrape: Scraper, on_scraped: Callable[[Worker], None] = lambda w: None
) -> None:
    """Read every worker's load signals at once; a failed scrape leaves ``load`` None, so the
    balancer falls back to the gateway's own in-flight count rather than stale numbers."""

    async def scrape_one(worker: Worker) -> None:
        # Ours in the worker's counts: those in flight when the scrape went out, less those
        # that ended before its answer came. One that started meanwhile is taken as not counted
        # yet, and one that ended meanwhile as already gone: either way the balancer's score
        # errs towards busier (balancer.load_score).
        in_flight, finished = worker.in_flight, worker.finished
        try:
            load = await scrape(worker)
            ours = in_flight - (worker.finished - finished)
            worker.load = load if load is None else replace(load, ours=ours)
        except Exception:
            log.exception("scrape of %s failed unexpectedly", worker.url)
            worker.load = None
        on_scraped(worker)

    await asyncio.gather(*(scrape_one(w) for w in list(fleet.workers)))


async def scrape_forever(
    fleet: Fleet,
    scrape: Scraper,
    interval: float,
    on_scraped: Callable[[Worker], None] = lambda w: None,
) -> None:
    while True:
        await scrape_all(fleet, scrape, on_scraped)
        await asyncio.sleep(interval)
