"""Units without sockets: the error tree, the balancer, admission control and fleet health."""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import Iterator

import orjson
import pytest

from gateway.errors import (
    AdminKeyRequired,
    ClientTooSlow,
    ConnectTimeout,
    ExpectationFailed,
    FirstTokenTimeout,
    GatewayError,
    HeadersTooLarge,
    IdleTimeout,
    InternalError,
    InvalidField,
    InvalidJSON,
    InvalidRequest,
    MalformedHTTP,
    MethodNotAllowed,
    ModelNotFound,
    NoHealthyWorker,
    Overloaded,
    PayloadTooLarge,
    RateLimited,
    RequestBodyTimeout,
    ResponseHolderLost,
    ResponseHolderUnavailable,
    ResponseNotFound,
    RouteNotFound,
    ShuttingDown,
    StaleConnection,
    TotalTimeout,
    Unauthorized,
    Unavailable,
    UnsupportedContentEncoding,
    UnsupportedMediaType,
    UpstreamAborted,
    UpstreamBadAnswer,
    UpstreamBadResponse,
    UpstreamConnectError,
    UpstreamDisconnected,
    UpstreamError,
    UpstreamMalformedEvent,
    UpstreamStatusError,
    UpstreamStreamError,
    UpstreamStreamTruncated,
    UpstreamTimeout,
    WorkersCoolingDown,
    is_openai_error,
)
from gateway.failover import worker_at_fault
from gateway.limits import Admission
from gateway.middleware import error_response

DEADLINE = 2.0  # seconds any gate in this file may take before the test fails by name


def subclasses(cls: type[GatewayError]) -> Iterator[type[GatewayError]]:
    for sub in cls.__subclasses__():
        yield sub
        yield from subclasses(sub)


# --- errors ---------------------------------------------------------------------------------

# The documented tree (gateway/errors.py docstring): status, OpenAI type, code, retryable.
TREE: dict[type[GatewayError], tuple[int, str, str, bool]] = {
    InternalError: (500, "server_error", "internal_error", False),
    InvalidRequest: (400, "invalid_request_error", "invalid_body", False),
    InvalidJSON: (400, "invalid_request_error", "invalid_json", False),
    InvalidField: (400, "invalid_request_error", "invalid_field", False),
    ModelNotFound: (404, "invalid_request_error", "model_not_found", False),
    RouteNotFound: (404, "invalid_request_error", "route_not_found", False),
    MethodNotAllowed: (405, "invalid_request_error", "method_not_allowed", False),
    PayloadTooLarge: (413, "invalid_request_error", "request_too_large", False),
    UnsupportedMediaType: (415, "invalid_request_error", "unsupported_media_type", False),
    ExpectationFailed: (417, "invalid_request_error", "expectation_failed", False),
    ClientTooSlow: (408, "invalid_request_error", "client_too_slow", False),
    RequestBodyTimeout: (408, "invalid_request_error", "request_body_timeout", False),
    Unauthorized: (401, "invalid_request_error", "invalid_api_key", False),
    RateLimited: (429, "requests", "rate_limit_exceeded", False),
    Unavailable: (503, "server_error", "unavailable", False),
    Overloaded: (503, "server_error", "gateway_overloaded", False),
    NoHealthyWorker: (503, "server_error", "no_healthy_worker", False),
    WorkersCoolingDown: (503, "server_error", "workers_cooling_down", False),
    ResponseHolderUnavailable: (503, "server_error", "response_holder_unavailable", False),
    UnsupportedContentEncoding: (
        415,
        "invalid_request_error",
        "unsupported_content_encoding",
        False,
    ),
    HeadersTooLarge: (431, "invalid_request_error", "headers_too_large", False),
    MalformedHTTP: (400, "invalid_request_error", "invalid_http", False),
    ResponseNotFound: (404, "invalid_request_error", "response_not_found", False),
    ResponseHolderLost: (404, "invalid_request_error", "response_holder_lost", False),
    AdminKeyRequired: (403, "invalid_request_error", "admin_key_required", False),
    ShuttingDown: (503, "server_error", "shutting_down", False),
    UpstreamError: (502, "upstream_error", "upstream_error", False),
    UpstreamConnectError: (502, "upstream_error", "upstream_connect_error", True),
    UpstreamDisconnected: (502, "upstream_error", "upstream_disconnected", True),
    StaleConnection: (502, "upstream_error", "upstream_stale_connection", True),
    UpstreamStatusError: (503, "upstream_error", "upstream_unavailable", True),
    UpstreamBadResponse: (502, "upstream_error", "upstream_bad_response", False),
    UpstreamMalformedEvent: (502, "upstream_error", "upstream_malformed_event", True),
    UpstreamBadAnswer: (502, "upstream_error", "upstream_bad_answer", True),
    UpstreamStreamError: (502, "upstream_error", "upstream_stream_error", True),
    UpstreamStreamTruncated: (502, "upstream_error", "upstream_stream_truncated", False),
    UpstreamAborted: (502, "upstream_error", "upstream_aborted", True),
    UpstreamTimeout: (504, "timeout_error", "upstream_timeout", False),
    ConnectTimeout: (504, "timeout_error", "connect_timeout", True),
    FirstTokenTimeout: (504, "timeout_error", "first_token_timeout", True),
    IdleTimeout: (504, "timeout_error", "idle_timeout", False),
    TotalTimeout: (504, "timeout_error", "request_timeout", False),
}


