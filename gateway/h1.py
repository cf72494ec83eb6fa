"""The hot-path HTTP/1.1 client towards workers: a bounded pool of keep-alive connections per
worker, one socket write per request, and responses parsed by httptools (llhttp, the parser
Node.js uses) straight into a body buffer that pauses the socket when nobody reads it.

Why not aiohttp's client: on the gateway's profile it was a third of the event loop's CPU for a
small JSON request (building a ``ClientRequest``, merging headers, a ``ClientResponse``, a
``StreamReader``); here a request is one bytes join and a response a handful of callbacks.
aiohttp still serves the clients and carries pass-through requests; this module forwards,
probes and scrapes (GET), so the probes test the very client and TLS settings that carry the
traffic.

The semantics the proxy relies on:
- ``Pool.request`` returns once the status line and headers are in; connecting (and waiting for
  a pool slot) is bounded by ``connect_timeout``, the rest by the caller's own timeouts.
- ``Response.read_chunk`` returns the body bytes buffered so far (chunked coding removed), b""
  at its end; a cut or malformed body raises ``Closed``/``BadHTTP``
  once the bytes before the fault are read.
- ``Response.divert`` hands the body to a callback instead, called inside the connection's own
  ``data_received`` with what each read brought (``gateway.pump``: a committed stream's events go
  to the client without waking a task per event); its reader then waits with ``wait`` for the
  body's end, a failure, or the callback's own ``wake``, and pushes back with ``pause``.
- ``Response.release`` puts a keep-alive connection back once its body has ended, else closes
  it; ``release(drain=True)``, for a reader that stopped at an end it knows (a stream's
  ``[DONE]`` event, whose chunked terminator vLLM writes separately), lets the rest arrive in
  the background: up to ``DRAIN_LIMIT`` bytes within ``DRAIN_TIMEOUT``, else the connection is
  closed. ``close`` closes it, which is what tells vLLM to abort the request.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import functools
import select
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import httptools
import yarl
from multidict import CIMultiDict, CIMultiDictProxy

if TYPE_CHECKING:
    from gateway.tls import ClientTls


class TransportError(Exception):
    """A failure of the connection to a worker. Its own family, so that what the client
    sees is decided in one place (``upstream.gateway_error``), never here."""


class ConnectFailed(TransportError):
    """No connection: refused (nothing listens at the address), unreachable, or a TLS
    handshake or certificate check that failed."""

    def __init__(self, refused: bool = False) -> None:
        super().__init__("connect failed")
        self.refused = refused


class ConnectTimedOut(TransportError):
    """No connection (or pool slot) within the connect timeout."""


class PoolClosed(TransportError):
    """The pool is closing: the gateway is shutting down."""


class Closed(TransportError):
    """The worker closed or reset the connection before its answer was whole."""


class StaleClose(Closed):
    """A kept connection closed as the request went out, not a byte back."""


class BadHTTP(TransportError):
    """The worker's bytes are not an HTTP/1.1 response we can read."""


# A status line and headers larger than this are not a worker's answer.
HEAD_LIMIT = 64 * 1024
# Body bytes buffered and not yet read before the socket stops being read (TCP then pushes
# back on the worker); reading resumes once the reader took them.
HIGH_WATER = 256 * 1024

# After ``release`` of a response whose body has not ended yet: how long and how many more body
# bytes the connection may take to reach the end before it is closed instead of kept.
DRAIN_TIMEOUT = 1.0
DRAIN_LIMIT = 64 * 1024

# Called with the worker's base URL and the seconds a new connection took.
ConnectObserver = Callable[[str, float], None]
# Called with the worker's base URL and why a new connection to it failed (refused, TLS, ...).
ConnectFailureObserver = Callable[[str, OSError], None]


@dataclass(frozen=True, slots=True)
class Target:
    """Where a worker's base URL connects to, parsed once."""

    host: str
    port: int
    host_header: str
    https: bool  # the caller gives the TLS context: one per setting, not one per URL


