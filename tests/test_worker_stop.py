"""A worker that stops listening mid-answer: its answers are cut at the next health probe
instead of hanging until the idle timeout.

vLLM told to stop (SIGTERM) closes its listener first; a stream it was serving then ends with
``finish_reason: "abort"`` or, sometimes, just falls silent with its connection open. The
worker here does the second on purpose: it streams three tokens, closes its listening socket
(new connections are refused, as the gateway's probe finds) and keeps the stream open without
another byte.
"""

from __future__ import annotations

import asyncio
import time

import aiohttp
import orjson
import pytest

from tests.conftest import GatewayFactory
from tests.helpers import chat, sse_data

pytestmark = pytest.mark.timeout(30)

HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def token(i: int) -> bytes:
    body = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1,
            "model": "sim-model", "choices": [{"index": 0, "delta": {"content": f" t{i}"},
            "logprobs": None, "finish_reason": None}]}  # fmt: skip
    return b"data: " + orjson.dumps(body) + b"\n\n"


class SilentWorker:
    """Answers /health with 200 and a chat stream with three tokens, then stops listening."""

    def __init__(self) -> None:
        self.server: asyncio.Server | None = None
        self.silent = asyncio.Event()
        self.writers: list[asyncio.StreamWriter] = []

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.append(writer)
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            await reader.readexactly(length)
            if head.startswith(b"GET /health"):
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
                continue
            if not head.startswith(b"POST "):  # the load scrape's /metrics
                writer.write(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
                continue
            writer.write(HEAD + b"".join(chunk(token(i)) for i in range(3)))
            assert self.server is not None
            self.server.close()  # refuse new connections; this one stays open, silent
            for other in self.writers:  # idle keep-alive ones close, as uvicorn's do
                if other is not writer:
                    other.close()
            self.silent.set()
            await asyncio.Event().wait()  # cancelled when the test closes the connection

    def close(self) -> None:
        for writer in self.writers:
            writer.close()


async def test_a_stream_from_a_worker_that_stopped_listening_ends_at_the_next_probe(
    gateway: GatewayFactory,
) -> None:
    worker = SilentWorker()
    url = await worker.start()
    gw = await gateway(
        {"url": url, "models": ["sim-model"]},
        health={"interval": 0.2, "timeout": 1.0},
        timeouts={"idle": 20.0, "first_token": 5.0, "total": 25.0},
    )
    started = time.monotonic()
    try:
        async with (
            aiohttp.ClientSession() as session,
            session.post(gw.url + "/v1/chat/completions", json=chat(stream=True)) as r,
        ):
            raw = await r.read()
    finally:
        worker.close()
    took = time.monotonic() - started
    assert worker.silent.is_set()
    events = sse_data(raw)
    assert events[-1] == "[DONE]"
    error = orjson.loads(events[-2])["error"]
    assert error["code"] == "upstream_stream_truncated"
    assert took < 5.0, f"cut after {took:.1f}s: the idle timeout (20 s), not the probe"
