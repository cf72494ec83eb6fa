"""`make bench`: what the gateway adds to every request, side by side with the limit (direct to
the worker), two Python floors and the peers (vllm-router, LiteLLM). The floors do nothing but
carry bytes: `passthrough` is a bare aiohttp proxy, `python-floor` a relay with no framework
(uvloop and httptools, each worker read written to the client inside its callback): the least
a request and an SSE event can cost in Python.

The headline is paced streams (`paced*`): the worker sends each token as its own SSE event, one
engine step apart (5 or 20 ms, after 20 ms to the first token), as vLLM does, so every token is
its own read and its own write in every proxy; CPU per SSE event is the figure that matters
there. The zero-sleep scenarios, where a whole answer arrives in one or two reads, are the best
case. vllm-gateway runs twice: as shipped (`vllm-gateway`), and with its production features on
(`vllm-gateway+features`: API keys with rpm, tpm and concurrency limits, resume for every
stream, prefix affinity). LiteLLM is left out of the paced scenarios (at 20 ms of its own a
request it would take minutes per run). A paced run's figures come from a steady-state window
(``loadgen.closed_loop``'s ``warm``): it opens one answer's length after the ramp, so the first
wave (every client connecting at once, all streams in step) is not in them, and CPU is read at
the window's edges. The kernel's share of each system's CPU is given beside it: the syscalls
and loopback TCP that any proxy pays per event.

Method: one mock worker (`mockworker.py`) and each system run as process trees on loopback on
this machine; the load generator (`loadgen.py`, uvloop) runs here. Within each repeat every
scenario runs on every system in turn (the order rotates between repeats), so machine noise
falls on all of them alike; "added" figures are differences to direct within the same repeat.
CPU seconds (per request) and peak resident memory are read from /proc for each system's whole
process tree. The gateway runs as shipped, features on (metrics, least-loaded routing with
worker scraping, every timeout, the JSON access log, `processes: auto`); only its limits are
raised so it does not shed the benchmark's own load, as are vllm-router's.

`c1-turns` measures what one request adds at c=1 with the systems taking turns request by
request (direct, the floors, the gateways, vllm-router; LiteLLM, at 20 ms a request, is left out):
runs one after another see different moments of these shared machines, which moves a p99 by
more than the 1 ms it is held to; taking turns, every system sees the same moments.
`c1-stream` runs each system alone as the other scenarios do. Its req/s has no meaning (it is
a share of the turns); its CPU per request does.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import uvloop

from tests.bench import loadgen
from tests.bench.common import machine, options
from tests.bench.loadgen import Sample, chat_body, quantile
from tests.bench.mockworker import PACES
from tests.bench.systems import RssSampler, System, started

HERE = Path(__file__).parent
RESULTS = HERE / "RESULTS.md"
SYSTEMS = [
    "passthrough",
    "python-floor",
    "vllm-gateway",
    "vllm-gateway+features",
    "vllm-router",
    "litellm",
]
GATEWAYS = ("vllm-gateway", "vllm-gateway+features")
QUICK_OUT = HERE / "PACED.md"
# A report's text below this line is written by hand (analyses, profiles) and kept across runs.
KEEP = "<!-- kept across runs: written by hand below this line -->"
QUICK_CONCURRENCY = (64, 256)  # issue 21's targets; c=1,000 in the full run or by --scenarios
SLOW_GAP = 0.1  # a slow stream "saw a gap" when one exceeded the worker's step by this much


@dataclass(frozen=True)
class Scenario:
    key: str
    title: str
    model: str
    stream: bool
    concurrency: int = 0  # closed loop at this concurrency, or
    rate: float = 0.0  # open loop at this arrival rate
    seconds: float = 1.0  # times --seconds
    ramp: float = 0.0
    # c=1 with the systems taking turns request by request (``loadgen.taking_turns``), LiteLLM
    # left out (at 20 ms a request it would leave the others a few hundred samples).
    turns: bool = False
    prompt: int = 0  # the request's size in bytes (``loadgen.chat_body``); 0: one short message

    @property
    def paced(self) -> bool:
        return self.key.startswith("paced")

    @property
    def warm(self) -> float:
        """Seconds after the ramp before a paced run's window opens: one answer's length (the
        first wave's connects and the clients' start in step are over by then); 0: none."""
        pace = PACES[self.model]
        return pace.ttft + pace.itl * pace.tokens + 0.05 if self.paced else 0.0

    @property
    def events(self) -> int:
        """SSE events in one answer (role, one per token, ``[DONE]``); 1 for a JSON answer."""
        return PACES[self.model].tokens + 2 if self.stream else 1


SCENARIOS = [
    Scenario("paced5-c64", "64 paced streams, a token every 5 ms", "sim-realistic", True,
             concurrency=64, seconds=0.75),
    Scenario("paced5-c64-24k", "64 paced streams of 24 KB conversations, a token every 5 ms",
             "sim-realistic", True, concurrency=64, seconds=0.75, prompt=24_000),
    Scenario("paced5-c256", "256 paced streams, a token every 5 ms", "sim-realistic", True,
             concurrency=256, seconds=0.75, ramp=0.5),
    Scenario("paced20-c64", "64 paced streams, a token every 20 ms", "sim-itl20", True,
             concurrency=64, seconds=0.75),
    Scenario("paced20-c256", "256 paced streams, a token every 20 ms", "sim-itl20", True,
             concurrency=256, seconds=0.75, ramp=0.5),
    Scenario("paced20-c1000", "1,000 paced streams, a token every 20 ms", "sim-itl20", True,
             concurrency=1000, seconds=0.75, ramp=1.0),
    Scenario("c1-stream", "1 stream at a time", "sim-model", True, concurrency=1),
    Scenario("c1-json", "1 JSON request at a time", "sim-model", False, concurrency=1),
    Scenario(
        "c1-turns", "1 stream at a time, the systems taking turns request by request",
        "sim-model", True, concurrency=1, seconds=2.0, turns=True,
    ),
    Scenario("c16-stream", "16 concurrent streams", "sim-model", True, concurrency=16),
    Scenario("c64-stream", "64 concurrent streams", "sim-model", True, concurrency=64),
    Scenario("c64-json", "64 concurrent JSON requests", "sim-model", False, concurrency=64),
    Scenario("c256-stream", "256 concurrent streams", "sim-model", True, concurrency=256),
    Scenario("c256-json", "256 concurrent JSON requests", "sim-model", False, concurrency=256),
    Scenario(
        "realistic-512", "512 realistic streams (20 ms to first token, 5 ms x 50 tokens)",
        "sim-realistic", True, concurrency=512, seconds=1.5, ramp=1.0,
    ),
    Scenario(
        "open-200", "open loop, 200 realistic streams/s", "sim-realistic", True, rate=200,
        seconds=1.5,
    ),
    Scenario(
        "open-json-500", "open loop, 500 JSON requests/s", "sim-model", False, rate=500,
        seconds=1.0,
    ),
    Scenario(
        "slow-2000", "2,000 concurrent slow streams (500 ms x 20 tokens)", "sim-slow", True,
        concurrency=2000, seconds=2.5, ramp=2.0,
    ),
]  # fmt: skip
SWEEP = ["c1-stream", "c16-stream", "c64-stream", "c256-stream"]  # the plots' x axis


def kept(out: Path) -> str:
    """The hand-written part of the report a run replaces (``KEEP`` and what follows)."""
    old = out.read_text(encoding="utf-8") if out.exists() else ""
    return "\n" + KEEP + old.split(KEEP, 1)[1] if KEEP in old else ""


async def settle(systems: list[System], quiet: float = 0.05, limit: float = 15.0) -> None:
    """Until every system is idle (all trees under ``quiet`` of a core over 0.5 s; at most
    ``limit`` s): a system still working off the last run's backlog (LiteLLM's queue, seconds
    deep) must not take CPU from the next one measured."""
    loop = asyncio.get_running_loop()
    give_up = loop.time() + limit
    await asyncio.sleep(0.5)  # connections close, timers settle
    while loop.time() < give_up:
        before = sum(s.cpu_seconds() for s in systems)
        await asyncio.sleep(0.5)
        if sum(s.cpu_seconds() for s in systems) - before < quiet * 0.5:
            return


async def measure(system: System, sc: Scenario, seconds: float, label: str) -> Sample:
    url = f"{system.url}/v1/chat/completions"
    data = chat_body(sc.model, sc.stream, sc.prompt)
    before, kernel = system.cpu_seconds(), system.kernel_seconds()
    with RssSampler(system) as rss:
        if sc.rate:
            s = await loadgen.open_loop(url, data, sc.stream, sc.rate, seconds, label)
        elif sc.warm:
            # Started over one answer's length at least: clients in step would start in waves,
            # a burst of request set-ups each, and a window would hold a whole number of waves.
            s = await loadgen.closed_loop(
                url, data, sc.stream, sc.concurrency, seconds, label, ramp=max(sc.ramp, sc.warm),
                warm=sc.warm, meter=lambda: (system.cpu_seconds(), system.kernel_seconds()),
            )  # fmt: skip
        else:
            s = await loadgen.closed_loop(
                url, data, sc.stream, sc.concurrency, seconds, label, ramp=sc.ramp
            )
    if not sc.warm or system.proc is None:
        s.cpu = system.cpu_seconds() - before
        s.kernel = system.kernel_seconds() - kernel
    s.rss_mb = rss.peak
    return s


async def measure_turns(
    systems: list[System], sc: Scenario, seconds: float, repeat: int
) -> list[tuple[System, Sample]]:
    taking = [s for s in systems if s.name != "litellm"]
    before = [s.cpu_seconds() for s in taking]
    urls = [f"{s.url}/v1/chat/completions" for s in taking]
    label = f"#{repeat + 1} {sc.key} (all taking turns)"
    samples = await loadgen.taking_turns(urls, chat_body(sc.model, sc.stream, sc.prompt), sc.stream,
                                         seconds, label)  # fmt: skip
    for system, s, cpu in zip(taking, samples, before, strict=True):
        s.cpu = system.cpu_seconds() - cpu
        s.rss_mb = system.rss_mb() if system.proc is not None else 0.0  # at the end, not peak
    return list(zip(taking, samples, strict=True))


Results = dict[tuple[str, str], list[Sample]]  # (system, scenario) -> one Sample per repeat


def more_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--systems",
        nargs="+",
        choices=SYSTEMS,
        help=f"default: all ({', '.join(SYSTEMS)}); --quick: all but litellm",
    )
    parser.add_argument(
        "--scenarios", nargs="+", choices=[s.key for s in SCENARIOS],
        help="default: all; --quick: the paced ones",
    )  # fmt: skip
    parser.add_argument(
        "--quick", action="store_true",
        help="the paced scenarios at c=64 and 256 only, 3 s windows, 2 repeats, no LiteLLM "
        "(about 6 minutes); "
        f"writes {QUICK_OUT.name} instead of {RESULTS.name}",
    )  # fmt: skip
    parser.add_argument("--out", type=Path, help="the report's file (default: see --quick)")


def plan(args: argparse.Namespace) -> tuple[list[str], list[Scenario], Path]:
    """The systems, scenarios and report file that the options ask for."""
    if args.quick:
        if "--seconds" not in sys.argv:
            args.seconds = 4.0  # x 0.75: 3 s runs
        if "--repeats" not in sys.argv:
            args.repeats = 2
    names = args.systems or [s for s in SYSTEMS if not (args.quick and s == "litellm")]
    keys = args.scenarios or [
        s.key for s in SCENARIOS
        if not args.quick or (s.paced and s.concurrency in QUICK_CONCURRENCY)
    ]  # fmt: skip
    out = args.out or (QUICK_OUT if args.quick else RESULTS)
    return names, [s for s in SCENARIOS if s.key in keys], out


def takes_part(system: System, sc: Scenario) -> bool:
    return not (sc.paced and system.name == "litellm")


async def main() -> None:
    args, workdir = options("perf", 6.0, 3, more_options)
    names, scenarios, out = plan(args)
    results: Results = {}
    with started(names, workdir) as systems:
        for i in range(args.repeats):
            order = systems[i % len(systems) :] + systems[: i % len(systems)]
            for sc in scenarios:
                if sc.turns:
                    for system, s in await measure_turns(order, sc, sc.seconds * args.seconds, i):
                        results.setdefault((system.name, sc.key), []).append(s)
                    await settle(systems)
                    continue
                for system in (s for s in order if takes_part(s, sc)):
                    label = f"#{i + 1} {sc.key} {system.name}"
                    s = await measure(system, sc, sc.seconds * args.seconds, label)
                    results.setdefault((system.name, sc.key), []).append(s)
                    await settle(systems)
        text = report(results, systems, scenarios, args)
    out.write_text(text + kept(out), encoding="utf-8")
    plot(results, [s.name for s in systems], scenarios, out.parent)
    print(text)


# --- the report -------------------------------------------------------------------------------


def med(values: Sequence[float]) -> float:
    values = [v for v in values if v == v]  # drop NaN (no samples)
    return statistics.median(values) if values else float("nan")


def spread(values: Sequence[float], fmt: str = "{:.0f}") -> str:
    clean = [v for v in values if v == v]
    if not clean:
        return "-"
    if len(clean) == 1:
        return fmt.format(clean[0])
    return f"{fmt.format(med(clean))} ({fmt.format(min(clean))}-{fmt.format(max(clean))})"


def ms(q: float) -> Callable[[Sample], float]:
    return lambda s: 1000 * quantile(s.ttft, q)


def per_repeat(results: Results, name: str, key: str, f: Callable[[Sample], float]) -> list[float]:
    return [f(s) for s in results.get((name, key), [])]


def added(results: Results, name: str, key: str, f: Callable[[Sample], float]) -> list[float]:
    """``f`` of the system minus ``f`` of direct, repeat by repeat."""
    return [a - b for a, b in zip(per_repeat(results, name, key, f),
                                  per_repeat(results, "direct", key, f), strict=False)]  # fmt: skip


def ratio(
    results: Results, name: str, other: str, key: str, f: Callable[[Sample], float]
) -> list[float]:
    return [a / b if b else float("nan") for a, b in zip(
        per_repeat(results, name, key, f), per_repeat(results, other, key, f), strict=False
    )]  # fmt: skip


def rate(s: Sample) -> float:
    return s.rate


def total_ms(q: float) -> Callable[[Sample], float]:
    return lambda s: 1000 * quantile(s.total, q)


def gap_ms(q: float) -> Callable[[Sample], float]:
    return lambda s: 1000 * quantile(s.gaps, q)


def cpu_ms(s: Sample) -> float:
    return 1000 * s.cpu / max(len(s.total), 1)


def cpu_us_per_event(sc: Scenario) -> Callable[[Sample], float]:
    """CPU per SSE event relayed (per answer for JSON): the system's CPU over the run divided
    by the events of the answers it completed."""
    return lambda s: 1e6 * s.cpu / max(len(s.total) * sc.events, 1)


def kernel_share(s: Sample) -> float:
    return 100 * s.kernel / s.cpu if s.cpu else float("nan")


def each(values: Sequence[float], fmt: str = "{:.2f}") -> str:
    """Every repeat's value, in the order of the repeats."""
    return ", ".join(fmt.format(v) for v in values) or "-"


