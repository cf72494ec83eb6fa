"""DNS discovery: a name (a Kubernetes headless Service) re-resolved on an interval, each
address one worker.

New addresses are probed before they join, so a pod that resolves but does not answer yet
gets no traffic. Addresses that disappear leave the fleet at once; requests already on them
finish. A failed resolution keeps the last known set: a DNS blip must not empty the fleet.
No Kubernetes API access is needed, only cluster DNS.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from collections.abc import Awaitable, Callable
from urllib.parse import urlsplit

from gateway.monitor import Prober, probe_all
from gateway.settings import HealthSettings, ServiceSettings
from gateway.workers import Fleet, Worker

log = logging.getLogger(__name__)

# A lookup that takes longer is a failed one: start-up and the next rounds must not wait on it.
RESOLVE_TIMEOUT = 5.0

# (host, port) -> addresses; raises OSError when the name does not resolve.
Resolver = Callable[[str, int], Awaitable[list[str]]]


async def system_resolver(host: str, port: int) -> list[str]:
    """Addresses of ``host`` from the system resolver (getaddrinfo runs in a thread)."""
    infos = await asyncio.get_running_loop().getaddrinfo(
        host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
    )
    return sorted({str(info[4][0]) for info in infos})


def worker_url(scheme: str, address: str, port: int) -> str:
    host = f"[{address}]" if ipaddress.ip_address(address).version == 6 else address
    return f"{scheme}://{host}:{port}"


def service_source(service: ServiceSettings) -> str:
    """``scheme://host:port`` of a service: its workers' ``source``."""
    parts = urlsplit(str(service.url))
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return f"{parts.scheme}://{parts.hostname or ''}:{port}"


class ServiceWatcher:
    """Keeps the fleet's workers from one service equal to what its name resolves to."""

    def __init__(
        self,
        fleet: Fleet,
        service: ServiceSettings,
        resolver: Resolver,
        probe: Prober,
        default_cap: int,
    ) -> None:
        self._fleet = fleet
        self._service = service
        self._resolver = resolver
        self._probe = probe
        self._cap = service.max_in_flight or default_cap
        parts = urlsplit(str(service.url))
        self._scheme = parts.scheme
        self._host = parts.hostname or ""
        self._port = parts.port or (443 if parts.scheme == "https" else 80)
        self.source = service_source(service)
        self.on_error: Callable[[], None] = lambda: None

    async def sync(self) -> None:
        try:
            async with asyncio.timeout(RESOLVE_TIMEOUT):  # the resolver thread may hang longer
                addresses = await self._resolver(self._host, self._port)
        except (OSError, TimeoutError) as exc:
            log.warning("cannot resolve %s (%s): keeping its last known workers", self._host, exc)
            self.on_error()
            return
        wanted = {worker_url(self._scheme, a, self._port) for a in addresses}
        current = {w.url: w for w in self._fleet.workers if w.source == self.source}
        new = [
            Worker(url, self._service.models, cap=self._cap, source=self.source)
            for url in sorted(wanted - current.keys())
            if not any(w.url == url for w in self._fleet.workers)  # also listed statically
        ]
        for url in current.keys() - wanted:
            self._fleet.remove(current[url])
        if new:
            staged = Fleet(new, HealthSettings())  # probe before joining, outside the real fleet
            await probe_all(staged, self._probe)
            for worker in new:
                self._fleet.add(worker)


async def watch_forever(watchers: list[ServiceWatcher], interval: float) -> None:
    """Re-resolve every ``interval`` seconds (the first resolution is the caller's)."""
    while True:
        await asyncio.sleep(interval)
        await asyncio.gather(*(w.sync() for w in watchers))
