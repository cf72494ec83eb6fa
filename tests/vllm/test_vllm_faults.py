"""Real vLLM workers failing under the gateway: killed mid-stream (API server, engine), told
to stop (SIGTERM, which ends streams with ``finish_reason: "abort"``), and clients that leave.

Resume scenarios (numbered as in the issue):
1. SIGKILL of the API server mid-stream: the connection breaks; the stream goes on elsewhere.
2. SIGKILL of the engine core: the API server ends the stream with an error, then exits.
3. SIGTERM: vLLM aborts requests in flight (``abort`` ending) or falls silent.
In each, the victim streams several tokens per chunk (``--stream-interval 3``), and the
client's text must equal an uninterrupted greedy run, with exact usage.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import orjson
import pytest

from tests.conftest import Gateway, GatewayFactory
from tests.helpers import sse_data, wait_for
from tests.vllm.compare import TIMEOUT, text_of, usage_of
from tests.vllm.conftest import VLLMFleet, worker_entry
from tests.vllm.fleet import MODEL, VLLMWorker

pytestmark = pytest.mark.timeout(300)

PROMPT = [{"role": "user", "content": "Tell me a long story about a gateway and its workers"}]
# Long enough that the kill lands mid-answer; ignore_eos so every run is exactly this long.
LONG = 900
# A whole 900-token answer, resumed after a kill: a SIGKILLed API server leaves its engine
# generating on the same two cores, and the full suite ran one past 60 s. The gateway's own
# total bound is 120 s.
STREAM_TIMEOUT = aiohttp.ClientTimeout(total=150)
# The gateway's idle bound in the resume tests. With that orphaned engine on the same cores the
# surviving worker once paused more than 5 s mid-continuation (make test, 2026-12-06: the
# text equal to an uninterrupted run up to the pause, then idle_timeout). Every kill here is
# found by the connection or the stream ending, not by this bound; the tests are about the
# continuation's text.
RESUME_IDLE = 15.0


def long_chat(**fields: Any) -> dict[str, Any]:
    return {
        "model": MODEL, "messages": PROMPT, "max_tokens": LONG, "temperature": 0,
        "ignore_eos": True, "stream": True, **fields,
    }  # fmt: skip


async def vllm_metric(session: aiohttp.ClientSession, worker: VLLMWorker, name: str) -> float:
    """Sum of a vLLM metric's samples (every label set) on one worker."""
    async with session.get(worker.url + "/metrics", timeout=TIMEOUT) as response:
        text = await response.text()
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            total += float(line.rsplit(" ", 1)[1])
    return total


async def resilient_gateway(gateway: GatewayFactory, vllm: VLLMFleet) -> Gateway:
    """Both workers, the victim (chunky: it has the lower URL) picked first by round-robin."""
    assert vllm.chunky.url < vllm.plain.url
    return await gateway(
        worker_entry(vllm.chunky),
        worker_entry(vllm.plain),
        routing={"policy": "round_robin"},
        resume={"enabled": True},
        timeouts={
            "queue": 0.5,
            "connect": 1.0,
            "first_token": 20.0,
            "idle": RESUME_IDLE,
            "total": 120,
        },
    )


def kill_api(worker: VLLMWorker) -> None:
    worker.signal_api(signal.SIGKILL)


def kill_engine(worker: VLLMWorker) -> None:
    worker.kill_engine()


def term(worker: VLLMWorker) -> None:
    worker.signal_api(signal.SIGTERM)


@pytest.mark.parametrize("usage", [True, False], ids=["usage", "no-usage"])
@pytest.mark.parametrize(
    "kill", [kill_api, kill_engine, term], ids=["sigkill-api", "sigkill-engine", "sigterm"]
)
async def test_resume_after_the_worker_dies_equals_an_uninterrupted_run(
    vllm: VLLMFleet,
    gateway: GatewayFactory,
    kill: Callable[[VLLMWorker], None],
    usage: bool,
) -> None:
    options = {"stream_options": {"include_usage": True}} if usage else {}
    async with aiohttp.ClientSession() as session:
        _, reference = await read_stream(session, vllm.plain.url, long_chat(**options))
        gw, raw = await interrupted(
            vllm, lambda: resilient_gateway(gateway, vllm), kill, long_chat(**options), 10
        )
    assert text_of(bytes(raw)) == text_of(reference)
    events = [orjson.loads(d) for d in sse_data(bytes(raw)) if d != "[DONE]"]
    reasons = [c.get("finish_reason") for e in events for c in e.get("choices") or ()]
    assert [r for r in reasons if r is not None] == ["length"]
    assert sse_data(bytes(raw))[-1] == "[DONE]"
    if usage:
        assert usage_of(bytes(raw)) == usage_of(reference)
    else:
        assert usage_of(bytes(raw)) is None
        assert "system_fingerprint" in events[-1]
    assert all(c.get("token_ids") is None for e in events for c in e.get("choices") or ())
    assert "prompt_token_ids" not in events[0] or events[0]["prompt_token_ids"] is None
    assert gw.metric("gateway_stream_resumes_total", model=MODEL, outcome="resumed") == 1


