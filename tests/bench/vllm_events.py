"""``python -m tests.bench.vllm_events``: what relaying one SSE event costs in front of real vLLM
(issue 21, scope 4), beside vllm-router; writes tests/bench/VLLM_EVENTS.md.

The mock worker of ``make bench`` sends one token per event at a fixed pace. Real vLLM decides
for itself: on these CPUs its API server falls behind and puts several tokens in one event, and
its pace follows the engine. So the figure here is CPU per event actually relayed, counted at
the client, for the same requests through each system in turn.

Method. One CPU vLLM worker (the test suite's tiny model, ``tests/vllm/fleet.py``). Systems:
direct (the floor: no proxy), vllm-router 0.1.17 (round_robin), vllm-gateway as shipped and
with its production features on (``systems.FEATURES``). Each run is a closed loop of
CONCURRENCY clients sending REQUESTS streaming chat requests of TOKENS tokens (greedy,
``ignore_eos``); the systems take turns, in reverse order every other repeat. Per run: the
events the client received, the proxy's CPU seconds over its whole process tree, the time to
first token (p50, p99) and the wall time. CPU per event = the proxy's CPU / events.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from tests.bench.common import machine
from tests.bench.routing import quantile
from tests.bench.systems import MASTER_KEY, System, gateway, vllm_router
from tests.vllm.fleet import MODEL, VLLMWorker

RESULTS = Path(__file__).with_name("VLLM_EVENTS.md")
CONCURRENCY, REQUESTS, TOKENS, REPEATS = 16, 64, 200, 3
SYSTEMS = ("direct", "vllm-router", "vllm-gateway", "vllm-gateway+features")


@dataclass
class Run:
    system: str
    events: int = 0
    cpu: float = 0.0
    seconds: float = 0.0
    ttft: list[float] = field(default_factory=list)
    failed: int = 0

    @property
    def us_per_event(self) -> float:
        return self.cpu / self.events * 1e6 if self.events else float("nan")

    def ttft_q(self, q: float) -> float:
        return quantile(self.ttft, q)


async def one_stream(session: aiohttp.ClientSession, url: str, run: Run) -> None:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Count the stars, one by one."}],
        "max_tokens": TOKENS,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
    }
    started = time.perf_counter()
    first: float | None = None
    done = False
    headers = {"Authorization": f"Bearer {MASTER_KEY}"}
    async with session.post(f"{url}/v1/chat/completions", json=body, headers=headers) as resp:
        if resp.status != 200:
            run.failed += 1
            await resp.read()
            return
        async for line in resp.content:
            if not line.startswith(b"data: "):
                continue
            run.events += 1
            if line.startswith(b"data: [DONE]"):
                done = True
            elif first is None and b'"content":"' in line and b'"content":""' not in line:
                first = time.perf_counter()
    if not done or first is None:
        run.failed += 1
        return
    run.ttft.append(first - started)


async def one_run(system: System) -> Run:
    run = Run(system.name)
    cpu_before = system.cpu_seconds()
    started = time.perf_counter()
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        queue = list(range(REQUESTS))

        async def client() -> None:
            while queue:
                queue.pop()
                await one_stream(session, system.url, run)

        await asyncio.gather(*(client() for _ in range(CONCURRENCY)))
    run.seconds = time.perf_counter() - started
    run.cpu = system.cpu_seconds() - cpu_before
    return run


def start(name: str, worker: str, workdir: Path) -> System:
    if name == "direct":
        return System("direct", worker, None)
    if name == "vllm-router":
        return vllm_router(worker)
    return gateway(worker, workdir, features=name.endswith("+features"), models=(MODEL,))


def report(runs: dict[str, list[Run]], repeats: int) -> str:
    def cell(values: Sequence[float], fmt: str) -> str:
        return f"{statistics.median(values):{fmt}} ({', '.join(format(v, fmt) for v in values)})"

    lines = [
        "# Relaying real vLLM's events (tests/bench/vllm_events.py)",
        f"{machine()}; one CPU vLLM worker (tiny model); {CONCURRENCY} clients, {REQUESTS} "
        f"streams of {TOKENS} tokens per run, {repeats} repeats; medians, then each repeat.",
        "",
        "| system | events per stream | CPU µs per event | TTFT p50 (s) | TTFT p99 (s) | "
        "run (s) | failed |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, rs in runs.items():
        lines.append(
            f"| {name} | {cell([r.events / REQUESTS for r in rs], '.1f')} | "
            f"{cell([r.us_per_event for r in rs], '.1f') if name != 'direct' else 'n/a'} | "
            f"{cell([r.ttft_q(0.5) for r in rs], '.3f')} | "
            f"{cell([r.ttft_q(0.99) for r in rs], '.3f')} | "
            f"{cell([r.seconds for r in rs], '.1f')} | {sum(r.failed for r in rs)} |"
        )
    router = runs.get("vllm-router")
    if router:
        lines += ["", "CPU per event over vllm-router's, per repeat:", ""]
        for name in ("vllm-gateway", "vllm-gateway+features"):
            if name in runs:
                pairs = zip(runs[name], router, strict=True)
                ratios = [g.us_per_event / r.us_per_event for g, r in pairs]
                lines.append(f"- {name}: {', '.join(f'{x:.2f}' for x in ratios)}")
    return "\n".join(lines) + "\n"


async def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.vllm_events")
    parser.add_argument("--repeats", type=int, default=REPEATS)
    args = parser.parse_args(argv)
    worker = VLLMWorker("events")
    await asyncio.to_thread(worker.start)
    try:
        await asyncio.to_thread(worker.wait_ready)
        runs: dict[str, list[Run]] = {name: [] for name in SYSTEMS}
        with tempfile.TemporaryDirectory() as tmp:
            for repeat in range(args.repeats):
                order = SYSTEMS if repeat % 2 == 0 else SYSTEMS[::-1]
                for name in order:
                    system = await asyncio.to_thread(start, name, worker.url, Path(tmp))
                    try:
                        await one_run(system)  # warm-up: connections, caches
                        run = await one_run(system)
                    finally:
                        if system.proc is not None:
                            system.proc.kill()
                    runs[name].append(run)
                    print(
                        f"{name} {repeat + 1}/{args.repeats}: {run.events} events, "
                        f"{run.us_per_event:.1f} µs/event, {run.seconds:.1f} s",
                        file=sys.stderr,
                    )
        text = report(runs, args.repeats)
        RESULTS.write_text(text, encoding="utf-8")
        print(text)
    finally:
        await asyncio.to_thread(worker.stop)


if __name__ == "__main__":
    asyncio.run(main())
