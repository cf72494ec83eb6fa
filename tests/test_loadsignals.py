"""parse_load: the three vLLM load gauges out of a /metrics body, whatever surrounds them."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from gateway.loadsignals import LoadSignals, parse_load

LABELS = ("model_name", "engine")


def vllm_body(engines: int = 2, histograms: int = 30) -> bytes:
    """What a vLLM worker exposes: the gauges among many labelled histogram series."""
    registry = CollectorRegistry()
    waiting = Gauge("vllm:num_requests_waiting", "Waiting.", LABELS, registry=registry)
    running = Gauge("vllm:num_requests_running", "Running.", LABELS, registry=registry)
    kv = Gauge("vllm:kv_cache_usage_perc", "KV cache usage.", LABELS, registry=registry)
    tokens = Counter("vllm:prompt_tokens", "Prompt tokens.", LABELS, registry=registry)
    buckets = [0.001 * 2**i for i in range(24)]
    series = [
        Histogram(
            f"vllm:latency_{i}_seconds", "Latency.", LABELS, registry=registry, buckets=buckets
        )
        for i in range(histograms)
    ]
    for engine in range(engines):
        labels = ("org/model-7b", str(engine))
        waiting.labels(*labels).set(3 + engine)
        running.labels(*labels).set(10 + engine)
        kv.labels(*labels).set(0.25 * (engine + 1))
        tokens.labels(*labels).inc(12345)
        for histogram in series:
            histogram.labels(*labels).observe(0.05 * (engine + 1))
    return generate_latest(registry)


def test_realistic_large_body() -> None:
    body = vllm_body()
    assert len(body) > 100_000
    assert parse_load(body) == LoadSignals(waiting=7.0, running=21.0, kv_cache=0.5)


def test_single_engine_without_labels() -> None:
    body = (
        b"vllm:num_requests_waiting 2\nvllm:num_requests_running 5\nvllm:kv_cache_usage_perc .9\n"
    )
    assert parse_load(body) == LoadSignals(2.0, 5.0, 0.9)


@pytest.mark.parametrize("sep", [b"\n", b"\r\n"], ids=["lf", "crlf"])
def test_line_endings(sep: bytes) -> None:
    lines = [
        b"# HELP vllm:num_requests_waiting Number of requests waiting to be processed.",
        b"# TYPE vllm:num_requests_waiting gauge",
        b'vllm:num_requests_waiting{model_name="m"} 4.0',
        b'vllm:num_requests_running{model_name="m"} 1.0',
        b'vllm:kv_cache_usage_perc{model_name="m"} 0.5',
    ]
    assert parse_load(sep.join(lines)) == LoadSignals(4.0, 1.0, 0.5)


def test_timestamps_are_ignored() -> None:
    body = (
        b'vllm:num_requests_waiting{engine="0"} 3 1700000000000\nvllm:num_requests_running 2 -1\n'
    )
    assert parse_load(body) == LoadSignals(3.0, 2.0, 0.0)


def test_awkward_labels() -> None:
    body = (
        b'vllm:num_requests_waiting{ model_name = "a}b" , engine="0" } 1\n'
        b'vllm:num_requests_waiting{model_name="say \\"hi\\" {x}",engine="1",} 2\n'
        b'vllm:num_requests_waiting{model_name="back\\\\slash"}\t4\n'
        b'  vllm:num_requests_running {engine="0"} 8\n'
    )
    assert parse_load(body) == LoadSignals(7.0, 8.0, 0.0)


def test_non_finite_and_broken_values_are_skipped() -> None:
    body = (
        b'vllm:num_requests_waiting{engine="0"} NaN\n'
        b'vllm:num_requests_waiting{engine="1"} +Inf\n'
        b'vllm:num_requests_waiting{engine="2"} 2\n'
        b'vllm:num_requests_running{engine="0"} -Inf\n'
        b'vllm:num_requests_running{engine="1"} 3e0\n'
        b'vllm:num_requests_running{engine="2"} lots\n'
        b'vllm:kv_cache_usage_perc{engine="0"} NaN\n'
        b'vllm:kv_cache_usage_perc{engine="1"} 0.125\n'
    )
    assert parse_load(body) == LoadSignals(2.0, 3.0, 0.125)


def test_only_nan_counts_as_absent() -> None:
    assert parse_load(b"vllm:num_requests_waiting NaN\nvllm:num_requests_running NaN\n") is None


def test_waiting_alone_is_enough() -> None:
    assert parse_load(b"vllm:num_requests_waiting 1\n") == LoadSignals(1.0, 0.0, 0.0)


def test_kv_cache_is_the_max_and_clamped() -> None:
    body = b"vllm:num_requests_running 1\n" + b"".join(
        b'vllm:kv_cache_usage_perc{engine="%d"} %s\n' % (i, v)
        for i, v in enumerate([b"0.2", b"0.7", b"0.4"])
    )
    assert parse_load(body) == LoadSignals(0.0, 1.0, 0.7)
    assert parse_load(b"vllm:num_requests_running 1\nvllm:kv_cache_usage_perc 3\n") == LoadSignals(
        0.0, 1.0, 1.0
    )


def test_old_kv_cache_name_only_when_the_new_one_is_absent() -> None:
    old = b"vllm:num_requests_running 1\nvllm:gpu_cache_usage_perc 0.8\n"
    assert parse_load(old) == LoadSignals(0.0, 1.0, 0.8)
    both = old + b"vllm:kv_cache_usage_perc 0.3\n"
    assert parse_load(both) == LoadSignals(0.0, 1.0, 0.3)


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"not metrics at all",
        b"\x00\xff\xfe garbage \r\n\r\n",
        b'vllm:prompt_tokens_total{model_name="m"} 5\nprocess_cpu_seconds_total 1.5\n',
        b"vllm:num_requests_waiting\nvllm:num_requests_running\n",  # no values
        b'vllm:num_requests_waiting{model_name="m 3\n',  # unclosed labels
        b'vllm:num_requests_waiting{model_name="m"}3\n',  # no blank before the value
        b"vllm:kv_cache_usage_perc 0.5\n",  # KV alone is not enough
    ],
)
def test_not_a_vllm_body(body: bytes) -> None:
    assert parse_load(body) is None


def test_only_whole_names_at_line_start_count() -> None:
    body = (
        b"# HELP vllm:num_requests_waiting 99 requests waiting\n"
        b"vllm:num_requests_waiting_total 50\n"
        b"xvllm:num_requests_waiting 40\n"
        b'other{note="vllm:num_requests_running 30"} 1\n'
        b"myvllm:num_requests_running 20\n"
        b"vllm:num_requests_waiting 1\n"
    )
    assert parse_load(body) == LoadSignals(1.0, 0.0, 0.0)


def test_a_broken_line_does_not_swallow_the_next() -> None:
    body = b'vllm:num_requests_waiting{model_name="m\nvllm:num_requests_running{engine="0"} 6\n'
    assert parse_load(body) == LoadSignals(0.0, 6.0, 0.0)


def test_gauges_after_the_histograms() -> None:
    body = vllm_body(engines=1, histograms=5)
    head, sep, tail = body.partition(b"# HELP vllm:latency_0_seconds")
    assert parse_load(sep + tail + head) == LoadSignals(3.0, 10.0, 0.25)
