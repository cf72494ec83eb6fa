"""`make bench-routing`: routing quality on simulated fleets, two routing settings side by side.

Owns the scenarios, their parameters and capacity arithmetic, the open-loop load generator, the
per-run measurements (client TTFT, the workers' own counters, CPU per process) and the report
it writes to tests/bench/ROUTING.md.

Method. Simulated vLLM workers (``python -m gateway.simulator``) and the gateway
(``python -m gateway --config``) run as subprocesses, fresh for every run. An open-loop client in
this process (aiohttp on uvloop) sends streaming chat requests at Poisson arrival times drawn
from a seed per repeat, so both settings of a repeat see the very same arrivals; it records each
request's time from sending to the first non-empty content token. The two settings of a scenario
alternate within every repeat (A, B, A, B, ...), so machine noise falls on both.

(a) Heterogeneous fleet, `routing.policy` least_loaded (the default) vs round_robin.
(b) Prefix-heavy traffic, `routing.affinity` prefix vs none (policy least_loaded in both).
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import random
import statistics
import sys
import textwrap
import time
from collections.abc import Callable, Collection, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from gateway.affinity import prefix_key
from gateway.balancer import make_policy
from gateway.loadsignals import LoadSignals
from tests.bench.common import machine
from tests.processes import GatewayProc, Proc, Sim, start_gateway, start_simulator, write_config

RESULTS = Path(__file__).with_name("ROUTING.md")
MODEL = "sim-model"
SECONDS = 25.0  # of arrivals per run
REPEATS = 3  # runs per setting
SCRAPE_INTERVAL = 0.5
WORKERS = 4

# (a) Heterogeneous fleet: every latency fixed, so capacity is arithmetic.
A_SEQS = 8  # --max-num-seqs: requests a worker runs at once
A_TTFT = 0.02  # --ttft: batch slot granted -> first token (no prefill cost: --prefill-per-token 0)
A_ITL = 0.02  # --itl, and --itl-per-seq 0: the batch does not slow down as it fills
A_TOKENS = 32  # max_tokens of every request
A_SLOWDOWN = 3.0
A_LOAD = 0.8  # arrivals as a share of the fleet's capacity
A_SERVICE = A_TTFT + (A_TOKENS - 1) * A_ITL  # seconds a request holds a slot on a fast worker
A_FAST_RATE = A_SEQS / A_SERVICE  # requests/s one fast worker completes when always full
A_FLEET_RATE = (WORKERS - 1) * A_FAST_RATE + A_FAST_RATE / A_SLOWDOWN
A_RATE = A_LOAD * A_FLEET_RATE

# (b) Prefix-heavy traffic: the prompt is "system" + PREFIX_WORDS words = exactly PREFIX_BLOCKS
# full blocks, then "user" + a unique question shorter than a block, which is never cached: so
# a cache of CACHED_PREFIXES * PREFIX_BLOCKS blocks holds exactly CACHED_PREFIXES prefixes.
BLOCK = 16
PREFIX_BLOCKS = 63
PREFIX_WORDS = PREFIX_BLOCKS * BLOCK - 1  # 1007 words, plus the role token
PREFIXES = 16
CACHED_PREFIXES = 5
B_SEQS = 32
B_TTFT = 0.01
B_PREFILL = 0.0002  # seconds per uncached prompt token: a miss on a whole prefix costs ~0.2 s
B_ITL = 0.02
B_TOKENS = 48
B_RATE = 20.0  # requests/s
QUESTION_WORDS = 7  # "Question N: what does clause M say?"
BEST_HIT = PREFIX_BLOCKS * BLOCK / (PREFIX_WORDS + QUESTION_WORDS)  # prompt tokens a hit covers

VOCABULARY = (
    "policy", "section", "customer", "invoice", "shipping", "refund", "warranty", "account",
    "contract", "clause", "delivery", "payment", "support", "product", "service", "terms",
    "notice", "period", "party", "agreement", "liability", "order", "return", "claim", "data",
)  # fmt: skip


@dataclass(frozen=True)
class Variant:
    label: str
    routing: dict[str, Any]


Body = Callable[[int, random.Random], dict[str, Any]]


@dataclass(frozen=True)
class Scenario:
    key: str
    variants: tuple[Variant, Variant]
    sim_args: tuple[tuple[str, ...], ...]  # one per worker
    rate: float  # requests/s
    tokens: int  # content tokens every answer must carry
    body: Body


@dataclass
class Tally:
    """What the client saw, request by request."""

    sent: int = 0
    ttft: list[float] = field(default_factory=list)
    numbers: list[int] = field(default_factory=list)  # each ``ttft``'s request, by arrival
    errors: dict[str, int] = field(default_factory=dict)
    lag: float = 0.0  # worst lateness of a send against its arrival time

    @property
    def completed(self) -> int:
        return len(self.ttft)

    @property
    def failed(self) -> int:
        return sum(self.errors.values())

    def fail(self, why: str) -> None:
        self.errors[why] = self.errors.get(why, 0) + 1


@dataclass
class Run:
    """One run of one variant: the client's tally and the fleet's counters over the run."""

    variant: str
    tally: Tally
    seconds: float = 0.0  # first arrival -> last answer
    served: list[float] = field(default_factory=list)  # requests finished, per worker
    service: list[float] = field(default_factory=list)  # mean slot-holding seconds, per worker
    queue: list[float] = field(default_factory=list)  # mean seconds waiting for a slot, per worker
    hits: float = 0.0  # prompt tokens found in the workers' prefix caches
    queries: float = 0.0  # prompt tokens looked up
    window: float = 0.0  # seconds of arrivals
    e2e: float = 0.0  # request-seconds spent in the workers (queue + slot), all workers
    home_keys: list[int] = field(default_factory=list)  # (b): prompts whose ring home is each
    cpu: dict[str, float] = field(default_factory=dict)  # share of one core, by process kind
    predicted: float = math.nan  # hit tokens the router expected of the workers it chose
    firsts: set[int] = field(default_factory=set)  # requests that first sent their shared prefix

    def quantile(self, q: float, leaving: Collection[int] = ()) -> float:
        """TTFT quantile over the completed requests, but those numbered in ``leaving``."""
        if not leaving:
            return quantile(self.tally.ttft, q)
        kept = [
            t for n, t in zip(self.tally.numbers, self.tally.ttft, strict=True) if n not in leaving
        ]
        return quantile(kept, q)

    @property
    def hit_rate(self) -> float:
        return self.hits / self.queries if self.queries else math.nan

    def utilization(self, worker: int, slots: int) -> float:
        """Share of the worker's slots busy over the run, first arrival to last answer."""
        return self.served[worker] * self.service[worker] / (slots * self.seconds)

    @property
    def in_flight(self) -> float:
        """Mean requests inside the workers (queued or running) during the run (Little)."""
        return self.e2e / self.window

    @property
    def busiest(self) -> float:
        mean = statistics.fmean(self.served) if self.served else 0.0
        return max(self.served) / mean if mean else math.nan