def instance(cls: type[GatewayError]) -> GatewayError:
    if cls is ModelNotFound:
        return ModelNotFound("gpt-x")
    if cls is PayloadTooLarge:
        return PayloadTooLarge(1024)
    if cls is UpstreamStatusError:
        return UpstreamStatusError(503, b"<html>busy</html>", {})
    if cls is RateLimited:
        return RateLimited("requests", 1.5, {"x-ratelimit-limit-requests": "10"})
    if issubclass(cls, ResponseNotFound):
        return cls("resp_1", "previous_response_id")
    return cls()


def test_tree_lists_every_error_class() -> None:
    assert set(subclasses(GatewayError)) == set(TREE)


@pytest.mark.parametrize("cls", list(TREE), ids=lambda cls: cls.__name__)
def test_error_knows_status_type_code_and_retryable(cls: type[GatewayError]) -> None:
    err = instance(cls)
    assert (err.status, err.type, err.code, err.retryable) == TREE[cls]


@pytest.mark.parametrize("cls", list(TREE), ids=lambda cls: cls.__name__)
def test_error_renders_the_openai_shape(cls: type[GatewayError]) -> None:
    err = instance(cls)
    body = orjson.loads(err.body_bytes())
    assert body == err.body()
    assert list(body) == ["error"]
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert isinstance(body["error"]["code"], str)
    assert body["error"]["code"] == err.code
    assert isinstance(body["error"]["message"], str)
    assert body["error"]["message"]
    assert 400 <= err.status < 600


def test_codes_are_unique() -> None:
    codes = Counter(instance(cls).code for cls in TREE if cls is not UpstreamStatusError)
    assert [code for code, n in codes.items() if n > 1] == []


def test_message_and_param_are_the_callers() -> None:
    err = InvalidField("temperature must be at most 2", param="temperature")
    assert err.body()["error"] == {
        "message": "temperature must be at most 2",
        "type": "invalid_request_error",
        "param": "temperature",
        "code": "invalid_field",
    }
    assert str(err) == "temperature must be at most 2"


def test_model_not_found_names_the_model() -> None:
    assert ModelNotFound("gpt-x").body()["error"] == {
        "message": "The model 'gpt-x' does not exist.",
        "type": "invalid_request_error",
        "param": "model",
        "code": "model_not_found",
    }


def test_payload_too_large_states_the_limit() -> None:
    assert PayloadTooLarge(1024).message == "The request body exceeds the limit of 1024 bytes."
    assert PayloadTooLarge().message == "The request body exceeds the limit."


@pytest.mark.parametrize(
    "cls", [Unavailable, *subclasses(Unavailable)], ids=lambda cls: cls.__name__
)
def test_unavailable_errors_carry_retry_after(cls: type[Unavailable]) -> None:
    assert cls().headers() == {"Retry-After": "1"}
    err = cls(retry_after=7)
    assert err.headers() == {"Retry-After": "7"}
    response = error_response(err)
    assert response.status == 503
    assert response.headers["Retry-After"] == "7"
    assert response.content_type == "application/json"


def test_unauthorized_names_the_scheme_and_rate_limited_says_when() -> None:
    assert Unauthorized().headers() == {"WWW-Authenticate": 'Bearer realm="vllm-gateway"'}
    err = RateLimited("tokens", 1.2, {"x-ratelimit-remaining-tokens": "0"})
    assert err.headers() == {"x-ratelimit-remaining-tokens": "0", "Retry-After": "2"}
    assert err.body()["error"]["type"] == "tokens"  # type: ignore[index]
    assert "try again in 2s" in err.message


