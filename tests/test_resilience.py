"""Faults over real sockets, each checked for one promise: nothing is lost.

Every request ends complete (a stream: content, then ``data: [DONE]``; otherwise a 200 JSON
answer) or with a clean OpenAI-shaped error: an error status with
``{"error": {"message", "type", "param", "code"}}`` before commit, or, for a stream already
committed, one in-band ``data: {"error": ...}`` event and then ``[DONE]``. And once the fault is
over, the gateway's books balance: no request counted in flight anywhere (``assert_at_rest``).

Workers are simulators (in-process, or subprocesses that can be SIGKILLed) and scripted aiohttp
apps, all on real ports. The balancer breaks ties by "chosen longest ago", then configuration
order, so the first worker listed takes the first request and two idle workers alternate; load
scraping is switched off where a test relies on that order.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import aiohttp
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from gateway.simulator import ENGINE, SimConfig, parse_fault
from gateway.simulator import create_app as create_sim_app
from tests.conftest import TEST_SETTINGS, Gateway, GatewayFactory, SimFactory
from tests.helpers import chat, scripted_worker, sse_data, stream_text, wait_for
from tests.processes import HOST, free_port, start_simulator
from tests.processes import Sim as ProcSim

ERROR_KEYS = {"message", "type", "param", "code"}
SETTLE = 5.0  # seconds for the books to balance once the last response is read
NO_SCRAPE = {"scrape_interval": 0}  # keep picks in the balancer's tie order

Verdict = Literal["complete", "cut", "error"]
Serve = Callable[..., Awaitable[str]]


def health(**fields: float) -> dict[str, float]:
    return {**TEST_SETTINGS["health"], **fields}


def timeouts(**phases: float) -> dict[str, float]:
    return {**TEST_SETTINGS["timeouts"], **phases}


# --- what a client saw, and whether anything was lost -----------------------------------------


@dataclass(frozen=True, slots=True)
class Outcome:
    status: int
    headers: Mapping[str, str]
    raw: bytes
    stream: bool
    elapsed: float

    def json(self) -> Any:
        return orjson.loads(self.raw)


async def send(
    client: aiohttp.ClientSession,
    gw: Gateway,
    body: dict[str, Any],
    headers: Mapping[str, str] | None = None,
) -> Outcome:
    """One request, read to its end. A body cut short raises (``ClientPayloadError``): lost."""
    started = time.monotonic()
    async with client.post(f"{gw.url}/v1/chat/completions", json=body, headers=headers) as resp:
        raw = await resp.read()
    elapsed = time.monotonic() - started
    return Outcome(resp.status, resp.headers, raw, bool(body.get("stream")), elapsed)


def verdict(out: Outcome) -> Verdict:
    """Classify a finished request, failing the test unless it ended in one of the clean ways."""
    if out.status != 200:
        assert out.headers.get("Content-Type", "").startswith("application/json"), out
        error = out.json()["error"]
        assert set(error) == ERROR_KEYS, error
        assert isinstance(error["message"], str) and error["message"], error
        return "error"
    if not out.stream:
        answer = out.json()
        assert answer["choices"][0]["message"]["content"], answer
        assert answer["choices"][0]["finish_reason"], answer
        return "complete"
    events = sse_data(out.raw)
    assert events and events[-1] == "[DONE]", f"stream not terminated: {out.raw[-300:]!r}"
    assert events.count("[DONE]") == 1, events
    payloads = [orjson.loads(e) for e in events[:-1]]
    errors = [p for p in payloads if "error" in p]
    if not errors:
        finishes = [c["finish_reason"] for p in payloads for c in p.get("choices", [])]
        assert any(finishes), f"a stream ended without a finish_reason: {events}"
        return "complete"
    assert len(errors) == 1 and "error" in payloads[-1], f"not one final error event: {events}"
    assert set(errors[0]["error"]) == ERROR_KEYS, errors[0]
    assert stream_text(out.raw), "a stream committed before any content"
    return "cut"


def in_band_error(out: Outcome) -> dict[str, Any]:
    error: dict[str, Any] = orjson.loads(sse_data(out.raw)[-2])["error"]
    return error


def words(out: Outcome) -> int:
    if out.stream:
        return len(stream_text(out.raw).split())
    return len(out.json()["choices"][0]["message"]["content"].split())


async def assert_at_rest(gw: Gateway) -> None:
    """The books balance: no request in flight in the gauge, on any worker, or in admission;
    no half-open trial left marked as running."""

    def unsettled() -> list[str]:
        found: list[str] = []
        if (value := gw.metric("gateway_requests_in_flight")) != 0:
            found.append(f"gateway_requests_in_flight={value}")
        if gw.proxy.admission.in_flight != 0:
            found.append(f"admission.in_flight={gw.proxy.admission.in_flight}")
        for w in gw.fleet.workers:
            gauge = gw.metric("gateway_worker_requests_in_flight", worker=w.url)
            if w.in_flight != 0 or gauge != 0 or w.trial:
                found.append(f"{w.url}: in_flight={w.in_flight} gauge={gauge} trial={w.trial}")
        return found

    with contextlib.suppress(AssertionError):
        await wait_for(lambda: not unsettled(), SETTLE)
    assert not unsettled(), f"not at rest after {SETTLE}s: {unsettled()}"


# --- scripted workers ---------------------------------------------------------------------------


@pytest.fixture
async def serve() -> AsyncIterator[Serve]:
    """Start an aiohttp app on a real port (a given one, to restart a worker); its URL."""
    servers: list[TestServer] = []

    async def start(app: web.Application, port: int | None = None) -> str:
        server = TestServer(app, host=HOST, port=port)
        await server.start_server()
        servers.append(server)
        return str(server.make_url("")).rstrip("/")

    yield start
    for server in servers:
        await server.close()


@dataclass
class Refuser:
    """A worker that answers every chat request with one error status, noting when each came."""

    status: int
    body: bytes = b"Service Unavailable"
    content_type: str = "text/plain"
    headers: dict[str, str] = field(default_factory=dict)
    hits: list[float] = field(default_factory=list)  # time.monotonic() of each request

    async def handle(self, request: web.Request) -> web.Response:
        self.hits.append(time.monotonic())
        await request.read()
        return web.Response(
            status=self.status, body=self.body, content_type=self.content_type, headers=self.headers
        )

    def app(self) -> web.Application:
        return scripted_worker(self.handle)


def configured(url: str) -> dict[str, Any]:
    """A scripted worker's entry: it has no /v1/models, so its model is configured."""
    return {"url": url, "models": ["sim-model"]}


