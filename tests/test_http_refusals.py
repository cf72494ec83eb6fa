"""What aiohttp's HTTP parser refuses before any route runs, answered by the gateway's protocol
(``gateway/protocol.py``): OpenAI-shaped JSON with a stable code and an ``X-Request-Id``, on an
HTTP/1.1 status line, the connection closed, and the client's bytes neither echoed nor logged.

1. A header value over ``MAX_FIELD_SIZE`` bytes: 431; one at the limit is served.
2. More than ``MAX_HEADERS`` header fields: 431; exactly that many are served.
3. A refused request after a served one on the same connection: the first answer stands.
4. ``Content-Encoding: br`` or ``zstd`` (aiohttp has no decoder without extra packages): 415,
   where aiohttp answered an HTTP/1.0 400 asking for a package to be installed.
5. A refusal carries a fresh request id, not the one the refused request named.
6. ``python -m gateway`` serves with this protocol (server.py), and logs a refusal by its code.

Requests are raw bytes on a real socket: no client library would send them.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import orjson
import pytest

from gateway.protocol import MAX_FIELD_SIZE, MAX_HEADERS
from gateway.simulator import SimConfig
from tests.conftest import SimFactory
from tests.processes import start_gateway, start_simulator, write_config
from tests.served import served_gateway

pytestmark = pytest.mark.timeout(30)

SECRET = b"sk-secret-0123456789"
_ID = re.compile(r"[0-9a-f]{32}")


@dataclass
class Answer:
    status_line: str
    headers: dict[str, str]
    body: bytes

    @property
    def status(self) -> int:
        return int(self.status_line.split()[1])


@pytest.fixture
async def url(sim: SimFactory) -> AsyncIterator[str]:
    async with served_gateway((await sim(SimConfig())).url) as base:
        yield base


async def exchange(url: str, request: bytes) -> list[Answer]:
    """Sends ``request`` as it is and reads every answer until the server closes."""
    address = urlsplit(url)
    reader, writer = await asyncio.open_connection(address.hostname, address.port)
    try:
        writer.write(request)
        async with asyncio.timeout(10):
            data = await reader.read()
    finally:
        writer.close()
        await writer.wait_closed()
    answers = []
    while data:
        head, _, rest = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = {k.lower(): v for k, v in (line.split(": ", 1) for line in lines[1:])}
        size = int(headers.get("content-length", len(rest)))
        answers.append(Answer(lines[0], headers, rest[:size]))
        data = rest[size:]
    return answers


def get(*headers: bytes, close: bool = True) -> bytes:
    lines = [b"GET /health HTTP/1.1", b"Host: gw", *headers]
    if close:
        lines.append(b"Connection: close")
    return b"\r\n".join(lines) + b"\r\n\r\n"


def assert_refusal(answer: Answer, status: int, code: str) -> None:
    assert answer.status_line.startswith("HTTP/1.1 "), answer.status_line
    assert answer.status == status, answer
    assert answer.headers["content-type"].startswith("application/json")
    assert answer.headers["connection"] == "close"
    assert _ID.fullmatch(answer.headers["x-request-id"])
    error = orjson.loads(answer.body)["error"]
    assert error["code"] == code
    assert error["type"] == "invalid_request_error"
    assert SECRET not in answer.body


async def test_a_header_value_at_the_limit_is_served_and_one_byte_more_is_a_431(
    url: str, caplog: pytest.LogCaptureFixture
) -> None:
    at_limit = b"Authorization: " + SECRET + b"x" * (MAX_FIELD_SIZE - len(SECRET))
    [served] = await exchange(url, get(at_limit))
    assert served.status == 200
    caplog.set_level(logging.DEBUG)
    [refused] = await exchange(url, get(at_limit + b"x"))
    assert_refusal(refused, 431, "headers_too_large")
    assert "sk-secret" not in caplog.text


async def test_more_header_fields_than_the_limit_is_a_431(url: str) -> None:
    # Host and Connection count: MAX_HEADERS fields in all are served.
    pads = [b"X-Pad-%d: %s" % (i, SECRET) for i in range(MAX_HEADERS - 2)]
    [served] = await exchange(url, get(*pads))
    assert served.status == 200
    [refused] = await exchange(url, get(*pads, b"X-One-More: 1"))
    assert_refusal(refused, 431, "headers_too_large")


async def test_a_refusal_after_a_served_request_on_the_same_connection(url: str) -> None:
    address = urlsplit(url)
    reader, writer = await asyncio.open_connection(address.hostname, address.port)
    try:
        async with asyncio.timeout(10):
            writer.write(get(close=False))
            head = await reader.readuntil(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200 "), head
            size = re.search(rb"(?i)content-length: (\d+)", head)
            assert size is not None
            await reader.readexactly(int(size[1]))
            writer.write(get(b"Bad Header: " + SECRET))
            rest = await reader.read()  # until the server closes
    finally:
        writer.close()
        await writer.wait_closed()
    head, _, body = rest.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v for k, v in (line.split(": ", 1) for line in lines[1:])}
    assert_refusal(Answer(lines[0], headers, body), 400, "invalid_http")


@pytest.mark.parametrize("coding", [b"br", b"zstd"])
async def test_a_content_encoding_without_a_decoder_is_a_415(url: str, coding: bytes) -> None:
    head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n"
    request = head + b"Content-Encoding: " + coding + b"\r\nContent-Length: 2\r\n\r\n{}"
    [refused] = await exchange(url, request)
    assert_refusal(refused, 415, "unsupported_content_encoding")


async def test_a_refusal_names_its_own_request_id(url: str) -> None:
    [refused] = await exchange(url, get(b"X-Request-Id: client-chosen-id", b"Bad Header: x"))
    assert_refusal(refused, 400, "invalid_http")
    assert refused.headers["x-request-id"] != "client-chosen-id"


@pytest.mark.timeout(60)
async def test_the_gateway_process_answers_refusals_itself(tmp_path: Path) -> None:
    sim = start_simulator()
    try:
        gw = start_gateway(write_config(tmp_path / "gateway.yaml", [sim.url]))
        try:
            big = b"Authorization: " + SECRET + b"x" * MAX_FIELD_SIZE
            [refused] = await exchange(gw.url, get(big))
            assert_refusal(refused, 431, "headers_too_large")
            gw.proc.wait_line("refused by the HTTP parser: headers_too_large", 10)
            assert "sk-secret" not in gw.proc.output
        finally:
            gw.proc.kill()
    finally:
        sim.proc.kill()
