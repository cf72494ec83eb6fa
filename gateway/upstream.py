"""The gateway's HTTP client towards workers: one session, a bounded pool, mapped exceptions.

This is the only module that knows aiohttp's client exceptions; it maps each to the most
specific ``errors.UpstreamError`` (chained with ``from``). The connect phase is bounded here
(aiohttp's ``connect``/``sock_connect``, which includes waiting for a pooled connection); the
other phases (first token, idle, total) are enforced by the proxy, because only it knows where
a stream is. ``ClientTimeout.total`` stays None: it would count the whole streamed body.
"""

from __future__ import annotations

import asyncio
import functools
from contextvars import ContextVar
from typing import Any

import aiohttp
import orjson
import yarl
from aiohttp.client_proto import ResponseHandler
from multidict import CIMultiDict, CIMultiDictProxy

from gateway.errors import (
    ConnectTimeout,
    UpstreamBadResponse,
    UpstreamConnectError,
    UpstreamDisconnected,
    UpstreamError,
)
from gateway.loadsignals import LoadSignals, parse_load
from gateway.metrics import GatewayMetrics
from gateway.settings import HealthSettings, LimitSettings, RoutingSettings, TimeoutSettings
from gateway.workers import ModelCard, ProbeResult, Worker

# Headers that describe one hop, carry the client's credentials, or claim an identity the
# client could spoof (who it is, where it came from) never go to a worker.
_DROPPED_REQUEST_HEADERS = frozenset(
    h.lower()
    for h in (
        "Host", "Connection", "Keep-Alive", "Proxy-Connection", "Transfer-Encoding", "TE",
        "Trailer", "Upgrade", "Content-Length", "Accept-Encoding", "Authorization", "Cookie",
        "Proxy-Authorization", "Expect", "Content-Encoding", "Forwarded", "X-Forwarded-For",
        "X-Forwarded-Host", "X-Forwarded-Proto", "X-Real-IP", "X-Api-Key",
    )
)  # fmt: skip

ClientResponse = aiohttp.ClientResponse

PROBE_POOL_SIZE = 32
# A worker's /metrics body larger than this is not read: the signals are near its top anyway.
SCRAPE_LIMIT = 4 * 1024 * 1024