def rate_limiter() -> Refuser:
    body = {
        "error": {
            "message": "Rate limit reached; retry later.",
            "type": "rate_limit_error",
            "param": None,
            "code": "rate_limit_exceeded",
        }
    }
    return Refuser(429, orjson.dumps(body), "application/json", headers={"Retry-After": "2"})


# --- 1. a worker killed under load --------------------------------------------------------------

LOAD = 40  # streaming requests in all
MAX_TOKENS = 40
PACE = 0.02  # seconds between request starts
MID_STREAM_ON_VICTIM = 4  # streams that must be mid-answer on the victim when it is killed


@dataclass
class Watched:
    """One streaming request of the load, as its client sees it while it runs."""

    after_kill: bool
    got_bytes: bool = False  # the gateway commits a stream only with its first content
    done: bool = False
    outcome: Outcome | None = None


async def watched_stream(client: aiohttp.ClientSession, gw: Gateway, watched: Watched) -> None:
    started = time.monotonic()
    body = chat(stream=True, max_tokens=MAX_TOKENS)
    try:
        async with client.post(f"{gw.url}/v1/chat/completions", json=body) as resp:
            parts: list[bytes] = []
            async for chunk in resp.content.iter_any():
                parts.append(chunk)
                watched.got_bytes = resp.status == 200
        elapsed = time.monotonic() - started
        watched.outcome = Outcome(resp.status, resp.headers, b"".join(parts), True, elapsed)
    finally:
        watched.done = True


