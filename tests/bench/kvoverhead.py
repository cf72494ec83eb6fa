"""What cache-aware routing adds to time to first token at concurrency 1, side by side with the
default policy: ``python -m tests.bench.kvoverhead`` (needs ``.cache/tiny-model``: make vllm).

Two simulated workers publish KV-cache events; two gateway processes front them, one with the
default settings, one with ``routing.kv_events`` on and the tiny model's tokenizer configured.
Requests alternate between the two gateways, one at a time, and each records the time from
sending to the first content token of the stream. The simulators' prefill is free and their
first token comes after a fixed 5 ms, so the difference between the gateways is what the
cache-aware path costs on the request path:

- chat: a ~1700-token system prompt shared by all requests and a new question each time; the
  gateway renders and tokenizes it (its piece cache warm), computes the block keys and looks
  them up. The simulators tokenize differently from the tiny model, so nothing matches: the
  lookup stops at the first block and the default policy decides (the tokenizer's cost);
- ids: a completions prompt of 1600 token ids sharing a 1536-token prefix; no tokenizer, the
  prefix is found at a worker and the whole chain is walked (the index's cost on a hit).
"""

from __future__ import annotations

import asyncio
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp

from tests.bench.common import machine, options
from tests.processes import HOST, Proc, free_port_with, http_status, poll_until, start_gateway
from tests.processes import write_config as gateway_yaml

MODEL_DIR = Path(__file__).resolve().parents[2] / ".cache" / "tiny-model"
MODEL = "sim-model"
EVENTS, REPLAY = 1000, 2000
RESULTS = Path(__file__).with_name("KVOVERHEAD.md")
WORDS = ("route", "cache", "block", "token", "prefix", "worker", "gateway", "event", "queue")


def start_sim() -> tuple[str, Proc]:
    port = free_port_with(EVENTS, REPLAY)
    args = [
        sys.executable, "-m", "gateway.simulator", "--host", HOST, "--port", str(port),
        "--model", MODEL, "--log-level", "WARNING", "--prefix-cache-blocks", "20000",
        "--block-tokens", "16", "--ttft", "0.005", "--prefill-per-token", "0",
        "--itl", "0.001", "--itl-per-seq", "0", "--max-num-seqs", "64",
        "--kv-events-endpoint", f"tcp://{HOST}:{port + EVENTS}",
        "--kv-events-replay-endpoint", f"tcp://{HOST}:{port + REPLAY}",
    ]  # fmt: skip
    url = f"http://{HOST}:{port}"
    proc = Proc(args, name="simulator")
    poll_until(lambda: http_status(url, "/health") == 200, 30, f"{url} healthy")
    return url, proc


def chat_body(rng: random.Random, system: str) -> tuple[str, dict[str, Any]]:
    messages = [
        {"role": "system", "content": system},
        {"role": "user", "content": f"question {rng.randrange(10**9)}?"},
    ]
    return "/v1/chat/completions", {
        "model": MODEL, "messages": messages, "max_tokens": 4, "stream": True,
    }  # fmt: skip


def ids_body(rng: random.Random, prefix: list[int]) -> tuple[str, dict[str, Any]]:
    prompt = prefix + [rng.randrange(10, 30000) for _ in range(64)]
    return "/v1/completions", {"model": MODEL, "prompt": prompt, "max_tokens": 4, "stream": True}


async def ttft(session: aiohttp.ClientSession, url: str, path: str, body: dict[str, Any]) -> float:
    started = time.perf_counter()
    async with session.post(url + path, json=body) as response:
        assert response.status == 200, await response.text()
        first = None
        async for line in response.content:
            if first is None and line.startswith(b"data: {") and _content(line):
                first = time.perf_counter()
    assert first is not None
    return first - started


def _content(line: bytes) -> bool:
    return (b'"content":"' in line and b'"content":""' not in line) or (
        b'"text":"' in line and b'"text":""' not in line
    )


def cuts(samples: list[float]) -> tuple[float, float]:
    q = statistics.quantiles(samples, n=100)
    return q[49] * 1e3, q[98] * 1e3


async def side_by_side(urls: dict[str, str], make: Any, count: int) -> dict[str, list[float]]:
    rng = random.Random(1)
    samples: dict[str, list[float]] = {name: [] for name in urls}
    async with aiohttp.ClientSession() as session:
        for _ in range(20):
            for url in urls.values():
                await ttft(session, url, *make(rng))
        for _ in range(count):
            for name, url in urls.items():
                samples[name].append(await ttft(session, url, *make(rng)))
            if rng.random() < 0.5:  # alternate which goes first
                urls = dict(reversed(list(urls.items())))
    return samples


async def main() -> None:
    args, workdir = options("kvoverhead", 0.0, 1500)
    sims = [start_sim() for _ in range(2)]
    procs = [proc for _, proc in sims]
    try:
        workers = [url for url, _ in sims]
        kv = {
            "enabled": True,
            "endpoint": f"tcp://{{host}}:{{port+{EVENTS}}}",
            "replay_endpoint": f"tcp://{{host}}:{{port+{REPLAY}}}",
            "tokenizers": {MODEL: str(MODEL_DIR / "tokenizer.json")},
        }
        default = start_gateway(gateway_yaml(workdir / "default.yaml", workers))
        procs.append(default.proc)
        aware = start_gateway(gateway_yaml(workdir / "kv.yaml", workers, routing={"kv_events": kv}))
        procs.append(aware.proc)
        urls = {"default": default.url, "kv_events": aware.url}
        rng = random.Random(7)
        system = " ".join(rng.choice(WORDS) for _ in range(700))
        prefix = [rng.randrange(10, 30000) for _ in range(1536)]
        lines = [f"{machine()}; {args.repeats} requests per gateway and workload, c=1", ""]
        lines.append("| workload | default p50 / p99 | kv_events p50 / p99 | added p50 / p99 |")
        lines.append("|---|---|---|---|")
        for workload, make in (
            ("chat", lambda r: chat_body(r, system)),
            ("ids", lambda r: ids_body(r, prefix)),
        ):
            samples = await side_by_side(urls, make, args.repeats)
            (d50, d99), (k50, k99) = cuts(samples["default"]), cuts(samples["kv_events"])
            lines.append(
                f"| {workload} | {d50:.3f} / {d99:.3f} ms | {k50:.3f} / {k99:.3f} ms |"
                f" {k50 - d50:+.3f} / {k99 - d99:+.3f} ms |"
            )
            print(lines[-1], flush=True)
        doc = (__doc__ or "").split("\n\n", 1)[1]
        RESULTS.write_text(
            "# What cache-aware routing adds to TTFT at c=1 (`python -m tests.bench.kvoverhead`)"
            "\n\n" + doc.strip() + "\n\n" + "\n".join(lines) + "\n"
        )
    finally:
        for proc in procs:
            proc.kill()


if __name__ == "__main__":
    asyncio.run(main())