def quantile(values: Sequence[float], q: float) -> float:
    """Nearest rank: the smallest value with at least q of the values at or below it."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


# --- scenarios -------------------------------------------------------------------------------


def sim_flags(seqs: int, ttft: float, prefill: float, itl: float, tokens: int) -> tuple[str, ...]:
    return (
        "--max-num-seqs", str(seqs), "--ttft", str(ttft), "--prefill-per-token", str(prefill),
        "--itl", str(itl), "--itl-per-seq", "0", "--default-max-tokens", str(tokens),
    )  # fmt: skip


def heterogeneous() -> Scenario:
    fast = sim_flags(A_SEQS, A_TTFT, 0.0, A_ITL, A_TOKENS)
    slow = (*fast, "--slowdown", str(A_SLOWDOWN))
    return Scenario(
        key="a",
        variants=(
            Variant("least_loaded", {"policy": "least_loaded"}),
            Variant("round_robin", {"policy": "round_robin"}),
        ),
        sim_args=(fast,) * (WORKERS - 1) + (slow,),
        rate=A_RATE,
        tokens=A_TOKENS,
        body=question_body,
    )


def question_body(n: int, rng: random.Random) -> dict[str, Any]:
    content = f"Question {n}: what is {rng.randrange(1000)} plus {rng.randrange(1000)}?"
    return chat([{"role": "user", "content": content}], A_TOKENS)


def chat(messages: list[dict[str, str]], tokens: int) -> dict[str, Any]:
    return {"model": MODEL, "messages": messages, "max_tokens": tokens, "stream": True}


def prefix_heavy() -> Scenario:
    cache = ("--prefix-cache-blocks", str(CACHED_PREFIXES * PREFIX_BLOCKS))
    flags = (*sim_flags(B_SEQS, B_TTFT, B_PREFILL, B_ITL, B_TOKENS), *cache, "--block-tokens")
    return Scenario(
        key="b",
        variants=(
            Variant("prefix", {"policy": "least_loaded", "affinity": "prefix"}),
            Variant("none", {"policy": "least_loaded", "affinity": "none"}),
        ),
        sim_args=((*flags, str(BLOCK)),) * WORKERS,
        rate=B_RATE,
        tokens=B_TOKENS,
        body=prefix_body,
    )


def prefix_text(i: int) -> str:
    rng = random.Random(i)
    words = [f"Document {i}:", *(rng.choice(VOCABULARY) for _ in range(PREFIX_WORDS - 2))]
    return " ".join(words)


PREFIX_TEXTS = tuple(prefix_text(i) for i in range(PREFIXES))


def prefix_body(n: int, rng: random.Random) -> dict[str, Any]:
    system = PREFIX_TEXTS[rng.randrange(PREFIXES)]
    question = f"Question {n}: what does clause {rng.randrange(100)} say?"  # QUESTION_WORDS
    return chat(
        [{"role": "system", "content": system}, {"role": "user", "content": question}], B_TOKENS
    )


# --- the client ------------------------------------------------------------------------------


def arrivals(rate: float, seconds: float, seed: int) -> list[float]:
    """Poisson arrival times in [0, seconds)."""
    rng = random.Random(seed)
    times: list[float] = []
    at = rng.expovariate(rate)
    while at < seconds:
        times.append(at)
        at += rng.expovariate(rate)
    return times


async def stream(
    session: aiohttp.ClientSession,
    url: str,
    body: dict[str, Any],
    tokens: int,
    tally: Tally,
    number: int = -1,
) -> None:
    started = time.perf_counter()
    first: float | None = None
    seen = 0
    done = False
    try:
        async with session.post(f"{url}/v1/chat/completions", json=body) as resp:
            if resp.status != 200:
                await resp.read()
                tally.fail(f"status {resp.status}")
                return
            async for line in resp.content:
                if line.startswith(b"data: [DONE]"):
                    done = True
                    break
                if line.startswith(b'data: {"error"'):
                    tally.fail("error event")
                    return
                if has_content(line):
                    seen += 1
                    first = first or time.perf_counter()
    except (aiohttp.ClientError, TimeoutError) as exc:
        tally.fail(type(exc).__name__)
        return
    if not done or first is None or seen != tokens:
        tally.fail("incomplete stream")
        return
    tally.ttft.append(first - started)
    tally.numbers.append(number)


def has_content(line: bytes) -> bool:
    return line.startswith(b"data: {") and b'"content":"' in line and b'"content":""' not in line


Route = Callable[[aiohttp.ClientSession, dict[str, Any]], AbstractAsyncContextManager[str]]


async def open_loop(
    url: str | Route, scenario: Scenario, times: list[float], seed: int, tally: Tally
) -> None:
    """Send one request at each arrival time, whatever the answers are doing (open loop).
    ``url``: the router's, or a ``Route`` that picks a worker for each body (the oracle)."""
    rng = random.Random(seed)  # request bodies
    timeout = aiohttp.ClientTimeout(total=600.0, sock_read=300.0)
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        tasks: list[asyncio.Task[None]] = []
        start = time.perf_counter()
        for n, at in enumerate(times):
            delay = start + at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tally.lag = max(tally.lag, -delay)
            body = scenario.body(n, rng)
            sending = send(session, url, body, scenario.tokens, tally, n)
            tasks.append(asyncio.create_task(sending))
            tally.sent += 1
        await asyncio.gather(*tasks)


