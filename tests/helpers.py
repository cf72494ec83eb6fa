"""Shared test helpers: condition waits with deadlines, SSE parsing, request bodies."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import orjson
from aiohttp import web
from aiohttp.test_utils import TestServer
from aiohttp.typedefs import Handler
from multidict import CIMultiDictProxy


async def wait_for(predicate: Callable[[], bool], timeout: float, what: str = "") -> None:
    """Poll ``predicate`` until true; fail the test if ``timeout`` seconds pass first."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s: {what}")
        await asyncio.sleep(0.002)


def chat(stream: bool = False, **fields: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": "sim-model",
        "messages": [{"role": "user", "content": "Tell me about gateways"}],
        "stream": stream,
    }
    body.update(fields)
    return body


def sse_data(raw: bytes) -> list[str]:
    """The ``data:`` payloads of a complete SSE body, in order."""
    out = []
    for block in raw.replace(b"\r\n", b"\n").split(b"\n\n"):
        lines = [ln[5:].lstrip(b" ") for ln in block.split(b"\n") if ln.startswith(b"data:")]
        if lines:
            out.append(b"\n".join(lines).decode())
    return out


def stream_text(raw: bytes) -> str:
    text = []
    for data in sse_data(raw):
        if data == "[DONE]":
            continue
        event = orjson.loads(data)
        for choice in event.get("choices", []):
            text.append(choice.get("delta", {}).get("content") or choice.get("text") or "")
    return "".join(text)


async def healthy(request: web.Request) -> web.Response:
    return web.Response()


def scripted_worker(chat_handler: Handler) -> web.Application:
    """A worker whose chat route is the test's own handler, with a passing /health probe."""
    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat_handler)
    app.router.add_get("/health", healthy)
    return app


@contextlib.asynccontextmanager
async def header_recorder() -> AsyncIterator[tuple[str, list[CIMultiDictProxy[str]]]]:
    """A worker on a real port that answers every chat request with an empty completion and
    keeps the headers of each: yields its URL and the list they are appended to."""
    seen: list[CIMultiDictProxy[str]] = []

    async def handler(request: web.Request) -> web.Response:
        seen.append(request.headers)
        return web.json_response({"id": "x", "object": "chat.completion", "choices": []})

    server = TestServer(scripted_worker(handler))
    await server.start_server()
    try:
        yield str(server.make_url("")).rstrip("/"), seen
    finally:
        await server.close()
