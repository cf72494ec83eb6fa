"""`make bench-routing`: routing quality on simulated fleets, policies side by side.

Method. Simulated vLLM workers and the gateway run as subprocesses; an open-loop client in this
process sends streaming chat requests with Poisson arrivals and records each request's time to
first content token. Each scenario runs every policy REPEATS times, interleaved (A, B, A, B...),
with fresh workers and gateway per run, so machine noise falls on both.

(a) Heterogeneous fleet: 4 workers, one `--slowdown 3`. Every request asks 20 tokens; a worker
    runs `MAX_SEQS` at once, takes TTFT + 19 * ITL per request (no batch slowdown:
    `--itl-per-seq 0`), so a fast worker serves MAX_SEQS / service_time requests/s and the slow
    one a third of that. Arrivals at LOAD of the fleet's total. Round-robin sends the slow
    worker a quarter of the traffic, more than it can serve; the default policy (power of two
    choices over in-flight counts and scraped queues) should not.
(b) Prefix-heavy traffic: 4 identical workers with a prefix cache that holds about
    CACHED_PREFIXES of the PREFIXES long shared system prompts; each request is one of them
    plus a unique question. Prefix affinity (consistent hashing with bounded load) vs none:
    the workers' own prefix-cache hit rate (vllm:prefix_cache_hits/queries), the busiest
    worker's share of requests over the mean, and time to first token.
"""

from __future__ import annotations

import asyncio
import random
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from tests.bench.common import machine, options
from tests.processes import GatewayProc, Sim, start_gateway, start_simulator, write_config

RESULTS = Path(__file__).with_name("ROUTING.md")

# (a) heterogeneous fleet
MAX_SEQS = 4
TTFT = 0.02
ITL = 0.01
TOKENS = 20
SLOWDOWN = 3.0
LOAD = 0.8
FAST_RATE = MAX_SEQS / (TTFT + (TOKENS - 1) * ITL)  # requests/s one fast worker serves
FLEET_RATE = 3 * FAST_RATE + FAST_RATE / SLOWDOWN

# (b) prefix-heavy traffic
PREFIXES = 16
PREFIX_WORDS = 1024  # 64 blocks of 16 tokens
BLOCK = 16
CACHED_PREFIXES = 5
PREFIX_RATE = 16.0  # requests/s
PREFILL = 0.0003  # seconds per uncached prompt token: a miss on a whole prefix costs ~0.3 s


@dataclass
class Run:
    ttft: list[float] = field(default_factory=list)
    errors: int = 0
    served: list[float] = field(default_factory=list)  # requests finished per worker
    hits: float = 0.0
    queries: float = 0.0

    def p(self, q: float) -> float:
        ordered = sorted(self.ttft)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")

    @property
    def hit_rate(self) -> float:
        return self.hits / self.queries if self.queries else float("nan")

    @property
    def max_share(self) -> float:
        mean = statistics.fmean(self.served) if self.served else 0.0
        return max(self.served) / mean if mean else float("nan")


async def stream(session: aiohttp.ClientSession, url: str, body: dict[str, Any], run: Run) -> None:
    started = time.monotonic()
    first: float | None = None
    try:
        async with session.post(f"{url}/v1/chat/completions", json=body) as resp:
            if resp.status != 200:
                run.errors += 1
                await resp.read()
                return
            async for line in resp.content:
                if first is None and _has_content(line):
                    first = time.monotonic()
                if b"[DONE]" in line:
                    break
                if b'"error"' in line:
                    run.errors += 1
                    return
    except (aiohttp.ClientError, TimeoutError):
        run.errors += 1
        return
    if first is None:
        run.errors += 1
    else:
        run.ttft.append(first - started)


def _has_content(line: bytes) -> bool:
    return line.startswith(b"data: {") and b'"content":"' in line and b'"content":""' not in line


async def open_loop(url: str, rate: float, seconds: float, make_body: Any, run: Run) -> None:
    rng = random.Random(7)  # the same arrival times for every policy
    tasks: list[asyncio.Task[None]] = []
    timeout = aiohttp.ClientTimeout(total=seconds * 20)
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        start = time.monotonic()
        at = 0.0
        n = 0
        while at < seconds:
            delay = start + at - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(stream(session, url, make_body(n, rng), run)))
            n += 1
            at += rng.expovariate(rate)
            if n % 100 == 0:
                print(f"\r  {n} requests sent", end="", file=sys.stderr, flush=True)
        await asyncio.gather(*tasks)
    print(file=sys.stderr)