async def send(
    session: aiohttp.ClientSession,
    url: str | Route,
    body: dict[str, Any],
    tokens: int,
    tally: Tally,
    number: int = -1,
) -> None:
    if isinstance(url, str):
        await stream(session, url, body, tokens, tally, number)
        return
    async with url(session, body) as chosen:
        await stream(session, chosen, body, tokens, tally, number)


async def progress(label: str, total: int, tally: Tally) -> None:
    """One line on stderr, rewritten every second until cancelled."""
    started = time.monotonic()
    while True:
        print(
            f"\r  {label}: {time.monotonic() - started:5.0f} s, sent {tally.sent}/{total}, "
            f"done {tally.completed}, errors {tally.failed}   ",
            end="",
            file=sys.stderr,
            flush=True,
        )
        await asyncio.sleep(1.0)


# --- the fleet's own numbers -----------------------------------------------------------------

COUNTERS = (
    "vllm:request_success_total",
    "vllm:prefix_cache_hits_total",
    "vllm:prefix_cache_queries_total",
    "vllm:e2e_request_latency_seconds_sum",
    "vllm:request_queue_time_seconds_sum",
)


def metric_sums(text: str) -> dict[str, float]:
    """Every counter in COUNTERS summed over its label sets."""
    sums = dict.fromkeys(COUNTERS, 0.0)
    for line in text.splitlines():
        name, _, rest = line.partition("{")
        if name not in sums:
            name, _, rest = line.partition(" ")
        if name in sums:
            sums[name] += float(rest.rsplit(" ", 1)[1] if "}" in rest else rest)
    return sums


