"""A request that fails leaves no reference cycle holding its body: what it held is freed when
it ends, not whenever the cyclic collector next runs (the serving process runs it rarely:
``server.YOUNG_GC_THRESHOLD``). An error's traceback holds the frames it went through, and
they hold the body; a frame that also holds the error (a retry keeps the last one) closes
the cycle."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest
from prometheus_client import CollectorRegistry

from tests.conftest import GatewayFactory, SimFactory
from tests.helpers import chat, wait_for

BODY_PAD = 300_000  # bytes of prompt: far more than anything else a request holds
REQUESTS = 6


def held_by_garbage() -> list[int]:
    """Sizes of the large bytes and strings that unreachable objects hold, after a collection
    that keeps what it found (``DEBUG_SAVEALL``) so its referents can be read."""
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        gc.collect()
        sizes = {
            id(r): len(r)
            for o in gc.garbage
            for r in gc.get_referents(o)
            if isinstance(r, bytes | bytearray | str) and len(r) >= BODY_PAD
        }
        return sorted(sizes.values())
    finally:
        gc.set_debug(0)
        gc.garbage.clear()


def answered(registry: CollectorRegistry) -> float:
    """Requests counted by ``gateway_requests_total``, whatever their labels."""
    return sum(
        sample.value
        for metric in registry.collect()
        if metric.name == "gateway_requests"
        for sample in metric.samples
        if sample.name == "gateway_requests_total"
    )


@pytest.fixture
def no_collector() -> Iterator[None]:
    """The cyclic collector off, so what the requests leave to it is still there to be found."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def padded(**fields: Any) -> dict[str, Any]:
    body = chat(**fields)
    body["messages"][0]["content"] += " " + "y" * BODY_PAD
    return body


CASES = {
    "the worker's 503": (padded(), {"X-Sim-Fault": "status=503"}),
    "the worker's 500, retried": (padded(), {"X-Sim-Fault": "status=500"}),
    "a stream cut after the commit": (
        padded(stream=True, max_tokens=10),
        {"X-Sim-Fault": "cut_after=3"},
    ),
}


@pytest.mark.parametrize("case", CASES)
async def test_a_failed_request_leaves_no_cycle_holding_its_body(
    case: str, gateway: GatewayFactory, sim: SimFactory, no_collector: None
) -> None:
    body, headers = CASES[case]
    worker, other = await sim(), await sim()
    gw = await gateway(worker, other)
    async with aiohttp.ClientSession() as session:
        for _ in range(REQUESTS):
            async with session.post(
                gw.url + "/v1/chat/completions", json=body, headers=headers
            ) as response:
                await response.read()
    # A request is counted at its handler's very end: a cut stream's client may read its
    # in-band error before that.
    await wait_for(lambda: answered(gw.registry) == REQUESTS, 10, "every handler ended")
    assert held_by_garbage() == []


async def test_a_client_that_leaves_leaves_no_cycle_holding_its_body(
    gateway: GatewayFactory, sim: SimFactory, no_collector: None
) -> None:
    gw = await gateway(await sim())
    labels = {
        "model": "sim-model", "route": "chat_completions",
        "status": "499", "code": "client_disconnected",
    }  # fmt: skip
    async with aiohttp.ClientSession() as session:
        for i in range(REQUESTS):
            response = await session.post(
                gw.url + "/v1/chat/completions",
                json=padded(stream=True, max_tokens=10),
                headers={"X-Sim-Fault": "stall_after=2"},
            )
            assert response.status == 200
            await response.content.readany()
            response.close()
            # Counted when its handler has ended.
            await wait_for(
                lambda n=i + 1: gw.metric("gateway_requests_total", **labels) == n,
                10,
                "the abandoned stream's handler ended",
            )
    assert held_by_garbage() == []