@functools.lru_cache(maxsize=1024)
def target(base: str) -> Target:
    url = yarl.URL(base)
    if url.scheme not in ("http", "https") or not url.host or url.port is None:
        raise ValueError(f"not an http(s) URL: {base!r}")
    https = url.scheme == "https"
    return Target(url.host, url.port, url.host_port_subcomponent or url.host, https)


class Response:
    """One response's status, headers and body; read it, then ``release`` or ``close``."""

    __slots__ = ("_conn", "_headers", "_raw_headers", "content_length", "content_type", "status")

    def __init__(self, conn: _Connection) -> None:
        self._conn: _Connection | None = conn
        self.status = conn.status
        self.content_length = conn.content_length
        self.content_type = conn.content_type
        self._raw_headers = conn.raw_headers
        self._headers: CIMultiDictProxy[str] | None = None

    @property
    def headers(self) -> CIMultiDictProxy[str]:
        if self._headers is None:
            self._headers = CIMultiDictProxy(
                CIMultiDict(
                    (n.decode("utf-8", "surrogateescape"), v.decode("utf-8", "surrogateescape"))
                    for n, v in self._raw_headers
                )
            )
        return self._headers

    async def read_chunk(self) -> bytes:
        conn = self._conn
        if conn is None:
            return b""
        while True:
            chunks = conn.chunks
            if chunks:
                conn.chunks = []
                conn.buffered = 0
                conn.unpause()
                return chunks[0] if len(chunks) == 1 else b"".join(chunks)
            if conn.error is not None:
                raise conn.error
            if conn.complete:
                return b""
            await conn.wait()

    def divert(self, sink: Callable[[bytes], None]) -> bytes:
        """From now on the body goes to ``sink`` inside the protocol callback, what each read
        brought in one call, instead of the buffer; returns what the buffer held, which the
        caller hands on first (nothing arrives in between: there is no await here). ``sink``
        must not raise."""
        conn = self._conn
        if conn is None:
            return b""
        held = b"".join(conn.chunks)
        conn.chunks = []
        conn.buffered = 0
        conn.sink = sink
        conn.unpause()
        return held

    def ended(self) -> bool:
        """The body is whole (all of it went to the reader or the sink); raises the transport's
        error if the body was cut or malformed."""
        conn = self._conn
        if conn is None:
            return True
        if conn.error is not None:
            raise conn.error
        return conn.complete

    async def wait(self) -> None:
        """Until the body ends or fails, or a sink calls ``wake``."""
        conn = self._conn
        if conn is not None and conn.error is None and not conn.complete:
            await conn.wait()

    def wake(self) -> None:
        if self._conn is not None:
            self._conn._wake()

    def pause(self) -> None:
        """Stop reading the worker's socket (TCP pushes back on it) until ``resume``."""
        conn = self._conn
        if conn is not None and not conn.paused and not conn.lost:
            conn.paused = True
            conn.transport.pause_reading()

    def resume(self) -> None:
        if self._conn is not None:
            self._conn.unpause()

    def release(self, drain: bool = False) -> None:
        """Done with the response: its connection is kept if the body has ended, else closed;
        with ``drain`` (the reader stopped at an end of its own, a stream's ``[DONE]``), the
        rest of the body may still come, within bounds, and the connection is kept then."""
        conn, self._conn = self._conn, None
        if conn is None:
            return
        if conn.sink is not None:
            conn.sink = None
            conn.unpause()  # a sink's pause: the rest must be read, to drain or to see an end
        if not drain or conn.complete or conn.error is not None or conn.lost or conn.until_close:
            conn.pool.put_back(conn)  # closes what cannot be kept
        else:
            conn.drain()

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.sink = None
            conn.close()


