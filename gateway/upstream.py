"""The gateway's HTTP clients towards workers: the forwarding pool (``gateway.h1``), a second
small pool of the same client for probes and scrapes, and an aiohttp session for pass-through
requests the pool cannot carry (any method, a streamed request body); aiohttp's exceptions are
mapped here. All three reach a worker with its TLS settings (``gateway.tls``), and the first
failed connect to a worker is logged with its cause, once until the worker answers again.

The connect phase (including the wait for a pooled connection) is bounded by the pool; the
other phases (first token, idle, total) are enforced by the proxy, because only it knows where
a stream is.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import AsyncIterable

import aiohttp
import orjson
from multidict import CIMultiDict, CIMultiDictProxy

from gateway.errors import (
    ConnectTimeout,
    IdleTimeout,
    StaleConnection,
    UpstreamBadResponse,
    UpstreamConnectError,
    UpstreamDisconnected,
    UpstreamError,
)
from gateway.h1 import (
    BadHTTP,
    Closed,
    ConnectFailed,
    ConnectTimedOut,
    Pool,
    PoolClosed,
    Response,
    StaleClose,
    TransportError,
)
from gateway.loadsignals import LoadSignals, parse_load
from gateway.metrics import GatewayMetrics
from gateway.settings import HealthSettings, LimitSettings, RoutingSettings, TimeoutSettings
from gateway.tls import WorkerTls, describe
from gateway.workers import ModelCard, ProbeResult, Worker

log = logging.getLogger(__name__)

# Headers that describe one hop, carry the client's credentials, or claim an identity the
# client could spoof (who it is, where it came from) never go to a worker. Lower-case bytes,
# as ``forward_headers`` compares the client's raw header names.
_DROPPED = frozenset(
    h.lower().encode()
    for h in (
        "Host", "Connection", "Keep-Alive", "Proxy-Connection", "Transfer-Encoding", "TE",
        "Trailer", "Upgrade", "Content-Length", "Accept-Encoding", "Authorization", "Cookie",
        "Proxy-Authorization", "Expect", "Content-Encoding", "Forwarded", "X-Forwarded-For",
        "X-Forwarded-Host", "X-Forwarded-Proto", "X-Real-IP", "X-Api-Key",
        # The gateway sends its own (the client's when it was sane): exactly one per request.
        "X-Request-Id",
    )
)  # fmt: skip
# Connection options, not header names (RFC 9110, 7.6.1): never a reason to drop a header.
_CONNECTION_OPTIONS = frozenset((b"close", b"keep-alive", b""))

RawHeaders = tuple[tuple[bytes, bytes], ...]

ClientResponse = Response

PROBE_POOL_SIZE = 32
# A worker's /metrics body larger than this is not read: the signals are near its top anyway.
SCRAPE_LIMIT = 4 * 1024 * 1024
# A /v1/models answer larger than this is not a list of models.
MODELS_LIMIT = 4 * 1024 * 1024
# Workers remembered as failing to connect (discovered pods come and go): the oldest is
# forgotten first, and at worst its next failure is logged again.
FAILING_REMEMBERED = 1024


class ConnectLog:
    """Logs the first failed connect to a worker with its cause (certificate verify failed,
    connection refused, ...), then nothing more for that worker until it answers again: a
    fleet-wide TLS mistake is one line per worker, not one per request or probe. Connects
    that time out are not among them (``ConnectTimeout`` cannot tell a slow worker from a
    full pool)."""

    def __init__(self) -> None:
        self._failing: dict[str, str] = {}

    def failed(self, worker: str, exc: OSError) -> None:
        if worker in self._failing:
            return
        if len(self._failing) >= FAILING_REMEMBERED:
            del self._failing[next(iter(self._failing))]
        cause = self._failing[worker] = describe(exc)
        log.warning("cannot connect to worker %s: %s", worker, cause)

    def connected(self, worker: str) -> None:
        """A response came from ``worker`` (a connect alone is not enough: a worker that
        requires a client certificate refuses it after the TLS handshake, TLS 1.3)."""
        if self._failing and self._failing.pop(worker, None) is not None:
            log.info("worker %s answers again", worker)


class Upstream:
    """Owns the pools and the pass-through session; create inside a running loop and
    ``close()`` at shutdown."""

    def __init__(
        self,
        limits: LimitSettings,
        timeouts: TimeoutSettings,
        health: HealthSettings,
        metrics: GatewayMetrics | None = None,
        routing: RoutingSettings | None = None,
        tls: WorkerTls | None = None,
    ) -> None:
        """``tls``: the workers' TLS settings, contexts built (at start-up); None: every
        ``https://`` worker is checked against the system's CAs and its URL's host."""
        self._scrape_timeout = (routing or RoutingSettings()).scrape_timeout
        self._probe_timeout = health.timeout
        self._metrics = metrics
        self._tls = tls if tls is not None else WorkerTls()
        self.connects = ConnectLog()
        self._pool = Pool(
            limit=limits.pool_size,
            limit_per_host=limits.pool_per_worker,
            keepalive=limits.keepalive,
            connect_timeout=timeouts.connect,
            on_connect=self._connected if metrics is not None else None,
            on_connect_failure=self.connects.failed,
        )
        # Probes get their own small pool: a worker whose request pool is full must still be
        # probed at once, not after the requests ahead of the probe. Its connects are not in
        # the connect-time metric, which is about the requests' connections.
        self._probes = Pool(
            limit=PROBE_POOL_SIZE,
            limit_per_host=PROBE_POOL_SIZE,
            keepalive=limits.keepalive,
            connect_timeout=health.timeout,
            on_connect_failure=self.connects.failed,
        )
        # Pass-through answers are relayed as the worker sent them: no decompression, no
        # cookies, no headers of aiohttp's own. The total bound is the caller's.
        self._passthrough = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(
                limit=limits.pool_size,
                limit_per_host=limits.pool_per_worker,
                keepalive_timeout=limits.keepalive,
            ),
            timeout=aiohttp.ClientTimeout(
                total=None, connect=timeouts.connect, sock_read=timeouts.idle
            ),
            auto_decompress=False,
            skip_auto_headers=("User-Agent", "Accept-Encoding", "Content-Type"),
            cookie_jar=aiohttp.DummyCookieJar(),
        )

    async def open(
        self,
        method: str,
        worker: Worker,
        path: str,
        headers: CIMultiDict[str],
        body: bytes | AsyncIterable[bytes] | None,
    ) -> PassResponse:
        """Send a request as it came (``headers`` from ``passthrough_headers``) and return once
        the response headers are in; the caller closes the response."""
        if worker.api_key is not None:
            headers["Authorization"] = f"Bearer {worker.api_key}"
        tls = self._tls.for_worker(worker)
        try:
            response = await self._passthrough.request(
                method,
                worker.url + path,
                headers=headers,
                data=body,
                allow_redirects=False,
                ssl=tls.context if tls is not None else True,
                server_hostname=tls.server_name if tls is not None else None,
            )
        except aiohttp.ClientConnectorError as exc:
            self.connects.failed(worker.url, exc.os_error)
            raise UpstreamConnectError() from None
        except aiohttp.ClientError as exc:
            raise _mapped(exc) from None
        except TimeoutError:
            raise ConnectTimeout() from None
        self.connects.connected(worker.url)
        return PassResponse(response)

    async def close(self) -> None:
        await self._pool.close()
        await self._probes.close()
        await self._passthrough.close()

    def _connected(self, worker: str, seconds: float) -> None:
        assert self._metrics is not None
        self._metrics.upstream_connect.labels(worker).observe(seconds)

    async def send(self, worker: Worker, path: str, body: bytes, headers: bytes) -> Response:
        """POST and return once the response headers are in; the caller releases or closes the
        response. ``headers`` comes from ``forward_headers``."""
        if worker.api_key is not None:
            headers += _authorization(worker.api_key)
        tls = self._tls.for_worker(worker)
        try:
            response = await self._pool.request(worker.url, path, headers, body, tls=tls)
        except TransportError as exc:
            raise gateway_error(exc) from exc
        self.connects.connected(worker.url)
        return response

    async def read_chunk(self, response: Response) -> bytes:
        """The next bytes of the body as they arrive; b"" at its end."""
        try:
            return await response.read_chunk()
        except TransportError as exc:
            raise gateway_error(exc) from exc

    async def read_body(self, response: ClientResponse, limit: int) -> bytes:
        """The whole (error) body, cut at ``limit`` bytes so a bad worker cannot swell memory."""
        parts: list[bytes] = []
        size = 0
        while size < limit:
            chunk = await self.read_chunk(response)
            if not chunk:
                break
            parts.append(chunk)
            size += len(chunk)
        return b"".join(parts)[:limit]

    async def probe(self, worker: Worker) -> ProbeResult:
        """``GET /health`` and ``GET /v1/models``, at once. A worker with configured models is
        asked too: its cards (``max_model_len``, ``root``, ...) are what ``/v1/models``
        shows for those models, as vLLM would; routing keeps to the configured names."""
        health, models = await asyncio.gather(self._health(worker), self._models(worker))
        return ProbeResult(healthy=health is True, models=models, refused=health is None)

    async def scrape(self, worker: Worker) -> LoadSignals | None:
        """The worker's load signals from ``GET /metrics``; None when it cannot be read."""
        try:
            status, body = await self._get(worker, "/metrics", self._scrape_timeout, SCRAPE_LIMIT)
        except (UpstreamError, TimeoutError):
            return None
        return parse_load(body) if status == 200 else None

    async def _health(self, worker: Worker) -> bool | None:
        """Whether ``/health`` answers 200; None when the connection is refused (nothing
        listens there: the worker stopped, or is stopping)."""
        try:
            status, _ = await self._get(worker, "/health", self._probe_timeout, 64 * 1024)
        except UpstreamConnectError as exc:
            return None if exc.refused else False
        except (UpstreamError, TimeoutError):
            return False
        return status == 200

    async def _models(self, worker: Worker) -> tuple[ModelCard, ...] | None:
        auth = _authorization(worker.api_key) if worker.api_key else b""
        try:
            status, body = await self._get(
                worker, "/v1/models", self._probe_timeout, MODELS_LIMIT, auth
            )
            data = orjson.loads(body) if status == 200 else None
        except (UpstreamError, TimeoutError, orjson.JSONDecodeError):
            return None
        cards = data.get("data") if isinstance(data, dict) else None
        if not isinstance(cards, list):
            return None
        return tuple(c for c in cards if isinstance(c, dict) and isinstance(c.get("id"), str))

    async def _get(
        self, worker: Worker, path: str, within: float, limit: int, headers: bytes = b""
    ) -> tuple[int, bytes]:
        """``GET path`` on the probe pool, all ``within`` seconds: the status and up to ``limit``
        bytes of the body. A GET is idempotent, so one that met a kept connection closing
        under it goes again, once, on a new connection (a probe is not a counted attempt)."""
        tls = self._tls.for_worker(worker)
        async with asyncio.timeout(within):
            try:
                try:
                    response = await self._probes.request(
                        worker.url, path, headers, b"", method="GET", tls=tls
                    )
                except StaleClose:
                    response = await self._probes.request(
                        worker.url, path, headers, b"", method="GET", tls=tls, fresh=True
                    )
            except TransportError as exc:
                raise gateway_error(exc) from exc
            self.connects.connected(worker.url)
            try:
                body = await self.read_body(response, limit)
            except BaseException:
                response.close()
                raise
            response.release()  # kept if the body ended, else closed
        return response.status, body