def test_other_errors_carry_no_extra_headers() -> None:
    special = Unavailable | UpstreamStatusError | Unauthorized | RateLimited
    plain = [cls for cls in TREE if not issubclass(cls, special)]
    assert {cls.__name__: instance(cls).headers() for cls in plain} == {
        cls.__name__: {} for cls in plain
    }


NESTED = orjson.dumps(
    {
        "error": {
            "message": "This model's maximum context length is 4096 tokens.",
            "type": "BadRequestError",
            "param": None,
            "code": 400,
        }
    }
)
HTML = b"<html><body>502 Bad Gateway</body></html>"
FLAT = orjson.dumps(
    {
        "object": "error",
        "message": "This model's maximum context length is 4096 tokens.",
        "type": "BadRequestError",
        "param": None,
        "code": 400,
    }
)


@pytest.mark.parametrize("body", [NESTED, FLAT], ids=["nested", "vllm_flat"])
def test_upstream_openai_body_passes_through_unchanged(body: bytes) -> None:
    err = UpstreamStatusError(400, body, {"Content-Type": "application/json"})
    assert err.body_bytes() == body
    response = error_response(err)
    assert response.status == 400
    assert response.body == body
    assert response.content_type == "application/json"


DEFAULT = "The model worker answered with an error."


@pytest.mark.parametrize(
    ("status", "body", "code", "kind", "message"),
    [
        (502, HTML, "upstream_unavailable", "upstream_error", DEFAULT),
        (401, b'{"error": "Unauthorized"}', "upstream_http_401", "invalid_request_error",
         "The model worker answered 401: Unauthorized"),
        (500, b'{"detail": "Internal Server Error"}', "upstream_http_500", "upstream_error",
         "Internal Server Error"),
        # FastAPI's answer (vLLM's server) to a route it does not serve.
        (404, b'{"detail": "Not Found"}', "upstream_http_404", "invalid_request_error",
         "The model worker answered 404: Not Found"),
        (422, b'{"detail": [{"loc": ["body"]}]}', "upstream_http_422", "invalid_request_error",
         DEFAULT),
        (400, b'{"error": {"message": 5}}', "upstream_http_400", "invalid_request_error", DEFAULT),
        (404, b"", "upstream_http_404", "invalid_request_error", DEFAULT),
    ],
)  # fmt: skip
def test_upstream_other_body_is_wrapped_with_the_workers_status(
    status: int, body: bytes, code: str, kind: str, message: str
) -> None:
    err = UpstreamStatusError(status, body, {})
    assert err.status == status
    assert orjson.loads(err.body_bytes()) == {
        "error": {
            "message": message,
            "type": kind,
            "param": None,
            "code": code,
        }
    }


def test_wrapped_upstream_body_is_sent_as_json() -> None:
    response = error_response(UpstreamStatusError(502, HTML, {"Content-Type": "text/html"}))
    assert response.body == UpstreamStatusError(502, HTML, {}).body_bytes()
    assert response.content_type == "application/json"


def test_upstream_retry_after_is_relayed() -> None:
    err = UpstreamStatusError(503, b"", {"Retry-After": "3"})
    assert error_response(err).headers["Retry-After"] == "3"


@pytest.mark.parametrize("status", range(400, 600))
def test_upstream_status_codes_and_whose_fault(status: int) -> None:
    err = UpstreamStatusError(status, b"", {})
    unavailable = status in {429, 502, 503, 504}
    assert err.code == ("upstream_unavailable" if unavailable else f"upstream_http_{status}")
    assert worker_at_fault(err) is (status >= 500 and status != 503)  # busy is not sick


def test_a_busy_or_failed_workers_body_becomes_ours_with_its_message() -> None:
    worker = b'{"error": {"message": "engine dead", "type": "x", "code": 7}}'
    for status in (429, 500, 503):
        body = orjson.loads(UpstreamStatusError(status, worker, {}).body_bytes())["error"]
        assert body["message"] == "engine dead"
        assert body["code"] == ("upstream_http_500" if status == 500 else "upstream_unavailable")
    assert UpstreamStatusError(400, worker, {}).body_bytes() == worker  # the client's error


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (NESTED, True),
        (FLAT, True),
        (b'{"error": {"message": "no", "code": "x"}}', True),
        (b'{"error": "Unauthorized"}', False),
        (b'{"error": {"code": 401}}', False),
        (b'{"error": {"message": null}}', False),
        (b'{"object": "error"}', False),
        (b'{"object": "list", "message": "hi"}', False),
        (b'["error"]', False),
        (b'"error"', False),
        (b"<html>oops</html>", False),
        (b"", False),
        (b"\xff\xfe", False),
    ],
)
def test_is_openai_error(body: bytes, expected: bool) -> None:
    assert is_openai_error(body) is expected


