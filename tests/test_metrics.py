"""Metrics and the access log over real sockets: token counters, inter-token latency,
event-loop lag, and one JSON access line per request that never carries the prompt."""

from __future__ import annotations

import asyncio
import logging
import time

import aiohttp
import orjson
import pytest

from gateway.logs import JsonFormatter
from tests.conftest import GatewayFactory, SimFactory
from tests.helpers import chat, sse_data, stream_text, wait_for

MODEL = "sim-model"


def _usage(raw: bytes) -> dict[str, int]:
    events = [orjson.loads(d) for d in sse_data(raw) if d != "[DONE]"]
    [usage] = [e["usage"] for e in events if e.get("usage")]
    return {k: v for k, v in usage.items() if isinstance(v, int)}


async def test_token_counters_equal_the_usage_the_worker_reported(
    sim: SimFactory, gateway: GatewayFactory, client: aiohttp.ClientSession
) -> None:
    gw = await gateway(await sim())
    total = {"prompt": 0, "completion": 0}
    for max_tokens in (3, 7):
        body = chat(stream=True, max_tokens=max_tokens, stream_options={"include_usage": True})
        async with client.post(f"{gw.url}/v1/chat/completions", json=body) as resp:
            assert resp.status == 200
            usage = _usage(await resp.read())
        assert usage["completion_tokens"] == max_tokens
        total["prompt"] += usage["prompt_tokens"]
        total["completion"] += usage["completion_tokens"]
    for kind, tokens in total.items():
        assert gw.metric("gateway_tokens_total", model=MODEL, kind=kind) == tokens


async def test_usage_is_asked_for_and_hidden_when_the_client_did_not_ask(
    sim: SimFactory, gateway: GatewayFactory, client: aiohttp.ClientSession
) -> None:
    """The gateway asks the worker for usage (exact token metrics) and removes the extra chunk,
    so the client sees exactly the stream it asked for."""
    worker = await sim()
    gw = await gateway(worker)
    body = chat(stream=True, max_tokens=6, stream_options={"continuous_usage_stats": False})
    async with client.post(f"{gw.url}/v1/chat/completions", json=body) as resp:
        raw = await resp.read()
    async with client.post(f"{worker.url}/v1/chat/completions", json=body) as direct:
        expected = await direct.read()
    events = sse_data(raw)
    assert events[-1] == "[DONE]"
    assert not any('"usage"' in event for event in events)
    assert len(events) == len(sse_data(expected))  # the same events as without the gateway
    assert gw.metric("gateway_tokens_total", model=MODEL, kind="completion") == 6
    assert gw.metric("gateway_tokens_total", model=MODEL, kind="prompt") > 0


async def test_client_that_asked_for_usage_gets_it_once(
    sim: SimFactory, gateway: GatewayFactory, client: aiohttp.ClientSession
) -> None:
    gw = await gateway(await sim())
    body = chat(stream=True, max_tokens=3, stream_options={"include_usage": True})
    async with client.post(f"{gw.url}/v1/chat/completions", json=body) as resp:
        raw = await resp.read()
    assert _usage(raw)["completion_tokens"] == 3
    assert gw.metric("gateway_tokens_total", model=MODEL, kind="completion") == 3


async def test_non_stream_tokens_are_read_from_the_body(
    sim: SimFactory, gateway: GatewayFactory, client: aiohttp.ClientSession
) -> None:
    gw = await gateway(await sim())
    async with client.post(f"{gw.url}/v1/chat/completions", json=chat(max_tokens=4)) as resp:
        data = await resp.json()
    async with client.post(
        f"{gw.url}/v1/embeddings", json={"model": MODEL, "input": ["a b c", "d"]}
    ) as resp:
        embedded = await resp.json()
    assert gw.metric("gateway_tokens_total", model=MODEL, kind="completion") == 4
    prompt = data["usage"]["prompt_tokens"] + embedded["usage"]["prompt_tokens"]
    assert gw.metric("gateway_tokens_total", model=MODEL, kind="prompt") == prompt


async def test_inter_token_latency_observes_the_gaps_of_a_stream(
    sim: SimFactory, gateway: GatewayFactory, client: aiohttp.ClientSession
) -> None:
    itl = 0.02
    gw = await gateway(await sim(itl_base=itl, itl_per_seq=0.0))
    async with client.post(f"{gw.url}/v1/chat/completions", json=chat(max_tokens=4)) as resp:
        await resp.read()
    name = "gateway_inter_token_latency_seconds"
    assert gw.metric(f"{name}_count", model=MODEL) == 0  # not a stream: no gaps observed
    body = chat(stream=True, max_tokens=10)
    async with client.post(f"{gw.url}/v1/chat/completions", json=body) as resp:
        await resp.read()
    count = gw.metric(f"{name}_count", model=MODEL)
    # Ten tokens give nine gaps of `itl` after the first one (plus the [DONE] read); a read
    # may join two events, which makes fewer, longer gaps, never shorter ones.
    assert 1 <= count <= 11
    assert gw.metric(f"{name}_sum", model=MODEL) / count >= itl * 0.8
    assert gw.metric(f"{name}_sum", model=MODEL) >= 8 * itl * 0.9