@functools.lru_cache(maxsize=256)
def _authorization(api_key: str) -> bytes:
    if "\r" in api_key or "\n" in api_key:
        raise ValueError("a line break in a worker's api_key")
    return f"Authorization: Bearer {api_key}\r\n".encode()


class PassResponse:
    """A worker's answer to a pass-through request: status, headers and body bytes as sent."""

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self._response = response
        self.status = response.status
        self.headers: CIMultiDictProxy[str] = response.headers

    async def read_chunk(self) -> bytes:
        """The next bytes of the body as they arrive; b"" at its end."""
        try:
            return await self._response.content.readany()
        except aiohttp.ClientError as exc:
            raise _mapped(exc) from None
        except TimeoutError:
            raise IdleTimeout() from None

    async def read_all(self, limit: int) -> bytes:
        """The whole body, cut at ``limit`` bytes."""
        parts: list[bytes] = []
        size = 0
        while size < limit and (chunk := await self.read_chunk()):
            parts.append(chunk)
            size += len(chunk)
        return b"".join(parts)[:limit]

    def close(self) -> None:
        self._response.close()


def gateway_error(exc: TransportError) -> UpstreamError:
    """What a transport failure of the forwarding client is to the gateway (and so to the
    retry policy and the client): the one mapping, used wherever the client's errors surface
    (here and in ``Attempts``, where a relay's reads end)."""
    if isinstance(exc, StaleClose):
        return StaleConnection()
    if isinstance(exc, Closed):
        return UpstreamDisconnected()
    if isinstance(exc, ConnectFailed):
        return UpstreamConnectError(refused=exc.refused)
    if isinstance(exc, ConnectTimedOut):
        return ConnectTimeout()
    if isinstance(exc, PoolClosed):
        return UpstreamConnectError("The gateway is shutting down.")
    if isinstance(exc, BadHTTP):
        return UpstreamBadResponse(str(exc) or None)
    return UpstreamBadResponse()


