"""The gateway on a real socket with the protocol ``server.py`` serves it with
(``gateway/protocol.py``), for tests of what aiohttp's parser refuses before any route runs."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from gateway.app import create_app
from gateway.settings import build_settings
from tests.conftest import TEST_SETTINGS, ServedGateway


@asynccontextmanager
async def served_gateway(*worker_urls: str) -> AsyncIterator[str]:
    """A gateway in front of ``worker_urls``; yields its base URL."""
    data: dict[str, Any] = {**TEST_SETTINGS, "workers": [{"url": u} for u in worker_urls]}
    async with ServedGateway(create_app(build_settings(data))) as server:
        yield str(server.make_url("")).rstrip("/")