@pytest.fixture
def sim_processes() -> Iterator[tuple[ProcSim, ProcSim]]:
    """Two simulator processes, 20 ms per token; both SIGKILLed (again) at teardown."""
    args = ("--itl", "0.02", "--itl-per-seq", "0", "--ttft", "0.01", "--max-num-seqs", "64")
    started: list[ProcSim] = []
    try:
        for _ in range(2):
            started.append(start_simulator(*args, "--default-max-tokens", str(MAX_TOKENS)))
        yield started[0], started[1]
    finally:
        for process in started:
            process.proc.kill()


@pytest.mark.parametrize("ejects", [True, False], ids=["ejected", "kept-in-rotation"])
async def test_worker_killed_under_load_loses_no_request(
    gateway: GatewayFactory,
    client: aiohttp.ClientSession,
    sim_processes: tuple[ProcSim, ProcSim],
    ejects: bool,
) -> None:
    """1. Two simulator processes, the gateway in front; requests start every 20 ms.
    2. Once at least 4 streams are surely mid-answer on the victim, SIGKILL it.
    3. Half the requests start after the kill: with default health settings the victim is
       ejected by its cut streams; kept in rotation, it draws new requests (nothing in flight
       looks least loaded) and each must fail over.
    Streams cut mid-answer end with one in-band error then [DONE]; every other request,
    and every one started after the kill, completes in full. None fails without content."""
    victim, survivor = sim_processes
    sections: dict[str, Any] = {}
    if not ejects:
        sections = {"health": health(failures_to_eject=1000), "retry": {"budget_min": 1000}}
    gw = await gateway(
        {"url": victim.url, "models": ["sim-model"]},
        {"url": survivor.url, "models": ["sim-model"]},
        **sections,
    )
    victim_worker = gw.fleet.workers[0]
    watched: list[Watched] = []
    tasks: list[asyncio.Task[None]] = []
    killed = asyncio.Event()

    async def load() -> None:
        for i in range(LOAD):
            if i == LOAD // 2:
                await killed.wait()  # the second half starts after the kill
            w = Watched(after_kill=killed.is_set())
            watched.append(w)
            tasks.append(asyncio.create_task(watched_stream(client, gw, w)))
            await asyncio.sleep(PACE)

    def surely_mid_stream_on_victim() -> int:
        # Requests without content yet might all be on the victim; the rest of its count are
        # streams the gateway has committed.
        waiting = sum(1 for w in watched if not w.done and not w.got_bytes)
        return int(victim_worker.in_flight) - waiting

    generator = asyncio.create_task(load())
    try:
        await wait_for(
            lambda: surely_mid_stream_on_victim() >= MID_STREAM_ON_VICTIM,
            15,
            f"{MID_STREAM_ON_VICTIM} streams mid-answer on the victim",
        )
        victim.proc.kill()
        killed.set()
        await generator
        await asyncio.gather(*tasks)
    finally:
        generator.cancel()
        for task in tasks:
            task.cancel()
        await asyncio.gather(generator, *tasks, return_exceptions=True)

    verdicts: list[Verdict] = []
    for w in watched:
        assert w.outcome is not None
        verdicts.append(verdict(w.outcome))
        if verdicts[-1] == "cut":
            assert in_band_error(w.outcome)["code"] == "upstream_stream_truncated"
            assert not w.after_kill
        else:
            assert verdicts[-1] == "complete", w.outcome
            assert words(w.outcome) == MAX_TOKENS
    assert len(verdicts) == LOAD
    assert verdicts.count("cut") >= 1, "the kill cut no stream: the test proved nothing"
    assert sum(w.after_kill for w in watched) >= LOAD // 2
    if ejects:
        assert not victim_worker.in_rotation  # the cut streams count against it
    else:
        # Never ejected; down, as a probe would find, once its address refused a connection.
        assert victim_worker.ejected_until is None
        assert not victim_worker.healthy
        failed_over = sum(
            gw.metric("gateway_retries_total", reason=reason)
            for reason in ("upstream_connect_error", "upstream_disconnected")
        )
        assert failed_over >= 1, "no request started after the kill tried the dead worker"
    await assert_at_rest(gw)


