"""Fuzzing the gateway in CI: about four thousand requests, each under a timeout.

1. schemathesis, from the gateway's own OpenAPI document: every operation, its coverage phase
   (each field at its bounds, of the wrong type, missing; wrong methods and media types) and its
   fuzzing phase (valid and invalid data). Every answer is checked against the document
   (status, content type, headers, body schema, each event of a stream) and by our own checks.
2. hypothesis, for the chat route: arbitrary JSON, plausible bodies whose every field may have
   any type, huge numbers, unicode and lone surrogates, long strings, deep nesting, streaming and
   not; raw bytes that are not JSON, wrong content types, bad keys and request ids.

Our checks: no 5xx (the simulated workers do not fail unless told to, so a 5xx is the
gateway's), every 4xx in the OpenAI error shape with a string ``code`` (or a worker's own error
relayed as it wrote it), no answer slower than ``TIMEOUT``, every stream well-formed.

One gateway and two simulated workers serve the whole module on real sockets, from an event
loop in a thread of their own: schemathesis and hypothesis send blocking requests, which a loop
in the test's own thread could not serve. Examples are derandomized: CI runs the same cases
every time.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Coroutine, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urlsplit

import aiohttp
import orjson
import pytest
import requests
import schemathesis
from aiohttp import web
from aiohttp.test_utils import TestServer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.checks import max_response_time, not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from gateway import keys
from gateway.app import create_app
from gateway.openapi import document
from gateway.settings import InputLimitSettings, build_settings
from gateway.simulator import SimConfig
from gateway.simulator import create_app as create_sim_app
from tests.conftest import TEST_SETTINGS, SimFactory
from tests.helpers import sse_data
from tests.served import served_gateway

T = TypeVar("T")

MODEL = "sim-model"
KEY = "sk-fuzz-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {KEY}"}
JSON = {"Content-Type": "application/json"}
TIMEOUT = 10.0  # seconds for one request, answer included: a hang fails its case
MAX_BODY = 256 * 1024  # small, so generated long strings cross it cheaply
MAX_DEPTH = InputLimitSettings().max_json_depth
MAX_TOKENS = 64


# --- the gateway under test -------------------------------------------------------------------


class LoopThread:
    """An event loop running in its own thread, for servers that blocking clients talk to."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self.loop.run_forever, name="fuzzed-gateway", daemon=True
        )
        self._thread.start()

    def run(self, work: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
        return asyncio.run_coroutine_threadsafe(work, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10.0)
        assert not self._thread.is_alive(), "the servers' loop did not stop"
        self.loop.close()


async def serve(app: web.Application) -> TestServer:
    server = TestServer(app)
    await server.start_server()
    return server


def url_of(server: TestServer) -> str:
    return str(server.make_url("")).rstrip("/")


@dataclass(frozen=True)
class Stack:
    url: str
    gateway: web.Application
    tally: Counter[str]  # cases run, per test: the module reports them at the end
    statuses: Counter[int]  # of the schemathesis cases


INSTANT = SimConfig(ttft_base=0, prefill_per_token=0, itl_base=0, itl_per_seq=0)


def gateway_settings(workers: list[str]) -> dict[str, Any]:
    """Every request-path feature on, so fuzzed bodies reach it: keys with (roomy) rate limits,
    prefix affinity, embeddings fan-out over two workers, resumable streams, input limits."""
    roomy = {"rpm": 10**9, "tpm": 10**12, "max_concurrent": 64}
    return {
        **TEST_SETTINGS,
        "workers": [{"url": url} for url in workers],
        "server": {"max_body_bytes": MAX_BODY},
        "input": {"max_tokens": MAX_TOKENS},
        "auth": {"keys": [{"name": "fuzz", "key": KEY, **roomy}]},
        "routing": {"affinity": "prefix", "embedding_shard_size": 2},
        "resume": {"enabled": True},
    }


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    servers = LoopThread()
    started: list[TestServer] = []
    try:
        for _ in range(2):
            started.append(servers.run(serve(create_sim_app(INSTANT))))
        settings = build_settings(gateway_settings([url_of(s) for s in started]))
        gateway = create_app(settings)
        started.append(servers.run(serve(gateway)))
        tally: Counter[str] = Counter()
        statuses: Counter[int] = Counter()
        yield Stack(url_of(started[-1]), gateway, tally, statuses)
        # Every request of every case has ended: none is left holding a slot.
        assert servers.run(gateway[keys.LIFECYCLE].wait_idle(5.0)), "requests still in flight"
        assert gateway[keys.PROXY].admission.in_flight == 0
        print(f"\nfuzz cases: {sum(tally.values())} {dict(tally)}")
        print(f"schemathesis statuses: {dict(statuses)}")
    finally:
        for server in reversed(started):
            servers.run(server.close())
        servers.close()


# --- what every answer must be ----------------------------------------------------------------


def check_answer(
    status: int, content_type: str, body: bytes, what: str, cut_short: bool = False
) -> None:
    assert status < 500, f"{what}\n=> {status} {body[:500]!r}"
    # The key's limits are far from reach: a 429 would be a lease or a token never given back.
    assert status != 429, f"{what}\n=> {status} {body[:500]!r}"
    if status >= 400:
        check_error(status, content_type, body, what)
    elif status == 200 and content_type.startswith("text/event-stream"):
        check_stream(body, what, cut_short)
    elif status == 200 and content_type.startswith("application/json"):
        assert isinstance(orjson.loads(body), dict), what


def check_error(status: int, content_type: str, body: bytes, what: str) -> None:
    """OpenAI's shape. ``code`` is a string for the gateway's own errors; a worker's error is
    relayed as the worker wrote it, and vLLM puts the HTTP status there."""
    shown = f"{what}\n=> {status} {content_type} {body[:500]!r}"
    assert content_type.startswith("application/json"), shown
    try:
        error = orjson.loads(body)["error"]
    except (orjson.JSONDecodeError, KeyError, TypeError):
        raise AssertionError(shown) from None
    assert isinstance(error["message"], str), what
    assert isinstance(error["type"], str), what
    assert error.get("param") is None or isinstance(error["param"], str), what
    code = error["code"]
    assert isinstance(code, str) or code == status, shown


def check_stream(body: bytes, what: str, cut_short: bool = False) -> None:
    """Whole events, each a JSON object; ``[DONE]`` last, or an in-band error event. A stream
    the client stopped reading (``cut_short``) has whole events only."""
    events = sse_data(body)
    assert events, what
    for data in events[:-1]:
        assert isinstance(orjson.loads(data), dict), f"{what}\n=> event {data[:300]!r}"
    last = events[-1]
    if cut_short:
        assert last == "[DONE]" or isinstance(orjson.loads(last), dict), what
        return
    assert last == "[DONE]" or "error" in orjson.loads(last), f"{what}\n=> last event {last!r}"


def fuzzing(examples: int) -> settings:
    return settings(
        max_examples=examples,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


# --- 1. schemathesis, from the document ---------------------------------------------------------

SCHEMA = schemathesis.openapi.from_dict(document())


def openai_errors(ctx: Any, response: Any, case: Any) -> None:
    # schemathesis stops reading an event stream after 20 events and closes the connection
    # (DEFAULT_MAX_STREAM_EVENTS), and says so: the gateway then logs a 499, and the stream
    # has no [DONE]. This was the "n > 1 stream without [DONE]" of issue 15's note: an n: 5
    # completions stream with echo is longer than 20 events.
    content_type = response.headers.get("content-type", [""])[0]
    check_answer(
        response.status_code, content_type, response.content, case.as_curl_command(),
        cut_short=response.stream_cut_short,
    )  # fmt: skip


CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    max_response_time,
    openai_errors,
]
# Not checked: `negative_data_rejection` and `positive_data_acceptance`. The gateway forwards
# fields it does not read to the worker, and the simulator is more lenient than vLLM (it ignores
# sampling fields); what is valid also depends on configured limits the document cannot know.


def call(case: Any, stack: Stack) -> None:
    stack.tally[f"schemathesis {case.operation.label}"] += 1
    # A generated model name is unknown to the workers, and the case would stop at a 404: a
    # valid one becomes the workers' model; an invalid one (not a string, empty) stays.
    if (
        isinstance(case.body, dict)
        and isinstance(case.body.get("model"), str)
        and case.body["model"]
    ):
        case.body["model"] = MODEL
    response = case.call(base_url=stack.url, headers=AUTH, timeout=TIMEOUT)
    stack.statuses[response.status_code] += 1
    case.validate_response(response, checks=CHECKS)


@pytest.mark.timeout(300)
@SCHEMA.include(method="POST").parametrize()
@fuzzing(300)
def test_schemathesis_openai_routes(case: Any, stack: Stack) -> None:
    call(case, stack)


@pytest.mark.timeout(120)
@SCHEMA.exclude(method="POST").parametrize()
@fuzzing(25)  # their only input is the X-Request-Id header
def test_schemathesis_other_routes(case: Any, stack: Stack) -> None:
    call(case, stack)


# --- 2. hypothesis, for the chat route -----------------------------------------------------------

HUGE = 2**200
LEAVES = (
    st.none()
    | st.booleans()
    | st.integers(-HUGE, HUGE)
    | st.floats()  # inf and nan serialise as Infinity / NaN: not JSON
    | st.text(max_size=30)
    | st.text(st.characters(categories=["Cs"]), min_size=1, max_size=3)  # lone surrogates
)
ANY_JSON = st.recursive(
    LEAVES,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=25,
)
LONG_TEXT = st.integers(0, 2 * MAX_BODY).map(lambda n: "é" * (n // 2))


def nested(depth: int) -> Any:
    """A value ``depth`` levels deep, objects and lists in turn."""
    value: Any = "x"
    for level in range(depth):
        value = [value] if level % 2 else {"k": value}
    return value


CONTENT_PART = st.fixed_dictionaries(
    {"type": st.sampled_from(["text", "image_url"]) | ANY_JSON},
    optional={"text": st.text(max_size=50) | ANY_JSON},
)
MESSAGE = st.fixed_dictionaries(
    {"role": st.sampled_from(["system", "user", "assistant", "tool"]) | ANY_JSON},
    optional={
        "content": st.text(max_size=200)
        | st.lists(CONTENT_PART, max_size=3)
        | LONG_TEXT
        | ANY_JSON,
        "name": st.text(max_size=10),
    },
)
TOOL = st.fixed_dictionaries(
    {"type": st.just("function"), "function": st.fixed_dictionaries({"name": st.text(max_size=10)})}
)
# Each field is mostly plausible and sometimes anything at all, so bodies get past the first
# check that would refuse them and reach the code behind it.
FIELDS: dict[str, st.SearchStrategy[Any]] = {
    "stream": st.booleans(),
    "stream_options": st.fixed_dictionaries(
        {}, optional={"include_usage": st.booleans(), "continuous_usage_stats": st.booleans()}
    ),
    "max_tokens": st.integers(1, MAX_TOKENS),
    "max_completion_tokens": st.integers(1, MAX_TOKENS),
    "n": st.integers(1, 3),
    "temperature": st.floats(0, 2),
    "top_p": st.floats(0.01, 1),
    "stop": st.text(max_size=5) | st.lists(st.text(max_size=5), max_size=3),
    "seed": st.integers(0, 2**63),
    "user": st.text(max_size=20),
    "tools": st.lists(TOOL, max_size=2),
    "tool_choice": st.sampled_from(["auto", "none"]),
    "logprobs": st.booleans(),
    "top_logprobs": st.integers(0, 5),
    "response_format": st.just({"type": "json_object"}),
    "continue_final_message": st.booleans(),
    "add_generation_prompt": st.booleans(),
    "deep": st.integers(1, 2 * MAX_DEPTH).map(nested),
}
CHAT_LIKE = st.fixed_dictionaries(
    {
        "model": st.just(MODEL) | st.text(max_size=10) | ANY_JSON,
        "messages": st.lists(MESSAGE, min_size=1, max_size=4) | ANY_JSON,
    },
    optional={name: value | ANY_JSON for name, value in FIELDS.items()},
)


@st.composite
def encoded(draw: st.DrawFn, data: st.SearchStrategy[Any]) -> bytes:
    """JSON text as a client might send it: ASCII with escapes, or raw UTF-8 (invalid UTF-8
    where it holds lone surrogates)."""
    value = draw(data)
    text = json.dumps(value, ensure_ascii=draw(st.booleans()))
    return text.encode("utf-8", "surrogatepass")


def post(session: requests.Session, url: str, body: bytes, headers: dict[str, str]) -> str:
    """POST, check the answer, and return what was sent (for the failure message)."""
    started = time.monotonic()
    response = session.post(url, data=body, headers=headers, timeout=TIMEOUT)
    elapsed = time.monotonic() - started
    what = f"POST {url} {headers} {body[:300]!r}"
    assert elapsed < TIMEOUT, f"{what}\n=> took {elapsed:.1f}s"
    content_type = response.headers.get("Content-Type", "")
    check_answer(response.status_code, content_type, response.content, what)
    return what


@pytest.mark.timeout(300)
def test_generated_chat_bodies(stack: Stack) -> None:
    url = f"{stack.url}/v1/chat/completions"
    headers = {**AUTH, **JSON}

    @fuzzing(1500)
    @given(encoded(CHAT_LIKE | ANY_JSON))
    def case(body: bytes) -> None:
        stack.tally["chat bodies"] += 1
        post(session, url, body, headers)

    with requests.Session() as session:
        case()


@pytest.mark.timeout(300)
def test_generated_streams_are_whole(stack: Stack) -> None:
    """Valid streaming bodies with any options: each answer is a whole, well-formed stream."""
    url = f"{stack.url}/v1/chat/completions"
    headers = {**AUTH, **JSON}
    body = st.fixed_dictionaries(
        {
            "model": st.just(MODEL),
            "messages": st.lists(MESSAGE, min_size=1, max_size=3),
            "stream": st.just(True),
        },
        optional={name: FIELDS[name] for name in ("stream_options", "max_tokens", "n", "stop")},
    )

    @fuzzing(300)
    @given(body.map(lambda data: json.dumps(data).encode()))
    def case(raw: bytes) -> None:
        stack.tally["streams"] += 1
        post(session, url, raw, headers)

    with requests.Session() as session:
        case()


CONTENT_TYPES = st.sampled_from(
    [
        "application/json",
        "application/json; charset=latin-1",
        "Application/JSON",
        "text/plain",
        "text/event-stream",
        "multipart/form-data; boundary=x",
        "application/x-www-form-urlencoded",
        "",
    ]
) | st.from_regex(r"[a-z]{1,8}/[a-z0-9+.\-]{1,12}(; ?[a-z]{1,7}=[a-z0-9\-]{0,8})?", fullmatch=True)
# Header values a client can send: latin-1, no line breaks, no leading space.
HEADER_TEXT = st.text(
    st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f"), max_size=40
).map(str.lstrip)
AUTHORIZATION = (
    st.sampled_from([f"Bearer {KEY}", f"bearer {KEY}", "Bearer", "", f"Basic {KEY}"]) | HEADER_TEXT
)
BODIES = (
    st.binary(max_size=300)
    | encoded(CHAT_LIKE)
    | st.sampled_from(
        [b"", b"null", b"[]", b"{}", b'"x"', b"{" * 5000, b"\xef\xbb\xbf{}", b"{}\x00"]
    )
)


@pytest.mark.timeout(300)
def test_generated_bytes_headers_and_content_types(stack: Stack) -> None:
    url = f"{stack.url}/v1/chat/completions"

    @fuzzing(600)
    @given(
        BODIES,
        CONTENT_TYPES,
        AUTHORIZATION,
        st.none() | st.sampled_from(["req-1", "a" * 200]) | HEADER_TEXT,
    )
    def case(body: bytes, content_type: str, authorization: str, request_id: str | None) -> None:
        stack.tally["bytes and headers"] += 1
        headers = {"Content-Type": content_type, "Authorization": authorization}
        if request_id is not None:
            headers["X-Request-Id"] = request_id
        post(session, url, body, headers)

    with requests.Session() as session:
        case()


def deep_body(depth: int) -> bytes:
    """A chat body with a field ``depth`` lists deep: the body is ``depth + 1`` levels."""
    prefix = (
        b'{"model": "%s", "messages": [{"role": "user", "content": "hi"}], "x": ' % MODEL.encode()
    )
    return prefix + b"[" * depth + b"]" * depth + b"}"


@pytest.mark.parametrize("depth", [MAX_DEPTH - 1, MAX_DEPTH, 1000, 100_000])
def test_nesting_at_and_beyond_the_limit(stack: Stack, depth: int) -> None:
    url = f"{stack.url}/v1/chat/completions"
    with requests.Session() as session:
        response = session.post(
            url, data=deep_body(depth), headers={**AUTH, **JSON}, timeout=TIMEOUT
        )
    check_answer(
        response.status_code, response.headers["Content-Type"], response.content, f"depth {depth}"
    )
    assert response.status_code == (200 if depth + 1 <= MAX_DEPTH else 400)


# --- bodies and framing the HTTP layer rejects ----------------------------------------------------
# An undecodable body is the gateway's to answer (a 400); what aiohttp's parser refuses before any
# middleware runs is answered by the gateway's protocol (gateway/protocol.py), so these gateways
# are served as server.py serves it. Each test runs its own gateway in the test's own thread:
# these requests make a server log, and Python 3.11 formats tracebacks with the `ast` module,
# whose state two threads can corrupt ("SystemError: AST constructor recursion depth mismatch").


@pytest.fixture
async def lone_gateway(sim: SimFactory) -> AsyncIterator[str]:
    async with served_gateway((await sim(INSTANT)).url) as url:
        yield url


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
async def test_a_body_that_does_not_decode_is_a_400(
    lone_gateway: str, client: aiohttp.ClientSession, encoding: str
) -> None:
    url = f"{lone_gateway}/v1/chat/completions"
    headers = {**JSON, "Content-Encoding": encoding}
    async with client.post(url, data=b"not compressed", headers=headers) as response:
        body = await response.read()
    check_answer(response.status, response.content_type, body, f"{encoding}: b'not compressed'")


async def raw_exchange(url: str, request: bytes) -> tuple[int, str, bytes]:
    """Send bytes as they are; read the answer until the server closes the connection."""
    address = urlsplit(url)
    reader, writer = await asyncio.open_connection(address.hostname, address.port)
    try:
        writer.write(request)
        async with asyncio.timeout(TIMEOUT):
            answer = await reader.read()
    finally:
        writer.close()
        await writer.wait_closed()
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:] if ": " in line)
    return int(lines[0].split()[1]), headers.get("Content-Type", ""), body


HEAD = b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n"


@pytest.mark.parametrize(
    ("request_bytes", "status", "code"),
    [
        (
            HEAD + b"Content-Encoding: br\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}",
            415,
            "unsupported_content_encoding",
        ),
        (
            HEAD + b"Content-Encoding: zstd\r\nContent-Length: 2\r\n\r\n{}",
            415,
            "unsupported_content_encoding",
        ),
        (HEAD + b"Transfer-Encoding: chunked\r\n\r\nZZ\r\nab\r\n0\r\n\r\n", 400, "invalid_http"),
        (HEAD + b"Bad Header: x\r\nContent-Length: 2\r\n\r\n{}", 400, "invalid_http"),
    ],
    ids=["content-encoding br", "content-encoding zstd", "bad chunk size", "bad header name"],
)
async def test_malformed_http_is_answered_in_the_openai_shape(
    lone_gateway: str, request_bytes: bytes, status: int, code: str
) -> None:
    answer = await raw_exchange(lone_gateway, request_bytes)
    check_answer(*answer, repr(request_bytes))
    assert answer[0] == status
    assert orjson.loads(answer[2])["error"]["code"] == code