# --- admission ------------------------------------------------------------------------------


async def hold(admission: Admission, entered: asyncio.Event, release: asyncio.Event) -> None:
    async with admission.slot():
        entered.set()
        await release.wait()


async def test_free_slot_admits_without_suspending() -> None:
    admission = Admission(2, queue_timeout=0, retry_after=1)
    other = asyncio.get_running_loop().create_future()
    asyncio.get_running_loop().call_soon(other.set_result, None)
    async with admission.slot():
        assert not other.done()  # the loop never ran: no wait happened
        assert admission.in_flight == 1
        async with admission.slot():
            assert admission.in_flight == 2
    assert admission.in_flight == 0
    await other


async def test_full_with_zero_queue_timeout_sheds_at_once() -> None:
    admission = Admission(1, queue_timeout=0, retry_after=7)
    async with admission.slot():
        other = asyncio.get_running_loop().create_future()
        asyncio.get_running_loop().call_soon(other.set_result, None)
        with pytest.raises(Overloaded) as info:
            async with admission.slot():
                pytest.fail("admitted past the limit")
        assert not other.done()  # shed before the loop ran again: no wait at all
        assert admission.in_flight == 1
        await other
    assert info.value.retry_after == 7
    assert info.value.headers() == {"Retry-After": "7"}
    assert admission.in_flight == 0


async def test_waiter_is_admitted_when_a_slot_frees() -> None:
    """1. A holds the only slot. 2. B queues (long timeout). 3. A leaves. 4. B gets in at once."""
    admission = Admission(1, queue_timeout=30.0, retry_after=1)
    entered, release = asyncio.Event(), asyncio.Event()
    admitted, done = asyncio.Event(), asyncio.Event()
    holder = asyncio.create_task(hold(admission, entered, release))
    await asyncio.wait_for(entered.wait(), DEADLINE)
    waiter = asyncio.create_task(hold(admission, admitted, done))
    await asyncio.sleep(0)  # one loop turn: B runs up to its wait for the slot
    assert not admitted.is_set()
    assert admission.in_flight == 1

    release.set()
    await asyncio.wait_for(admitted.wait(), DEADLINE)  # far below the 30 s queue timeout
    assert holder.done()
    assert admission.in_flight == 1
    done.set()
    await asyncio.wait_for(waiter, DEADLINE)
    assert admission.in_flight == 0


async def test_waiter_is_shed_after_the_queue_timeout() -> None:
    admission = Admission(1, queue_timeout=0.05, retry_after=3)
    loop = asyncio.get_running_loop()
    async with admission.slot():
        started = loop.time()
        with pytest.raises(Overloaded) as info:
            async with asyncio.timeout(DEADLINE), admission.slot():
                pytest.fail("admitted past the limit")
        waited = loop.time() - started
    assert 0.05 <= waited < 1.0
    assert info.value.retry_after == 3
    assert admission.in_flight == 0


async def assert_all_slots_free(admission: Admission) -> None:
    """Every slot can be taken again; a leaked one would shed or wait past the deadline."""
    assert admission.in_flight == 0
    async with asyncio.timeout(DEADLINE), contextlib.AsyncExitStack() as stack:
        for _ in range(admission.limit):
            await stack.enter_async_context(admission.slot())
        assert admission.in_flight == admission.limit
    assert admission.in_flight == 0


async def test_slot_is_returned_after_an_exception() -> None:
    admission = Admission(2, queue_timeout=0, retry_after=1)
    with pytest.raises(RuntimeError, match="boom"):
        async with admission.slot():
            raise RuntimeError("boom")
    await assert_all_slots_free(admission)


async def test_slot_is_returned_when_the_holder_is_cancelled() -> None:
    admission = Admission(2, queue_timeout=0, retry_after=1)
    entered, never = asyncio.Event(), asyncio.Event()
    holder = asyncio.create_task(hold(admission, entered, never))
    await asyncio.wait_for(entered.wait(), DEADLINE)
    assert admission.in_flight == 1
    holder.cancel()
    with pytest.raises(asyncio.CancelledError):
        await holder
    await assert_all_slots_free(admission)


