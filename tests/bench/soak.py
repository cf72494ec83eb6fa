"""`make bench-soak`: ten minutes of steady load on the gateway, its memory at the start and the
end. Method: the mock worker and the gateway (as shipped: `processes: auto`, features on) as
process trees on loopback; an open loop here sends realistic streams (20 ms to the first token,
50 tokens 5 ms apart) and JSON requests at fixed rates, in 30 s segments. After each segment
the gateway's resident memory (all its processes) is read from /proc. The first segment is the
warm-up: growth is measured from its end to the last segment's end. Writes tests/bench/SOAK.md.
"""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

import uvloop

from tests.bench import loadgen
from tests.bench.common import machine, options
from tests.bench.loadgen import chat_body, quantile
from tests.bench.systems import System, started

RESULTS = Path(__file__).with_name("SOAK.md")
SEGMENT = 30.0
STREAMS_PER_S = 100.0
JSON_PER_S = 200.0


async def segment(gw: System, seconds: float, label: str) -> tuple[loadgen.Sample, ...]:
    url = f"{gw.url}/v1/chat/completions"
    return await asyncio.gather(
        loadgen.open_loop(url, chat_body("sim-realistic", True), True, STREAMS_PER_S, seconds,
                          f"{label} streams"),
        loadgen.open_loop(url, chat_body("sim-model", False), False, JSON_PER_S, seconds,
                          f"{label} json"),
    )  # fmt: skip


async def main() -> None:
    args, workdir = options("soak", 600.0, 1)
    rows = []
    errors = 0
    with started(["vllm-gateway"], workdir) as systems:
        gw = systems[-1]
        start = time.monotonic()
        n = 0
        while (elapsed := time.monotonic() - start) < args.seconds:
            n += 1
            streams, json = await segment(gw, min(SEGMENT, args.seconds - elapsed), f"segment {n}")
            errors += streams.errors + json.errors
            rows.append((time.monotonic() - start, gw.rss_mb(), streams, json))
    first, last = rows[0][1], rows[-1][1]
    growth = 100 * (last - first) / first
    table = "\n".join(
        f"| {t:.0f} | {rss:.1f} | {len(s.total)} | {1000 * quantile(s.ttft, 0.99):.1f} "
        f"| {1000 * quantile(s.gaps, 0.99):.1f} | {len(j.total)} | {s.errors + j.errors} |"
        for t, rss, s, j in rows
    )
    text = f"""# `make bench-soak`: memory under steady load

{(__doc__ or "").split(chr(10), 2)[2].strip()}

- Date: {time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}; machine: {machine()}
- Load: {STREAMS_PER_S:.0f} streams/s and {JSON_PER_S:.0f} JSON requests/s for
  {args.seconds:.0f} s; gateway {gw.version} ({gw.notes})
- **RSS after warm-up {first:.1f} MB, at the end {last:.1f} MB: {growth:+.1f}%**; errors: {errors}

| t (s) | gateway RSS (MB) | streams | stream TTFT p99 (ms) | gap p99 (ms) | JSON | errors |
|---|---|---|---|---|---|---|
{table}
"""
    RESULTS.write_text(text, encoding="utf-8")
    print(text)
    sys.exit(0 if errors == 0 else 1)


if __name__ == "__main__":
    uvloop.run(main())
