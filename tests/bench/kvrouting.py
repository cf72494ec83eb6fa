"""``python -m tests.bench.kvrouting``: cache-aware routing (``routing.kv_events``) against the
other policies, on simulated workers that publish their prefix caches as vLLM's KV-cache
events. Writes tests/bench/KVROUTING.md. ``make bench-routing`` runs it after
``tests.bench.routing``.

Method. WORKERS simulated workers (``python -m gateway.simulator``) and the gateway run as
subprocesses, fresh for every run; the open-loop client of ``tests.bench.routing`` sends
streaming chat requests at Poisson arrival times from a seed per repeat, so every variant of a
repeat sees the same arrivals and the same bodies. Workers and gateway share one tokenizer,
trained at start on the benchmark's own words (about one token per word), so the gateway's
ids are the workers' cache ids. A worker's prefix cache holds CACHED_TOKENS[workload] tokens
(``--cache-tokens`` for all): on shared, about five of the sixteen documents, so a hot
document spills and the cache churns; on chat and agent, a worker's share of the live sessions
with room to spare, as a GPU worker's cache of 100k+ tokens holds them. With chat and agent at
6,000 tokens the live sessions do not fit: later turns find their history evicted on every
policy, the oracle's included, and the p99 is a cold prefill for all (KVROUTING.md says by how
much). A miss costs PREFILL seconds per uncached token before the first token.

Workloads:
- shared: many users, PREFIXES long system prompts (about PREFIX_WORDS words each), a new short
  question each time;
- chat: CONVERSATIONS multi-turn conversations; each request is the next turn of one of them
  (the whole history, then a new question), so the prefix grows each turn;
- agent: AGENTS agent loops resending a long context (AGENT_WORDS words) plus every earlier
  step's observation, one step more each time;
- unique: no shared prefix (cache-aware routing must not be worse than least-loaded there).

Variants (the default set: least_loaded, prefix, kv, kv+prefix, vllm-router cache_aware, radix,
oracle; ``--variants`` for others): round_robin, least_loaded, prefix (least_loaded with prefix
affinity), kv (least_loaded behind routing.kv_events, default weight), kv+prefix (prefix
affinity as kv's fallback), kv w=2, w=16, w=32 (a holder spills once 2, 16 or 32 requests
busier than another worker), kv unscraped (kv with our own in-flight count as the only load
signal); vllm-router with ``--policy cache_aware`` and its own defaults, as shipped; radix
(tests/bench/radix.py: the radix-tree approximation of each worker's cache from request text,
built the way cache_aware works, the third level of routing); the oracle
(tests/bench/oracle.py: the same rule as kv with every cache and load known exactly). radix
and the oracle route from the load generator, with no proxy hop.

Per repeat, the report also gives each variant's TTFT p99 over prefix's, over vllm-router's and
kv's hit rate minus the oracle's, since the machine's noise moves whole repeats together.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import statistics
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from tests.bench.common import machine
from tests.bench.kvoverhead import EVENTS, REPLAY
from tests.bench.oracle import Oracle
from tests.bench.perf import kept
from tests.bench.radix import Radix
from tests.bench.routing import (
    CpuClock,
    Route,
    Run,
    Scenario,
    Tally,
    Variant,
    arrivals,
    chat,
    open_loop,
    progress,
    record_counters,
    scrape,
    sim_flags,
    stop,
)
from tests.bench.systems import vllm_router
from tests.processes import (
    HOST,
    Proc,
    free_port_with,
    http_status,
    poll_until,
    start_gateway,
    write_config,
)

RESULTS = Path(__file__).with_name("KVROUTING.md")
MODEL = "sim-model"
WORKERS = 8
SECONDS = 20.0
REPEATS = 3
SEQS, TTFT, PREFILL, ITL, TOKENS = 8, 0.01, 0.0002, 0.02, 32
RATE = 40.0  # requests/s: about 80% of the fleet's slots with the hits a good router gets
BLOCK = 16
# Per worker, by workload (see the docstring).
CACHED_TOKENS = {"shared": 6000, "chat": 24000, "agent": 24000, "unique": 6000}
PREFIXES, PREFIX_WORDS = 16, 1000
CONVERSATIONS, TURN_WORDS, MAX_TURNS = 48, 120, 10
AGENTS, AGENT_WORDS, STEP_WORDS, MAX_STEPS = 24, 1500, 60, 12
WORDS = (
    "policy", "section", "customer", "invoice", "shipping", "refund", "warranty", "account",
    "contract", "clause", "delivery", "payment", "support", "product", "service", "terms",
    "notice", "period", "party", "agreement", "liability", "order", "return", "claim", "data",
    "tool", "result", "step", "observation", "answer", "question", "what", "does", "say",
)  # fmt: skip
TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{{ eos_token }}"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
VARIANTS = (
    Variant("round_robin", {"policy": "round_robin"}),
    Variant("least_loaded", {"policy": "least_loaded"}),
    Variant("prefix", {"policy": "least_loaded", "affinity": "prefix"}),
    Variant("kv", {"policy": "least_loaded", "kv_events": {}}),
    Variant("kv+prefix", {"policy": "least_loaded", "affinity": "prefix", "kv_events": {}}),
    Variant("kv w=2", {"policy": "least_loaded", "kv_events": {"weight": 2.0}}),
    Variant("kv w=16", {"policy": "least_loaded", "kv_events": {"weight": 16.0}}),
    Variant("kv w=32", {"policy": "least_loaded", "kv_events": {"weight": 32.0}}),
    # The load from our own in-flight count only: what stale scraped counts cost the routing.
    Variant("kv unscraped", {"policy": "least_loaded", "kv_events": {}, "scrape_interval": 0}),
    # Not the gateway: vllm-router as shipped, our radix-tree approximation of its policy
    # (tests/bench/radix.py) and the oracle (tests/bench/oracle.py).
    Variant("vllm-router cache_aware", {}),
    Variant("radix", {}),
    Variant("oracle", {}),
)
DEFAULT_VARIANTS = (
    "least_loaded",
    "prefix",
    "kv",
    "kv+prefix",
    "vllm-router cache_aware",
    "radix",
    "oracle",
)


def train_tokenizer(workdir: Path) -> Path:
    """A byte-level BPE that knows every benchmark word as one token, and a chat template."""
    tokenizer = Tokenizer(models.BPE(unk_token=None))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    corpus = [" ".join(WORDS) + " Document Question Turn Agent Step 0123456789:?"] * 50
    tokenizer.train_from_iterator(corpus, trainer)
    path = workdir / "tokenizer.json"
    tokenizer.save(str(path))
    config = {"bos_token": "<s>", "eos_token": "</s>", "chat_template": TEMPLATE}
    (workdir / "tokenizer_config.json").write_text(json.dumps(config))
    return path


def text(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words))


class Workload:
    """Request bodies by number; ``firsts`` are the requests that were the first in the run to
    send their shared prefix (a new document, a session's first request, any unique prompt):
    no cache can hold it yet, whatever the router does. (A repeat sent while the first is
    still being admitted can be cold too; it counts as a repeat.)"""

    def __init__(self, body: Callable[[int, random.Random, set[int]], dict[str, Any]]) -> None:
        self._body = body
        self.firsts: set[int] = set()

    def __call__(self, n: int, rng: random.Random) -> dict[str, Any]:
        return self._body(n, rng, self.firsts)


def shared() -> Workload:
    prefixes = [f"Document {i}: " + text(random.Random(i), PREFIX_WORDS) for i in range(PREFIXES)]
    sent: set[int] = set()

    def body(n: int, rng: random.Random, firsts: set[int]) -> dict[str, Any]:
        which = rng.randrange(PREFIXES)
        if which not in sent:
            sent.add(which)
            firsts.add(n)
        question = f"Question {n}: what does clause {rng.randrange(100)} say?"
        messages = [
            {"role": "system", "content": prefixes[which]},
            {"role": "user", "content": question},
        ]
        return chat(messages, TOKENS)

    return Workload(body)


def growing(count: int, first_words: int, step_words: int, steps: int, role: str) -> Workload:
    """Sessions whose every request resends the whole session so far plus one step."""
    histories: dict[int, list[dict[str, str]]] = {}
    started = [0] * count  # sessions begun in each slot: a finished one starts over as new

    def body(n: int, rng: random.Random, firsts: set[int]) -> dict[str, Any]:
        slot = rng.randrange(count)
        history = histories.get(slot)
        if history is None or len(history) > 2 * steps:
            firsts.add(n)
            started[slot] += 1
            seed = slot * 1000 + started[slot]
            history = [{"role": "system", "content": text(random.Random(seed), first_words)}]
            histories[slot] = history
        history.append({"role": role, "content": f"Step {n}: " + text(rng, step_words)})
        request = chat(list(history), TOKENS)
        history.append({"role": "assistant", "content": text(rng, 40)})
        return request

    return Workload(body)


def unique() -> Workload:
    """No shared prefix at all: every prompt is new text of the shared prompts' length."""

    def body(n: int, rng: random.Random, firsts: set[int]) -> dict[str, Any]:
        firsts.add(n)
        return chat([{"role": "user", "content": f"{n} " + text(rng, PREFIX_WORDS)}], TOKENS)

    return Workload(body)


def workloads() -> dict[str, Workload]:
    return {
        "shared": shared(),
        "chat": growing(CONVERSATIONS, 200, TURN_WORDS, MAX_TURNS, "user"),
        "agent": growing(AGENTS, AGENT_WORDS, STEP_WORDS, MAX_STEPS, "user"),
        "unique": unique(),
    }


@dataclass
class SimProc:
    url: str
    proc: Proc


def start_sim(tokenizer: Path, cached_tokens: int) -> SimProc:
    port = free_port_with(EVENTS, REPLAY)
    args = [
        sys.executable, "-m", "gateway.simulator", "--host", HOST, "--port", str(port),
        "--model", MODEL, "--log-level", "WARNING",
        *sim_flags(SEQS, TTFT, PREFILL, ITL, TOKENS),
        "--prefix-cache-blocks", str(cached_tokens // BLOCK), "--block-tokens", str(BLOCK),
        "--kv-events-endpoint", f"tcp://{HOST}:{port + EVENTS}",
        "--kv-events-replay-endpoint", f"tcp://{HOST}:{port + REPLAY}",
        "--tokenizer", str(tokenizer),
    ]  # fmt: skip
    url = f"http://{HOST}:{port}"
    proc = Proc(args, name="simulator")
    try:
        poll_until(lambda: http_status(url, "/health") == 200, 60, f"{url} healthy")
    except BaseException:
        proc.kill()
        raise
    return SimProc(url, proc)


def routing_for(variant: Variant, tokenizer: Path) -> dict[str, Any]:
    routing = {"scrape_interval": 0.5, **variant.routing}
    if "kv_events" in routing:
        routing["kv_events"] = {
            "enabled": True,
            "endpoint": f"tcp://{{host}}:{{port+{EVENTS}}}",
            "replay_endpoint": f"tcp://{{host}}:{{port+{REPLAY}}}",
            "tokenizers": {MODEL: str(tokenizer)},
            **routing["kv_events"],
        }
    return routing


async def one_run(
    body: Workload,
    variant: Variant,
    seed: int,
    seconds: float,
    label: str,
    workdir: Path,
    cached_tokens: int,
) -> Run:
    tokenizer = workdir / "tokenizer.json"
    sims = await asyncio.gather(
        *(asyncio.to_thread(start_sim, tokenizer, cached_tokens) for _ in range(WORKERS))
    )
    procs = [s.proc for s in sims]
    try:
        urls = [s.url for s in sims]
        front, proc, predicted = await start_front(variant, urls, workdir)
        if proc is not None:
            procs.append(proc)
        await asyncio.sleep(2.0)  # load scrapes in, event subscriptions made
        scenario = Scenario("kv", (variant, variant), (), RATE, TOKENS, body)
        run = Run(variant.label, Tally(), window=seconds)
        times = arrivals(RATE, seconds, seed)
        before = await scrape(urls)
        # The oracle runs in this process: its CPU is the client's (not reported here).
        front_pid = proc.popen.pid if proc is not None else os.getpid()
        clock = CpuClock(front_pid, [s.proc.popen.pid for s in sims])
        ticker = asyncio.create_task(progress(label, len(times), run.tally))
        try:
            await open_loop(front, scenario, times, seed, run.tally)
        finally:
            ticker.cancel()
            print(file=sys.stderr)
        run.seconds = time.perf_counter() - clock.started
        run.cpu = clock.shares()
        record_counters(run, before, await scrape(urls))
        run.predicted = await predicted()
        run.firsts = set(body.firsts)
        return run
    finally:
        stop(procs)


Predicted = Callable[[], Awaitable[float]]


async def start_front(
    variant: Variant, urls: list[str], workdir: Path
) -> tuple[str | Route, Proc | None, Predicted]:
    """What the load generator sends to: the gateway configured as ``variant`` says,
    vllm-router, radix or the oracle (no process: they route from the load generator); and
    how to read the hit tokens it predicted (NaN where it predicts none)."""
    tokenizer = workdir / "tokenizer.json"

    async def unknown() -> float:
        return math.nan

    if variant.label == "oracle":
        oracle = await asyncio.to_thread(Oracle, urls, tokenizer, SEQS, BLOCK)

        async def known() -> float:
            return float(oracle.predicted)

        return oracle.route, None, known
    if variant.label == "radix":
        return Radix(urls).route, None, unknown
    if variant.label.startswith("vllm-router "):
        policy = variant.label.split(" ", 1)[1]
        router = await asyncio.to_thread(vllm_router, urls, policy)
        assert router.proc is not None
        return router.url, router.proc, unknown
    config = write_config(
        workdir / "gateway.yaml",
        urls,
        routing=routing_for(variant, tokenizer),
        timeouts={"queue": 5.0, "connect": 5.0, "first_token": 300.0, "idle": 300.0},
        limits={"max_in_flight": 4096, "pool_size": 4096, "pool_per_worker": 1024},
    )
    gateway = await asyncio.to_thread(start_gateway, config)

    async def scraped() -> float:
        if "kv_events" not in variant.routing:
            return math.nan
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"{gateway.url}/metrics") as resp,
        ):
            text = await resp.text()
        return sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("gateway_kv_predicted_hit_tokens_total")
        )

    return gateway.url, gateway.proc, scraped


