"""`make bench`: what the gateway adds to every request, side by side with the limit (direct
to the worker) and the Python floor (a bare pass-through proxy).

Method: one mock worker (`mockworker.py`: 50-chunk streams written with no sleeps, or one JSON
body) and each proxy run as subprocesses on loopback; a closed-loop client here (uvloop) keeps
C requests in flight for a fixed time and records per request the time to the first content
event and the total time. Systems are interleaved within each repeat so machine noise falls
on all of them; CPU seconds and peak RSS of the proxy process come from /proc. The gateway runs
with its features on (metrics, routing, timeouts, admission); only its limits are raised so it
does not shed the benchmark's own load.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import orjson
import uvloop

from tests.bench.common import machine, options
from tests.processes import Proc, free_port, http_status, poll_until, start_gateway, write_config

RESULTS = Path(__file__).with_name("RESULTS.md")
PY = sys.executable


@dataclass
class Sample:
    ttft: list[float] = field(default_factory=list)
    total: list[float] = field(default_factory=list)
    errors: int = 0
    seconds: float = 0.0
    cpu: float = 0.0  # proxy CPU seconds during the run
    rss_mb: float = 0.0

    @property
    def rate(self) -> float:
        return len(self.total) / self.seconds if self.seconds else 0.0

    def q(self, values: list[float], p: float) -> float:
        ordered = sorted(values)
        return ordered[min(len(ordered) - 1, int(p * len(ordered)))] if ordered else float("nan")


def body(stream: bool) -> bytes:
    return orjson.dumps(
        {"model": "sim-model", "messages": [{"role": "user", "content": "hi"}], "stream": stream}
    )


async def one(
    session: aiohttp.ClientSession, url: str, data: bytes, stream: bool, s: Sample
) -> None:
    started = time.perf_counter()
    first: float | None = None
    try:
        async with session.post(url, data=data, headers={"Content-Type": "application/json"}) as r:
            if r.status != 200:
                s.errors += 1
                await r.read()
                return
            if stream:
                async for line in r.content:
                    if first is None and b'"content":" ' in line:
                        first = time.perf_counter()
            else:
                await r.read()
                first = time.perf_counter()
    except aiohttp.ClientError:
        s.errors += 1
        return
    end = time.perf_counter()
    s.ttft.append((first or end) - started)
    s.total.append(end - started)


async def closed_loop(url: str, concurrency: int, seconds: float, stream: bool, s: Sample) -> None:
    data = body(stream)
    deadline = time.perf_counter() + seconds
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def worker() -> None:
            while time.perf_counter() < deadline:
                await one(session, url, data, stream, s)

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        s.seconds = time.perf_counter() - started


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def start(args: list[str], url: str, name: str) -> Proc:
    proc = Proc(args, name=name)
    poll_until(lambda: http_status(url, "/health") in (200, 404, 405), 20, f"{name} up")
    return proc


@dataclass
class System:
    name: str
    url: str
    pid: int | None  # the proxy process measured; None for direct


async def measure(system: System, concurrency: int, seconds: float, stream: bool) -> Sample:
    s = Sample()
    before = cpu_seconds(system.pid) if system.pid else 0.0
    await closed_loop(f"{system.url}/v1/chat/completions", concurrency, seconds, stream, s)
    if system.pid:
        s.cpu = cpu_seconds(system.pid) - before
        s.rss_mb = peak_rss_mb(system.pid)
    return s


SCENARIOS = [(1, True), (1, False), (64, True), (64, False), (256, True)]


async def main() -> None:
    args, workdir = options("perf", 8.0, 3)
    procs: list[Proc] = []
    try:
        wport, pport = free_port(), free_port()
        worker_url = f"http://127.0.0.1:{wport}"
        procs.append(
            start([PY, "-m", "tests.bench.mockworker", "--port", str(wport)], worker_url, "mock")
        )
        passthrough = f"http://127.0.0.1:{pport}"
        procs.append(
            start(
                [
                    PY,
                    "-m",
                    "tests.bench.passthrough",
                    "--port",
                    str(pport),
                    "--upstream",
                    worker_url,
                ],
                passthrough,
                "passthrough",
            )
        )
        config = write_config(
            workdir / "gateway.yaml",
            [worker_url],
            limits={"max_in_flight": 1024, "pool_size": 1024, "pool_per_worker": 1024},
            logging={"level": "INFO", "format": "json"},  # the defaults: the access log is on
        )
        gateway = start_gateway(config)
        procs.append(gateway.proc)
        systems = [
            System("direct", worker_url, None),
            System("passthrough", passthrough, procs[1].popen.pid),
            System("vllm-gateway", gateway.url, gateway.proc.popen.pid),
        ]
        results: dict[tuple[str, int, bool], list[Sample]] = {}
        for c, stream in SCENARIOS:
            for i in range(args.repeats):
                for system in systems:
                    s = await measure(system, c, args.seconds, stream)
                    results.setdefault((system.name, c, stream), []).append(s)
                    print(f"c={c} stream={stream} {system.name} #{i + 1}: {s.rate:.0f} req/s, "
                          f"ttft p50 {1000 * s.q(s.ttft, 0.5):.2f} ms, errors {s.errors}",
                          file=sys.stderr, flush=True)  # fmt: skip
        text = report(results, systems, args)
        RESULTS.write_text(text, encoding="utf-8")
        print(text)
    finally:
        for proc in procs:
            proc.kill()


HEADER = (
    "| C | body | system | req/s | vs direct | TTFT p50 / p99 (ms) | added p50 / p99 (ms) "
    "| CPU ms / req | peak RSS (MB) | errors |\n|---|---|---|---|---|---|---|---|---|---|"
)


def med(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def report(
    results: dict[tuple[str, int, bool], list[Sample]],
    systems: list[System],
    args: argparse.Namespace,
) -> str:
    rows = []
    for c, stream in SCENARIOS:
        direct = results[("direct", c, stream)]
        for system in systems:
            runs = results[(system.name, c, stream)]
            rates = [r.rate for r in runs]
            ttft50 = [1000 * r.q(r.ttft, 0.5) for r in runs]
            ttft99 = [1000 * r.q(r.ttft, 0.99) for r in runs]
            added50 = med(ttft50) - med([1000 * r.q(r.ttft, 0.5) for r in direct])
            added99 = med(ttft99) - med([1000 * r.q(r.ttft, 0.99) for r in direct])
            cpu = [1000 * r.cpu / max(len(r.total), 1) for r in runs]
            direct_rate = med([r.rate for r in direct])
            rows.append(
                f"| {c} | {'stream' if stream else 'json'} | {system.name} | {med(rates):.0f} "
                f"({min(rates):.0f}-{max(rates):.0f}) | {med(rates) / direct_rate:.2f} "
                f"| {med(ttft50):.2f} / {med(ttft99):.2f} | {added50:+.2f} / {added99:+.2f} "
                f"| {med(cpu):.2f} | {max(r.rss_mb for r in runs):.0f} "
                f"| {sum(r.errors for r in runs)} |"
            )
    return f"""# `make bench`: what the gateway adds, side by side

{(__doc__ or "").split(chr(10), 2)[2].strip()}

- Date: {time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}; machine: {machine()}
- {args.repeats} repeats of {args.seconds:.0f} s per system and scenario, interleaved. Figures:
  median (min-max) over repeats. Peers (vllm-router, LiteLLM) are not in this run yet.

{HEADER}
{chr(10).join(rows)}
"""


if __name__ == "__main__":
    uvloop.run(main())
