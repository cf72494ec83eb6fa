"""The benchmark harness itself (tests/bench), so `make bench` does not rot between runs: the
load generator against the mock worker measures what it says, and the process-tree readings
see a process's children."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

import pytest

from tests.bench import loadgen
from tests.bench.mockworker import PACES
from tests.bench.systems import System, mock_worker, tree
from tests.processes import Proc


@pytest.fixture(scope="module")
def worker() -> Iterator[System]:
    direct, proc = mock_worker()
    yield direct
    proc.kill()


@pytest.mark.timeout(30)
async def test_closed_loop_records_first_token_every_gap_and_total(worker: System) -> None:
    url = f"{worker.url}/v1/chat/completions"
    s = await loadgen.closed_loop(url, loadgen.chat_body("sim-realistic", True), True, 4, 0.5, "t")
    pace = PACES["sim-realistic"]
    assert s.errors == 0 and len(s.total) >= 4
    # The worker's prefill is inside TTFT; its timer may fire up to 1 ms early (libuv rounds to ms).
    assert all(pace.ttft - 0.002 <= t for t in s.ttft)
    assert all(t > f for t, f in zip(s.total, s.ttft, strict=True))
    # One chunk per engine step: about tokens - 1 gaps per stream, none far below the step.
    assert len(s.gaps) >= len(s.total) * (pace.tokens - 1) // 2
    assert loadgen.quantile(s.gaps, 0.5) >= pace.itl / 2
    assert len(s.max_gap) == len(s.total)


@pytest.mark.timeout(30)
async def test_open_loop_keeps_its_rate_and_counts_json(worker: System) -> None:
    url = f"{worker.url}/v1/chat/completions"
    s = await loadgen.open_loop(url, loadgen.chat_body("sim-model", False), False, 100, 0.5, "t")
    assert s.errors == 0
    assert 40 <= len(s.total) <= 55  # 100/s for 0.5 s (a stall at the end sends fewer)
    assert not s.gaps


@pytest.mark.timeout(30)
async def test_a_refused_request_is_an_error_not_a_sample() -> None:
    s = await loadgen.closed_loop(
        "http://127.0.0.1:9/v1/chat/completions", loadgen.chat_body("x", True), True, 1, 0.2, "t"
    )
    assert s.errors > 0 and not s.total
    assert set(s.error_kinds) == {"ClientConnectorError"}


def test_tree_sees_children() -> None:
    parent = Proc(["sh", "-c", "sleep 30 & sleep 30 & wait"], name="parent")
    try:
        from tests.processes import poll_until

        poll_until(lambda: len(tree(parent.popen.pid)) == 3, 5, "two children")
        assert tree(parent.popen.pid)[0] == parent.popen.pid
        assert os.getpid() not in tree(parent.popen.pid)
    finally:
        parent.kill()


@pytest.mark.timeout(30)
async def test_taking_turns_gives_each_url_its_own_sample_in_turn(worker: System) -> None:
    json_url = f"{worker.url}/v1/chat/completions"
    urls = [json_url, "http://127.0.0.1:9/v1/chat/completions", json_url]  # the middle refuses
    samples = await loadgen.taking_turns(urls, loadgen.chat_body("sim-model", True), True, 0.3, "t")
    first, refused, third = samples
    assert refused.errors > 0 and not refused.total
    assert first.errors == third.errors == 0 and len(first.total) >= 5
    assert abs(len(first.total) - len(third.total)) <= 1  # in turn: neither got ahead
    assert refused.errors == len(first.total)  # one turn each, the refused one included
    assert all(0 < f <= t for f, t in zip(first.ttft, first.total, strict=True))


@pytest.mark.timeout(30)
async def test_a_warm_window_leaves_out_the_first_wave_and_meters_only_the_window(
    worker: System,
) -> None:
    url = f"{worker.url}/v1/chat/completions"
    readings: list[float] = []

    def meter() -> tuple[float, float]:
        readings.append(time.perf_counter())
        return float(len(readings)), 0.5 * len(readings)

    body = loadgen.chat_body("sim-realistic", True)  # about 0.27 s an answer
    started = time.perf_counter()
    s = await loadgen.closed_loop(url, body, True, 4, 0.6, "t", warm=0.3, meter=meter)
    assert s.errors == 0 and s.seconds == 0.6
    # Read at the window's edges, 0.3 and 0.9 s in: never before them (a busy loop can only
    # read late, so the upper bound is loose).
    assert len(readings) == 2
    assert readings[0] - started >= 0.3 - 0.002
    assert readings[1] - started >= 0.9 - 0.002
    assert readings[1] - readings[0] <= 1.2
    assert (s.cpu, s.kernel) == (1.0, 0.5)  # the differences across the window
    # Clients start answers at about 0, 0.27, 0.54, 0.81 s: the window [0.3, 0.9) holds the
    # last two of each, never the first (connects) one; one each when a busy machine slows them.
    assert 4 <= len(s.total) <= 12
