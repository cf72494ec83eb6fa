"""The floor of any Python relay: what a request and an SSE event cost when Python does nothing
but carry them. `python -m tests.bench.floor --port N --upstream URL`.

No web framework and no task per request: uvloop, httptools (llhttp) on both sides, a pool of
keep-alive connections to the worker, and each read from the worker written to the client as
one HTTP/1.1 chunk inside the worker connection's ``data_received``, as ``gateway.pump`` does
after a stream's commit. No timeouts, limits, metrics, logs, retries, backpressure or checks
of any kind: it is no product, only the least work a proxy written in Python can do per
request and per event, to hold the gateway's figures and vllm-router's against. (The bare
aiohttp pass-through, ``passthrough.py``, is the floor with a framework.)
"""

from __future__ import annotations

import argparse
import asyncio
import socket
from typing import cast
from urllib.parse import urlsplit

import httptools
import uvloop


class Worker(asyncio.Protocol):
    """One keep-alive connection to the worker, carrying one request at a time."""

    def __init__(self, relay: Relay) -> None:
        self._relay = relay
        self._parser = httptools.HttpResponseParser(self)
        self._client: Client | None = None
        self._content_type = b"application/json"
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's: no asyncio subclass

    def send(self, client: Client, request: bytes) -> None:
        self._client = client
        assert self.transport is not None
        self.transport.write(request)

    def data_received(self, data: bytes) -> None:
        self._parser.feed_data(data)

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() == b"content-type":
            self._content_type = value

    def on_headers_complete(self) -> None:
        if self._client is not None:
            self._client.head(self._parser.get_status_code(), self._content_type)

    def on_body(self, body: bytes) -> None:
        if self._client is not None:
            self._client.chunk(body)

    def on_message_complete(self) -> None:
        client, self._client = self._client, None
        self._relay.idle.append(self)
        if client is not None:
            client.end()

    def connection_lost(self, exc: Exception | None) -> None:
        if self in self._relay.idle:
            self._relay.idle.remove(self)
        if self._client is not None:
            self._client.abort()


class Client(asyncio.Protocol):
    """One client connection: requests in, the worker's answers out."""

    def __init__(self, relay: Relay) -> None:
        self._relay = relay
        self._parser = httptools.HttpRequestParser(self)
        self._url = b""
        self._body: list[bytes] = []
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's: no asyncio subclass

    def data_received(self, data: bytes) -> None:
        self._parser.feed_data(data)

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_body(self, body: bytes) -> None:
        self._body.append(body)

    def on_message_complete(self) -> None:
        body = b"".join(self._body)
        request = (
            b"POST %b HTTP/1.1\r\nHost: %b\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%b" % (self._url, self._relay.host, len(body), body)
        )
        self._url, self._body = b"", []
        if self._relay.idle:
            self._relay.idle.pop().send(self, request)
        else:
            asyncio.get_running_loop().create_task(self._relay.connect(self, request))

    def head(self, status: int, content_type: bytes) -> None:
        assert self.transport is not None
        self.transport.write(
            b"HTTP/1.1 %d OK\r\nContent-Type: %b\r\nTransfer-Encoding: chunked\r\n\r\n"
            % (status, content_type)
        )

    def chunk(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(b"%x\r\n%b\r\n" % (len(data), data))

    def end(self) -> None:
        assert self.transport is not None
        self.transport.write(b"0\r\n\r\n")

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()


class Relay:
    def __init__(self, upstream: str) -> None:
        parts = urlsplit(upstream)
        self._address = (parts.hostname or "127.0.0.1", parts.port or 80)
        self.host = parts.netloc.encode()
        self.idle: list[Worker] = []

    async def connect(self, client: Client, request: bytes) -> None:
        loop = asyncio.get_running_loop()
        try:
            _, worker = await loop.create_connection(lambda: Worker(self), *self._address)
        except OSError:
            client.abort()
            return
        worker.send(client, request)


async def serve(port: int, upstream: str) -> None:
    relay = Relay(upstream)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: Client(relay), "127.0.0.1", port, family=socket.AF_INET, backlog=4096
    )
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.floor")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True)
    args = parser.parse_args()
    uvloop.run(serve(args.port, args.upstream))


if __name__ == "__main__":
    main()