async def scrape(urls: Sequence[str]) -> list[dict[str, float]]:
    async with aiohttp.ClientSession() as session:
        return [await scrape_one(session, url) for url in urls]


async def scrape_one(session: aiohttp.ClientSession, url: str) -> dict[str, float]:
    async with session.get(f"{url}/metrics") as resp:
        resp.raise_for_status()
        return metric_sums(await resp.text())


def record_counters(
    run: Run, before: list[dict[str, float]], after: list[dict[str, float]]
) -> None:
    for old, new in zip(before, after, strict=True):
        delta = {name: new[name] - old[name] for name in COUNTERS}
        done = delta["vllm:request_success_total"]
        queued = delta["vllm:request_queue_time_seconds_sum"]
        busy = delta["vllm:e2e_request_latency_seconds_sum"] - queued
        run.served.append(done)
        run.service.append(busy / done if done else math.nan)
        run.queue.append(queued / done if done else math.nan)
        run.hits += delta["vllm:prefix_cache_hits_total"]
        run.queries += delta["vllm:prefix_cache_queries_total"]
        run.e2e += delta["vllm:e2e_request_latency_seconds_sum"]


def cpu_seconds(pid: int) -> float:
    """utime + stime of a live process, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_busy() -> tuple[float, float]:
    """(busy, total) clock ticks of all CPUs since boot."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    return float(sum(values) - idle), float(sum(values))


@dataclass
class CpuClock:
    """CPU used by the gateway, the workers, this client and the whole machine over a run."""

    gateway: int
    sims: list[int]
    started: float = field(default_factory=time.perf_counter)
    marks: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.marks = self._read()

    def _read(self) -> dict[str, float]:
        busy, total = machine_busy()
        return {
            "gateway": cpu_seconds(self.gateway),
            "workers": sum(cpu_seconds(pid) for pid in self.sims),
            "client": time.process_time(),
            "busy": busy,
            "total": total,
        }

    def shares(self) -> dict[str, float]:
        """Per process kind: CPU seconds per wall second (1.0 = one core); machine: 0..1."""
        now = self._read()
        wall = time.perf_counter() - self.started
        delta = {name: now[name] - self.marks[name] for name in now}
        shares = {name: delta[name] / wall for name in ("gateway", "workers", "client")}
        shares["machine"] = delta["busy"] / delta["total"] if delta["total"] else math.nan
        return shares


# --- one run ---------------------------------------------------------------------------------


async def start_fleet(sim_args: Sequence[Sequence[str]]) -> list[Sim]:
    """All workers at once (each takes a second or two to import); none left behind on failure."""
    started = await asyncio.gather(
        *(asyncio.to_thread(start_simulator, *args, model=MODEL) for args in sim_args),
        return_exceptions=True,
    )
    sims = [s for s in started if isinstance(s, Sim)]
    for failure in started:
        if isinstance(failure, BaseException):
            stop([s.proc for s in sims])
            raise failure
    return sims


def gateway_config(workdir: Path, urls: Sequence[str], routing: dict[str, Any]) -> Path:
    """Generous timeouts and limits: the gateway must neither time out nor shed the bench."""
    return write_config(
        workdir / "gateway.yaml",
        urls,
        routing={"scrape_interval": SCRAPE_INTERVAL, **routing},
        timeouts={"queue": 5.0, "connect": 5.0, "first_token": 300.0, "idle": 300.0},
        limits={"max_in_flight": 4096, "pool_size": 4096, "pool_per_worker": 1024},
    )


def stop(procs: Sequence[Proc]) -> None:
    for proc in procs:
        proc.kill()


async def one_run(
    scenario: Scenario, variant: Variant, seed: int, seconds: float, label: str, workdir: Path
) -> Run:
    sims = await start_fleet(scenario.sim_args)
    procs = [s.proc for s in sims]
    try:
        urls = [s.url for s in sims]
        config = gateway_config(workdir, urls, variant.routing)
        gateway = await asyncio.to_thread(start_gateway, config)
        procs.append(gateway.proc)
        await asyncio.sleep(2 * SCRAPE_INTERVAL)  # the first load scrapes are in
        return await measure(scenario, variant, seed, seconds, label, gateway, sims)
    finally:
        stop(procs)