# --- 2. a worker that hangs ---------------------------------------------------------------------

FIRST_TOKEN = 0.5


async def test_hung_worker_is_ejected_and_traffic_moves(
    sim: SimFactory, gateway: GatewayFactory, client: aiohttp.ClientSession
) -> None:
    """1. A worker that never answers, listed first, next to a good one.
    2. Streams fail over after the first-token timeout; after 2 such failures the hung worker
       is ejected. No client request fails.
    3. From then on every request goes straight to the good worker: no first-token wait."""
    hung = await sim(fault=parse_fault("hang"))
    good = await sim()
    gw = await gateway(
        hung,
        good,
        timeouts=timeouts(first_token=FIRST_TOKEN),
        health=health(failures_to_eject=2, ejection_time=30),
        routing=NO_SCRAPE,
    )
    hung_worker = gw.fleet.workers[0]
    sent = 0
    while hung_worker.in_rotation:
        assert sent < 6, "the hung worker was never ejected"
        assert verdict(await send(client, gw, chat(stream=True))) == "complete"
        sent += 1
    assert gw.metric("gateway_worker_ejections_total", worker=hung.url) == 1
    assert gw.metric("gateway_worker_healthy", worker=hung.url) == 0
    errors = {"worker": hung.url, "kind": "first_token_timeout"}
    assert gw.metric("gateway_upstream_errors_total", **errors) == 2
    retries = gw.metric("gateway_retries_total", reason="first_token_timeout")
    assert retries == 2
    served = good.engine.finished

    for stream in (True, True, True, False, False):
        out = await send(client, gw, chat(stream=stream))
        assert verdict(out) == "complete"
        assert out.elapsed < FIRST_TOKEN, f"waited on the hung worker: {out.elapsed:.2f}s"
    assert good.engine.finished == served + 5
    assert gw.metric("gateway_upstream_errors_total", **errors) == 2
    assert gw.metric("gateway_retries_total", reason="first_token_timeout") == retries
    await assert_at_rest(gw)


# --- 3. a worker that recovers ------------------------------------------------------------------


async def test_worker_that_comes_back_is_readmitted_by_its_half_open_trial(
    sim: SimFactory, gateway: GatewayFactory, serve: Serve, client: aiohttp.ClientSession
) -> None:
    """1. Two workers; the first one answers 502 to everything.
    2. Requests fail over; after 2 failures it is ejected for 0.3 s.
    3. Its server is replaced by a healthy simulator on the same port.
    4. After the ejection time, the next request is its one half-open trial: it is served
       there and the worker is back in rotation."""
    port = free_port()
    first = TestServer(Refuser(502).app(), host=HOST, port=port)
    await first.start_server()
    url = str(first.make_url("")).rstrip("/")
    good = await sim()
    gw = await gateway(
        configured(url),
        {"url": good.url, "models": ["sim-model"]},
        health=health(failures_to_eject=2, ejection_time=0.3),
        routing=NO_SCRAPE,
    )
    flaky_worker = gw.fleet.workers[0]

    for _ in range(2):
        assert verdict(await send(client, gw, chat())) == "complete"
    assert not flaky_worker.in_rotation
    assert gw.metric("gateway_worker_ejections_total", worker=url) == 1
    assert gw.metric("gateway_worker_healthy", worker=url) == 0
    errors = {"worker": url, "kind": "upstream_unavailable"}
    assert gw.metric("gateway_upstream_errors_total", **errors) == 2
    assert good.engine.finished == 2

    await first.close()
    restarted = create_sim_app(SimConfig())
    assert await serve(restarted, port) == url
    ejected_until = flaky_worker.ejected_until
    assert ejected_until is not None
    await wait_for(lambda: gw.fleet.clock() >= ejected_until, 5, "ejection time over")

    out = await send(client, gw, chat(stream=True))
    assert verdict(out) == "complete"
    assert restarted[ENGINE].finished == 1  # the trial went to the restarted worker
    assert good.engine.finished == 2
    assert flaky_worker.in_rotation
    assert flaky_worker.consecutive_failures == 0
    assert gw.metric("gateway_worker_healthy", worker=url) == 1
    assert gw.metric("gateway_worker_ejections_total", worker=url) == 1
    await assert_at_rest(gw)


