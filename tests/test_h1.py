"""The forwarding client (gateway/h1.py) against raw sockets that answer byte for byte what a
test scripts: framing (length, chunked, until close, 1xx), faults mapped to the gateway's
errors, keep-alive reuse and expiry, pool limits and their waiters, and flow control."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import pytest

from gateway import h1
from gateway.errors import (
    ConnectTimeout,
    StaleConnection,
    UpstreamBadResponse,
    UpstreamConnectError,
    UpstreamDisconnected,
)
from gateway.h1 import (
    DRAIN_LIMIT,
    HIGH_WATER,
    BadHTTP,
    Closed,
    ConnectFailed,
    ConnectTimedOut,
    Pool,
    PoolClosed,
    Response,
    StaleClose,
    TransportError,
    target,
)
from gateway.upstream import gateway_error
from tests.helpers import wait_for

Answer = Callable[[bytes, asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
HEADERS = b"X-Test: 1\r\n"


@dataclass
class RawServer:
    url: str
    connections: int = 0
    requests: list[bytes] = field(default_factory=list)
    closed: asyncio.Event = field(default_factory=asyncio.Event)  # a client went away


@contextlib.asynccontextmanager
async def raw_server(answer: Answer) -> AsyncIterator[RawServer]:
    """Reads each request (head and Content-Length body) and lets ``answer`` write bytes."""
    state = RawServer("")

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        state.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(
                    (
                        int(line.split(b":")[1])
                        for line in head.split(b"\r\n")
                        if line.lower().startswith(b"content-length:")
                    ),
                    0,  # a GET
                )
                request = head + await reader.readexactly(length)
                state.requests.append(request)
                await answer(request, reader, writer)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            state.closed.set()
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    state.url = f"http://127.0.0.1:{port}"
    try:
        yield state
    finally:
        server.close()


def pool(**kwargs: float) -> Pool:
    settings = {"limit": 8, "limit_per_host": 8, "keepalive": 30.0, "connect_timeout": 1.0}
    settings.update(kwargs)
    return Pool(**settings)  # type: ignore[arg-type]


async def read_all(response: Response) -> bytes:
    parts = []
    while chunk := await response.read_chunk():
        parts.append(chunk)
    return b"".join(parts)


def fixed(data: bytes) -> Answer:
    async def answer(_: bytes, __: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(data)

    return answer


def closing(*parts: bytes) -> Answer:
    """Writes each part (a read of its own, likely), then closes the connection."""

    async def answer(_: bytes, __: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for part in parts:
            writer.write(part)
            await writer.drain()
        writer.close()

    return answer


async def fetch(p: Pool, url: str) -> bytes:
    """One whole answer, its connection released."""
    resp = await p.request(url, "/", b"", b"")
    body = await read_all(resp)
    resp.release()
    return body


OK = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"


async def test_a_request_is_sent_whole_and_the_connection_kept() -> None:
    async with raw_server(fixed(OK)) as srv:
        p = pool()
        for _ in range(3):
            resp = await p.request(srv.url, "/v1/x", HEADERS, b'{"a":1}')
            assert (resp.status, resp.content_length) == (200, 2)
            assert resp.headers["content-type"] == "application/json"
            assert await read_all(resp) == b"{}"
            resp.release()
        await p.close()
    assert srv.connections == 1
    host = srv.url.removeprefix("http://")
    assert (
        srv.requests[0]
        == (
            f"POST /v1/x HTTP/1.1\r\nHost: {host}\r\nContent-Length: 7\r\nX-Test: 1\r\n\r\n"
            '{"a":1}'
        ).encode()
    )


async def test_chunked_bodies_are_decoded_and_the_connection_reused() -> None:
    answer = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"6\r\ndata: \r\n8\r\n{}\n\nmore\r\n0\r\n\r\n"
    )
    async with raw_server(fixed(answer)) as srv:
        p = pool()
        for _ in range(2):
            assert await fetch(p, srv.url) == b"data: {}\n\nmore"
        await p.close()
    assert srv.connections == 1


async def test_a_body_without_length_ends_with_the_connection_and_is_not_reused() -> None:
    async with raw_server(closing(b"HTTP/1.1 200 OK\r\n\r\npart one, ", b"part two")) as srv:
        p = pool()
        for _ in range(2):
            assert await fetch(p, srv.url) == b"part one, part two"
        await p.close()
    assert srv.connections == 2


async def test_informational_answers_are_skipped() -> None:
    async with raw_server(fixed(b"HTTP/1.1 100 Continue\r\n\r\n" + OK)) as srv:
        p = pool()
        resp = await p.request(srv.url, "/", b"", b"")
        assert resp.status == 200
        assert await read_all(resp) == b"{}"
        await p.close()


@pytest.mark.parametrize(
    ("answer", "error"),
    [
        (b"SMTP ready\r\n\r\n", BadHTTP),
        (b"HTTP/1.1 200 OK\r\nX: " + b"y" * 70_000, BadHTTP),
        (
            b"HTTP/1.1 101 Switching\r\nConnection: upgrade\r\nUpgrade: h2c\r\n\r\n",
            BadHTTP,
        ),
        (b"HTTP/1.1 200 O", Closed),
    ],
    ids=["not http", "oversized headers", "upgrade", "cut in the head"],
)
async def test_a_broken_head_is_the_workers_fault(answer: bytes, error: type[Exception]) -> None:
    async with raw_server(closing(answer)) as srv:
        p = pool()
        with pytest.raises(error):
            await p.request(srv.url, "/", b"", b"")
        assert p._total == 0  # the connection is not kept
        await p.close()


async def test_a_cut_body_gives_its_bytes_then_fails() -> None:
    async with raw_server(closing(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhello")) as srv:
        p = pool()
        resp = await p.request(srv.url, "/", b"", b"")
        assert await resp.read_chunk() == b"hello"
        with pytest.raises(Closed):
            await resp.read_chunk()
        resp.release()
        assert p._total == 0
        await p.close()


async def test_closing_a_response_mid_body_closes_the_connection_the_worker_sees_it() -> None:
    async def endless(_: bytes, __: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
        await w.drain()

    async with raw_server(endless) as srv:
        p = pool()
        resp = await p.request(srv.url, "/", b"", b"")
        assert await resp.read_chunk() == b"hello"
        resp.close()
        await asyncio.wait_for(srv.closed.wait(), 5)
        await p.close()


def end_held(gate: asyncio.Event, tail: bytes = b"0\r\n\r\n") -> Answer:
    """A chunked answer whose ``tail`` waits for ``gate``, as vLLM writes a stream's chunked
    terminator after its ``[DONE]`` event."""

    async def answer(_: bytes, __: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n6\r\n[DONE]\r\n")
        await w.drain()
        await gate.wait()
        w.write(tail)

    return answer


async def released_at_done(p: Pool, url: str, drain: bool = True) -> None:
    resp = await p.request(url, "/", b"", b"")
    assert await resp.read_chunk() == b"[DONE]"
    resp.release(drain=drain)  # the reader knows the stream is over; the body's end is not in


async def test_a_response_released_before_its_end_is_kept_once_the_end_arrives() -> None:
    gate = asyncio.Event()
    async with raw_server(end_held(gate)) as srv:
        p = pool()
        await released_at_done(p, srv.url)
        assert p.kept(srv.url) == 0
        gate.set()
        await wait_for(lambda: p.kept(srv.url) == 1, 5, "kept at the body's end")
        assert await fetch(p, srv.url) == b"[DONE]"
        await p.close()
    assert srv.connections == 1


async def test_a_response_released_without_drain_before_its_end_is_closed() -> None:
    gate = asyncio.Event()
    async with raw_server(end_held(gate)) as srv:
        p = pool()
        await released_at_done(p, srv.url, drain=False)  # e.g. a shard answer cut at its limit
        assert p._total == 0
        gate.set()
        await asyncio.wait_for(srv.closed.wait(), 5)
        await p.close()


async def test_a_released_response_whose_end_does_not_come_is_closed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(h1, "DRAIN_TIMEOUT", 0.05)
    gate = asyncio.Event()
    async with raw_server(end_held(gate)) as srv:
        p = pool()
        await released_at_done(p, srv.url)
        await wait_for(lambda: p._total == 0, 5, "closed after DRAIN_TIMEOUT")
        gate.set()  # the end comes too late: the connection is gone
        await asyncio.wait_for(srv.closed.wait(), 5)
        await p.close()


async def test_a_released_response_with_much_more_body_is_closed() -> None:
    gate = asyncio.Event()
    more = b"%x\r\n%s\r\n0\r\n\r\n" % (DRAIN_LIMIT + 1, b"x" * (DRAIN_LIMIT + 1))
    async with raw_server(end_held(gate, more)) as srv:
        p = pool()
        await released_at_done(p, srv.url)
        gate.set()
        await asyncio.wait_for(srv.closed.wait(), 5)
        assert p._total == 0
        await p.close()


async def test_an_idle_connection_the_worker_closed_is_not_used_again() -> None:
    async with raw_server(closing(OK)) as srv:  # as uvicorn does after its keep-alive timeout
        p = pool()
        assert await fetch(p, srv.url) == b"{}"
        await wait_for(lambda: p._total == 0, 5, "the pool noticed the close")
        assert await fetch(p, srv.url) == b"{}"
        await p.close()
    assert srv.connections == 2


async def test_a_kept_connection_closed_as_the_request_went_is_never_sent_again() -> None:
    """The worker read the second request and closed unanswered: the pool says so with its own
    error and does not send it again (the proxy decides, counted, whether to retry)."""
    served = 0

    async def first_only(_: bytes, __: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        nonlocal served
        served += 1
        if served == 2:  # the second request, on the kept connection: closed unanswered
            w.transport.abort()
            return
        w.write(OK)

    async with raw_server(first_only) as srv:
        p = pool()
        assert await fetch(p, srv.url) == b"{}"
        with pytest.raises(StaleClose):
            await fetch(p, srv.url)
        await p.close()
    assert (served, srv.connections) == (2, 1)


async def test_a_kept_connection_with_an_unread_close_is_not_reused() -> None:
    """The worker closed the kept connection before the next request, and the loop has not
    run the close's callback yet: the readability check sees it, and a new connection is
    used. Nothing is sent on the dead one."""
    gate = asyncio.Event()
    gone = asyncio.Event()

    async def close_when_told(_: bytes, __: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        if gate.is_set():
            w.write(OK)
            return
        w.write(OK)
        await w.drain()
        await gate.wait()
        w.transport.close()
        gone.set()

    async with raw_server(close_when_told) as srv:
        p = pool()
        assert await fetch(p, srv.url) == b"{}"
        (conn,) = p._idle[srv.url]
        # Hold back the callbacks that would tell the pool: only the kernel knows.
        conn.transport.pause_reading()
        gate.set()
        await asyncio.wait_for(gone.wait(), 5)
        assert not conn.lost
        # Sent on the dead connection instead, it would wait for an answer forever.
        assert await asyncio.wait_for(fetch(p, srv.url), 5) == b"{}"
        await p.close()
    assert srv.connections == 2
    assert len(srv.requests) == 2


async def test_a_new_connection_closed_unanswered_is_the_workers_fault() -> None:
    async def hang_up(_: bytes, __: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.transport.abort()

    async with raw_server(hang_up) as srv:
        p = pool()
        with pytest.raises(Closed):
            await p.request(srv.url, "/", b"", b"")
        await p.close()
    assert srv.connections == 1


async def test_idle_connections_expire_after_keepalive() -> None:
    async with raw_server(fixed(OK)) as srv:
        p = pool(keepalive=0.05)
        resp = await p.request(srv.url, "/", b"", b"")
        await read_all(resp)
        resp.release()
        assert p._total == 1
        await asyncio.wait_for(srv.closed.wait(), 5)
        assert p._total == 0
        await p.close()


async def test_a_full_worker_pool_queues_in_order_and_bounds_the_wait() -> None:
    async with raw_server(fixed(OK)) as srv:
        p = pool(limit_per_host=1, connect_timeout=0.3)
        first = await p.request(srv.url, "/", b"", b"")
        second = asyncio.create_task(p.request(srv.url, "/", b"", b""))
        third = asyncio.create_task(p.request(srv.url, "/", b"", b""))
        await wait_for(lambda: len(p._waiters) == 2, 5, "both wait for the slot")
        await read_all(first)
        first.release()  # the slot is handed to the second ...
        second.cancel()  # ... which leaves before it takes it: the third gets it
        resp = await asyncio.wait_for(third, 5)
        assert await read_all(resp) == b"{}"
        # Held, the slot is not free: the next request's wait ends at connect_timeout.
        with pytest.raises(ConnectTimedOut):
            await p.request(srv.url, "/", b"", b"")
        resp.release()
        await p.close()
    assert srv.connections == 1


async def test_a_full_gateway_pool_closes_another_workers_idle_connection() -> None:
    async with raw_server(fixed(OK)) as a, raw_server(fixed(OK)) as b:
        p = pool(limit=1)
        resp = await p.request(a.url, "/", b"", b"")
        await read_all(resp)
        resp.release()
        resp = await asyncio.wait_for(p.request(b.url, "/", b"", b""), 5)
        assert await read_all(resp) == b"{}"
        await asyncio.wait_for(a.closed.wait(), 5)
        await p.close()


async def test_a_refused_connection_is_a_connect_error() -> None:
    async with raw_server(fixed(OK)) as srv:
        url = srv.url
    p = pool()
    with pytest.raises(ConnectFailed) as refused:
        await p.request(url, "/", b"", b"")
    assert refused.value.refused
    assert p._total == 0
    await p.close()


async def test_a_reader_that_falls_behind_pauses_the_socket() -> None:
    size = 8 * HIGH_WATER
    answer = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size + b"x" * size
    async with raw_server(fixed(answer)) as srv:
        p = pool()
        resp = await p.request(srv.url, "/", b"", b"")
        conn = resp._conn
        assert conn is not None
        await wait_for(lambda: conn.paused, 5, "reading paused")
        assert conn.buffered <= 2 * HIGH_WATER
        assert len(await read_all(resp)) == size
        resp.release()
        assert p._total == 1  # read whole: kept
        await p.close()


def test_targets_are_parsed_once_with_default_ports() -> None:
    assert (target("http://w:8000").host, target("http://w:8000").port) == ("w", 8000)
    assert (target("https://w").port, target("https://w").https) == (443, True)
    six = target("http://[::1]:9000")
    assert (six.host, six.port, six.host_header) == ("::1", 9000, "[::1]:9000")
    with pytest.raises(ValueError):
        target("ftp://w")


async def test_a_get_has_no_body_and_reuses_the_connection() -> None:
    """Probes and scrapes are GETs on the same client: no Content-Length, the answer read
    whole, the connection kept for the next one."""

    async def answer(request: bytes, reader: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

    async with raw_server(answer) as server:
        p = pool()
        for _ in range(2):
            resp = await p.request(server.url, "/health", b"", b"", method="GET")
            assert (resp.status, await read_all(resp)) == (200, b"ok")
            resp.release()
        assert server.connections == 1
        host = server.url.removeprefix("http://")
        assert server.requests[0] == f"GET /health HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()
        await p.close()


async def test_an_https_worker_without_its_tls_settings_is_a_bug_not_a_default() -> None:
    p = pool()
    with pytest.raises(ValueError, match="needs its TLS settings"):
        await p.request("https://127.0.0.1:9", "/health", b"", b"", method="GET")
    await p.close()


@pytest.mark.parametrize(
    ("transport", "gateway", "retryable"),
    [
        (ConnectFailed(refused=True), UpstreamConnectError, True),
        (ConnectTimedOut(), ConnectTimeout, True),
        (PoolClosed(), UpstreamConnectError, True),
        (Closed(), UpstreamDisconnected, True),
        (StaleClose(), StaleConnection, True),
        (BadHTTP("The model worker sent oversized headers."), UpstreamBadResponse, False),
    ],
)
def test_each_transport_error_has_one_gateway_error(
    transport: TransportError, gateway: type, retryable: bool
) -> None:
    """The pool raises its own family; ``upstream.gateway_error`` is the one mapping."""
    err = gateway_error(transport)
    assert type(err) is gateway
    assert err.retryable is retryable
    if isinstance(transport, ConnectFailed):
        assert isinstance(err, UpstreamConnectError) and err.refused
    if isinstance(transport, BadHTTP):
        assert err.message == "The model worker sent oversized headers."