class Upstream:
    """Owns the ``ClientSession``; create inside a running loop and ``close()`` at shutdown."""

    def __init__(
        self,
        limits: LimitSettings,
        timeouts: TimeoutSettings,
        health: HealthSettings,
        metrics: GatewayMetrics | None = None,
        routing: RoutingSettings | None = None,
    ) -> None:
        self._scrape_timeout = aiohttp.ClientTimeout(
            total=(routing or RoutingSettings()).scrape_timeout
        )
        connector = _TimedConnector(
            metrics,
            limit=limits.pool_size,
            limit_per_host=limits.pool_per_worker,
            keepalive_timeout=limits.keepalive,
            enable_cleanup_closed=False,
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(
                total=None, connect=timeouts.connect, sock_connect=timeouts.connect
            ),
            auto_decompress=False,
            skip_auto_headers=("User-Agent",),
            # Cookies a worker sets must not travel with other clients' requests (and keeping
            # none spares a jar look-up per request).
            cookie_jar=aiohttp.DummyCookieJar(),
        )
        # Probes get their own small pool: a worker whose request pool is full must still be
        # probed at once, not after the requests ahead of the probe.
        self._probes = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(
                limit=PROBE_POOL_SIZE, keepalive_timeout=limits.keepalive
            ),
            timeout=aiohttp.ClientTimeout(total=health.timeout),
            skip_auto_headers=("User-Agent",),
            cookie_jar=aiohttp.DummyCookieJar(),
        )

    async def close(self) -> None:
        await self._session.close()
        await self._probes.close()

    async def send(
        self, worker: Worker, path: str, body: bytes, headers: CIMultiDict[str]
    ) -> ClientResponse:
        """POST and return once the response headers are in; the caller closes the response."""
        if worker.api_key is not None:
            headers = headers.copy()
            headers["Authorization"] = f"Bearer {worker.api_key}"
        token = _CONNECTING_FOR.set(worker.url)
        try:
            return await self._session.post(
                _url(worker.url, path), data=body, headers=headers, allow_redirects=False
            )
        except aiohttp.ConnectionTimeoutError as exc:
            raise ConnectTimeout() from exc
        except aiohttp.ClientConnectorError as exc:
            raise UpstreamConnectError() from exc
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as exc:
            raise UpstreamDisconnected() from exc
        except aiohttp.ClientError as exc:
            raise UpstreamBadResponse() from exc
        finally:
            _CONNECTING_FOR.reset(token)

    async def read_chunk(self, response: ClientResponse) -> bytes:
        """The next bytes of the body as they arrive; b"" at its end."""
        try:
            return await response.content.readany()
        except (aiohttp.ClientPayloadError, aiohttp.ClientOSError) as exc:
            raise UpstreamDisconnected() from exc
        except aiohttp.ClientError as exc:
            raise UpstreamBadResponse() from exc

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
        """``GET /health``, and ``GET /v1/models`` when the worker's models are not configured."""
        healthy, models = await asyncio.gather(
            self._health(worker),
            self._models(worker) if not worker.configured_models else _none(),
        )
        return ProbeResult(healthy=healthy, models=models)

    async def scrape(self, worker: Worker) -> LoadSignals | None:
        """The worker's load signals from ``GET /metrics``; None when it cannot be read."""
        try:
            async with self._probes.get(
                worker.url + "/metrics", timeout=self._scrape_timeout
            ) as resp:
                if resp.status != 200:
                    return None
                parts: list[bytes] = []
                size = 0
                while size < SCRAPE_LIMIT and (chunk := await resp.content.readany()):
                    parts.append(chunk)
                    size += len(chunk)
        except (aiohttp.ClientError, TimeoutError):
            return None
        return parse_load(b"".join(parts))

    async def _health(self, worker: Worker) -> bool:
        try:
            async with self._probes.get(worker.url + "/health") as resp:
                return resp.status == 200
        except (aiohttp.ClientError, TimeoutError):
            return False

    async def _models(self, worker: Worker) -> tuple[ModelCard, ...] | None:
        try:
            async with self._probes.get(worker.url + "/v1/models", headers=_auth(worker)) as resp:
                if resp.status != 200:
                    return None
                data = orjson.loads(await resp.read())
        except (aiohttp.ClientError, TimeoutError, orjson.JSONDecodeError):
            return None
        cards = data.get("data") if isinstance(data, dict) else None
        if not isinstance(cards, list):
            return None
        return tuple(c for c in cards if isinstance(c, dict) and isinstance(c.get("id"), str))


# The worker a request is connecting to, for the connect-time histogram's label.
_CONNECTING_FOR: ContextVar[str] = ContextVar("connecting_for", default="")


class _TimedConnector(aiohttp.TCPConnector):
    """Feeds ``gateway_upstream_connect_seconds`` from the one place a new connection is
    opened. (aiohttp's tracing does it too, but costs a dozen awaited signals on every request,
    pooled or not, about 3% of the gateway's CPU.) ``_create_connection`` is aiohttp's own
    hook for it; tests/test_fanout.py and tests/test_discovery.py fail if a release renames it."""

    def __init__(self, metrics: GatewayMetrics | None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._metrics = metrics

    async def _create_connection(
        self,
        req: aiohttp.ClientRequest,
        traces: list[Any],
        timeout: aiohttp.ClientTimeout,  # noqa: ASYNC109 (aiohttp's signature)
    ) -> ResponseHandler:
        loop = asyncio.get_running_loop()
        started = loop.time()
        protocol = await super()._create_connection(req, traces, timeout)
        if self._metrics is not None:
            worker = _CONNECTING_FOR.get()
            if worker:
                self._metrics.upstream_connect.labels(worker).observe(loop.time() - started)
        return protocol


@functools.lru_cache(maxsize=1024)
def _url(base: str, path: str) -> yarl.URL:
    """Parsed once per worker and route, not per request."""
    return yarl.URL(base + path)


def _auth(worker: Worker) -> dict[str, str]:
    return {"Authorization": f"Bearer {worker.api_key}"} if worker.api_key else {}


async def _none() -> None:
    return None


def forward_headers(incoming: CIMultiDictProxy[str], request_id: str) -> CIMultiDict[str]:
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in incoming.items():
        if name.lower() not in _DROPPED_REQUEST_HEADERS:
            out.add(name, value)
    out["X-Request-Id"] = request_id
    out["Accept-Encoding"] = "identity"
    return out


__all__ = ["ClientResponse", "Upstream", "UpstreamError", "forward_headers"]