# --- 4. a whole pool down, with a fallback ------------------------------------------------------

FALLBACKS = {"big": ["small"]}


def big(stream: bool) -> dict[str, Any]:
    extra: dict[str, Any] = {"stream_options": {"include_usage": True}} if stream else {}
    return chat(stream=stream, model="big", max_tokens=5, **extra)


def served_model_and_usage(out: Outcome) -> tuple[str, dict[str, Any]]:
    if not out.stream:
        answer = out.json()
        return answer["model"], answer["usage"]
    payloads = [orjson.loads(e) for e in sse_data(out.raw)[:-1]]
    models = {p["model"] for p in payloads}
    assert len(models) == 1, models
    usage = payloads[-1]["usage"]  # the usage chunk comes last
    return models.pop(), usage


async def assert_served_by_small(client: aiohttp.ClientSession, gw: Gateway) -> None:
    for stream in (False, True, False, True):
        out = await send(client, gw, big(stream))
        assert verdict(out) == "complete"
        model, usage = served_model_and_usage(out)
        assert model == "small"
        assert usage["completion_tokens"] == 5
        assert usage["prompt_tokens"] > 0


async def test_pool_down_falls_back_to_another_model(
    sim: SimFactory, gateway: GatewayFactory, client: aiohttp.ClientSession
) -> None:
    """1. Both "big" workers are unreachable: the start-up probe marks them down.
    2. Every request for "big" (streaming or not) is served by the "small" pool."""
    small = await sim(models=("small",))
    gw = await gateway(
        {"url": f"http://{HOST}:{free_port()}", "models": ["big"]},
        {"url": f"http://{HOST}:{free_port()}", "models": ["big"]},
        {"url": small.url, "models": ["small"]},
        fallbacks=FALLBACKS,
    )
    assert not any(w.in_rotation for w in gw.fleet.workers[:2])
    await assert_served_by_small(client, gw)
    assert small.engine.finished == 4
    assert gw.metric("gateway_fallbacks_total", model="big", fallback="small") == 4
    await assert_at_rest(gw)


async def test_pool_answering_503_falls_back_to_another_model(
    sim: SimFactory, gateway: GatewayFactory, client: aiohttp.ClientSession
) -> None:
    """1. The "big" worker passes /health but answers 503 to every request.
    2. Every request for "big" is tried there once, then served by the "small" pool."""
    big_worker = await sim(models=("big",), fault=parse_fault("status=503"))
    small = await sim(models=("small",))
    gw = await gateway(
        {"url": big_worker.url, "models": ["big"]},
        {"url": small.url, "models": ["small"]},
        fallbacks=FALLBACKS,
        retry={"budget_min": 1000},
    )
    await assert_served_by_small(client, gw)
    assert small.engine.finished == 4
    assert gw.metric("gateway_fallbacks_total", model="big", fallback="small") == 4
    errors = {"worker": big_worker.url, "kind": "upstream_unavailable"}
    assert gw.metric("gateway_upstream_errors_total", **errors) == 4
    assert gw.fleet.workers[0].in_rotation  # busy is not sick
    await assert_at_rest(gw)


# --- 5. 429 with Retry-After --------------------------------------------------------------------

RETRY_AFTER = 2.0


async def test_retry_after_keeps_requests_off_a_rate_limited_worker(
    sim: SimFactory, gateway: GatewayFactory, serve: Serve, client: aiohttp.ClientSession
) -> None:
    """1. A worker answering 429 + ``Retry-After: 2``, listed first, next to a good one.
    2. Requests one after another for 2.5 s (and until it was asked twice): all succeed.
    3. The limited worker never got a request within 2 s of the one before."""
    limited = rate_limiter()
    limited_url = await serve(limited.app())
    good = await sim()
    gw = await gateway(configured(limited_url), good, routing=NO_SCRAPE)
    started = time.monotonic()
    sent = 0
    while time.monotonic() - started < RETRY_AFTER + 0.5 or len(limited.hits) < 2:
        assert time.monotonic() - started < 10, f"asked again only {limited.hits}"
        assert verdict(await send(client, gw, chat(max_tokens=2))) == "complete"
        sent += 1
    assert good.engine.finished == sent
    assert len(limited.hits) >= 2
    gaps = [b - a for a, b in zip(limited.hits, limited.hits[1:], strict=False)]
    assert min(gaps) >= RETRY_AFTER, gaps
    assert gw.fleet.workers[0].in_rotation  # asked to wait, not sick
    await assert_at_rest(gw)


