"""Fixtures: simulated vLLM workers and gateways on real sockets, built fresh for each test."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from aiohttp.web_runner import BaseRunner
from prometheus_client import CollectorRegistry

from gateway import keys
from gateway.app import create_app
from gateway.protocol import GatewayRunner
from gateway.settings import build_settings
from gateway.simulator import ENGINE, SimConfig
from gateway.simulator import create_app as create_sim_app


@dataclass
class Sim:
    url: str
    app: web.Application
    server: TestServer

    @property
    def engine(self) -> Any:
        return self.app[ENGINE]


@dataclass
class Gateway:
    url: str
    app: web.Application
    server: TestServer
    registry: CollectorRegistry

    def metric(self, name: str, **labels: str) -> float:
        value = self.registry.get_sample_value(name, labels)
        return 0.0 if value is None else value

    @property
    def proxy(self) -> Any:
        return self.app[keys.PROXY]

    @property
    def fleet(self) -> Any:
        return self.app[keys.FLEET]

    def app_lifecycle_active(self) -> int:
        return int(self.app[keys.LIFECYCLE].active)


SimFactory = Callable[..., Awaitable[Sim]]
GatewayFactory = Callable[..., Awaitable[Gateway]]

# Fast, test-sized settings; a test overrides the sections it is about.
TEST_SETTINGS: dict[str, Any] = {
    "timeouts": {"queue": 0.5, "connect": 1.0, "first_token": 5.0, "idle": 5.0, "total": 20.0},
    "health": {"interval": 60.0, "timeout": 1.0},
    "logging": {"level": "WARNING"},
}


@pytest.fixture
async def sim() -> AsyncIterator[SimFactory]:
    servers: list[TestServer] = []

    async def start(config: SimConfig | None = None, **fields: Any) -> Sim:
        app = create_sim_app(config or SimConfig(**fields))
        server = TestServer(app)
        await server.start_server()
        servers.append(server)
        return Sim(url=str(server.make_url("")).rstrip("/"), app=app, server=server)

    yield start
    for server in servers:
        await server.close()


class ServedGateway(TestServer):
    """The gateway on a real socket with the protocol ``server.py`` serves it with
    (``gateway/protocol.py``: the parser's refusals in the OpenAI shape)."""

    async def _make_runner(self, **kwargs: Any) -> BaseRunner:
        return GatewayRunner(self.app, **kwargs)


@pytest.fixture
async def gateway() -> AsyncIterator[GatewayFactory]:
    servers: list[TestServer] = []

    async def start(*workers: Sim | str | dict[str, Any], **sections: Any) -> Gateway:
        data: dict[str, Any] = {**TEST_SETTINGS, **sections}
        data["workers"] = [_worker(w) for w in workers]
        registry = CollectorRegistry()
        app = create_app(build_settings(data), registry=registry)
        server = ServedGateway(app)
        await server.start_server()
        servers.append(server)
        return Gateway(str(server.make_url("")).rstrip("/"), app, server, registry)

    yield start
    for server in servers:
        await server.close()


def _worker(worker: Sim | str | dict[str, Any]) -> dict[str, Any]:
    if isinstance(worker, Sim):
        return {"url": worker.url}
    if isinstance(worker, str):
        return {"url": worker}
    return worker


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session
