"""Quiet logs: no library warning when a worker's series go in multi-process mode, and repeated
warnings let through a few at a time with a count of the rest.

1. Removing a worker's series with prometheus_client in multi-process mode warns nothing (the
   suite turns warnings into errors, so the library's own warning fails this test).
2. A warning repeated many times in one window passes ``BURST`` times; the first one of the
   next window carries how many were held back. INFO lines always pass.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from gateway.logs import RepeatFilter
from gateway.metrics import GatewayMetrics


def test_worker_series_go_without_a_warning_in_multiprocess_mode(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    metrics = GatewayMetrics(CollectorRegistry(), multiprocess_dir=str(tmp_path))
    url = "http://10.0.0.1:8000"
    metrics.worker_load.labels(url, "waiting").set(3)
    metrics.worker_healthy.labels(url).set(1)
    metrics.worker_ejections.labels(url).inc()
    metrics.upstream_connect.labels(url).observe(0.01)
    metrics.worker_load.remove(url, "waiting")
    for family in (metrics.worker_healthy, metrics.worker_ejections, metrics.upstream_connect):
        family.remove(url)


def record(msg: str, at: float, level: int = logging.WARNING) -> logging.LogRecord:
    rec = logging.LogRecord("gateway.test", level, __file__, 1, msg, ("x",), None)
    rec.created = at
    return rec


def test_repeated_warnings_pass_a_burst_per_window_then_say_how_many_were_held() -> None:
    repeats = RepeatFilter()
    passed = [repeats.filter(record("worker %s down", 100.0 + i * 0.01)) for i in range(50)]
    assert passed.count(True) == RepeatFilter.BURST
    assert passed[: RepeatFilter.BURST] == [True] * RepeatFilter.BURST
    later = record("worker %s down", 100.0 + RepeatFilter.WINDOW)
    assert repeats.filter(later)
    assert later.suppressed == 50 - RepeatFilter.BURST  # type: ignore[attr-defined]


def test_other_templates_and_info_lines_are_not_held() -> None:
    repeats = RepeatFilter()
    for i in range(20):
        repeats.filter(record("worker %s down", 1.0 + i * 0.01))
    assert repeats.filter(record("redis %s unreachable", 1.5))
    assert all(repeats.filter(record("request", 1.6, logging.INFO)) for _ in range(100))