async def measure(
    scenario: Scenario,
    variant: Variant,
    seed: int,
    seconds: float,
    label: str,
    gateway: GatewayProc,
    sims: Sequence[Sim],
) -> Run:
    urls = [s.url for s in sims]
    run = Run(variant.label, Tally(), window=seconds, home_keys=home_keys(urls, scenario))
    times = arrivals(scenario.rate, seconds, seed)
    before = await scrape(urls)
    clock = CpuClock(gateway.proc.popen.pid, [s.proc.popen.pid for s in sims])
    ticker = asyncio.create_task(progress(label, len(times), run.tally))
    try:
        await open_loop(gateway.url, scenario, times, seed, run.tally)
    finally:
        ticker.cancel()
        print(file=sys.stderr)
    run.seconds = time.perf_counter() - clock.started
    run.cpu = clock.shares()
    record_counters(run, before, await scrape(urls))
    return run


@dataclass
class FakeWorker:
    """Enough of a gateway worker for the balancer's policies (`Pickable`)."""

    url: str
    in_flight: int = 0
    last_pick: int = 0
    load: LoadSignals | None = None


def home_keys(urls: Sequence[str], scenario: Scenario) -> list[int]:
    """(b) only: how many prefixes each worker is home to on the gateway's hash ring, found with
    the gateway's own policy on idle workers (the ring depends on the workers' ports)."""
    if scenario.key != "b":
        return []
    workers = [FakeWorker(url) for url in urls]
    policy = make_policy("least_loaded", "prefix")
    counts = dict.fromkeys(urls, 0)
    for text in PREFIX_TEXTS:
        messages = [{"role": "system", "content": text}, {"role": "user", "content": "?"}]
        home = policy.pick(workers, prefix_key({"messages": messages}, 1024))
        assert home is not None
        counts[home.url] += 1
    return list(counts.values())


# --- the scenarios, interleaved --------------------------------------------------------------


async def run_scenario(
    scenario: Scenario, seconds: float, repeats: int, workdir: Path
) -> dict[str, list[Run]]:
    runs: dict[str, list[Run]] = {v.label: [] for v in scenario.variants}
    for repeat in range(repeats):
        order = scenario.variants if repeat % 2 == 0 else scenario.variants[::-1]
        for variant in order:
            label = f"({scenario.key}) {variant.label} {repeat + 1}/{repeats}"
            run = await one_run(scenario, variant, repeat, seconds, label, workdir)
            print(f"    {summary(run)}", file=sys.stderr, flush=True)
            runs[variant.label].append(run)
    return runs


def summary(run: Run) -> str:
    served = "/".join(f"{s:.0f}" for s in run.served)
    return (
        f"p50 {run.quantile(0.5):.3f} s, p99 {run.quantile(0.99):.3f} s, "
        f"errors {run.tally.errors or 0}, served {served}, hit rate {run.hit_rate:.3f}, "
        f"cpu gateway {run.cpu['gateway']:.2f} workers {run.cpu['workers']:.2f} "
        f"client {run.cpu['client']:.2f} machine {run.cpu['machine']:.0%}"
    )


# --- the report ------------------------------------------------------------------------------


def spread(values: Sequence[float], fmt: str) -> str:
    """Median over runs, with the range."""
    low, mid, high = (format(v, fmt) for v in (min(values), statistics.median(values), max(values)))
    return mid if len(values) == 1 else f"{mid} ({low} to {high})"


def median(runs: Sequence[Run], value: Callable[[Run], float]) -> float:
    return statistics.median(value(r) for r in runs)


def row(cells: Sequence[object]) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = [row(header), row(["---"] * len(header)), *(row(r) for r in rows)]
    return "\n".join(lines)


def common_cells(runs: Sequence[Run]) -> list[str]:
    return [
        f"{sum(r.tally.completed for r in runs)} / {sum(r.tally.sent for r in runs)}",
        str(sum(r.tally.failed for r in runs)),
        spread([r.quantile(0.5) for r in runs], ".3f"),
        spread([r.quantile(0.99) for r in runs], ".3f"),
    ]


def fleet_table(runs: dict[str, list[Run]]) -> str:
    header = ["policy", "completed / sent", "errors", "TTFT p50 (s)", "TTFT p99 (s)",
              "slow worker's share (%)", "slot time fast / slow (s)",
              "queue wait fast / slow (s)"]  # fmt: skip
    rows = [
        [
            label, *common_cells(rs),
            spread([100 * r.served[-1] / sum(r.served) for r in rs], ".1f"),
            f"{median(rs, lambda r: statistics.fmean(r.service[:-1])):.3f} / "
            f"{median(rs, lambda r: r.service[-1]):.3f}",
            f"{median(rs, lambda r: statistics.fmean(r.queue[:-1])):.3f} / "
            f"{median(rs, lambda r: r.queue[-1]):.3f}",
        ]
        for label, rs in runs.items()
    ]  # fmt: skip
    return table(header, rows)