def smooth_share(step: float) -> Callable[[Sample], float]:
    """Share of streams whose every gap stayed under the worker's step plus ``SLOW_GAP``."""
    return lambda s: (
        100 * sum(1 for g in s.max_gap if g <= step + SLOW_GAP) / len(s.max_gap)
        if s.max_gap else float("nan")
    )  # fmt: skip


def scenario_table(results: Results, names: list[str], sc: Scenario) -> str:
    head = (
        "| system | req/s | vs direct | TTFT p50 / p99 (ms) | added TTFT p50 / p99 (ms) "
        "| added total p50 / p99 (ms) | gap p99 (ms) | CPU ms / req | CPU µs / event "
        "| peak RSS (MB) | errors |"
    )
    rows = [head, "|" + "---|" * 11]
    for name in names:
        runs = results.get((name, sc.key), [])
        if not runs:
            continue
        errors = sum(s.errors for s in runs)
        kinds: dict[str, int] = {}
        for s in runs:
            for k, n in s.error_kinds.items():
                kinds[k] = kinds.get(k, 0) + n
        error_cell = str(errors) + (f" ({', '.join(f'{k}: {n}' for k, n in kinds.items())})"
                                    if kinds else "")  # fmt: skip

        def cell(f: Callable[[Sample], float], fmt: str) -> str:
            return spread(per_repeat(results, name, sc.key, f), fmt)  # noqa: B023

        proxy = name != "direct"
        cells = [
            name,
            cell(rate, "{:.0f}"),
            spread(ratio(results, name, "direct", sc.key, rate), "{:.2f}"),
            f"{cell(ms(0.5), '{:.2f}')} / {cell(ms(0.99), '{:.2f}')}",
            f"{_added(results, name, sc.key, ms(0.5))} / {_added(results, name, sc.key, ms(0.99))}",
            f"{_added(results, name, sc.key, total_ms(0.5))} / "
            f"{_added(results, name, sc.key, total_ms(0.99))}",
            cell(gap_ms(0.99), "{:.1f}"),
            cell(cpu_ms, "{:.2f}") if proxy else "-",
            cell(cpu_us_per_event(sc), "{:.1f}") if proxy else "-",
            spread([s.rss_mb for s in runs]) if proxy else "-",
            error_cell,
        ]
        rows.append("| " + " | ".join(cells) + " |")
    if sc.model == "sim-slow":
        step = PACES["sim-slow"].itl
        rows.append("")
        rows.append(
            f"Streams with no gap over {1000 * (step + SLOW_GAP):.0f} ms (the worker's "
            f"{1000 * step:.0f} ms step + {1000 * SLOW_GAP:.0f} ms): "
            + "; ".join(
                f"{name} {spread(per_repeat(results, name, sc.key, smooth_share(step)), '{:.1f}')}%"
                for name in names if results.get((name, sc.key))
            )
        )  # fmt: skip
    return "\n".join(rows)