def cell(runs: Sequence[Run], value: Any, fmt: str) -> str:
    values = [value(run) for run in runs]
    median = statistics.median(values)
    return f"{median:{fmt}} ({', '.join(format(v, fmt) for v in values)})"


def table(results: dict[str, dict[str, list[Run]]]) -> str:
    lines = [
        "| workload | variant | hit rate | predicted / hit | TTFT p50 (s) | TTFT p90 (s) | "
        "TTFT p99 (s) | repeats' TTFT p99 (s) | completed/s | failed |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for workload, by_variant in results.items():
        for variant, runs in by_variant.items():
            lines.append(
                f"| {workload} | {variant} | {cell(runs, lambda r: r.hit_rate, '.3f')} | "
                f"{cell(runs, lambda r: r.predicted / r.hits if r.hits else math.nan, '.2f')} | "
                f"{cell(runs, lambda r: r.quantile(0.5), '.3f')} | "
                f"{cell(runs, lambda r: r.quantile(0.9), '.3f')} | "
                f"{cell(runs, lambda r: r.quantile(0.99), '.3f')} | "
                f"{cell(runs, lambda r: r.quantile(0.99, r.firsts), '.3f')} | "
                f"{cell(runs, lambda r: r.tally.completed / r.seconds, '.1f')} | "
                f"{sum(r.tally.failed for r in runs)} |"
            )
    return "\n".join(lines)


def ratios(
    results: dict[str, dict[str, list[Run]]], candidates: Sequence[str], repeats: bool = False
) -> str:
    """Issue 20's checks, per repeat: hit rate minus the oracle's, TTFT p99 over prefix's,
    over vllm-router's, over radix's and over least_loaded's, for each cache-aware variant.
    ``repeats``: the p99s are over the requests that were not the first to send their prefix
    (``Workload.firsts``), on the workloads that have such requests."""
    lines = [
        "| workload | variant | hit - oracle | p99 / prefix | p99 / vllm-router | p99 / radix | "
        "p99 / least_loaded |",
        "|---|---|---|---|---|---|---|",
    ]

    def per_repeat(runs: Sequence[Run], others: Sequence[Run] | None, value: Any) -> str:
        if not others:
            return "n/a"
        return ", ".join(
            format(value(run, other), "+.3f" if value is minus else ".2f")
            for run, other in zip(runs, others, strict=True)
        )

    def minus(run: Run, other: Run) -> float:
        return run.hit_rate - other.hit_rate

    def over(run: Run, other: Run) -> float:
        if repeats:
            return run.quantile(0.99, run.firsts) / other.quantile(0.99, other.firsts)
        return run.quantile(0.99) / other.quantile(0.99)

    for workload, by_variant in results.items():
        if repeats and workload == "unique":
            continue  # every request is a first use
        for variant in candidates:
            runs = by_variant.get(variant)
            if not runs:
                continue
            lines.append(
                f"| {workload} | {variant} | "
                f"{per_repeat(runs, by_variant.get('oracle'), minus)} | "
                f"{per_repeat(runs, by_variant.get('prefix'), over)} | "
                f"{per_repeat(runs, by_variant.get('vllm-router cache_aware'), over)} | "
                f"{per_repeat(runs, by_variant.get('radix'), over)} | "
                f"{per_repeat(runs, by_variant.get('least_loaded'), over)} |"
            )
    return "\n".join(lines)


async def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.kvrouting")
    parser.add_argument("--seconds", type=float, default=SECONDS)
    parser.add_argument("--repeats", type=int, default=REPEATS)
    parser.add_argument("--only", help="one workload: shared, chat, agent or unique")
    parser.add_argument("--variants", help="comma-separated variant labels (default: all)")
    parser.add_argument(
        "--cache-tokens", type=int,
        help=f"each worker's prefix cache, in tokens, on every workload (default {CACHED_TOKENS})",
    )  # fmt: skip
    parser.add_argument("--out", type=Path, default=RESULTS, help=f"default: {RESULTS.name}")
    args = parser.parse_args(argv)
    chosen = args.variants.split(",") if args.variants else DEFAULT_VARIANTS
    variants = tuple(v for v in VARIANTS if v.label in chosen)
    workdir = Path("/tmp") / f"bench-kvrouting-{time.time_ns()}"
    workdir.mkdir(parents=True)
    train_tokenizer(workdir)
    results: dict[str, dict[str, list[Run]]] = {}
    for name in workloads():
        if args.only and name != args.only:
            continue
        results[name] = {v.label: [] for v in variants}
        for repeat in range(args.repeats):
            order = variants if repeat % 2 == 0 else variants[::-1]
            for variant in order:
                label = f"{name} {variant.label} {repeat + 1}/{args.repeats}"
                # Every variant of a repeat gets the same bodies: a fresh workload each time.
                fresh = workloads()[name]
                cached = args.cache_tokens or CACHED_TOKENS[name]
                run = await one_run(fresh, variant, repeat, args.seconds, label, workdir, cached)
                results[name][variant.label].append(run)
    report = "\n\n".join(
        [
            "# Cache-aware routing on simulated workers (tests/bench/kvrouting.py)",
            f"{machine()}; {WORKERS} workers, {RATE:g} requests/s for {args.seconds:g} s, "
            f"{args.repeats} repeats; each worker's prefix cache, in tokens: "
            + ", ".join(
                f"{name} {args.cache_tokens or tokens}" for name, tokens in CACHED_TOKENS.items()
            )
            + "; medians, then each repeat in brackets.",
            table(results),
            "Per repeat (issue 20: hit rate within 0.05 of the oracle; TTFT p99 below prefix's "
            "and vllm-router's (and radix's) on the prefix workloads; not above least_loaded's on "
            "unique):",
            ratios(results, ("kv", "kv+prefix")),
            "The same p99 ratios over the repeats only: the requests whose shared prefix was "
            "sent before in the run (a document already used, a session's later turns). A first "
            "use is a cold prefill wherever it goes, and more than 1 % of requests are first "
            "uses, so the p99 over all requests is that prefill for every router, the oracle "
            "included; over the repeats it is what the routing decided.",
            ratios(results, ("kv", "kv+prefix"), repeats=True),
        ]
    )
    args.out.write_text(report + "\n" + kept(args.out), encoding="utf-8")
    print(report)


if __name__ == "__main__":
    asyncio.run(main())