def prefix_table(runs: dict[str, list[Run]]) -> str:
    header = ["affinity", "completed / sent", "errors", "TTFT p50 (s)", "TTFT p99 (s)",
              "prefix-cache hit rate (%)", "busiest worker / mean"]  # fmt: skip
    rows = [
        [
            label, *common_cells(rs),
            spread([100 * r.hit_rate for r in rs], ".1f"),
            spread([r.busiest for r in rs], ".2f"),
        ]
        for label, rs in runs.items()
    ]  # fmt: skip
    return table(header, rows)


CPU_KINDS = ("gateway", "workers", "client")


def cpu_table(results: dict[str, dict[str, list[Run]]]) -> str:
    header = ["scenario", "setting", "gateway", "4 workers", "client", "machine busy",
              "client's worst send lag (ms)", "run length (s)"]  # fmt: skip
    rows = [
        [
            key, label,
            *(f"{statistics.median(r.cpu[k] for r in rs):.2f}" for k in CPU_KINDS),
            f"{100 * statistics.median(r.cpu['machine'] for r in rs):.0f}%",
            f"{1000 * max(r.tally.lag for r in rs):.1f}",
            f"{median(rs, lambda r: r.seconds):.0f}",
        ]
        for key, runs in results.items()
        for label, rs in runs.items()
    ]  # fmt: skip
    return table(header, rows)


def ratios(runs: dict[str, list[Run]], a: str, b: str) -> list[float]:
    return [x.quantile(0.99) / y.quantile(0.99) for x, y in zip(runs[a], runs[b], strict=True)]


def verdict(ok: bool) -> str:
    return "met" if ok else "NOT met"


def para(text: str) -> str:
    """One Markdown paragraph, rewrapped: the source's line breaks don't matter."""
    return textwrap.fill(" ".join(text.split()), width=100, break_on_hyphens=False)


def full_rate(run: Run) -> float:
    """(a): requests/s the fleet completes when full, from the slot times the workers measured."""
    return sum(A_SEQS / s for s in run.service)


def slow_share() -> float:
    """The slow worker's share of the fleet's capacity."""
    return A_FAST_RATE / A_SLOWDOWN / A_FLEET_RATE


def fleet_section(runs: dict[str, list[Run]]) -> str:
    ratio = ratios(runs, "least_loaded", "round_robin")
    p99 = {label: median(rs, lambda r: r.quantile(0.99)) for label, rs in runs.items()}
    errors = sum(r.tally.failed for rs in runs.values() for r in rs)
    measured = statistics.median(full_rate(r) for rs in runs.values() for r in rs)
    arithmetic = f"""Capacity arithmetic. A request holds a batch slot for TTFT + (tokens - 1) x ITL
        = {A_TTFT} + {A_TOKENS - 1} x {A_ITL} = {A_SERVICE:.2f} s on a fast worker (no prefill
        cost, `--itl-per-seq 0`: the batch does not slow down as it fills), {A_SLOWDOWN:g}x that
        on the slow one. With {A_SEQS} slots (`--max-num-seqs`) a fast worker completes
        {A_SEQS} / {A_SERVICE:.2f} = {A_FAST_RATE:.2f} requests/s, the slow one
        {A_FAST_RATE / A_SLOWDOWN:.2f}; the fleet {WORKERS - 1} x {A_FAST_RATE:.2f} +
        {A_FAST_RATE / A_SLOWDOWN:.2f} = {A_FLEET_RATE:.2f}. Arrivals: {A_LOAD:.0%} of that,
        {A_RATE:.2f} requests/s (Poisson), {A_TOKENS} tokens each. Round-robin gives the slow
        worker a quarter, {A_RATE / WORKERS:.2f} requests/s, more than it can complete: its queue
        grows for the whole run (round-robin is stable only below {WORKERS * slow_share():.0%}
        load here), so round-robin's p99 grows with the run length. "Slot time" and "queue wait"
        are the workers' own means per request (e2e minus queue time, and queue time), to check
        the arithmetic: the simulators' timers overshoot each sleep a little, so the fleet
        really completes {measured:.1f} requests/s when full and the offered load is
        {A_RATE / measured:.0%} of that."""
    target = f"""p99 TTFT least_loaded / round_robin, repeat by repeat:
        {", ".join(f"{x:.3f}" for x in ratio)}; of the medians:
        {p99["least_loaded"] / p99["round_robin"]:.3f}. Target <= 0.5:
        {verdict(max(ratio) <= 0.5)}. Errors (target 0): {errors}, {verdict(errors == 0)}."""
    title = f"## (a) Heterogeneous fleet: {WORKERS} workers, one {A_SLOWDOWN:g}x slower"
    return "\n\n".join([title, para(arithmetic), fleet_table(runs), para(target)]) + "\n"