async def test_retry_after_relayed_then_honoured_by_the_gateway(
    gateway: GatewayFactory, serve: Serve, client: aiohttp.ClientSession
) -> None:
    """1. The only worker answers 429 + ``Retry-After: 2``, longer than ``retry.max_wait``:
       the client gets the 429 with that Retry-After, the worker's message, our stable code.
    2. A second request at once is not sent to the worker: a clean 503 that says the worker
       is cooling down, with a Retry-After of at most the time left."""
    limited = rate_limiter()
    gw = await gateway(configured(await serve(limited.app())), retry={"max_wait": 1.0})
    first = await send(client, gw, chat(stream=True))
    assert verdict(first) == "error"
    assert first.status == 429
    assert first.headers["Retry-After"] == "2"
    assert first.json()["error"]["code"] == "upstream_unavailable"
    assert first.json()["error"]["message"] == "Rate limit reached; retry later."

    second = await send(client, gw, chat(stream=True))
    assert verdict(second) == "error"
    assert second.status == 503
    assert second.json()["error"]["code"] == "workers_cooling_down"
    assert 1 <= int(second.headers["Retry-After"]) <= RETRY_AFTER
    assert len(limited.hits) == 1
    await assert_at_rest(gw)


# --- 6. a persistent 503 ------------------------------------------------------------------------


@pytest.mark.parametrize("max_attempts", [1, 2])
async def test_persistent_503_is_a_clean_503_after_bounded_attempts(
    gateway: GatewayFactory, serve: Serve, client: aiohttp.ClientSession, max_attempts: int
) -> None:
    """Two workers answer 503 (no Retry-After, not JSON) to everything: each request gets a
    clean OpenAI-shaped 503 after exactly ``retry.max_attempts`` upstream attempts."""
    a, b = Refuser(503), Refuser(503)
    gw = await gateway(
        configured(await serve(a.app())),
        configured(await serve(b.app())),
        retry={"max_attempts": max_attempts, "budget_min": 1000},
    )
    for n in range(1, 6):
        for stream in (True, False):
            out = await send(client, gw, chat(stream=stream))
            assert verdict(out) == "error"
            assert out.status == 503
            assert out.json()["error"]["code"] == "upstream_unavailable"
        assert len(a.hits) + len(b.hits) == 2 * n * max_attempts
    assert all(w.in_rotation for w in gw.fleet.workers)  # busy is not sick
    await assert_at_rest(gw)


async def test_persistent_503_is_not_multiplied_by_retries(
    gateway: GatewayFactory, serve: Serve, client: aiohttp.ClientSession
) -> None:
    """30 requests one after another against two workers that answer 503: the retry budget
    (10% plus 2) caps the upstream load at 35 attempts, not 60."""
    a, b = Refuser(503), Refuser(503)
    gw = await gateway(
        configured(await serve(a.app())),
        configured(await serve(b.app())),
        retry={"max_attempts": 2, "budget_ratio": 0.1, "budget_min": 2},
    )
    requests = 30
    for _ in range(requests):
        out = await send(client, gw, chat())
        assert verdict(out) == "error"
        assert out.status == 503
    hits = len(a.hits) + len(b.hits)
    assert requests < hits <= requests + 2 + 0.1 * requests
    exhausted = gw.metric("gateway_retry_budget_exhausted_total")
    assert exhausted > 0
    retried = gw.metric("gateway_retries_total", reason="upstream_unavailable")
    assert retried + exhausted == requests  # each request retried once or was refused the retry
    assert hits == requests + retried
    await assert_at_rest(gw)