def _added(results: Results, name: str, key: str, f: Callable[[Sample], float]) -> str:
    if name == "direct":
        return "-"
    return spread(added(results, name, key, f), "{:+.2f}")


@dataclass
class Check:
    what: str
    values: list[float]
    target: str
    ok: Callable[[float], bool]

    def row(self) -> str:
        clean = [v for v in self.values if v == v]
        verdict = "met" if clean and all(self.ok(v) for v in clean) else (
            "met on the median" if clean and self.ok(med(clean)) else "NOT met"
        )  # fmt: skip
        shown = ", ".join(f"{v:.2f}" for v in self.values) or "-"
        return f"| {self.what} | {shown} | {self.target} | {verdict} |"


def headline(results: Results, names: list[str], scenarios: list[Scenario]) -> str:
    """The paced scenarios in one table: every value is one repeat's, in repeat order; ratios
    are to vllm-router in the same repeat."""
    peer = "vllm-router" if "vllm-router" in names else ""
    rows = [
        "| scenario | system | req/s | req/s / vllm-router | CPU µs / event "
        "| CPU per event / vllm-router | kernel share of CPU (%) | added TTFT p99 (ms) | errors |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for sc in (sc for sc in scenarios if sc.paced):
        per_event = cpu_us_per_event(sc)
        for name in names:
            runs = results.get((name, sc.key), [])
            if name == "direct" or not runs:
                continue
            mine = name != peer and peer
            cells = [
                f"`{sc.key}`", name,
                each(per_repeat(results, name, sc.key, rate), "{:.0f}"),
                each(ratio(results, name, peer, sc.key, rate)) if mine else "-",
                each(per_repeat(results, name, sc.key, per_event), "{:.1f}"),
                each(ratio(results, name, peer, sc.key, per_event)) if mine else "-",
                each(per_repeat(results, name, sc.key, kernel_share), "{:.0f}"),
                each(added(results, name, sc.key, ms(0.99)), "{:+.1f}"),
                str(sum(s.errors for s in runs)),
            ]  # fmt: skip
            rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def paced_checks(results: Results, names: list[str], scenarios: list[Scenario]) -> list[Check]:
    """Issue 21's targets on paced streams at c=64 and c=256, per gateway variant."""
    if "vllm-router" not in names:
        return []
    peer = "vllm-router"
    items: list[Check] = []
    for sc in (sc for sc in scenarios if sc.paced and sc.concurrency in (64, 256)):
        for gw in (g for g in GATEWAYS if g in names):
            over = [
                a - b
                for a, b in zip(
                    added(results, gw, sc.key, ms(0.99)),
                    added(results, peer, sc.key, ms(0.99)),
                    strict=False,
                )
            ]
            items += [
                Check(f"{sc.key}: CPU per event, {gw} / vllm-router",
                      ratio(results, gw, peer, sc.key, cpu_us_per_event(sc)), "<= 1",
                      lambda v: v <= 1.0),
                Check(f"{sc.key}: added TTFT p99, {gw} - vllm-router (ms)", over, "<= 2",
                      lambda v: v <= 2.0),
                Check(f"{sc.key}: req/s, {gw} / vllm-router",
                      ratio(results, gw, peer, sc.key, rate), ">= 1.0", lambda v: v >= 1.0),
            ]  # fmt: skip
    return items


def checks(results: Results, names: list[str], scenarios: list[Scenario]) -> str:
    gw = "vllm-gateway"
    ran = {sc.key for sc in scenarios}
    rows = ["| what (each repeat) | values | target | verdict |", "|---|---|---|---|"]
    items: list[Check] = paced_checks(results, names, scenarios)
    for key in (k for k in ("c64-stream", "c64-json") if k in ran):
        if "vllm-router" in names:
            items.append(Check(f"{key}: req/s, gateway / vllm-router",
                               ratio(results, gw, "vllm-router", key, rate), ">= 1.2",
                               lambda v: v >= 1.2))  # fmt: skip
        if "passthrough" in names:
            items.append(Check(f"{key}: req/s, gateway / bare pass-through",
                               ratio(results, gw, "passthrough", key, rate), ">= 0.85",
                               lambda v: v >= 0.85))  # fmt: skip
    for turns in (k for k in ("c1-turns", "c1-stream") if k in ran):
        items.append(Check(f"{turns}: added TTFT p99 (ms)", added(results, gw, turns, ms(0.99)),
                           "<= 1", lambda v: v <= 1.0))  # fmt: skip
    if "vllm-router" in names and "slow-2000" in ran:
        rss = [a / b for a, b in zip(
            [s.rss_mb for s in results.get((gw, "slow-2000"), [])],
            [s.rss_mb for s in results.get(("vllm-router", "slow-2000"), [])], strict=False,
        )]  # fmt: skip
        items.append(Check("slow-2000: peak RSS, gateway / vllm-router", rss, "<= 1",
                           lambda v: v <= 1.0))  # fmt: skip
    for name in (g for g in GATEWAYS if g in names):
        errors = [float(sum(s.errors for k, runs in results.items() if k[0] == name for s in runs))]
        items.append(Check(f"{name} errors, all scenarios", errors, "0", lambda v: v == 0))
    rows += [c.row() for c in items]
    return "\n".join(rows)


def versions(systems: list[System]) -> str:
    libs = ", ".join(
        f"{lib} {importlib.metadata.version(lib)}" for lib in ("aiohttp", "uvloop", "orjson")
    )
    peers = "; ".join(
        f"{s.name} {s.version} ({s.notes})" if s.version else f"{s.name} ({s.notes})"
        for s in systems if s.proc is not None
    )  # fmt: skip
    return f"{libs}; {peers}"


def report(
    results: Results, systems: list[System], scenarios: list[Scenario], args: argparse.Namespace
) -> str:
    names = [s.name for s in systems]
    method = (__doc__ or "").split("\n", 2)[2].strip()
    command = "make bench-quick" if args.quick else "make bench"
    flags = f"--seconds {args.seconds:g} --repeats {args.repeats}"
    if args.quick:
        flags += " --quick"
    if args.systems:
        flags += " --systems " + " ".join(args.systems)
    if args.scenarios:
        flags += " --scenarios " + " ".join(args.scenarios)
    paced = [sc for sc in scenarios if sc.paced]
    top = (
        "## Paced streams (the headline)\n\nEach value is one repeat's, in repeat order; ratios "
        "are to vllm-router in the same repeat; added TTFT is over direct in the same repeat.\n\n"
        + headline(results, names, scenarios) + "\n\n"
    ) if paced else ""  # fmt: skip
    sections = [
        f"### {sc.title} (`{sc.key}`, {sc.seconds * args.seconds:.0f} s a run)\n\n"
        + scenario_table(results, names, sc)
        for sc in scenarios
    ]
    return f"""# `make bench`: what the gateway adds, side by side with the peers

{method}

- Date: {time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}; machine: {machine()}
- Versions: {versions(systems)}
- {args.repeats} repeats; figures are the median over repeats (min-max in brackets). TTFT: to
  the first chunk carrying content; gap: between chunks after it; total: to the end of the
  answer. Plots: `throughput.png`, `ttft_p99.png` (streams, zero-sleep worker).
- CPU µs / event: the system's CPU over the run divided by the SSE events of the answers it
  completed (role chunk, one per token, `[DONE]`).
- Command: `{command}` (`python -m tests.bench.perf {flags}`)

{top}## The issue's targets, from this run

{checks(results, names, scenarios)}

## Every scenario

{chr(10).join(sections)}
"""


def plot(results: Results, names: list[str], scenarios: list[Scenario], folder: Path) -> None:
    """The zero-sleep sweep's plots, beside the report (a run written elsewhere with ``--out``
    leaves the committed ones alone)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sweep = [sc for sc in scenarios if sc.key in SWEEP]
    if len(sweep) < 2:
        return
    xs = [sc.concurrency for sc in sweep]
    for filename, f, ylabel, log in (
        ("throughput.png", rate, "requests/s", False),
        ("ttft_p99.png", ms(0.99), "p99 time to first token (ms)", True),
    ):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for name in names:
            ys = [med(per_repeat(results, name, sc.key, f)) for sc in sweep]
            ax.plot(xs, ys, marker="o", label=name)
        ax.set_xscale("log", base=2)
        if log:
            ax.set_yscale("log")
        ax.set_xticks(xs, [str(x) for x in xs])
        ax.set_xlabel("concurrent streams (zero-sleep worker, 50 chunks)")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(folder / filename, dpi=110)
        plt.close(fig)


if __name__ == "__main__":
    if sys.platform == "linux":
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # 2,000 streams need fds
    uvloop.run(main())