def prefix_section(runs: dict[str, list[Run]]) -> str:
    busiest = median(runs["prefix"], lambda r: r.busiest)
    errors = sum(r.tally.failed for rs in runs.values() for r in rs)
    homes = "; ".join(" ".join(str(n) for n in r.home_keys) for r in runs["prefix"])
    setup = f"""Each request is one of {PREFIXES} system prompts of {PREFIX_WORDS} words (picked
        uniformly) plus a unique {QUESTION_WORDS}-word question, {B_TOKENS} tokens of answer,
        {B_RATE:g} requests/s (Poisson). The prompt's "system" token and words fill exactly
        {PREFIX_BLOCKS} blocks of {BLOCK} tokens; the question stays in a partial block, which
        is never cached. Each worker's cache (`--prefix-cache-blocks
        {CACHED_PREFIXES * PREFIX_BLOCKS}`) holds exactly {CACHED_PREFIXES} prompts. Prefill
        costs {B_PREFILL} s per uncached token, so a miss adds {B_PREFILL * PREFIX_WORDS:.2f} s
        to the first token; ITL {B_ITL} s, {B_SEQS} slots per worker (never all busy). Hit rate
        = the workers' `vllm:prefix_cache_hits_total` / `vllm:prefix_cache_queries_total` over
        the run (prompt tokens); a request hits at most {BEST_HIT:.1%} (the question is never
        cached). Without affinity an LRU cache of {CACHED_PREFIXES} among {PREFIXES} equally
        likely prompts hits about {CACHED_PREFIXES}/{PREFIXES} = {CACHED_PREFIXES / PREFIXES:.0%}
        of requests. Busiest worker / mean: requests completed (`vllm:request_success_total`)
        by the busiest worker over the mean of the {WORKERS}."""
    target = f"""Prompts whose home on the gateway's hash ring is each worker (the ring is built
        from the workers' ports, which change from run to run), per `prefix` run: {homes}.
        Busiest worker / mean with affinity (target <= 1.25): {busiest:.2f},
        {verdict(busiest <= 1.25)}. Errors (target 0): {errors}, {verdict(errors == 0)}."""
    title = f"## (b) Prefix-heavy traffic: {PREFIXES} system prompts, {WORKERS} identical workers"
    return "\n\n".join([title, para(setup), prefix_table(runs), para(target)]) + "\n"


def report(results: dict[str, dict[str, list[Run]]], seconds: float, repeats: int) -> str:
    parts = [
        "# `make bench-routing`: routing quality on simulated fleets\n",
        method(seconds, repeats),
    ]
    if "a" in results:
        parts.append(fleet_section(results["a"]))
    if "b" in results:
        parts.append(prefix_section(results["b"]))
    cpu = """CPU seconds per wall second over each run (1.00 = one core busy), medians over
        runs; "machine busy" counts every process on the machine, ours and others'."""
    parts.append(f"## CPU: is the machine the bottleneck?\n\n{para(cpu)}\n\n{cpu_table(results)}\n")
    parts.append(reading(results))
    return "\n".join(parts)


def method(seconds: float, repeats: int) -> str:
    doc = (__doc__ or "").split("\n\n", 2)[2].split("\n\n")
    settings = f"""Gateway settings for the bench: `routing.scrape_interval: {SCRAPE_INTERVAL}`;
        timeouts first_token and idle 300 s (nothing times out); limits 4096 in flight
        (nothing is shed); everything else default (`routing.load_factor` 1.25,
        `routing.prefix_chars` 1024, retries on). TTFT is the client's clock, from sending the
        request to the first chunk with non-empty content. A request counts as completed when
        its stream carries all its tokens and `[DONE]`; anything else (a status, an error
        event, a broken or short stream) is an error."""
    runs = f"""- Command: `make bench-routing` (`python -m tests.bench.routing --seconds {seconds:g}
        --repeats {repeats}`): {repeats} runs per setting, settings alternating, {seconds:g} s of
        arrivals per run (then until every answer is in). Tables: median over runs (min to
        max); "completed / sent" and errors are totals over runs."""
    return (
        "\n\n".join(
            [
                para(doc[0]),
                "\n".join(doc[1].strip().splitlines()),
                para(settings),
                f"- Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n"
                f"- Machine: {machine()}\n" + textwrap.indent(para(runs), "  ")[2:],
            ]
        )
        + "\n"
    )


def reading(results: dict[str, dict[str, list[Run]]]) -> str:
    lines = ["## Reading"]
    if "a" in results:
        lines.append(fleet_reading(results["a"]))
    if "b" in results:
        lines.append(prefix_reading(results["b"]))
    return "\n\n".join(lines) + "\n"