async def interrupted(
    vllm: VLLMFleet,
    start: Callable[[], Awaitable[Gateway]],
    kill: Callable[[VLLMWorker], None],
    body: dict[str, Any],
    after: int,
) -> tuple[Gateway, bytes]:
    """Stream ``body`` through a gateway from ``start`` and kill the victim (chunky) once the
    client has ``after`` events; the gateway and the whole answer the client got.

    On a loaded machine the client, and the gateway in this process, can lag seconds behind
    vLLM, which then finishes the answer before the kill lands: the gateway saw no failure of
    the victim, and nothing was tested. That run is thrown away and the scenario run again
    (the victim restarted), at most three times."""
    for _ in range(3):
        gw = await start()
        raw = bytearray()
        killed = False
        async with (
            aiohttp.ClientSession() as session,
            session.post(
                gw.url + "/v1/chat/completions", json=body, timeout=STREAM_TIMEOUT
            ) as response,
        ):
            assert response.status == 200
            async for chunk in response.content.iter_any():
                raw += chunk
                if not killed and raw.count(b"\n\n") >= after:
                    kill(vllm.chunky)
                    killed = True
        assert killed
        if victim_failures(gw, vllm.chunky) > 0:
            return gw, bytes(raw)
        await asyncio.to_thread(vllm.revive)
    raise AssertionError("three times, the victim finished the answer before its kill landed")


def victim_failures(gw: Gateway, victim: VLLMWorker) -> float:
    """Failed attempts on the victim the gateway counted, whatever their kind."""
    return sum(
        sample.value
        for family in gw.registry.collect()
        if family.name == "gateway_upstream_errors"
        for sample in family.samples
        if sample.name.endswith("_total") and sample.labels.get("worker") == victim.url
    )


async def read_stream(
    session: aiohttp.ClientSession, url: str, body: dict[str, Any]
) -> tuple[int, bytes]:
    async with session.post(
        url + "/v1/chat/completions", json=body, timeout=STREAM_TIMEOUT
    ) as response:
        return response.status, await response.read()


async def test_sigterm_without_resume_is_an_error_never_a_complete_answer(
    vllm: VLLMFleet, gateway: GatewayFactory
) -> None:
    """Without resume, vLLM's ``abort`` ending after SIGTERM reaches the client as an in-band
    error, not as a finished answer (and not as a 200 in the gateway's metrics)."""

    def start() -> Awaitable[Gateway]:
        return gateway(worker_entry(vllm.chunky), timeouts={"idle": 5.0, "total": 120})

    gw, raw = await interrupted(vllm, start, term, long_chat(), 3)
    events = [orjson.loads(d) for d in sse_data(bytes(raw)) if d != "[DONE]"]
    assert "error" in events[-1], (len(events), events[-3:])
    assert all(c.get("finish_reason") != "abort" for e in events for c in e.get("choices") or ())
    assert gw.metric("gateway_requests_total", model=MODEL, route="chat_completions",
                     status="200", code=events[-1]["error"]["code"]) == 1  # fmt: skip


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "json"])
async def test_a_client_that_leaves_aborts_the_request_in_vllm(
    vllm: VLLMFleet, gateway: GatewayFactory, stream: bool
) -> None:
    gw = await gateway(worker_entry(vllm.plain))
    worker = vllm.plain
    async with aiohttp.ClientSession() as probe:
        aborted = "vllm:request_success_total"
        before = await vllm_metric(probe, worker, aborted)
        async with aiohttp.ClientSession() as client:
            body = long_chat(stream=stream, max_tokens=900)

            async def call() -> None:
                async with client.post(gw.url + "/v1/chat/completions", json=body) as response:
                    await response.read()

            request = asyncio.create_task(call())
            running = 0.0

            async def is_running() -> bool:
                nonlocal running
                running = await vllm_metric(probe, worker, "vllm:num_requests_running")
                return running >= 1

            await poll(is_running, 30, "the request is running in vLLM")
            request.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await request
        await poll(
            lambda: zero(probe, worker), 3, "vLLM stopped the request within 3 s of the client"
        )
        # Not finished: aborted (vLLM counts only finished requests as successes).
        assert await vllm_metric(probe, worker, aborted) == before
    await wait_for(lambda: gw.app_lifecycle_active() == 0, 5, "the gateway let the request go")


async def zero(session: aiohttp.ClientSession, worker: VLLMWorker) -> bool:
    return await vllm_metric(session, worker, "vllm:num_requests_running") == 0


async def poll(check: Callable[[], Any], timeout: float, what: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await check():
        if loop.time() > deadline:
            raise AssertionError(f"not within {timeout}s: {what}")
        await asyncio.sleep(0.05)


async def test_a_killed_worker_is_ejected_and_taken_back_after_its_restart(
    vllm: VLLMFleet, gateway: GatewayFactory
) -> None:
    gw = await gateway(
        worker_entry(vllm.plain),
        worker_entry(vllm.chunky),
        health={"interval": 0.5, "timeout": 1.0, "failures_to_eject": 2, "ejection_time": 1.0},
    )
    body = {"model": MODEL, "messages": PROMPT, "max_tokens": 4, "temperature": 0}
    victim = next(w for w in gw.fleet.pool(MODEL) if w.url == vllm.chunky.url)
    async with aiohttp.ClientSession() as session:
        await asyncio.to_thread(vllm.chunky.stop)
        for _ in range(6):  # every request is served: the dead worker is failed over
            async with session.post(
                gw.url + "/v1/chat/completions", json=body, timeout=TIMEOUT
            ) as response:
                assert response.status == 200
        await wait_for(lambda: not victim.in_rotation, 10, "the dead worker is ejected")
        await asyncio.to_thread(vllm.chunky.restart)
        await wait_for(lambda: victim.in_rotation, 20, "the restarted worker is back")
        before = await vllm_metric(session, vllm.chunky, "vllm:request_success_total")
        for _ in range(6):
            async with session.post(
                gw.url + "/v1/chat/completions", json=body, timeout=TIMEOUT
            ) as response:
                assert response.status == 200
        assert await vllm_metric(session, vllm.chunky, "vllm:request_success_total") > before
