"""The fleet: pools by model, active probes, passive ejection with growing times and half-open
recovery, Retry-After, membership changes, and the probe and scrape rounds (sans sockets)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from gateway.loadsignals import LoadSignals
from gateway.monitor import probe_all, scrape_all
from gateway.settings import HealthSettings, WorkerSettings
from gateway.workers import Fleet, ProbeResult, Worker, worker_from_settings

DEADLINE = 5.0


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def fleet(
    *models: tuple[str, ...],
    failures_to_eject: int = 3,
    ejection_time: float = 5.0,
    max_ejection_time: float = 300.0,
    clock: Clock | None = None,
) -> Fleet:
    configured = [WorkerSettings(url=f"http://w{i}:8000", models=m) for i, m in enumerate(models)]
    health = HealthSettings(
        failures_to_eject=failures_to_eject,
        ejection_time=ejection_time,
        max_ejection_time=max_ejection_time,
    )
    return Fleet((worker_from_settings(w, 256) for w in configured), health, clock=clock or Clock())


def card(model: str, **fields: Any) -> dict[str, Any]:
    return {"id": model, "object": "model", "owned_by": "vllm", **fields}


def fail(f: Fleet, worker: Worker, times: int = 1) -> None:
    for _ in range(times):
        f.begin_attempt(worker)
        f.record_failure(worker)
        f.end_attempt(worker)


def succeed(f: Fleet, worker: Worker) -> None:
    f.begin_attempt(worker)
    f.record_success(worker)
    f.end_attempt(worker)


# --- pools and probes -----------------------------------------------------------------------


def test_pools_follow_configured_models() -> None:
    f = fleet(("a",), ("a", "b"), ())
    w0, w1, w2 = f.workers
    assert [w.url for w in f.workers] == ["http://w0:8000", "http://w1:8000", "http://w2:8000"]
    assert (f.serves("a"), f.serves("b"), f.serves("c")) == (True, True, False)
    assert f.candidates("a") == [w0, w1]
    assert f.candidates("b") == [w1]
    assert f.candidates("c") == []
    assert w2.models == ()


def test_per_worker_cap_comes_from_the_worker_or_the_default() -> None:
    own = worker_from_settings(WorkerSettings(url="http://a:1", max_in_flight=4), 256)
    default = worker_from_settings(WorkerSettings(url="http://b:1"), 256)
    assert (own.cap, default.cap) == (4, 256)


def test_candidates_exclude_down_and_excluded_workers() -> None:
    f = fleet(("a",), ("a",), ("a",))
    w0, w1, w2 = f.workers
    f.apply_probe(w1, ProbeResult(healthy=False))
    assert f.candidates("a") == [w0, w2]
    assert f.candidates("a", exclude=[w0]) == [w2]
    assert f.candidates("a", exclude=[w0, w2]) == []
    assert f.serves("a")  # still a known model, only nobody can take it now


def test_failed_probe_takes_a_worker_out_and_a_passing_one_brings_it_back() -> None:
    f = fleet(("a",), failures_to_eject=3)
    [w0] = f.workers
    f.apply_probe(w0, ProbeResult(healthy=False))
    assert not w0.in_rotation
    assert not f.any_healthy()
    f.apply_probe(w0, ProbeResult(healthy=True))
    assert f.candidates("a") == [w0]


def test_discovered_models_feed_pools_and_cards() -> None:
    f = fleet(("a",), ())
    w1 = f.workers[1]
    assert not f.serves("m")
    f.apply_probe(w1, ProbeResult(healthy=True, models=(card("m", max_model_len=4096),)))
    assert f.serves("m")
    assert f.candidates("m") == [w1]
    assert f.model_cards() == [card("a"), card("m", max_model_len=4096)]

    f.apply_probe(w1, ProbeResult(healthy=True, models=None))  # not answered: keep what we know
    assert f.candidates("m") == [w1]
    f.apply_probe(w1, ProbeResult(healthy=True, models=()))  # answered: serves nothing now
    assert not f.serves("m")
    assert f.model_cards() == [card("a")]


def test_configured_models_win_over_discovered_ones() -> None:
    f = fleet(("a",))
    [w0] = f.workers
    discovered = (card("a", max_model_len=8192), card("other"))
    f.apply_probe(w0, ProbeResult(healthy=True, models=discovered))
    assert not f.serves("other")
    assert f.model_cards() == [card("a", max_model_len=8192)]  # the worker's own card for "a"


def test_model_cards_skip_workers_out_of_rotation_and_duplicates() -> None:
    f = fleet(("a",), ("a", "b"), ("c",), ("c",), failures_to_eject=1)
    f.apply_probe(f.workers[2], ProbeResult(healthy=False))
    fail(f, f.workers[3])  # the only other "c" worker is down, so this one is kept
    assert f.workers[3].in_rotation
    assert f.model_cards() == [card("a"), card("b"), card("c")]
    fail(f, f.workers[0])
    assert f.model_cards() == [card("a"), card("b"), card("c")]  # w1 still serves "a"


def test_any_healthy_needs_a_healthy_worker_with_models() -> None:
    f = fleet((), ("a",))
    w0, w1 = f.workers
    assert f.any_healthy()
    f.apply_probe(w1, ProbeResult(healthy=False))
    assert not f.any_healthy()  # w0 is up but serves nothing yet
    f.apply_probe(w0, ProbeResult(healthy=True, models=(card("m"),)))
    assert f.any_healthy()


# --- passive ejection -----------------------------------------------------------------------


def test_consecutive_failures_eject_and_success_resets_the_count() -> None:
    f = fleet(("a",), ("a",), failures_to_eject=3)
    w0, w1 = f.workers
    changes: list[tuple[str, bool]] = []
    ejected: list[str] = []
    f.on_health_change = lambda w: changes.append((w.url, w.in_rotation))
    f.on_eject = lambda w: ejected.append(w.url)
    fail(f, w0, 2)
    succeed(f, w0)
    fail(f, w0, 2)
    assert w0.in_rotation and w0.consecutive_failures == 2
    assert changes == []
    fail(f, w0)
    assert not w0.in_rotation
    assert w0.healthy  # the probe's verdict is its own field
    assert changes == [("http://w0:8000", False)]
    assert ejected == ["http://w0:8000"]
    assert f.candidates("a") == [w1]


def test_the_last_worker_in_rotation_for_a_model_is_never_ejected() -> None:
    f = fleet(("a",), ("a", "b"), failures_to_eject=1)
    w0, w1 = f.workers
    fail(f, w1, 5)  # the only "b" worker: kept, whatever "a" has
    assert w1.in_rotation
    fail(f, w0)
    assert not w0.in_rotation  # w1 still serves "a"
    fail(f, w1)
    assert w1.in_rotation


def test_a_probe_does_not_end_a_passive_ejection() -> None:
    clock = Clock()
    f = fleet(("a",), ("a",), failures_to_eject=1, clock=clock)
    w0, _ = f.workers
    fail(f, w0)
    f.apply_probe(w0, ProbeResult(healthy=True))
    assert not w0.in_rotation
    assert w0 not in f.candidates("a")


def test_half_open_admits_one_trial_and_success_readmits() -> None:
    clock = Clock()
    f = fleet(("a",), ("a",), failures_to_eject=1, ejection_time=5.0, clock=clock)
    w0, w1 = f.workers
    fail(f, w0)
    clock.now += 4.9
    assert f.candidates("a") == [w1]
    clock.now += 0.2
    assert f.candidates("a") == [w0, w1]  # half-open
    f.begin_attempt(w0)
    assert f.candidates("a") == [w1]  # one trial at a time
    f.record_success(w0)
    f.end_attempt(w0)
    assert w0.in_rotation
    assert f.candidates("a") == [w0, w1]


def test_trial_without_a_verdict_frees_the_half_open_slot() -> None:
    """A 4xx or a client that left says nothing about the worker: it stays half-open."""
    clock = Clock()
    f = fleet(("a",), ("a",), failures_to_eject=1, clock=clock)
    w0, _ = f.workers
    fail(f, w0)
    clock.now += 6
    f.begin_attempt(w0)
    f.end_attempt(w0)
    assert not w0.in_rotation
    assert w0 in f.candidates("a")


def test_failed_trials_eject_for_doubling_times_up_to_the_maximum() -> None:
    clock = Clock()
    f = fleet(
        ("a",), ("a",), failures_to_eject=2, ejection_time=5, max_ejection_time=30, clock=clock
    )
    w0, _ = f.workers
    fail(f, w0, 2)
    lengths = []
    for _ in range(5):
        assert w0.ejected_until is not None
        lengths.append(w0.ejected_until - clock.now)
        clock.now = w0.ejected_until
        fail(f, w0)  # one failed trial is enough to go out again
    assert lengths == [5, 10, 20, 30, 30]


def test_a_failure_while_ejected_that_is_not_the_trial_does_not_extend_it() -> None:
    clock = Clock()
    f = fleet(("a",), ("a",), failures_to_eject=1, clock=clock)
    w0, _ = f.workers
    fail(f, w0)
    until = w0.ejected_until
    f.record_failure(w0)  # a request that started before the ejection ends badly
    assert w0.ejected_until == until
    f.record_success(w0)  # ... or well: still not a trial
    assert not w0.in_rotation


def test_ejections_are_forgiven_after_a_long_healthy_stretch() -> None:
    clock = Clock()
    f = fleet(
        ("a",), ("a",), failures_to_eject=1, ejection_time=5, max_ejection_time=60, clock=clock
    )
    w0, _ = f.workers
    fail(f, w0)
    clock.now += 5
    fail(f, w0)  # second ejection: 10 s
    clock.now += 10
    succeed(f, w0)
    clock.now += 60
    fail(f, w0)
    assert w0.ejected_until == clock.now + 5


def test_retry_after_keeps_a_worker_out_until_then() -> None:
    clock = Clock()
    f = fleet(("a",), ("a",), clock=clock)
    w0, w1 = f.workers
    f.retry_later(w0, 2.0)
    assert f.candidates("a") == [w1]
    assert w0.in_rotation  # busy is not sick
    clock.now += 1.99
    assert f.candidates("a") == [w1]
    clock.now += 0.02
    assert f.candidates("a") == [w0, w1]


# --- membership -----------------------------------------------------------------------------


def test_removed_worker_leaves_pools_while_its_requests_keep_their_record() -> None:
    f = fleet(("a",), ("a",))
    w0, w1 = f.workers
    removed: list[str] = []
    f.on_removed = lambda w: removed.append(w.url)
    w0.in_flight = 1  # a request is on it
    f.remove(w0)
    assert f.candidates("a") == [w1]
    assert removed == ["http://w0:8000"]
    w0.in_flight -= 1  # the request finishes on the record it holds
    assert w0.in_flight == 0
    f.add(Worker("http://w9:8000", ("a", "z")))
    assert f.serves("z")
    assert [w.url for w in f.candidates("a")] == ["http://w1:8000", "http://w9:8000"]


# --- probe and scrape rounds ----------------------------------------------------------------


async def test_probe_all_probes_every_worker_at_once() -> None:
    """1. Both probes start before either may finish. 2. They finish in reverse order."""
    f = fleet(("a",), ("b",))
    w0, w1 = f.workers
    started = {w.url: asyncio.Event() for w in f.workers}
    release = {w.url: asyncio.Event() for w in f.workers}
    verdict = {w0.url: False, w1.url: True}

    async def probe(worker: Worker) -> ProbeResult:
        started[worker.url].set()
        await release[worker.url].wait()
        return ProbeResult(healthy=verdict[worker.url])

    f.apply_probe(w1, ProbeResult(healthy=False))
    task = asyncio.create_task(probe_all(f, probe))
    # A sequential prober would never start w1 while w0's probe is held: this would time out.
    await asyncio.wait_for(asyncio.gather(*(e.wait() for e in started.values())), DEADLINE)
    release[w1.url].set()
    release[w0.url].set()
    await asyncio.wait_for(task, DEADLINE)
    assert (w0.healthy, w1.healthy) == (False, True)


async def test_slow_probe_does_not_delay_another_workers_result() -> None:
    f = fleet(("a",), ("b",))
    w0, w1 = f.workers
    f.apply_probe(w1, ProbeResult(healthy=False))
    release, w1_probed = asyncio.Event(), asyncio.Event()

    async def probe(worker: Worker) -> ProbeResult:
        if worker is w0:
            await release.wait()
        else:
            w1_probed.set()
        return ProbeResult(healthy=True)

    task = asyncio.create_task(probe_all(f, probe))
    try:
        await asyncio.wait_for(w1_probed.wait(), DEADLINE)
        await asyncio.sleep(0)  # one loop turn for the result to be applied
        assert w1.healthy
    finally:
        release.set()
        await asyncio.wait_for(task, DEADLINE)


async def test_probe_that_raises_marks_only_its_worker_down(
    caplog: pytest.LogCaptureFixture,
) -> None:
    f = fleet(("a",), ("b",))
    w0, w1 = f.workers
    f.apply_probe(w1, ProbeResult(healthy=False))

    async def probe(worker: Worker) -> ProbeResult:
        if worker is w0:
            raise RuntimeError("probe bug")
        return ProbeResult(healthy=True)

    await asyncio.wait_for(probe_all(f, probe), DEADLINE)
    assert (w0.healthy, w1.healthy) == (False, True)
    assert f.serves("a")  # configured models are kept; the worker is only out of rotation
    [record] = [r for r in caplog.records if r.levelname == "ERROR"]
    assert record.getMessage() == "probe of http://w0:8000 failed unexpectedly"


async def test_scrape_round_sets_each_workers_load_and_clears_failures() -> None:
    f = fleet(("a",), ("a",), ("a",))
    w0, w1, w2 = f.workers
    w2.load = LoadSignals(waiting=9, running=9, kv_cache=0.9)  # stale from an earlier round
    release = asyncio.Event()
    seen: list[str] = []

    async def scrape(worker: Worker) -> LoadSignals | None:
        if worker is w0:
            await release.wait()
            return LoadSignals(waiting=1, running=2, kv_cache=0.5)
        if worker is w1:
            raise RuntimeError("scrape bug")
        return None

    w0.in_flight = 3  # when the scrape goes out
    task = asyncio.create_task(scrape_all(f, scrape, lambda w: seen.append(w.url)))
    async with asyncio.timeout(DEADLINE):
        while len(seen) < 2:  # w1 and w2 report while w0 is still held
            await asyncio.sleep(0)
    assert (w1.load, w2.load) == (None, None)
    # While its scrape is out, 2 of w0's 3 requests end and 4 start: ours, in the worker's
    # counts, is the one left (the new ones count as moved since: busier, the safe side).
    w0.in_flight, w0.finished = 1 + 4, 2
    release.set()
    await asyncio.wait_for(task, DEADLINE)
    assert w0.load == LoadSignals(waiting=1, running=2, kv_cache=0.5, ours=1)
