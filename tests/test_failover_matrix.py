"""Failover on every fleet shape, over real sockets: failure kind x fleet shape -> what the
client sees, how many requests each server received (counted on the server side), and that
``gateway_retries_total`` and the access log's attempt count agree with that count.

Shapes:
- ``one``: one worker serving model ``a``;
- ``two-models``: one worker serving ``a`` and ``b``; ``a`` falls back to ``b`` (and, on a
  context-length error, to ``b`` as its longer-context model);
- ``two``: two workers of ``a``;
- ``service``: one URL standing for two servers (a Kubernetes Service): requests alternate
  between two pods behind one address.

The first request for ``a`` that reaches the first server (or pod) fails as the case says;
everything after it is answered normally. README's failover table is this matrix.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from tests.conftest import Gateway, GatewayFactory
from tests.helpers import sse_data
from tests.processes import HOST

pytestmark = pytest.mark.timeout(60)

# vLLM 0.32's context-length 400 (its words, its shape).
CONTEXT_400 = orjson.dumps(
    {
        "error": {
            "message": "This model's maximum context length is 1024 tokens. However, you "
            "requested 2000 tokens (1990 in the messages, 10 in the completion). Please "
            "reduce the length of the messages or completion.",
            "type": "BadRequestError",
            "param": None,
            "code": 400,
        }
    }
)

FAULTS = (
    "refused",
    "reset",
    "429",
    "429-retry-after",
    "503",
    "503-retry-after",
    "500",
    "first-token-timeout",
    "context-length",
    "cut",
    "stall",
)
SHAPES = ("one", "two-models", "two", "service")


@dataclass
class Faults:
    """The one fault of a case: met by the first request for ``a`` that reaches any server."""

    kind: str

    def take(self, model: str) -> str:
        if model != "a" or self.kind == "refused":
            return ""
        kind, self.kind = self.kind, ""
        return kind


@dataclass
class Pod:
    """One server, counting what it received per model."""

    name: str
    faults: Faults
    received: Counter[str] = field(default_factory=Counter)

    async def answer(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        model = body["model"]
        self.received[model] += 1
        fault = self.faults.take(model)
        if fault == "reset":
            assert request.transport is not None
            request.transport.abort()
            raise ConnectionResetError  # nothing more to do: the peer sees a reset
        if fault in ("429", "503", "500"):
            return web.json_response(_error(fault), status=int(fault))
        if fault in ("429-retry-after", "503-retry-after"):
            status = int(fault[:3])
            headers = {"Retry-After": "1"}
            return web.json_response(_error(str(status)), status=status, headers=headers)
        if fault == "context-length":
            return web.Response(status=400, body=CONTEXT_400, content_type="application/json")
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        if fault == "first-token-timeout":
            await _until_gone(request)
            return response
        await response.write(_chunk(model, self.name, "Hello", None))
        await response.write(_chunk(model, self.name, " there", None))
        if fault == "cut":
            assert request.transport is not None
            request.transport.abort()
            return response
        if fault == "stall":
            await _until_gone(request)
            return response
        await response.write(_chunk(model, self.name, "!", "stop"))
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response


async def _until_gone(request: web.Request) -> None:
    """Silent until the gateway gives up on the answer and closes the connection."""
    async with asyncio.timeout(30):
        while request.transport is not None and not request.transport.is_closing():
            await asyncio.sleep(0.02)


def _error(status: str) -> dict[str, Any]:
    return {"error": {"message": f"busy ({status})", "type": "x", "param": None, "code": status}}


def _chunk(model: str, pod: str, text: str, finish: str | None) -> bytes:
    choice = {"index": 0, "delta": {"content": text}, "finish_reason": finish}
    event = {"id": f"chatcmpl-{pod}", "object": "chat.completion.chunk", "model": model,
             "choices": [choice]}  # fmt: skip
    return b"data: " + orjson.dumps(event) + b"\n\n"


@dataclass
class Server:
    """An address: one pod, or several in turn (a Service)."""

    pods: list[Pod]
    turn: int = 0

    def app(self) -> web.Application:
        async def chat(request: web.Request) -> web.StreamResponse:
            pod = self.pods[self.turn % len(self.pods)]
            self.turn += 1
            return await pod.answer(request)

        async def health(_: web.Request) -> web.Response:
            return web.Response(text="ok")

        app = web.Application()
        app.router.add_post("/v1/chat/completions", chat)
        app.router.add_get("/health", health)
        return app


@dataclass
class Fleet:
    gateway: Gateway
    pods: list[Pod]


Start = Callable[[str, str], Awaitable[Fleet]]


@pytest.fixture
async def fleet(gateway: GatewayFactory) -> AsyncIterator[Start]:
    servers: dict[str, TestServer] = {}

    async def serve(server: Server) -> str:
        test_server = TestServer(server.app(), host=HOST)
        await test_server.start_server()
        url = str(test_server.make_url("")).rstrip("/")
        servers[url] = test_server
        return url

    async def start(shape: str, fault: str) -> Fleet:
        faults = Faults(fault)
        first, second = Pod("p0", faults), Pod("p1", faults)
        sections: dict[str, Any] = {
            "timeouts": {"queue": 0.5, "connect": 1.0, "first_token": 0.5, "idle": 0.5,
                         "total": 20.0},
            "retry": {"budget_min": 100, "backoff_base": 0.01, "backoff_max": 0.05},
            "logging": {"level": "INFO"},
            "routing": {"policy": "round_robin"},  # the lowest URL first, then in turn
        }  # fmt: skip
        if shape == "service":
            urls = [await serve(Server([first, second]))]
            workers: list[dict[str, Any]] = [{"url": urls[0], "models": ["a"]}]
        elif shape == "two":
            urls = [await serve(Server([first])), await serve(Server([second]))]
            workers = [{"url": url, "models": ["a"]} for url in urls]
        else:
            urls = [await serve(Server([first]))]
            models = ["a", "b"] if shape == "two-models" else ["a"]
            workers = [{"url": urls[0], "models": models}]
            if shape == "two-models":
                sections["fallbacks"] = {"a": ["b"]}
                sections["context_fallbacks"] = {"a": ["b"]}
        gw = await gateway(*workers, **sections)
        if fault == "refused":
            # It passed its probe and died: the first pick (the lowest URL) now refuses.
            await servers.pop(min(urls)).close()
        return Fleet(gw, [first, second] if shape in ("two", "service") else [first])

    yield start
    for server in servers.values():
        await server.close()


@dataclass(frozen=True)
class Seen:
    """What the client saw: the status, the error code (status or in-band) or the model that
    answered, and whether a stream ended cleanly."""

    status: int
    code: str | None
    model: str | None


async def ask(url: str) -> Seen:
    body = {"model": "a", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    async with (
        aiohttp.ClientSession() as session,
        session.post(url + "/v1/chat/completions", json=body) as response,
    ):
        raw = await response.read()
    if response.status != 200:
        return Seen(response.status, str(orjson.loads(raw)["error"]["code"]), None)
    events = [orjson.loads(d) for d in sse_data(raw) if d != "[DONE]"]
    errors = [e["error"]["code"] for e in events if "error" in e]
    if errors:
        return Seen(200, errors[0], None)
    assert sse_data(raw)[-1] == "[DONE]"
    return Seen(200, None, events[-1]["model"])


# (shape, fault) -> (what the client sees, requests received by the server that met the fault,
# then by the other one)
SERVED_A = Seen(200, None, "a")
SERVED_B = Seen(200, None, "b")
RETRIED = ("reset", "429", "429-retry-after", "503", "503-retry-after", "500",
           "first-token-timeout")  # fmt: skip
EXPECTED: dict[tuple[str, str], tuple[Seen, tuple[int, ...]]] = {}
for _shape in SHAPES:
    _two = _shape in ("two", "service")
    _once = (1, 0) if _two else (1,)
    for _fault in RETRIED:  # to the other pod, or to the same server again
        EXPECTED[(_shape, _fault)] = (SERVED_A, (1, 1) if _two else (2,))
    EXPECTED[(_shape, "cut")] = (Seen(200, "upstream_stream_truncated", None), _once)
    EXPECTED[(_shape, "stall")] = (Seen(200, "idle_timeout", None), _once)
    EXPECTED[(_shape, "context-length")] = (Seen(400, "400", None), _once)  # vLLM's own 400
    EXPECTED[(_shape, "refused")] = (
        Seen(502, "upstream_connect_error", None),
        (0, 0)[: len(_once)],
    )
# A fallback model on the same server: a failure of ``a`` moves to ``b`` there at once...
for _fault in (*RETRIED, "context-length"):
    EXPECTED[("two-models", _fault)] = (SERVED_B, (2,))
# ...but not while the server asked for time: then ``a`` again once that time has passed.
EXPECTED[("two-models", "429-retry-after")] = (SERVED_A, (2,))
EXPECTED[("two-models", "503-retry-after")] = (SERVED_A, (2,))
EXPECTED[("two", "refused")] = (SERVED_A, (0, 1))


@pytest.mark.parametrize("fault", FAULTS)
@pytest.mark.parametrize("shape", SHAPES)
async def test_failover_matrix(
    fleet: Start, shape: str, fault: str, caplog: pytest.LogCaptureFixture
) -> None:
    seen_expected, received_expected = EXPECTED[(shape, fault)]
    setup = await fleet(shape, fault)
    caplog.set_level(logging.INFO, logger="gateway.access")
    seen = await ask(setup.gateway.url)
    assert seen == seen_expected
    received = tuple(sorted((sum(p.received.values()) for p in setup.pods), reverse=True))
    if fault == "refused" and shape == "two":
        received = received[::-1]  # the one that refused received nothing
    assert received == received_expected
    sent = sum(received)
    records = [r for r in caplog.records if r.name == "gateway.access"]
    assert len(records) == 1
    attempts = records[0].attempts  # type: ignore[attr-defined]
    retries = sum(
        sample.value
        for metric in setup.gateway.registry.collect()
        for sample in metric.samples
        if sample.name == "gateway_retries_total"
    )
    if fault == "refused":
        assert (attempts, retries) == (1 if shape != "two" else 2, 0 if shape != "two" else 1)
    else:
        assert attempts == sent
        assert retries == sent - 1