def fleet_reading(runs: dict[str, list[Run]]) -> str:
    ll, rr = runs["least_loaded"], runs["round_robin"]
    return para(
        f"""(a) least_loaded sent the slow worker {median(ll, slow_part):.1%} of the requests
        (its share of the fleet's capacity: {slow_share():.1%}), round-robin
        {median(rr, slow_part):.1%}, more than it can complete, so under round-robin its queue
        grew all run and round-robin's p99 TTFT ({median(rr, lambda r: r.quantile(0.99)):.2f} s)
        is that queue. least_loaded's p99 ({median(ll, lambda r: r.quantile(0.99)):.3f} s,
        against an idle slow worker's {A_TTFT * A_SLOWDOWN:.2f} s) is queueing too, mostly on
        the slow worker: with least_loaded its slots were
        {median(ll, lambda r: r.utilization(-1, A_SEQS)):.0%} busy, the fast workers'
        {median(ll, fast_utilization):.0%}, and a request waited for a slot
        {median(ll, lambda r: r.queue[-1]):.3f} s on average there,
        {median(ll, lambda r: statistics.fmean(r.queue[:-1])):.3f} s on a fast worker.
        {hotter(ll)}"""
    )


def hotter(runs: Sequence[Run]) -> str:
    if median(runs, lambda r: r.utilization(-1, A_SEQS)) <= median(runs, fast_utilization):
        return "The slow worker ran no hotter than the fast ones."
    return f"""The load score counts requests, not seconds of work, and power of two choices
        among {WORKERS} workers still picks the third-ranked one a sixth of the time, so the slow
        worker runs hotter than the fast ones, and each request queued there waits
        {A_SLOWDOWN:g}x as long per request ahead of it."""


def slow_part(run: Run) -> float:
    return run.served[-1] / sum(run.served)


def fast_utilization(run: Run) -> float:
    return statistics.fmean(run.utilization(i, A_SEQS) for i in range(WORKERS - 1))


def prefix_reading(runs: dict[str, list[Run]]) -> str:
    on, off = runs["prefix"], runs["none"]
    in_flight = median(on, lambda r: r.in_flight)
    cap = math.ceil(1.25 * (in_flight + 1) / WORKERS)
    return para(
        f"""(b) Prefix affinity took the hit rate from {median(off, lambda r: r.hit_rate):.1%}
        to {median(on, lambda r: r.hit_rate):.1%} and p50 TTFT from
        {median(off, lambda r: r.quantile(0.5)):.3f} s to
        {median(on, lambda r: r.quantile(0.5)):.3f} s; the busiest worker served
        {median(on, lambda r: r.busiest):.2f}x the mean
        ({median(off, lambda r: r.busiest):.2f}x without affinity). Below {BEST_HIT:.0%}
        because every prompt's first request on a worker misses ({PREFIXES} of about
        {median(on, lambda r: r.tally.sent):.0f} per run at best); a worker that is home to more
        than {CACHED_PREFIXES} prompts cannot cache them all; and bounded load: with about
        {in_flight:.0f} requests in the fleet the cap is ceil(1.25 x ({in_flight:.0f} + 1) /
        {WORKERS}) = {cap} per worker, so a burst on a prompt's home sends requests on to the
        next worker on the ring, where they miss and evict that worker's own prompts."""
    )


# --- main ------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.routing")
    parser.add_argument("--seconds", type=float, default=SECONDS, help="arrivals per run")
    parser.add_argument("--repeats", type=int, default=REPEATS, help="runs per setting")
    parser.add_argument("--only", choices=("a", "b"), help="one scenario only")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where the report goes")
    parser.add_argument(
        "--quick", action="store_true", help="8 s, 1 repeat, report to stdout only (iterating)"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.seconds, args.repeats, args.out = 8.0, 1, None
    return args


async def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    workdir = Path(os.environ.get("TMPDIR", "/tmp")) / f"bench-routing-{os.getpid()}"
    workdir.mkdir(parents=True, exist_ok=True)
    scenarios = [s for s in (heterogeneous(), prefix_heavy()) if args.only in (None, s.key)]
    results = {s.key: await run_scenario(s, args.seconds, args.repeats, workdir) for s in scenarios}
    text = report(results, args.seconds, args.repeats)
    if args.out is not None:
        args.out.write_text(text, encoding="utf-8")
        print(f"wrote {args.out}", file=sys.stderr)
    print(text)


def new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


if __name__ == "__main__":
    with asyncio.Runner(loop_factory=new_loop) as runner:
        runner.run(main())
