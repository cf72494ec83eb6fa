"""The demo: `once` faults, the simulated fleet `make run` and `make demo` start, and the README's
demo commands run word for word against that fleet, so the README cannot drift from the code.

1. A `once` spec strikes the first request carrying a request id and no later one, whichever
   worker of a fleet gets it, in one process (a shared `Claims`) or several (a directory).
2. The README's commands between `<!-- demo:start -->` and `<!-- demo:end -->`, each run by bash
   against `python -m gateway.simulator.fleet --config config/demo.yaml` (the `make demo`
   command) on free ports: each shows what its comment says, within the time it states.
3. Ctrl-C to the fleet's process group (as a terminal sends it) stops every process and exits
   0 with no traceback; the gateway stops first, so a stream in flight ends whole; a second
   Ctrl-C does not wait for it; a killed fleet leaves no child running.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from gateway.simulator.app import create_app
from gateway.simulator.config import SimConfig, parse_fault
from gateway.simulator.fleet import worker_faults
from gateway.simulator.once import Claims
from tests.processes import HOST, Proc, free_port, poll_until

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
DEMO_BLOCK = re.compile(r"<!-- demo:start -->(.*?)<!-- demo:end -->", re.S)
SH_BLOCK = re.compile(r"```sh\n(.*?)```", re.S)
STATED_TIME = re.compile(r"\((under|about) (\d+) s\)")

# --- 1. once ---------------------------------------------------------------------------------


def test_claims_in_memory_say_yes_once_per_id() -> None:
    claims = Claims()
    assert [claims.claim("a"), claims.claim("a"), claims.claim("b")] == [True, False, True]


def test_claims_in_a_directory_are_shared_by_separate_instances(tmp_path: Path) -> None:
    first, second = Claims(tmp_path), Claims(tmp_path)
    assert first.claim("req-1")
    assert not second.claim("req-1")
    assert second.claim("req-2")
    assert not first.claim("req-2")


def test_once_parses_as_a_flag() -> None:
    spec = parse_fault("once, status=503")
    assert spec.once and spec.status == 503
    assert not parse_fault("status=503").once


async def _post(client: TestClient[web.Request, web.Application], request_id: str) -> int:
    body = {"model": "sim-model", "prompt": "hi", "max_tokens": 2}
    headers = {"X-Sim-Fault": "once,status=503", "X-Request-Id": request_id}
    async with client.post("/v1/completions", json=body, headers=headers) as response:
        await response.read()
        return response.status


async def test_once_strikes_only_the_first_request_of_an_id_across_workers() -> None:
    claims = Claims()
    a = TestClient(TestServer(create_app(SimConfig(), claims=claims)))
    b = TestClient(TestServer(create_app(SimConfig(), claims=claims)))
    async with a, b:
        assert await _post(a, "r1") == 503
        assert await _post(b, "r1") == 200  # the retry, on another worker
        assert await _post(a, "r1") == 200
        assert await _post(b, "r2") == 503  # a new request id is struck again


async def test_once_dead_leaves_the_health_probe_alone() -> None:
    headers = {"X-Sim-Fault": "once,dead"}
    async with (
        TestClient(TestServer(create_app(SimConfig()))) as client,
        client.get("/health", headers=headers) as response,
    ):
        assert response.status == 200


def test_fleet_fault_must_name_one_of_its_workers() -> None:
    assert worker_faults(["8001=cut_after=3"], [8001, 8002]) == {8001: "cut_after=3"}
    with pytest.raises(ValueError, match="PORT one of"):
        worker_faults(["9000=cut_after=3"], [8001, 8002])
    with pytest.raises(ValueError, match="unknown fault"):
        worker_faults(["8001=explode"], [8001, 8002])


# --- 2. the README's demo --------------------------------------------------------------------


def demo_commands() -> list[str]:
    match = DEMO_BLOCK.search(README.read_text())
    assert match, "README.md has no <!-- demo:start --> ... <!-- demo:end --> section"
    return SH_BLOCK.findall(match.group(1))


def sse_events(out: str) -> list[str]:
    return [line.removeprefix("data: ") for line in out.splitlines() if line.startswith("data: ")]


def whole_stream(out: str, tokens: int) -> None:
    """One uninterrupted stream: one id, `tokens` content chunks, one finish, then [DONE]."""
    events = sse_events(out)
    assert events[-1] == "[DONE]", out
    chunks = [json.loads(e) for e in events[:-1]]
    assert all("error" not in c for c in chunks), out
    assert len({c["id"] for c in chunks}) == 1
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    assert sum(1 for d in deltas if d.get("content")) == tokens
    finishes = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
    assert [f for f in finishes if f] == ["length"]


def failed_over(out: str) -> None:
    answer = json.loads(out)
    assert answer["choices"][0]["message"]["content"], out


def cut_with_error(out: str) -> None:
    events = sse_events(out)
    assert events[-1] == "[DONE]", out
    error = json.loads(events[-2])["error"]
    assert error["code"] == "upstream_stream_truncated"
    assert all('"finish_reason":"length"' not in e for e in events), out


def gateway_error(out: str) -> None:
    head, _, body = out.replace("\r\n", "\n").partition("\n\n")
    assert head.startswith("HTTP/1.1 503"), out
    assert re.search(r"(?im)^retry-after: \d+$", head), out
    code = json.loads(body)["error"]["code"]
    assert isinstance(code, str) and code[:1].isalpha(), f"not a stable gateway code: {code!r}"


def shed(out: str) -> None:
    counts = {int(code): int(n) for n, code in (line.split() for line in out.splitlines())}
    assert set(counts) == {200, 503}, out
    assert sum(counts.values()) == 12


CHECKS: list[Callable[[str], None]] = [
    failed_over,
    lambda out: whole_stream(out, 8),
    cut_with_error,
    lambda out: whole_stream(out, 4),
    lambda out: whole_stream(out, 8),
    gateway_error,
    shed,
]


@pytest.fixture(scope="module")
def demo_fleet() -> Iterator[tuple[int, Proc]]:
    port, workers = free_port(), [free_port(), free_port()]
    fleet = Proc(
        [sys.executable, "-m", "gateway.simulator.fleet", "--config", "config/demo.yaml",
         "--port", str(port), "--workers", ",".join(map(str, workers))],
        cwd=REPO,
        name="demo fleet",
    )  # fmt: skip
    try:
        poll_until(lambda: _healthy_workers(port) == 2, 20, "both demo workers healthy")
        yield port, fleet
        # Stopped as Ctrl-C stops it, so it removes its claims directory (a kill cannot).
        os.killpg(fleet.popen.pid, signal.SIGINT)
        fleet.wait_exit(30)
    finally:
        fleet.kill()


def _healthy_workers(port: int) -> int:
    result = subprocess.run(
        ["curl", "-s", f"http://{HOST}:{port}/metrics"], capture_output=True, text=True, timeout=5
    )
    return len(re.findall(r"(?m)^gateway_worker_healthy\{[^}]*\} 1\.0$", result.stdout))


def test_readme_has_one_check_per_demo_command() -> None:
    assert len(demo_commands()) == len(CHECKS)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("index", range(len(CHECKS)), ids=lambda i: f"command{i + 1}")
def test_readme_demo_command(index: int, demo_fleet: tuple[int, Proc]) -> None:
    port, _ = demo_fleet
    command = demo_commands()[index]
    stated = STATED_TIME.search(command.splitlines()[0])
    assert stated, f"the command's first line states no time: {command.splitlines()[0]}"
    started = time.monotonic()
    result = subprocess.run(
        ["bash", "-o", "pipefail", "-c", command.replace("127.0.0.1:8080", f"{HOST}:{port}")],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stderr
    CHECKS[index](result.stdout)
    # Generous on a loaded machine, but a change to the demo's timeouts fails it.
    assert elapsed < 2 * int(stated.group(2)) + 2, f"took {elapsed:.1f} s, README: {stated[0]}"


# --- 3. a clean stop -------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_ctrl_c_stops_the_fleet_cleanly() -> None:
    _, fleet = _fleet()
    try:
        fleet.wait_line(r"listening on", 20)
        os.killpg(fleet.popen.pid, signal.SIGINT)  # as a terminal's Ctrl-C: the whole group
        assert fleet.wait_exit(30) == 0, fleet.output
        assert "Traceback" not in fleet.output, fleet.output
        assert "Terminated" not in fleet.output, fleet.output
    finally:
        fleet.kill()


def _children(pid: int) -> list[int]:
    """The direct children only (``tests.processes.tree`` has the gateway's own too)."""
    return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def _stream(port: int, tokens: int) -> Proc:
    """A streamed chat request by curl, its output on the Proc's lines."""
    body = json.dumps({
        "model": "sim-model", "stream": True, "max_tokens": tokens,
        "messages": [{"role": "user", "content": "hi"}],
    })  # fmt: skip
    url = f"http://{HOST}:{port}/v1/chat/completions"
    curl = f"curl -sN --max-time 90 -H 'content-type: application/json' -d '{body}' {url}"
    return Proc(["sh", "-c", curl + " 1>&2"], name="stream")


def _running(pid: int) -> bool:
    """Alive and not a zombie (an orphan's reaper may be slow, or absent in a container)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def _fleet(*extra: str, tmp: Path | None = None) -> tuple[int, Proc]:
    """``tmp``: where the fleet's claims directory goes (a killed fleet cannot remove it)."""
    port = free_port()
    workers = f"{free_port()},{free_port()}"
    command = [sys.executable, "-m", "gateway.simulator.fleet", "--port", str(port)]
    env = {"TMPDIR": str(tmp)} if tmp is not None else None
    return port, Proc([*command, "--workers", workers, *extra], cwd=REPO, name="fleet", env=env)


@pytest.mark.timeout(150)
def test_ctrl_c_lets_a_stream_in_flight_end_whole() -> None:
    """A terminal's Ctrl-C reaches the fleet alone (its children have sessions of their own);
    it stops the gateway first, which drains the stream while the workers still answer."""
    port, fleet = _fleet("--worker-arg=--itl=0.1")
    stream: Proc | None = None
    try:
        fleet.wait_line(r"listening on", 20)
        poll_until(lambda: _healthy_workers(port) == 2, 20, "both workers healthy")
        stream = _stream(port, 20)
        stream.wait_line(r'"content":"[^"]', 20)  # a token, 2 s before the last
        os.killpg(fleet.popen.pid, signal.SIGINT)
        assert stream.wait_exit(30) == 0, stream.output
        whole_stream(stream.output, 20)
        assert fleet.wait_exit(30) == 0, fleet.output
    finally:
        fleet.kill()
        if stream is not None:
            stream.kill()


@pytest.mark.timeout(120)
def test_a_second_ctrl_c_does_not_wait_for_the_drain() -> None:
    port, fleet = _fleet("--worker-arg=--itl=0.5")
    stream: Proc | None = None
    try:
        fleet.wait_line(r"listening on", 20)
        poll_until(lambda: _healthy_workers(port) == 2, 20, "both workers healthy")
        children = _children(fleet.popen.pid)
        stream = _stream(port, 60)  # 30 s at 0.5 s a token: the drain would wait it out
        stream.wait_line(r'"content":"[^"]', 20)
        os.killpg(fleet.popen.pid, signal.SIGINT)
        fleet.wait_line(r"draining", 10)
        started = time.monotonic()
        os.killpg(fleet.popen.pid, signal.SIGINT)
        fleet.wait_exit(15)
        assert time.monotonic() - started < 10, "the second Ctrl-C waited for the drain"
        poll_until(
            lambda: not any(_running(pid) for pid in children), 10, "the fleet's children gone"
        )
    finally:
        fleet.kill()
        if stream is not None:
            stream.kill()


@pytest.mark.timeout(120)
def test_the_fleets_children_stop_when_it_is_killed(tmp_path: Path) -> None:
    """SIGKILL gives the fleet no chance to stop its children: the kernel's parent-death
    signal does, so a killed `make run` leaves no worker holding its port."""
    _, fleet = _fleet(tmp=tmp_path)
    children: list[int] = []
    try:
        fleet.wait_line(r"listening on", 20)
        children = _children(fleet.popen.pid)
        assert len(children) == 3, children  # two workers and the gateway
        os.kill(fleet.popen.pid, signal.SIGKILL)
        poll_until(
            lambda: not any(_running(pid) for pid in children), 30, "the fleet's children gone"
        )
    finally:
        fleet.kill()
        for pid in children:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