async def test_event_loop_lag_shows_a_blocking_call(
    sim: SimFactory, gateway: GatewayFactory
) -> None:
    gw = await gateway(await sim())
    name = "gateway_event_loop_lag_seconds"
    await wait_for(lambda: gw.metric(f"{name}_count") >= 1, 5, "a first lag observation")
    assert gw.metric(f"{name}_bucket", le="0.1") == gw.metric(f"{name}_count")
    time.sleep(0.6)  # blocks the loop: the lag is at least 0.6 - LOOP_LAG_INTERVAL
    await wait_for(
        lambda: gw.metric(f"{name}_bucket", le="0.1") < gw.metric(f"{name}_count"),
        5,
        "a lag observation above 0.1 s",
    )


async def test_access_log_is_one_json_line_with_ids_and_tokens_but_no_prompt(
    sim: SimFactory,
    gateway: GatewayFactory,
    client: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    gw = await gateway(await sim())
    caplog.set_level(logging.INFO, logger="gateway.access")
    prompt = "the-secret-prompt-xyzzy"
    body = chat(stream=True, max_tokens=5, stream_options={"include_usage": True})
    body["messages"][0]["content"] = prompt
    headers = {"Authorization": "Bearer sk-secret-key-123", "X-Request-Id": "req-metrics-1"}
    async with client.post(f"{gw.url}/v1/chat/completions", json=body, headers=headers) as resp:
        raw = await resp.read()
    usage = _usage(raw)
    [record] = [r for r in caplog.records if r.name == "gateway.access"]
    line = JsonFormatter().format(record)
    assert "\n" not in line
    fields = orjson.loads(line)
    assert fields["request_id"] == "req-metrics-1"
    assert fields["model"] == MODEL
    assert fields["route"] == "chat_completions"
    assert fields["worker"] == gw.fleet.workers[0].url
    assert fields["status"] == 200
    assert fields["code"] == ""
    assert fields["retries"] == 0
    assert fields["ttft"] is not None and fields["ttft"] <= fields["duration"]
    assert fields["prompt_tokens"] == usage["prompt_tokens"]
    assert fields["completion_tokens"] == 5
    assert prompt not in line and "xyzzy" not in line
    assert "sk-secret" not in line
    answer = stream_text(raw)
    assert len(answer) > 10 and answer not in line  # nor the completion


async def test_upstream_connect_time_counts_new_connections_only(
    sim: SimFactory, gateway: GatewayFactory, client: aiohttp.ClientSession
) -> None:
    worker = await sim()
    gw = await gateway(worker)
    name = "gateway_upstream_connect_seconds_count"
    assert gw.registry.get_sample_value(name, {"worker": worker.url}) == 0  # exported at zero
    for _ in range(3):  # one after another: the pooled connection is reused
        async with client.post(f"{gw.url}/v1/chat/completions", json=chat()) as resp:
            assert resp.status == 200
            await resp.read()
    assert gw.metric(name, worker=worker.url) == 1
    assert 0 < gw.metric("gateway_upstream_connect_seconds_sum", worker=worker.url) < 1.0


async def test_passive_ejection_is_counted_and_shown_as_unhealthy(
    sim: SimFactory, gateway: GatewayFactory, client: aiohttp.ClientSession
) -> None:
    """The first 500 ejects its worker; the second goes to the other worker, which is then the
    last in rotation and is kept: exactly one ejection, shown on the worker that had it."""
    workers = [await sim(), await sim()]
    gw = await gateway(
        *workers,
        health={"interval": 60.0, "timeout": 1.0, "failures_to_eject": 1},
        retry={"max_attempts": 1},  # one attempt a request: one failure each
    )
    for w in workers:
        assert gw.metric("gateway_worker_ejections_total", worker=w.url) == 0
        assert gw.metric("gateway_worker_healthy", worker=w.url) == 1
    for _ in range(2):
        headers = {"X-Sim-Fault": "status=500"}
        async with client.post(
            f"{gw.url}/v1/chat/completions", json=chat(), headers=headers
        ) as resp:
            assert resp.status == 500
            await resp.read()
    ejected = [w for w in workers if gw.metric("gateway_worker_ejections_total", worker=w.url)]
    assert len(ejected) == 1
    [kept] = [w for w in workers if w is not ejected[0]]
    assert gw.metric("gateway_worker_ejections_total", worker=ejected[0].url) == 1
    assert gw.metric("gateway_worker_healthy", worker=ejected[0].url) == 0
    assert gw.metric("gateway_worker_healthy", worker=kept.url) == 1
    for w in workers:
        assert gw.metric("gateway_upstream_errors_total", worker=w.url,
                         kind="upstream_http_500") == 1  # fmt: skip


async def test_batched_updates_add_up_to_what_direct_ones_would_have() -> None:
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

    from gateway.metrics import (
        SHORT_BUCKETS,
        Batch,
        PendingCounter,
        PendingGauge,
        PendingHistogram,
    )

    registry = CollectorRegistry()
    batch = Batch(interval=0.05)
    hist = Histogram("h", "h", ["s"], buckets=SHORT_BUCKETS, registry=registry)
    count = Counter("c", "c", registry=registry)
    level = Gauge("g", "g", registry=registry)
    values = [0.0, *SHORT_BUCKETS, 0.0007, 0.003, 7.0, 123.0] * 20  # bounds, between, beyond
    batched = PendingHistogram(batch, hist.labels("batched"))
    counted, levelled = PendingCounter(batch, count), PendingGauge(batch, level)
    for value in values:
        hist.labels("observed").observe(value)
        batched.observe(value)
        counted.inc(2)
        levelled.inc(3)
        levelled.dec()
    assert registry.get_sample_value("h_count", {"s": "batched"}) == 0  # all pending
    assert registry.get_sample_value("c_total") == 0
    await asyncio.sleep(0)  # a turn of the loop is no flush: the interval is
    assert registry.get_sample_value("c_total") == 0
    await wait_for(lambda: registry.get_sample_value("c_total") != 0, 5, "the batch's flush")
    assert registry.get_sample_value("c_total") == 2 * len(values)
    assert registry.get_sample_value("g") == 2 * len(values)

    def samples(series: str) -> list[tuple[str, str, float]]:
        [family] = [m for m in registry.collect() if m.name == "h"]
        return [
            (s.name, s.labels.get("le", ""), round(s.value, 9))
            for s in family.samples
            if s.labels["s"] == series and not s.name.endswith("_created")
        ]

    assert samples("batched") == samples("observed")


async def test_a_closed_batch_adds_what_is_pending_and_every_later_update_at_once() -> None:
    from prometheus_client import CollectorRegistry, Counter

    from gateway.metrics import Batch, PendingCounter

    registry = CollectorRegistry()
    batch = Batch(interval=3600.0)  # no timer fires in this test
    counted = PendingCounter(batch, Counter("c", "c", registry=registry))
    counted.inc()
    assert registry.get_sample_value("c_total") == 0  # pending
    batch.close()  # the app's cleanup, at a graceful stop
    assert registry.get_sample_value("c_total") == 1
    counted.inc()  # an update made after it (a handler cancelled last)
    assert registry.get_sample_value("c_total") == 2


async def test_a_collection_on_the_loop_sees_every_batched_update_at_once() -> None:
    from prometheus_client import CollectorRegistry

    from gateway.metrics import GatewayMetrics

    registry = CollectorRegistry()
    metrics = GatewayMetrics(registry)
    metrics.requests_of("m", "chat_completions", "200", "").inc()
    metrics.in_flight_batched.inc()
    # No turn of the loop in between: the registry's first collector flushes the batch.
    labels = {"model": "m", "route": "chat_completions", "status": "200", "code": ""}
    assert registry.get_sample_value("gateway_requests_total", labels) == 1
    assert registry.get_sample_value("gateway_requests_in_flight") == 1
    assert b"gateway_requests_in_flight 1.0" in metrics.exposition()


def _access_lines(caplog: pytest.LogCaptureFixture) -> list[dict[str, object]]:
    formatter = JsonFormatter()
    return [orjson.loads(formatter.format(r)) for r in caplog.records if r.name == "gateway.access"]


async def test_a_refused_key_gets_an_access_line_and_a_rejection_count(
    sim: SimFactory,
    gateway: GatewayFactory,
    client: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A request refused before any handler (a wrong key here) shows in the access log and in
    gateway_rejections_total by its code: failed logins are not invisible."""
    gw = await gateway(await sim(), auth={"keys": [{"name": "a", "key": "sk-right-key"}]})
    caplog.set_level(logging.INFO, logger="gateway.access")
    headers = {"Authorization": "Bearer sk-wrong-guess", "X-Request-Id": "req-refused-1"}
    async with client.post(f"{gw.url}/v1/chat/completions", json=chat(), headers=headers) as resp:
        assert resp.status == 401
    [line] = _access_lines(caplog)
    assert line["request_id"] == "req-refused-1"
    assert (line["status"], line["code"]) == (401, "invalid_api_key")
    assert line["path"] == "/v1/chat/completions"
    assert "sk-wrong-guess" not in str(line)
    assert gw.metric("gateway_rejections_total", reason="invalid_api_key") == 1


async def test_a_pass_through_request_gets_one_access_line(
    sim: SimFactory,
    gateway: GatewayFactory,
    client: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The pass-through routes log as the proxy's do, once a request, their errors too (the
    simulator serves no /v1/responses: the worker's 404 is the line's status)."""
    gw = await gateway(await sim())
    caplog.set_level(logging.INFO, logger="gateway.access")
    async with client.get(f"{gw.url}/version") as resp:
        assert resp.status == 200
    body = {"model": MODEL, "input": "hi"}
    async with client.post(f"{gw.url}/v1/responses", json=body) as resp:
        assert resp.status == 404
    version, responses = _access_lines(caplog)
    assert (version["route"], version["status"], version["code"]) == ("version", 200, "")
    assert version["worker"] == gw.fleet.workers[0].url
    assert (responses["route"], responses["status"]) == ("responses", 404)
    assert (responses["code"], responses["model"]) == ("upstream_http_404", MODEL)