class _Connection(asyncio.Protocol):
    """One keep-alive connection to a worker and the state of the response being read on it."""

    def __init__(self, pool: Pool, key: str, loop: asyncio.AbstractEventLoop) -> None:
        self.pool = pool
        self.key = key
        self.loop = loop  # asking for the running loop costs a getpid() call on Python 3.11
        self.transport: asyncio.Transport = None  # type: ignore[assignment]  # set on connect
        self.parser = httptools.HttpResponseParser(self)
        self.busy = False  # a request is written and its response not yet released
        self.served = 0  # responses read whole on it before the current one
        self.lost = False
        self.idle_since = 0.0
        self._waiter: asyncio.Future[None] | None = None
        self._drain_timer: asyncio.TimerHandle | None = None
        self._drain_budget = 0
        self._reset()

    def _reset(self) -> None:
        self.status = 0
        self.raw_headers: list[tuple[bytes, bytes]] = []
        self.content_length: int | None = None
        self.content_type: str | None = None
        self.headers_done = False
        self.until_close = False  # no length and not chunked: the body ends with the connection
        self.complete = False
        self.keep_alive = False
        self.informational = False
        self.head_size = 0
        self.chunks: list[bytes] = []
        self.buffered = 0
        self.paused = False  # reading paused: the buffer's high water, or a sink's ``pause``
        self.sink: Callable[[bytes], None] | None = None  # see ``Response.divert``
        self.error: TransportError | None = None

    # -- the pool's side

    def send(self, data: bytes, body: bytes) -> None:
        self._reset()
        self.busy = True
        if self.lost:  # closed by the worker after the pool handed it out
            self.error = Closed()
            return
        if len(body) < 65536:
            self.transport.write(data + body)
        else:
            self.transport.writelines((data, body))

    async def wait(self) -> None:
        """Until the next callback that changes what a reader sees."""
        self._waiter = waiter = self.loop.create_future()
        try:
            await waiter
        finally:
            self._waiter = None

    def reusable(self) -> bool:
        return (
            self.complete
            and self.keep_alive
            and self.error is None
            and not self.lost
            and not self.chunks
            and not self.transport.is_closing()
        )

    def close(self) -> None:
        if not self.lost:
            self.transport.close()
            self._lose()

    def readable(self) -> bool:
        """Whether the kernel holds bytes or an end of stream that the loop has not delivered
        yet. An idle kept connection must have neither: a worker that closed it (its keep-alive
        timer) a moment ago would otherwise get, and maybe read, the next request as it dies.
        One zero-timeout poll, as httpcore checks a pooled connection before reusing it."""
        sock = self.transport.get_extra_info("socket")
        if sock is None:
            return False
        try:
            ready, _, _ = select.select([sock], [], [], 0)
        except (OSError, ValueError):
            return True
        return bool(ready)

    def drain(self) -> None:
        """The reader is done before the body's end: discard what is left of it and go back
        to the pool at its end, or close if that takes too long or too many bytes."""
        self._drain_budget = DRAIN_LIMIT - self.buffered
        self.chunks = []
        self.buffered = 0
        if self._drain_budget < 0:
            self.close()
            return
        self.unpause()
        self._drain_timer = self.loop.call_later(DRAIN_TIMEOUT, self.close)

    def unpause(self) -> None:
        if self.paused:
            self.paused = False
            if not self.lost:
                self.transport.resume_reading()

    def _drained(self) -> None:
        timer, self._drain_timer = self._drain_timer, None
        if timer is not None:
            timer.cancel()
            self.pool.put_back(self)

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _fail(self, err: TransportError) -> None:
        if self.error is None and not self.complete:
            self.error = err
        self.transport.close()
        self._wake()

    def _lose(self) -> None:
        if self.lost:
            return
        self.lost = True
        if self._drain_timer is not None:
            self._drain_timer.cancel()
            self._drain_timer = None
        if self.busy and not self.complete and self.error is None:
            if self.headers_done and self.until_close:
                self.complete = True
            else:
                self.error = Closed()
        self._wake()
        self.pool.forget(self)

    # -- asyncio's side

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost and not self.served and not self.head_size and self._is_tls():
            self.pool.connect_failed(self.key, _refused_session(exc))
        self._lose()

    def _is_tls(self) -> bool:
        return self.transport.get_extra_info("ssl_object") is not None

    def data_received(self, data: bytes) -> None:
        if not self.busy or self.complete:
            # Bytes nobody asked for (after the answer, or on an idle connection): the
            # connection's framing cannot be trusted for another request.
            self.transport.close()
            self._lose()
            return
        if not self.headers_done:
            self.head_size += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(BadHTTP("The model worker switched protocols."))
        except httptools.HttpParserError:
            self._fail(BadHTTP("The model worker sent a malformed HTTP response."))
        else:
            # A read is at most a few hundred kB, so the parser never holds more than that.
            if not self.headers_done and self.head_size > HEAD_LIMIT:
                self._fail(BadHTTP("The model worker sent oversized headers."))
            elif self.complete and self._drain_timer is not None:
                self._drained()  # after the parser is done with this read
        if self.chunks:
            # One call per read, not per HTTP chunk: a read holding a whole answer (a worker
            # that does not pace) is one write to the client, not one per event, and one call
            # to wake the reader, not one per event.
            sink = self.sink
            if sink is None:
                self._wake()
            else:
                chunks, self.chunks = self.chunks, []
                sink(chunks[0] if len(chunks) == 1 else b"".join(chunks))

    def eof_received(self) -> bool | None:
        return None  # close the transport: connection_lost settles the response

    # -- httptools' side

    def on_header(self, name: bytes, value: bytes) -> None:
        self.raw_headers.append((name, value))

    def on_headers_complete(self) -> None:
        if self.complete:  # a second answer to one request: never reuse this connection
            self.keep_alive = False
            return
        status = self.parser.get_status_code()
        if status < 200:  # 100 Continue and friends: the real answer follows
            self.informational = True
            self.raw_headers = []
            return
        self.status = status
        chunked = False
        for name, value in self.raw_headers:
            lname = name.lower()
            if lname == b"content-length":
                with contextlib.suppress(ValueError):
                    self.content_length = int(value)
            elif lname == b"transfer-encoding":
                chunked = b"chunked" in value.lower()
            elif lname == b"content-type":
                self.content_type = value.decode("latin-1")
        if chunked:
            self.content_length = None
        self.until_close = not chunked and self.content_length is None and status not in (204, 304)
        self.headers_done = True
        self._wake()

    def on_body(self, body: bytes) -> None:
        if self.complete:
            self.keep_alive = False
            return
        if self._drain_timer is not None:
            self._drain_budget -= len(body)
            if self._drain_budget < 0:
                self.close()
            return
        self.chunks.append(body)
        if self.sink is not None:
            return  # handed on whole at the end of the read (``data_received``)
        self.buffered += len(body)
        if self.buffered > HIGH_WATER and not self.paused:
            self.paused = True
            self.transport.pause_reading()
        # The reader is woken at the end of the read (``data_received``).

    def on_message_complete(self) -> None:
        if self.informational:
            self.informational = False
            self.head_size = 0
            return
        if self.complete:
            self.keep_alive = False
            return
        self.complete = True
        self.keep_alive = self.parser.should_keep_alive()
        self._wake()