# --- 7. stream truth ----------------------------------------------------------------------------


async def test_malformed_event_before_first_token_fails_over(
    sim: SimFactory, gateway: GatewayFactory, client: aiohttp.ClientSession
) -> None:
    """A worker whose stream starts with a malformed event: nothing was sent to the client
    yet, so the request moves to the good worker and completes."""
    broken = await sim(fault=parse_fault("malformed_after=0"))
    good = await sim()
    gw = await gateway(broken, good)
    out = await send(client, gw, chat(stream=True, max_tokens=8))
    assert verdict(out) == "complete"
    assert words(out) == 8
    assert good.engine.finished == 1
    assert gw.metric("gateway_retries_total", reason="upstream_malformed_event") == 1
    assert gw.fleet.workers[0].consecutive_failures == 1
    await assert_at_rest(gw)


async def test_malformed_event_mid_stream_ends_in_band(
    sim: SimFactory, gateway: GatewayFactory, client: aiohttp.ClientSession
) -> None:
    """A worker that sends a malformed event after 3 tokens: the client keeps the tokens it
    got, then one in-band ``upstream_malformed_event`` error and [DONE]; no retry after
    commit, and the failure counts against the worker's health."""
    broken = await sim(fault=parse_fault("malformed_after=3"))
    other = await sim()
    gw = await gateway(broken, other)
    out = await send(client, gw, chat(stream=True, max_tokens=10))
    assert out.status == 200
    assert verdict(out) == "cut"
    assert in_band_error(out)["code"] == "upstream_malformed_event"
    assert 1 <= words(out) <= 3
    assert "{not json" not in out.raw.decode()  # the broken event never reaches the client
    assert other.engine.finished == 0
    assert gw.fleet.workers[0].consecutive_failures == 1
    kind = {"worker": broken.url, "kind": "upstream_malformed_event"}
    assert gw.metric("gateway_upstream_errors_total", **kind) == 1
    await assert_at_rest(gw)


# --- a worker's own in-band error and a broken JSON answer -------------------------------------


async def test_in_band_worker_errors_count_against_its_health(
    sim: SimFactory, gateway: GatewayFactory, client: aiohttp.ClientSession
) -> None:
    """A worker whose streams all end in its own in-band 500 error after 2 tokens fails those
    requests as surely as one that cuts them or answers 500: each counts against its health,
    and after ``failures_to_eject`` of them the traffic completes on the good worker."""
    bad = await sim(fault=parse_fault("error_after=2"))
    good = await sim()
    gw = await gateway(
        bad, good, health=health(failures_to_eject=2, ejection_time=30), routing=NO_SCRAPE
    )
    first = await send(client, gw, chat(stream=True, max_tokens=5))
    assert verdict(first) == "cut"
    assert in_band_error(first)["code"] == 500  # the worker's own event, relayed
    assert gw.fleet.workers[0].consecutive_failures == 1
    for _ in range(6):
        await send(client, gw, chat(stream=True, max_tokens=5))
    assert not gw.fleet.workers[0].in_rotation
    await assert_at_rest(gw)


def parses(raw: bytes) -> bool:
    try:
        orjson.loads(raw)
    except orjson.JSONDecodeError:
        return False
    return True


async def test_non_stream_answer_that_is_not_json_is_not_relayed_as_200(
    sim: SimFactory, gateway: GatewayFactory, client: aiohttp.ClientSession
) -> None:
    """The non-streaming twin of a malformed first event: the worker answers 200 with a body
    that is not JSON. The client must get a complete answer (from the good worker) or a
    clean error, never the broken body under a 200."""
    broken = await sim(fault=parse_fault("malformed_after=0"))
    good = await sim()
    gw = await gateway(broken, good)
    out = await send(client, gw, chat(max_tokens=5))
    assert out.status != 200 or parses(out.raw), f"a 200 that is not JSON: {out.raw!r}"
    assert verdict(out) in ("complete", "error")
    await assert_at_rest(gw)