def _mapped(exc: aiohttp.ClientError) -> UpstreamError:
    if isinstance(exc, aiohttp.ServerTimeoutError):
        return IdleTimeout()
    if isinstance(exc, aiohttp.ServerDisconnectedError | aiohttp.ClientPayloadError):
        return UpstreamDisconnected()
    if isinstance(exc, aiohttp.ClientOSError):
        return UpstreamConnectError()
    return UpstreamBadResponse()


def forward_headers(raw: RawHeaders, request_id: str) -> bytes:
    """The client's headers as a worker gets them (encoded lines; the pool adds Host and
    Content-Length): hop-by-hop, credential and identity headers dropped, ours added. Built
    from the bytes the client sent (``request.raw_headers``), which aiohttp's parser let no
    line break into; ``request_id`` is checked by the middleware.
    """
    dropped = _dropped(raw)
    lines = b"".join(
        [name + b": " + value + b"\r\n" for name, value in raw if name.lower() not in dropped]
    )
    return lines + b"X-Request-Id: " + request_id.encode() + b"\r\nAccept-Encoding: identity\r\n"


def with_rank(headers: bytes, rank: int) -> bytes:
    """``forward_headers`` naming the data-parallel engine to serve the request (vLLM's
    ``X-data-parallel-rank``), in place of any the client sent."""
    lines = [
        line
        for line in headers.split(b"\r\n")
        if line and not line.lower().startswith(b"x-data-parallel-rank:")
    ]
    return b"".join(line + b"\r\n" for line in lines) + b"X-data-parallel-rank: %d\r\n" % rank