def _refused_session(exc: Exception | None) -> OSError:
    """Why the worker closed a new TLS connection before any answer. With TLS 1.3 a server
    checks the client's certificate after the client's side of the handshake is done, so a
    missing or unaccepted one shows only now: as the server's alert (OpenSSL, Go, Envoy), or,
    from an asyncio server such as vLLM's uvicorn, which sends none, as a bare close."""
    if isinstance(exc, ssl.SSLError):
        return exc
    return ConnectionAbortedError(
        errno.ECONNABORTED,
        "TLS: the worker closed a new connection without answering "
        "(does it require a client certificate, or refuse the one sent?)",
    )


class Pool:
    """Keep-alive connections to every worker: at most ``limit`` open in all and
    ``limit_per_host`` to one worker; a request beyond that waits (FIFO) for a slot."""

    def __init__(
        self,
        limit: int,
        limit_per_host: int,
        keepalive: float,
        connect_timeout: float,
        on_connect: ConnectObserver | None = None,
        on_connect_failure: ConnectFailureObserver | None = None,
    ) -> None:
        self._limit = limit
        self._limit_per_host = limit_per_host
        self._keepalive = keepalive
        self._connect_timeout = connect_timeout
        self._on_connect = on_connect
        self._on_connect_failure = on_connect_failure
        self._idle: dict[str, list[_Connection]] = {}
        self._open: collections.Counter[str] = collections.Counter()  # incl. connecting
        self._total = 0
        self._live: set[_Connection] = set()
        self._waiters: collections.deque[tuple[str, asyncio.Future[None]]] = collections.deque()
        self._sweep: asyncio.TimerHandle | None = None
        self._closed = False

    async def request(
        self,
        base: str,
        path: str,
        headers: bytes,
        body: bytes,
        *,
        method: str = "POST",
        tls: ClientTls | None = None,
        fresh: bool = False,
    ) -> Response:
        """Send ``body`` to ``base + path`` with ``headers`` (encoded ``Name: value\\r\\n``
        lines, without Host and Content-Length); return once the response headers are in.
        ``tls`` is required for an ``https://`` base; ``fresh`` skips kept connections (for a
        caller that may resend an idempotent request after a ``StaleClose``)."""
        to = target(base)
        length = f"Content-Length: {len(body)}\r\n" if body or method == "POST" else ""
        head = (
            f"{method} {path} HTTP/1.1\r\nHost: {to.host_header}\r\n{length}".encode()
            + headers
            + b"\r\n"
        )
        conn = None if fresh else self._take_idle(base)
        if conn is None:
            conn = await self._bounded_acquire(base, to, tls, fresh)
        conn.send(head, body)
        try:
            while not conn.headers_done:
                if conn.error is not None:
                    raise conn.error
                await conn.wait()
        except Closed:
            conn.close()
            if conn.served and not conn.head_size:
                # A kept connection closed as the request went out, not a byte back (the
                # worker's keep-alive timer; 5 s in vLLM's uvicorn) after the readability
                # check passed. Most likely unread, but the worker may have read it: never
                # sent again here, where nobody would count it (RFC 9110, 9.2.2).
                raise StaleClose() from None
            raise
        except BaseException:
            conn.close()
            raise
        return Response(conn)

    def connect_failed(self, key: str, exc: OSError) -> None:
        if self._on_connect_failure is not None:
            self._on_connect_failure(key, exc)

    def kept(self, base: str) -> int:
        """How many connections to ``base`` are kept, ready for a request."""
        return len(self._idle.get(base, ()))

    def put_back(self, conn: _Connection) -> None:
        """A response is done with its connection: keep it for the next request, or close it."""
        if self._closed or not conn.reusable():
            conn.close()
            return
        conn.busy = False
        conn.served += 1
        conn.idle_since = conn.loop.time()
        self._idle.setdefault(conn.key, []).append(conn)
        if self._sweep is None:
            self._sweep = conn.loop.call_later(self._keepalive, self._expire)
        self._wake(conn.key)

    def forget(self, conn: _Connection) -> None:
        """``conn`` is gone (closed by either side)."""
        if conn not in self._live:
            return
        self._live.discard(conn)
        self._open[conn.key] -= 1
        self._total -= 1
        stack = self._idle.get(conn.key)
        if stack and conn in stack:
            stack.remove(conn)
        self._wake(None)

    async def close(self) -> None:
        self._closed = True
        if self._sweep is not None:
            self._sweep.cancel()
        for conn in list(self._live):
            conn.close()
        for _, waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(None)

    # -- inside

    def _take_idle(self, key: str) -> _Connection | None:
        stack = self._idle.get(key)
        while stack:
            conn = stack.pop()
            if conn.lost or conn.transport.is_closing() or conn.readable():
                conn.close()
                continue
            return conn
        return None

    async def _bounded_acquire(
        self, key: str, to: Target, tls: ClientTls | None, fresh: bool
    ) -> _Connection:
        try:
            async with asyncio.timeout(self._connect_timeout):
                return await self._acquire(key, to, tls, fresh)
        except TimeoutError:
            raise ConnectTimedOut() from None

    async def _acquire(
        self, key: str, to: Target, tls: ClientTls | None, fresh: bool
    ) -> _Connection:
        """A connection to ``key``: a kept one (unless ``fresh``), else a new one when the
        limits allow, else the next one freed."""
        while True:
            if self._closed:
                raise PoolClosed()
            conn = None if fresh else self._take_idle(key)
            if conn is not None:
                return conn
            if self._total < self._limit and self._open[key] < self._limit_per_host:
                return await self._connect(key, to, tls)
            # No room: close a kept connection to make some, this worker's first when fresh.
            mine = self._idle.get(key) if fresh else None
            victim = mine[0] if mine else None
            if (
                victim is None
                and self._total >= self._limit
                and self._open[key] < self._limit_per_host
            ):
                victim = self._oldest_idle()
            if victim is not None:
                victim.close()
                continue
            waiter = asyncio.get_running_loop().create_future()
            entry = (key, waiter)
            self._waiters.append(entry)
            try:
                await waiter
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled():
                    self._wake(key)  # our turn came as we left: give it to the next
                else:
                    with contextlib.suppress(ValueError):
                        self._waiters.remove(entry)
                raise

    async def _connect(self, key: str, to: Target, tls: ClientTls | None) -> _Connection:
        if to.https and tls is None:
            raise ValueError(f"{key}: an https worker needs its TLS settings")
        loop = asyncio.get_running_loop()
        conn = _Connection(self, key, loop)
        self._open[key] += 1  # counted from now: forget() takes it back off
        self._total += 1
        self._live.add(conn)
        started = loop.time()
        try:
            await loop.create_connection(
                lambda: conn,
                to.host,
                to.port,
                ssl=tls.context if to.https and tls is not None else None,
                server_hostname=(tls.server_name or to.host) if to.https and tls else None,
            )
        except OSError as exc:  # ssl.SSLError (a failed handshake or check) is one too
            self.forget(conn)
            self.connect_failed(key, exc)
            raise ConnectFailed(refused=isinstance(exc, ConnectionRefusedError)) from exc
        except BaseException:
            self.forget(conn)
            raise
        if self._on_connect is not None:
            self._on_connect(key, loop.time() - started)
        return conn

    def _wake(self, key: str | None) -> None:
        """Wake the first waiter that can now go on: one for ``key`` when an idle connection
        of it came back, else the first with room under its worker's limit (it may close
        another worker's idle connection to get a slot)."""
        chosen = None
        for i, (wkey, waiter) in enumerate(self._waiters):
            if waiter.done():
                continue
            if wkey == key:
                chosen = i
                break
            if chosen is None and self._open[wkey] < self._limit_per_host:
                chosen = i
                if key is None:
                    break
        if chosen is not None:
            waiter = self._waiters[chosen][1]
            del self._waiters[chosen]
            waiter.set_result(None)

    def _oldest_idle(self) -> _Connection | None:
        stacks = [s for s in self._idle.values() if s]
        return min((s[0] for s in stacks), key=lambda c: c.idle_since, default=None)

    def _expire(self) -> None:
        self._sweep = None
        now = asyncio.get_running_loop().time()
        for stack in list(self._idle.values()):
            while stack and now - stack[0].idle_since >= self._keepalive:
                stack[0].close()  # forget() takes it off the stack
        oldest = self._oldest_idle()
        if oldest is not None:
            delay = oldest.idle_since + self._keepalive - now
            self._sweep = asyncio.get_running_loop().call_later(max(delay, 0.01), self._expire)