async def test_cancelled_waiter_takes_no_slot() -> None:
    admission = Admission(2, queue_timeout=30.0, retry_after=1)
    entered, release = asyncio.Event(), asyncio.Event()
    holders = [asyncio.create_task(hold(admission, entered, release)) for _ in range(2)]
    await asyncio.wait_for(entered.wait(), DEADLINE)
    waiter = asyncio.create_task(hold(admission, asyncio.Event(), asyncio.Event()))
    await asyncio.sleep(0)  # one loop turn: the waiter queues for a slot
    assert admission.in_flight == 2
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    release.set()
    await asyncio.wait_for(asyncio.gather(*holders), DEADLINE)
    await assert_all_slots_free(admission)


async def test_waiter_cancelled_after_being_handed_a_slot_gives_it_back() -> None:
    """The slot is released to B, and B is cancelled before it runs: the slot must not leak."""
    admission = Admission(1, queue_timeout=30.0, retry_after=1)
    admitted = asyncio.Event()
    async with admission.slot():
        waiter = asyncio.create_task(hold(admission, admitted, asyncio.Event()))
        await asyncio.sleep(0)  # one loop turn: the waiter queues for a slot
    waiter.cancel()  # no await since the release: the waiter has not run yet
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert not admitted.is_set()
    assert admission.in_flight == 0
    async with asyncio.timeout(DEADLINE), admission.slot():
        assert admission.in_flight == 1


async def test_slots_go_to_waiters_in_arrival_order_and_not_to_a_newcomer() -> None:
    """1. A holds the only slot; B then C queue. 2. A leaves: B (not C, not a newcomer D that
    arrives in the same turn) gets it. 3. B leaves: C gets it."""
    admission = Admission(1, queue_timeout=30.0, retry_after=1)
    order: list[str] = []
    gates = {name: asyncio.Event() for name in "ABCD"}

    async def visit(name: str) -> None:
        async with admission.slot():
            order.append(name)
            await gates[name].wait()

    a = asyncio.create_task(visit("A"))
    await asyncio.sleep(0)
    b, c = asyncio.create_task(visit("B")), asyncio.create_task(visit("C"))
    await asyncio.sleep(0)
    gates["A"].set()
    d = asyncio.create_task(visit("D"))  # arrives while B's grant is on its way
    async with asyncio.timeout(DEADLINE):
        while len(order) < 2:
            await asyncio.sleep(0)
        assert order == ["A", "B"] and admission.in_flight == 1
        gates["B"].set()
        while len(order) < 3:
            await asyncio.sleep(0)
        assert order == ["A", "B", "C"]
        gates["C"].set()
        gates["D"].set()
        await asyncio.gather(a, b, c, d)
    assert order == ["A", "B", "C", "D"]
    await assert_all_slots_free(admission)


async def test_a_waiter_that_is_cancelled_leaves_the_queue() -> None:
    admission = Admission(1, queue_timeout=30.0, retry_after=1)
    entered, release = asyncio.Event(), asyncio.Event()
    holder = asyncio.create_task(hold(admission, entered, release))
    await asyncio.wait_for(entered.wait(), DEADLINE)
    gone = asyncio.create_task(hold(admission, asyncio.Event(), asyncio.Event()))
    await asyncio.sleep(0)
    gone.cancel()  # the client went away while queued
    with pytest.raises(asyncio.CancelledError):
        await gone
    release.set()
    await asyncio.wait_for(holder, DEADLINE)
    await assert_all_slots_free(admission)


async def test_a_slot_granted_as_the_wait_ends_is_passed_on() -> None:
    """The holder leaves and, in the same loop turn, the waiter is cancelled (its timeout or
    its client): the waiter does not get in, and the slot it was handed is not lost."""
    admission = Admission(1, queue_timeout=30.0, retry_after=1)
    slot = admission.slot()
    await slot.__aenter__()
    waiter = asyncio.create_task(hold(admission, asyncio.Event(), asyncio.Event()))
    await asyncio.sleep(0)
    await slot.__aexit__(None, None, None)  # hands the slot to the waiter, without suspending
    waiter.cancel()  # before the waiter ran again
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(waiter, DEADLINE)
    await assert_all_slots_free(admission)