def passthrough_headers(raw: RawHeaders, request_id: str) -> CIMultiDict[str]:
    """``forward_headers`` for the pass-through client (which takes str): the same headers
    dropped, but Content-Length kept when the body goes as it came (aiohttp's server decodes
    a gzip or deflate body, which then has another length), so a streamed body is not sent
    chunked. Bytes are read as Latin-1 so none is lost."""
    dropped = _dropped(raw)
    if not any(n.lower() == b"content-encoding" and v.lower() != b"identity" for n, v in raw):
        dropped = dropped - _BODY_HEADERS
    headers = CIMultiDict(
        (name.decode("latin-1"), value.decode("latin-1"))
        for name, value in raw
        if name.lower() not in dropped
    )
    headers["X-Request-Id"] = request_id
    headers["Accept-Encoding"] = "identity"
    return headers


_BODY_HEADERS = frozenset((b"content-length",))


def _dropped(raw: RawHeaders) -> frozenset[bytes]:
    """The names never forwarded: ours, plus the ones ``Connection`` names as hop-by-hop."""
    named = [value for name, value in raw if name.lower() == b"connection"]
    if not named:
        return _DROPPED
    options = {o.strip().lower() for value in named for o in value.split(b",")}
    extra = options - _CONNECTION_OPTIONS
    return _DROPPED | extra if extra else _DROPPED


__all__ = [
    "ClientResponse",
    "PassResponse",
    "Upstream",
    "UpstreamError",
    "forward_headers",
    "passthrough_headers",
]
