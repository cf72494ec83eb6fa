"""Several serving processes on one port (``server.processes``, gateway/supervisor.py), over
real sockets with the real command line.

1. Two processes share the port: fresh connections reach both, and ``/metrics`` from either
   counts every request of both. A burst of connections opened at once reaches both too: each
   listens on a socket of its own in one ``SO_REUSEPORT`` group, so the kernel hashes
   connections over them (on one shared socket the first process awake took whole bursts).
2. A process that dies is restarted; the requests it had counted stay counted, and its
   in-flight gauge no longer adds in.
3. SIGTERM to the parent drains a stream in flight on a child, and the parent exits 0 with no
   child and no metrics folder left behind.
4. A second gateway on the same port fails at start with one line; the first keeps serving.
   While every child is down and restarting, the parent's holder keeps the port: a second
   gateway's bind fails the same way.
5. A child whose event loop is stuck (the GATEWAY_TEST_HANG_ON_SIGUSR1 hook) is killed within
   the heartbeat bound: the stream it held ends by then, fresh connections meanwhile are served
   by the other child or (those the kernel hashed to the stuck one) reset at the kill, none
   later, and a new child takes its place.
6. A child that fails during start-up (its keys file is gone) makes the parent exit 1 with the
   child's one-line reason, not restart it.
Plus the arithmetic: limits shared out, the CPU count under a cgroup quota, the setting.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import orjson
import pytest

from gateway.preflight import PreflightError, listen
from gateway.settings import SettingsError, build_settings, per_process
from gateway.supervisor import cgroup_cpu_quota, cpu_count
from tests.processes import (
    HOST,
    START_TIMEOUT,
    GatewayProc,
    Proc,
    Sim,
    poll_until,
    start_gateway,
    start_simulator,
    write_config,
)

CHAT = {"model": "sim-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
OK_SERIES = (
    'gateway_requests_total{code="",model="sim-model",route="chat_completions",status="200"}'
)


@pytest.fixture
def worker() -> Iterator[Sim]:
    sim = start_simulator("--itl", "0.05")
    yield sim
    sim.proc.kill()


@pytest.fixture
def gateway(worker: Sim, tmp_path: Path) -> Iterator[GatewayProc]:
    config = write_config(
        tmp_path / "gateway.yaml",
        [worker.url],
        server={"processes": 2, "shutdown_grace": 0.2, "drain_timeout": 10.0},
        logging={"level": "INFO", "format": "json"},
    )
    gw = start_gateway(config)
    try:
        poll_until(lambda: len(listening(gw)) == 2, 20, "two serving processes listening")
        yield gw
    finally:
        gw.proc.kill()


def records(gw: GatewayProc) -> list[dict[str, object]]:
    out = []
    for line in list(gw.proc.lines):
        if line.startswith("{"):
            out.append(orjson.loads(line))
    return out


def listening(gw: GatewayProc) -> list[int]:
    return [int(str(r["pid"])) for r in records(gw) if str(r["msg"]).startswith("listening on")]


def served_by(gw: GatewayProc) -> list[int]:
    return [int(str(r["pid"])) for r in records(gw) if r["logger"] == "gateway.access"]


async def chat_on_fresh_connections(gw: GatewayProc, count: int) -> None:
    # A new connection (a new source port) each time: SO_REUSEPORT spreads connections.
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=connector) as session:
        for _ in range(count):
            async with session.post(f"{gw.url}/v1/chat/completions", json=CHAT) as r:
                assert r.status == 200, await r.text()
                await r.read()


async def metric(gw: GatewayProc, series: str) -> float:
    connector = aiohttp.TCPConnector(force_close=True)
    timeout = aiohttp.ClientTimeout(total=5)
    async with (
        aiohttp.ClientSession(connector=connector, timeout=timeout) as session,
        session.get(f"{gw.url}/metrics") as r,
    ):
        text = await r.text()
    match = re.search(rf"^{re.escape(series)} (\S+)$", text, re.MULTILINE)
    assert match, f"{series} not in /metrics:\n{text}"
    return float(match.group(1))


@pytest.mark.timeout(60)
async def test_two_processes_share_the_port_and_the_metrics(gateway: GatewayProc) -> None:
    await chat_on_fresh_connections(gateway, 40)
    poll_until(lambda: len(served_by(gateway)) == 40, 10, "40 access-log lines")
    assert set(served_by(gateway)) == set(listening(gateway)), "one process served everything"
    # A process adds its updates to the shared files within metrics.FLUSH_INTERVAL.
    await metric_reaches(gateway, OK_SERIES, 40)
    for _ in range(6):  # whichever process answers /metrics, it counts both
        assert await metric(gateway, OK_SERIES) == 40
        assert await metric(gateway, "gateway_requests_in_flight") == 0


@pytest.mark.timeout(60)
async def test_a_dead_process_is_replaced_and_its_counts_stay(gateway: GatewayProc) -> None:
    await chat_on_fresh_connections(gateway, 20)
    # A process publishes its counts within metrics.FLUSH_INTERVAL after the answer went out:
    # a kill before that would lose a count this test is not about. Wait until all 20 show.
    await metric_reaches(gateway, OK_SERIES, 20)
    victim = listening(gateway)[0]
    os.kill(victim, signal.SIGKILL)
    gateway.proc.wait_line(rf"serving process {victim} exited with -9: restarting", 10)
    poll_until(lambda: len(listening(gateway)) == 3, 20, "a new serving process listening")
    await chat_on_fresh_connections(gateway, 20)
    await metric_reaches(gateway, OK_SERIES, 40)  # the last count lands within the interval
    assert await metric(gateway, "gateway_requests_in_flight") == 0


async def metric_reaches(gateway: GatewayProc, series: str, value: float) -> None:
    deadline = time.monotonic() + 10
    while (seen := await metric(gateway, series)) != value:
        assert seen < value, f"{series} is {seen}, past {value}"
        assert time.monotonic() < deadline, f"{series} stayed at {seen}, never {value}"
        await asyncio.sleep(0.05)


@pytest.mark.timeout(60)
async def test_sigterm_drains_every_process_and_cleans_up(gateway: GatewayProc) -> None:
    children = listening(gateway)
    before = set(Path(tempfile.gettempdir()).glob("vllm-gateway-metrics-*"))
    async with aiohttp.ClientSession() as session:
        body = {**CHAT, "max_tokens": 20, "stream": True}
        async with session.post(f"{gateway.url}/v1/chat/completions", json=body) as r:
            assert r.status == 200
            first = await r.content.readline()
            assert first.startswith(b"data: ")
            gateway.proc.signal(signal.SIGTERM)
            rest = await asyncio.wait_for(r.content.read(), 15)
    assert rest.rstrip().endswith(b"data: [DONE]"), rest[-200:]
    assert b'"error"' not in rest
    assert gateway.proc.wait_exit(20) == 0
    for pid in children:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    after = set(Path(tempfile.gettempdir()).glob("vllm-gateway-metrics-*"))
    assert after <= before, f"metrics folder left behind: {after - before}"


@pytest.mark.timeout(60)
async def test_a_second_gateway_on_the_port_fails_at_start_and_the_first_serves_on(
    gateway: GatewayProc, tmp_path: Path
) -> None:
    port = int(gateway.url.rsplit(":", 1)[1])
    config = write_config(
        tmp_path / "second.yaml", ["http://127.0.0.1:9"], server={"port": port, "processes": 2}
    )
    second = Proc([sys.executable, "-m", "gateway", "--config", str(config)], name="second")
    try:
        assert second.wait_exit(START_TIMEOUT) == 2
    finally:
        second.kill()
    assert second.lines == [
        f"vllm-gateway: server.port (file {config}): cannot listen on {HOST}:{port}: "
        "Address already in use"
    ]
    await chat_on_fresh_connections(gateway, 10)
    poll_until(lambda: len(served_by(gateway)) == 10, 10, "10 access-log lines")


BURSTS = 4
BURST = 64


@pytest.mark.timeout(60)
async def test_a_burst_of_connections_reaches_every_process(gateway: GatewayProc) -> None:
    """64 connections opened at once, four times: each burst reaches both processes. The
    kernel hashes each connection's ports with a random key, so a burst misses one of two
    processes with probability 2 * 2**-64, and this test fails about once in 10**18 runs."""
    pids = listening(gateway)
    port = int(gateway.url.rsplit(":", 1)[1])
    spreads = []
    for _ in range(BURSTS):
        conns = await asyncio.gather(*(asyncio.open_connection(HOST, port) for _ in range(BURST)))
        try:
            for _, writer in conns:  # an answer on each: surely accepted, by its owner
                writer.write(b"GET /health HTTP/1.1\r\nHost: test\r\n\r\n")
            await asyncio.gather(*(reader.readuntil(b"\r\n\r\n") for reader, _ in conns))
            spreads.append(Counter(owners([w.get_extra_info("socket") for _, w in conns], pids)))
        finally:
            for _, writer in conns:
                writer.close()
    assert all(set(spread) == set(pids) for spread in spreads), spreads


@pytest.mark.timeout(60)
async def test_the_port_stays_held_while_every_process_restarts(
    gateway: GatewayProc, tmp_path: Path
) -> None:
    port = int(gateway.url.rsplit(":", 1)[1])
    children = listening(gateway)
    for pid in children:
        os.kill(pid, signal.SIGKILL)
    for pid in children:
        gateway.proc.wait_line(rf"serving process {pid} exited with -9: restarting", 10)
    # Restarts come a second after each exit: until then nothing of ours listens, the
    # parent's holder alone keeps the port, and a second gateway still fails to bind it.
    assert not listeners(port), "a serving process listens already"
    second = build_settings({"workers": [{"url": "http://127.0.0.1:9"}]} | {
        "server": {"host": HOST, "port": port}
    })  # fmt: skip
    with pytest.raises(PreflightError, match=f"cannot listen on {HOST}:{port}: Address already"):
        listen(second, None, {})
    poll_until(lambda: len(listening(gateway)) == 4, 20, "two new serving processes listening")
    await chat_on_fresh_connections(gateway, 10)
    poll_until(lambda: len(served_by(gateway)) == 10, 10, "10 access-log lines")


def listeners(port: int) -> list[str]:
    """The listening sockets on ``port`` (/proc/net/tcp: state 0A), of any process."""
    rows = [line.split() for line in Path("/proc/net/tcp").read_text().splitlines()[1:]]
    return [row[9] for row in rows if row[1].endswith(f":{port:04X}") and row[3] == "0A"]


HEARTBEAT = 1.0


async def fresh_chat(gw: GatewayProc) -> int | str:
    """One request on a new connection: its status, or "reset" if the connection was."""
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=connector) as session:
        try:
            async with session.post(f"{gw.url}/v1/chat/completions", json=CHAT) as r:
                await r.read()
                return r.status
        except (aiohttp.ClientOSError, aiohttp.ServerDisconnectedError):
            return "reset"


# The supervisor notices a silent child at its next ping (every HEARTBEAT / 4) after HEARTBEAT;
# the rest is the kill and the client seeing its connection reset on a loaded machine.
HEARTBEAT_BOUND = HEARTBEAT + HEARTBEAT / 4 + 1.0


def owner_of(client: socket.socket, pids: list[int]) -> int:
    """The pid (of ``pids``) holding the server side of the TCP connection ``client``."""
    return owners([client], pids)[0]


def owners(clients: list[socket.socket], pids: list[int]) -> list[int]:
    """For each client socket, the pid (of ``pids``) holding the server side."""
    inodes = {}
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        inodes[f"{fields[1]} {fields[2]}"] = fields[9]
    holders = {}
    for pid in pids:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            with contextlib.suppress(OSError):  # an fd closed meanwhile
                holders[os.readlink(fd)] = pid
    found = []
    for client in clients:
        here, there = client.getsockname(), client.getpeername()
        inode = inodes.get(f"{_hex_address(there)} {_hex_address(here)}")
        assert inode is not None, f"no server side of {here} in /proc/net/tcp"
        pid = holders.get(f"socket:[{inode}]")
        assert pid is not None, f"none of {pids} holds socket {inode}"
        found.append(pid)
    return found


def _hex_address(address: tuple[str, int]) -> str:
    packed = socket.inet_aton(address[0])
    return f"{int.from_bytes(packed, 'little'):08X}:{address[1]:04X}"


@pytest.mark.timeout(60)
async def test_a_stuck_process_is_replaced_within_the_heartbeat_bound(
    worker: Sim, tmp_path: Path
) -> None:
    config = write_config(
        tmp_path / "gateway.yaml",
        [worker.url],
        server={"processes": 2, "heartbeat_timeout": HEARTBEAT},
        logging={"level": "INFO", "format": "json"},
    )
    args = [sys.executable, "-m", "gateway", "--config", str(config)]
    proc = Proc(args, name="gateway", env={"GATEWAY_TEST_HANG_ON_SIGUSR1": "1"})
    try:
        match = proc.wait_line(r"listening on (http://127\.0\.0\.1:\d+)", START_TIMEOUT)
        gw = GatewayProc(match.group(1), proc, config)
        poll_until(lambda: len(listening(gw)) == 2, START_TIMEOUT, "two processes listening")
        body = {**CHAT, "max_tokens": 400, "stream": True}  # 20 s at the worker's pace
        url = f"{gw.url}/v1/chat/completions"
        async with aiohttp.ClientSession() as session, session.post(url, json=body) as r:
            assert r.status == 200
            assert (await r.content.readline()).startswith(b"data: ")
            assert r.connection is not None and r.connection.transport is not None
            client = r.connection.transport.get_extra_info("socket")
            stuck = owner_of(client, listening(gw))
            os.kill(stuck, signal.SIGUSR1)
            hung_at = time.monotonic()
            # Meanwhile fresh connections: the kernel hashes about half to the stuck process,
            # where they wait until the kill resets them; the others are served.
            fresh = asyncio.gather(*(fresh_chat(gw) for _ in range(6)))
            with pytest.raises(aiohttp.ClientPayloadError):
                await asyncio.wait_for(r.content.read(), HEARTBEAT_BOUND)
            cut_after = time.monotonic() - hung_at
            ended = await asyncio.wait_for(fresh, HEARTBEAT_BOUND + hung_at - time.monotonic())
        # Silence is counted from the last answered ping, up to a ping interval before the hang.
        assert HEARTBEAT * 3 / 4 - 0.1 <= cut_after <= HEARTBEAT_BOUND, cut_after
        assert set(ended) <= {200, "reset"}, ended
        proc.wait_line(rf"serving process {stuck} did not answer the heartbeat", 5)
        proc.wait_line(rf"serving process {stuck} exited with -9: restarting", 5)
        poll_until(lambda: len(listening(gw)) == 3, START_TIMEOUT, "a new process listening")
        await chat_on_fresh_connections(gw, 5)
    finally:
        proc.kill()


@pytest.mark.timeout(60)
def test_a_process_failing_at_start_up_stops_the_gateway_with_its_reason(
    tmp_path: Path,
) -> None:
    """The keys file is there for the parent's checks and gone when the children start:
    the supervisor is run directly, with a socket of ours, as ``exec_supervisor`` runs it."""
    keys = tmp_path / "keys.yaml"
    config = write_config(
        tmp_path / "gateway.yaml",
        ["http://127.0.0.1:9"],
        server={"processes": 2},
        auth={"keys_file": str(keys)},
    )
    listener = socket.socket()
    listener.bind((HOST, 0))
    listener.listen()
    fd = listener.fileno()
    args = [sys.executable, "-m", "gateway.supervisor", "--processes", "2"]
    args += ["--listen-fd", str(fd), "--stop-budget", "5", "--heartbeat", "5"]
    args += ["--log-format", "text", "--", "--child", "2", "--config", str(config)]
    proc = subprocess.Popen(  # Proc cannot hand down a socket
        args, pass_fds=(fd,), stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    listener.close()
    try:
        _, output = proc.communicate(timeout=START_TIMEOUT)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 1, output
    failed = [line for line in output.splitlines() if "failed to start" in line]
    assert len(failed) == 1, output
    assert failed[0].endswith(f"serving process failed to start: {keys}: No such file or directory")
    assert "restarting" not in output
    assert "Traceback" not in output


def test_limits_are_shared_out_rounding_up() -> None:
    settings = build_settings(
        {
            "workers": [{"url": "http://w1:8000", "max_in_flight": 5}, {"url": "http://w2:8000"}],
            "discovery": {"services": [{"url": "http://vllm.svc:8000", "max_in_flight": 9}]},
            "limits": {"max_in_flight": 255, "pool_size": 512, "pool_per_worker": 101},
        }
    )
    share = per_process(settings, 2)
    limits = share.limits
    assert (limits.max_in_flight, limits.pool_size, limits.pool_per_worker) == (128, 256, 51)
    assert [w.max_in_flight for w in share.workers] == [3, None]
    assert share.discovery.services[0].max_in_flight == 5
    assert per_process(settings, 1) is settings


@pytest.mark.parametrize(
    ("files", "quota"),
    [
        ({"cpu.max": "150000 100000\n"}, 1.5),
        ({"cpu.max": "max 100000\n"}, None),
        ({"cpu/cpu.cfs_quota_us": "200000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 2.0),
        ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
        ({}, None),
    ],
)
def test_cgroup_cpu_quota(tmp_path: Path, files: dict[str, str], quota: float | None) -> None:
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert cgroup_cpu_quota(tmp_path) == quota


def test_cpu_count_is_the_affinity_capped_by_the_quota_rounded_up(tmp_path: Path) -> None:
    usable = len(os.sched_getaffinity(0))
    assert cpu_count(tmp_path) == usable
    (tmp_path / "cpu.max").write_text("50000 100000\n")
    assert cpu_count(tmp_path) == 1
    (tmp_path / "cpu.max").write_text(f"{100000 * usable + 1} 100000\n")
    assert cpu_count(tmp_path) == usable  # a quota above the affinity does not add CPUs


@pytest.mark.parametrize("value", [0, -1, 257, "many", 1.5])
def test_processes_setting_is_checked(value: object) -> None:
    with pytest.raises(SettingsError, match=r"server\.processes"):
        build_settings({"workers": [{"url": "http://w1:8000"}], "server": {"processes": value}})


@pytest.mark.parametrize("value", [1, 4, "auto"])
def test_processes_setting_accepts(value: object) -> None:
    settings = build_settings(
        {"workers": [{"url": "http://w1:8000"}], "server": {"processes": value}}
    )
    assert settings.server.processes == value