def metric_sum(text: str, name: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and line[len(name)] in "{ ":
            total += float(line.rsplit(" ", 1)[1])
    return total


async def scrape(urls: Sequence[str], run: Run) -> None:
    async with aiohttp.ClientSession() as session:
        for url in urls:
            async with session.get(f"{url}/metrics") as resp:
                text = await resp.text()
            run.served.append(metric_sum(text, "vllm:request_success_total"))
            run.hits += metric_sum(text, "vllm:prefix_cache_hits_total")
            run.queries += metric_sum(text, "vllm:prefix_cache_queries_total")


async def one_run(
    sim_args: list[list[str]],
    routing: dict[str, Any],
    rate: float,
    seconds: float,
    make_body: Any,
    workdir: Path,
) -> Run:
    sims: list[Sim] = []
    gateway: GatewayProc | None = None
    run = Run()
    try:
        for args in sim_args:
            sims.append(await asyncio.to_thread(start_simulator, *args))
        config = write_config(
            workdir / "gateway.yaml",
            [s.url for s in sims],
            routing={"scrape_interval": 0.5, **routing},
            timeouts={"first_token": 300.0, "idle": 300.0, "total": 600.0, "queue": 5.0},
            limits={"max_in_flight": 4096, "pool_size": 4096, "pool_per_worker": 1024},
            logging={"level": "INFO"},
        )
        gateway = await asyncio.to_thread(start_gateway, config)
        await open_loop(gateway.url, rate, seconds, make_body, run)
        await scrape([s.url for s in sims], run)
    finally:
        if gateway is not None:
            gateway.proc.kill()
        for sim in sims:
            sim.proc.kill()
    return run


def fleet_args() -> list[list[str]]:
    base = ["--max-num-seqs", str(MAX_SEQS), "--ttft", str(TTFT), "--itl", str(ITL),
            "--itl-per-seq", "0", "--prefill-per-token", "0"]  # fmt: skip
    return [base, base, base, [*base, "--slowdown", str(SLOWDOWN)]]


def fleet_body(n: int, rng: random.Random) -> dict[str, Any]:
    return {
        "model": "sim-model",
        "messages": [{"role": "user", "content": f"question {n}"}],
        "max_tokens": TOKENS,
        "stream": True,
    }


WORDS = ("alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india")


def prefix_text(i: int) -> str:
    rng = random.Random(i)
    return f"Document {i}. " + " ".join(rng.choice(WORDS) for _ in range(PREFIX_WORDS - 2))


PREFIX_TEXTS = [prefix_text(i) for i in range(PREFIXES)]


def prefix_args() -> list[list[str]]:
    blocks = CACHED_PREFIXES * (PREFIX_WORDS // BLOCK + 2)
    base = ["--max-num-seqs", "16", "--ttft", "0.01", "--itl", str(ITL), "--itl-per-seq", "0",
            "--prefill-per-token", str(PREFILL), "--prefix-cache-blocks", str(blocks),
            "--block-tokens", str(BLOCK), "--kv-cache-tokens", "1000000"]  # fmt: skip
    return [base] * 4


def prefix_body(n: int, rng: random.Random) -> dict[str, Any]:
    return {
        "model": "sim-model",
        "messages": [
            {"role": "system", "content": PREFIX_TEXTS[rng.randrange(PREFIXES)]},
            {"role": "user", "content": f"unique question number {n}"},
        ],
        "max_tokens": 10,
        "stream": True,
    }


def spread(values: list[float], fmt: str) -> str:
    low, mid, high = (format(v, fmt) for v in (min(values), statistics.median(values), max(values)))
    return f"{mid} ({low} to {high})"


async def scenario(
    name: str,
    policies: dict[str, dict[str, Any]],
    args: list[list[str]],
    rate: float,
    seconds: float,
    make_body: Any,
    repeats: int,
    workdir: Path,
) -> dict[str, list[Run]]:
    runs: dict[str, list[Run]] = {p: [] for p in policies}
    for i in range(repeats):
        for label, routing in policies.items():
            print(f"{name}: run {i + 1}/{repeats}, {label}", file=sys.stderr, flush=True)
            run = await one_run(args, routing, rate, seconds, make_body, workdir)
            print(f"  p99 ttft {run.p(0.99):.3f}s, errors {run.errors}, served {run.served}, "
                  f"hit rate {run.hit_rate:.3f}", file=sys.stderr, flush=True)  # fmt: skip
            runs[label].append(run)
    return runs


HEADER_B = (
    "| affinity | requests | errors | prefix-cache hit rate (%) | busiest worker / mean "
    "| TTFT p50 (s) | TTFT p99 (s) |\n|---|---|---|---|---|---|---|"
)


def report(
    fleet: dict[str, list[Run]], prefix: dict[str, list[Run]], seconds: float, repeats: int
) -> str:
    ll, rr = fleet["least_loaded"], fleet["round_robin"]
    ratio = [a.p(0.99) / b.p(0.99) for a, b in zip(ll, rr, strict=True)]
    rows_a = [
        f"| {label} | {sum(len(r.ttft) for r in runs)} | {sum(r.errors for r in runs)} "
        f"| {spread([r.p(0.5) for r in runs], '.3f')} | {spread([r.p(0.99) for r in runs], '.3f')} "
        f"| {spread([r.served[-1] / sum(r.served) * 100 for r in runs], '.1f')} |"
        for label, runs in fleet.items()
    ]
    rows_b = [
        f"| {label} | {sum(len(r.ttft) for r in runs)} | {sum(r.errors for r in runs)} "
        f"| {spread([100 * r.hit_rate for r in runs], '.1f')} "
        f"| {spread([r.max_share for r in runs], '.2f')} "
        f"| {spread([r.p(0.5) for r in runs], '.3f')} "
        f"| {spread([r.p(0.99) for r in runs], '.3f')} |"
        for label, runs in prefix.items()
    ]
    doc = __doc__ or ""
    return f"""# `make bench-routing`: routing quality on simulated fleets

{doc.split(chr(10), 2)[2].strip()}

- Date: {time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}; machine: {machine()}
- Command: `make bench-routing` (`python -m tests.bench.routing`); {repeats} runs per policy,
  interleaved, {seconds:.0f} s of arrivals each. Figures: median over runs (min to max).

## (a) 4 workers, one {SLOWDOWN:.0f}x slower, at {LOAD:.0%} of fleet capacity

Capacity: a fast worker serves {MAX_SEQS} / ({TTFT} + {TOKENS - 1} x {ITL}) = {FAST_RATE:.1f}
requests/s, the slow one {FAST_RATE / SLOWDOWN:.1f}; the fleet {FLEET_RATE:.1f}. Arrivals:
{LOAD * FLEET_RATE:.1f} requests/s (Poisson), {TOKENS} tokens each.

| policy | requests | errors | TTFT p50 (s) | TTFT p99 (s) | slow worker's share of requests (%) |
|---|---|---|---|---|---|
{chr(10).join(rows_a)}

p99 TTFT of least_loaded / round_robin, run by run: {", ".join(f"{x:.3f}" for x in ratio)}
(target <= 0.5).

## (b) Prefix-heavy traffic: {PREFIXES} shared prefixes of {PREFIX_WORDS} tokens

Each worker's cache holds about {CACHED_PREFIXES} of them.

Arrivals: {PREFIX_RATE:.0f} requests/s (Poisson); a miss on a whole prefix costs
{PREFILL * PREFIX_WORDS:.2f} s of prefill.

{HEADER_B}
{chr(10).join(rows_b)}
"""


async def main() -> None:
    args, workdir = options("routing", 25.0, 2)
    fleet = await scenario(
        "heterogeneous",
        {"least_loaded": {"policy": "least_loaded"}, "round_robin": {"policy": "round_robin"}},
        fleet_args(),
        LOAD * FLEET_RATE,
        args.seconds,
        fleet_body,
        args.repeats,
        workdir,
    )
    prefix = await scenario(
        "prefix",
        {"prefix": {"affinity": "prefix"}, "none": {"affinity": "none"}},
        prefix_args(),
        PREFIX_RATE,
        args.seconds,
        prefix_body,
        args.repeats,
        workdir,
    )
    text = report(fleet, prefix, args.seconds, args.repeats)
    RESULTS.write_text(text, encoding="utf-8")
    print(text)


if __name__ == "__main__":
    asyncio.run(main())
