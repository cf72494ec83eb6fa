"""SIGTERM against a real ``python -m gateway`` process, in the order ``gateway/server.py``
writes down: readiness turns 503 at once while requests are still served for
``server.shutdown_grace``; then listening stops; requests in flight finish within
``server.drain_timeout``; the rest end with one in-band ``shutting_down`` error; exit 0.

One simulated worker (a subprocess, 20 ms per token) serves every test; each test starts its
own gateway, since each one ends it.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from tests.helpers import chat, wait_for
from tests.processes import GatewayProc, Sim, start_gateway, start_simulator, write_config

pytestmark = pytest.mark.e2e

ITL = 0.02  # seconds per token on the worker
EXIT_BOUND = 10.0  # generous: the process's own bounds add up to a few seconds at most
# uvloop's timers run on libuv's clock: whole milliseconds, read once per loop turn, so a 0.5 s
# timer can fire up to about 1 ms before 0.5 s have passed on time.monotonic() (CI saw 0.49988).
TIMER_SLACK = 0.002

GatewayStarter = Callable[..., GatewayProc]


@pytest.fixture(scope="module")
def worker() -> Iterator[Sim]:
    sim = start_simulator("--itl", str(ITL), "--itl-per-seq", "0", "--ttft", "0.01")
    yield sim
    sim.proc.kill()


@pytest.fixture
def start(worker: Sim, tmp_path: Path) -> Iterator[GatewayStarter]:
    started: list[GatewayProc] = []

    def start(shutdown_grace: float, drain_timeout: float) -> GatewayProc:
        config = write_config(
            tmp_path / f"gateway{len(started)}.yaml",
            [worker.url],
            server={"shutdown_grace": shutdown_grace, "drain_timeout": drain_timeout},
        )
        gateway = start_gateway(config)
        started.append(gateway)
        return gateway

    yield start
    for gateway in started:
        gateway.proc.kill()


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as session:
        yield session


async def exit_code(gateway: GatewayProc) -> int:
    """Wait for the process to exit without blocking the event loop (a client closing its
    connection needs the loop to run)."""
    await wait_for(lambda: gateway.proc.popen.poll() is not None, EXIT_BOUND, "gateway exited")
    return gateway.proc.wait_exit(EXIT_BOUND)  # reaps and collects the last log lines


async def ready_status(gateway: GatewayProc) -> int | None:
    """``GET /ready`` on a new connection; None once the gateway no longer accepts one."""
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session,
            session.get(f"{gateway.url}/ready") as resp,
        ):
            return resp.status
    except aiohttp.ClientConnectorError:
        return None


async def wait_ready_503(gateway: GatewayProc, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while (status := await ready_status(gateway)) != 503:
        assert status is not None, "/ready stopped answering before it turned 503"
        assert status == 200, f"/ready answered {status} while draining"
        if time.monotonic() > deadline:
            raise AssertionError(f"/ready still 200 {timeout}s after SIGTERM")
        await asyncio.sleep(0.01)


async def accepts_connections(gateway: GatewayProc) -> bool:
    host, _, port = gateway.url.removeprefix("http://").partition(":")
    try:
        _, writer = await asyncio.open_connection(host, int(port))
    except ConnectionRefusedError:
        return False
    writer.close()
    await writer.wait_closed()
    return True


async def events_until(
    resp: aiohttp.ClientResponse, stop: Callable[[list[Any]], bool]
) -> list[Any]:
    """Read SSE ``data:`` lines (JSON decoded, ``[DONE]`` kept as a string) until ``stop`` says
    so or the body ends."""
    events: list[Any] = []
    while not stop(events):
        line = await resp.content.readline()
        if not line:
            break
        if line.startswith(b"data:"):
            data = line[5:].strip()
            events.append("[DONE]" if data == b"[DONE]" else orjson.loads(data))
    return events


def tokens(events: list[Any]) -> list[str]:
    return [
        e["choices"][0]["delta"]["content"]
        for e in events
        if isinstance(e, dict) and e.get("choices") and e["choices"][0]["delta"].get("content")
    ]


def errors(events: list[Any]) -> list[dict[str, Any]]:
    return [e["error"] for e in events if isinstance(e, dict) and "error" in e]


async def test_stream_in_flight_completes_and_ready_turns_503(
    start: GatewayStarter, client: aiohttp.ClientSession
) -> None:
    """1. A stream in flight when SIGTERM arrives completes fully, with ``[DONE]`` and no error;
    ``/ready`` answers 503 during the grace period; the process exits 0."""
    grace = 1.5
    gateway = start(shutdown_grace=grace, drain_timeout=10.0)
    body = chat(stream=True, max_tokens=40)  # 40 x 20 ms: still streaming after the signal
    async with client.post(f"{gateway.url}/v1/chat/completions", json=body) as resp:
        assert resp.status == 200
        before = await events_until(resp, lambda ev: len(tokens(ev)) >= 1)
        signalled = time.monotonic()
        gateway.proc.signal(signal.SIGTERM)
        await wait_ready_503(gateway, timeout=grace)
        assert time.monotonic() - signalled < grace
        after = await events_until(resp, lambda ev: False)
    events = before + after
    assert tokens(after), "the stream had finished before SIGTERM: nothing was tested"
    assert events[-1] == "[DONE]"
    assert errors(events) == []
    assert len(tokens(events)) == 40
    assert events[-2]["choices"][0]["finish_reason"] == "length"
    assert await exit_code(gateway) == 0
    assert "drained" in gateway.proc.output


async def test_new_request_during_grace_is_served(
    start: GatewayStarter, client: aiohttp.ClientSession
) -> None:
    """2. During the grace period (``/ready`` already 503) a new request is still served."""
    grace = 2.0
    gateway = start(shutdown_grace=grace, drain_timeout=10.0)
    signalled = time.monotonic()
    gateway.proc.signal(signal.SIGTERM)
    await wait_ready_503(gateway, timeout=grace)
    async with client.post(f"{gateway.url}/v1/chat/completions", json=chat(max_tokens=3)) as resp:
        assert resp.status == 200, await resp.text()
        answer = await resp.json()
    assert time.monotonic() - signalled < grace, "served, but only after the grace period"
    assert answer["choices"][0]["finish_reason"] == "length"
    assert len(answer["choices"][0]["message"]["content"].split()) == 3
    assert await exit_code(gateway) == 0


async def test_stalled_stream_ends_with_in_band_shutting_down_error(
    start: GatewayStarter, client: aiohttp.ClientSession
) -> None:
    """3. A stream that stalls in flight outlives ``drain_timeout``: it ends with exactly one
    in-band ``shutting_down`` error event then ``[DONE]``, and the process exits 0."""
    grace, drain = 0.2, 0.5
    gateway = start(shutdown_grace=grace, drain_timeout=drain)
    headers = {"X-Sim-Fault": "stall_after=2"}
    body = chat(stream=True, max_tokens=10)
    async with client.post(
        f"{gateway.url}/v1/chat/completions", json=body, headers=headers
    ) as resp:
        assert resp.status == 200
        before = await events_until(resp, lambda ev: len(tokens(ev)) >= 2)
        signalled = time.monotonic()
        gateway.proc.signal(signal.SIGTERM)
        after = await events_until(resp, lambda ev: False)
        ended = time.monotonic() - signalled
    assert tokens(after) == []
    assert after[-1] == "[DONE]"
    assert len(after) == 2, after
    assert errors(after) == [after[0]["error"]]
    error = after[0]["error"]
    assert error["code"] == "shutting_down"
    assert error["type"] == "server_error"
    assert set(error) == {"message", "type", "param", "code"}
    assert not any(e["choices"][0].get("finish_reason") for e in before if e.get("choices"))
    assert ended >= grace + drain - 2 * TIMER_SLACK, (  # two timers in a row
        f"aborted after {ended:.2f}s, before grace + drain_timeout"
    )
    assert await exit_code(gateway) == 0
    assert "aborting 1 requests" in gateway.proc.output


async def test_new_connection_refused_after_grace(
    start: GatewayStarter, client: aiohttp.ClientSession
) -> None:
    """4. After the grace period the gateway stops listening: a new connection is refused while
    the process is still alive, draining a stream. When that client leaves, the process exits 0
    without waiting for ``drain_timeout``."""
    grace, drain = 0.5, 30.0
    gateway = start(shutdown_grace=grace, drain_timeout=drain)
    headers = {"X-Sim-Fault": "stall_after=1"}
    resp = await client.post(
        f"{gateway.url}/v1/chat/completions", json=chat(stream=True), headers=headers
    )
    try:
        assert resp.status == 200
        await events_until(resp, lambda ev: len(tokens(ev)) >= 1)
        signalled = time.monotonic()
        gateway.proc.signal(signal.SIGTERM)
        await wait_ready_503(gateway, timeout=grace)
        deadline = signalled + grace + 10.0
        while await accepts_connections(gateway):
            assert time.monotonic() < deadline, "still accepting connections after the grace"
            await asyncio.sleep(0.01)
        refused = time.monotonic() - signalled
        assert gateway.proc.popen.poll() is None, "the process exited instead of draining"
        assert refused >= grace - TIMER_SLACK, (
            f"refused after {refused:.4f}s, within the grace period"
        )
    finally:
        resp.close()  # the client goes away: the drain has nothing left to wait for
    closed = time.monotonic()
    assert await exit_code(gateway) == 0
    assert time.monotonic() - closed < drain / 3
    assert "drained" in gateway.proc.output


async def test_kept_alive_connection_gets_503_after_grace(start: GatewayStarter) -> None:
    """5. A request that arrives after the grace period on a connection kept alive from before
    gets a clean 503 ``shutting_down`` (and the connection is closed)."""
    grace, drain = 0.3, 30.0
    gateway = start(shutdown_grace=grace, drain_timeout=drain)
    connector = aiohttp.TCPConnector(limit=1)
    async with (
        aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(20)) as kept,
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(20)) as other,
    ):
        async with kept.post(f"{gateway.url}/v1/chat/completions", json=chat()) as resp:
            assert resp.status == 200
            await resp.read()
        # A stream in flight keeps the process draining after the grace.
        stream = await other.post(
            f"{gateway.url}/v1/chat/completions",
            json=chat(stream=True),
            headers={"X-Sim-Fault": "stall_after=1"},
        )
        try:
            await events_until(stream, lambda ev: len(tokens(ev)) >= 1)
            gateway.proc.signal(signal.SIGTERM)
            await wait_for(lambda: "received SIGTERM" in gateway.proc.output, 5, "SIGTERM")
            deadline = time.monotonic() + grace + 10.0
            while await accepts_connections(gateway):
                assert time.monotonic() < deadline, "still accepting connections"
                await asyncio.sleep(0.01)
            async with kept.post(f"{gateway.url}/v1/chat/completions", json=chat()) as resp:
                assert resp.status == 503
                error = (await resp.json())["error"]
                assert resp.headers.get("Connection", "").lower() == "close"
            assert error["code"] == "shutting_down"
            assert "Retry-After" in resp.headers
        finally:
            stream.close()
    assert await exit_code(gateway) == 0


async def test_second_signal_skips_the_rest_of_the_grace(start: GatewayStarter) -> None:
    """6. A second signal skips what is left of the grace period: with nothing in flight the
    process exits 0 at once instead of after a long ``shutdown_grace``."""
    grace = 30.0
    gateway = start(shutdown_grace=grace, drain_timeout=30.0)
    gateway.proc.signal(signal.SIGTERM)
    await wait_ready_503(gateway, timeout=5.0)
    assert gateway.proc.popen.poll() is None, "exited before the second signal"
    second = time.monotonic()
    gateway.proc.signal(signal.SIGINT)
    assert await exit_code(gateway) == 0
    assert time.monotonic() - second < grace / 3
    assert "second signal" in gateway.proc.output
