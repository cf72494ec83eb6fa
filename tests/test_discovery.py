"""DNS discovery over real sockets: simulators on 127.0.0.2 and 127.0.0.3 (both loopback on
Linux) behind one service name whose answers the test scripts, and the system resolver."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer
from prometheus_client import CollectorRegistry

from gateway import discovery
from gateway.app import create_app
from gateway.discovery import system_resolver, worker_url
from gateway.settings import build_settings
from gateway.simulator import SimConfig
from gateway.simulator import create_app as create_sim_app
from tests.conftest import TEST_SETTINGS, Gateway
from tests.helpers import chat, stream_text, wait_for

HOSTS = ("127.0.0.2", "127.0.0.3")


class ScriptedDNS:
    """The answers the test wants the service name to have, one call at a time."""

    def __init__(self, *addresses: str) -> None:
        self.addresses = list(addresses)
        self.failing = False
        self.hanging = False
        self.calls = 0

    async def __call__(self, host: str, port: int) -> list[str]:
        self.calls += 1
        assert host == "vllm.test"
        if self.hanging:
            await asyncio.Event().wait()  # a resolver that never answers
        if self.failing:
            raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
        return list(self.addresses)


def shared_free_port() -> int:
    """A port free on every test host (a service's workers all listen on the same port)."""
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind((HOSTS[0], 0))
            port = int(probe.getsockname()[1])
        try:
            for host in HOSTS[1:]:
                with socket.socket() as other:
                    other.bind((host, port))
        except OSError:
            continue
        return port
    raise AssertionError("no port free on all test hosts")


@pytest.fixture
async def fleet_hosts() -> AsyncIterator[tuple[int, dict[str, TestServer]]]:
    port = shared_free_port()
    servers = {}
    for host in HOSTS:
        config = SimConfig(itl_base=0.02, default_max_tokens=20)
        servers[host] = TestServer(create_sim_app(config), host=host, port=port)
        await servers[host].start_server()
    yield port, servers
    for server in servers.values():
        await server.close()


async def start_gateway(port: int, dns: ScriptedDNS | None, **sections: Any) -> Gateway:
    data: dict[str, Any] = {**TEST_SETTINGS, **sections}
    host = "vllm.test" if dns is not None else "localhost"
    data["discovery"] = {"services": [{"url": f"http://{host}:{port}"}], "interval": 0.05}
    registry = CollectorRegistry()
    kwargs: dict[str, Any] = {"resolver": dns} if dns is not None else {}
    app = create_app(build_settings(data), registry=registry, **kwargs)
    server = TestServer(app)
    await server.start_server()
    return Gateway(str(server.make_url("")).rstrip("/"), app, server, registry)


def urls(gw: Gateway) -> list[str]:
    return sorted(w.url for w in gw.fleet.workers)


async def test_workers_follow_the_names_answers(
    fleet_hosts: tuple[int, dict[str, TestServer]], client: aiohttp.ClientSession
) -> None:
    """1. One address: one worker, serving. 2. A second address joins, probed first.
    3. An address where nothing listens joins as down and gets no traffic."""
    port, _ = fleet_hosts
    first, second = (worker_url("http", h, port) for h in HOSTS)
    dns = ScriptedDNS(HOSTS[0])
    gw = await start_gateway(port, dns)
    try:
        assert urls(gw) == [first]
        assert gw.metric("gateway_workers") == 1
        async with client.post(f"{gw.url}/v1/chat/completions", json=chat()) as resp:
            assert resp.status == 200

        dns.addresses = list(HOSTS)
        await wait_for(lambda: urls(gw) == [first, second], 5.0, "second worker joins")
        assert gw.metric("gateway_workers") == 2
        assert gw.metric("gateway_worker_healthy", worker=second) == 1

        dns.addresses = [*HOSTS, "127.0.0.4"]  # resolves, but no simulator there
        dead = worker_url("http", "127.0.0.4", port)
        await wait_for(lambda: dead in urls(gw), 5.0, "third address joins")
        assert gw.metric("gateway_worker_healthy", worker=dead) == 0
        for _ in range(4):
            async with client.post(f"{gw.url}/v1/chat/completions", json=chat()) as resp:
                assert resp.status == 200
        assert gw.metric("gateway_upstream_connect_seconds_count", worker=dead) == 0
        assert gw.metric("gateway_retries_total", reason="upstream_connect_error") == 0
    finally:
        await gw.server.close()


async def test_a_removed_worker_finishes_its_stream_and_gets_nothing_new(
    fleet_hosts: tuple[int, dict[str, TestServer]], client: aiohttp.ClientSession
) -> None:
    """1. A stream runs on the only worker. 2. DNS now names only the other one: the first
    leaves the fleet (and its metric series) at once. 3. The stream still completes."""
    port, _ = fleet_hosts
    first, second = (worker_url("http", h, port) for h in HOSTS)
    dns = ScriptedDNS(HOSTS[0])
    gw = await start_gateway(port, dns)
    try:
        [old] = gw.fleet.workers
        async with client.post(f"{gw.url}/v1/chat/completions", json=chat(stream=True)) as resp:
            assert resp.status == 200
            assert old.in_flight == 1
            dns.addresses = [HOSTS[1]]
            await wait_for(lambda: urls(gw) == [second], 5.0, "first worker leaves")
            assert gw.registry.get_sample_value("gateway_worker_healthy", {"worker": first}) is None
            body = await resp.read()
        assert body.rstrip().endswith(b"data: [DONE]")
        assert len(stream_text(body).split()) == 20
        assert old.in_flight == 0
        for _ in range(3):
            async with client.post(f"{gw.url}/v1/chat/completions", json=chat()) as resp:
                assert resp.status == 200
        assert gw.metric("gateway_upstream_connect_seconds_count", worker=second) >= 1
    finally:
        await gw.server.close()


async def test_a_failed_lookup_keeps_the_last_known_workers(
    fleet_hosts: tuple[int, dict[str, TestServer]], client: aiohttp.ClientSession
) -> None:
    port, _ = fleet_hosts
    dns = ScriptedDNS(*HOSTS)
    gw = await start_gateway(port, dns)
    try:
        source = f"http://vllm.test:{port}"
        dns.failing = True
        calls = dns.calls
        await wait_for(lambda: dns.calls >= calls + 3, 5.0, "three failed lookups")
        assert len(gw.fleet.workers) == 2
        assert gw.metric("gateway_discovery_errors_total", service=source) >= 3
        async with client.post(f"{gw.url}/v1/chat/completions", json=chat()) as resp:
            assert resp.status == 200
    finally:
        await gw.server.close()


async def test_the_system_resolver_finds_localhost() -> None:
    assert "127.0.0.1" in await system_resolver("localhost", 80)
    with pytest.raises(OSError):
        await system_resolver("no-such-host.invalid", 80)


async def test_a_service_url_resolves_through_the_system(
    client: aiohttp.ClientSession,
) -> None:
    """End to end without scripting: `localhost` resolves to 127.0.0.1 (and maybe ::1, where
    nothing listens: that worker joins as down and gets no traffic)."""
    server = TestServer(create_sim_app(SimConfig()), host="127.0.0.1")
    await server.start_server()
    try:
        gw = await start_gateway(server.port or 0, None)
        try:
            assert worker_url("http", "127.0.0.1", server.port or 0) in urls(gw)
            async with client.post(f"{gw.url}/v1/chat/completions", json=chat()) as resp:
                assert resp.status == 200
        finally:
            await gw.server.close()
    finally:
        await server.close()


async def test_a_lookup_that_hangs_counts_as_failed_and_keeps_the_workers(
    fleet_hosts: tuple[int, dict[str, TestServer]],
    client: aiohttp.ClientSession,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """1. The name resolves. 2. Then lookups hang: each is given up after RESOLVE_TIMEOUT and
    counted as an error; the workers stay and keep serving."""
    monkeypatch.setattr(discovery, "RESOLVE_TIMEOUT", 0.05)
    port, _ = fleet_hosts
    dns = ScriptedDNS(*HOSTS)
    gw = await start_gateway(port, dns)
    try:
        dns.hanging = True
        source = f"http://vllm.test:{port}"
        await wait_for(
            lambda: gw.metric("gateway_discovery_errors_total", service=source) >= 2,
            5.0,
            "hung lookups counted",
        )
        assert len(gw.fleet.workers) == 2
        async with client.post(f"{gw.url}/v1/chat/completions", json=chat()) as resp:
            assert resp.status == 200
    finally:
        await gw.server.close()
