"""Load signals from a vLLM worker's ``/metrics`` body: queue depth, running requests, KV usage.

Sans-I/O and synchronous: the scraper hands over the body it read and gets a `LoadSignals`, or
None when the body is not a vLLM worker's. It runs in the event loop for every worker every few
seconds on bodies of 100+ KB, so one compiled regular expression finds the few samples we need
and Python never loops over the thousands of histogram lines around them.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

# Names without the `vllm:` prefix, as the pattern captures them.
WAITING = b"num_requests_waiting"
RUNNING = b"num_requests_running"
KV_CACHE = b"kv_cache_usage_perc"
KV_CACHE_OLD = b"gpu_cache_usage_perc"  # vllm:gpu_cache_usage_perc, the name before vLLM V1

# One sample of the text exposition format: one of our names, optional labels, blanks, the value;
# a timestamp may follow and is ignored. Label values are quoted strings that may hold `}`, blanks
# and escaped quotes. No part may cross a line end, so a broken line can't swallow the next one.
# A longer name (`..._total`) fails on the blank required after the name or labels.
# The pattern starts with a literal on purpose: the regex engine then jumps between occurrences
# of `vllm:` instead of trying every byte, 5x faster than anchoring with `^` under MULTILINE.
# That the name opens its line (`# HELP` lines name it too) is checked per match instead.
_SAMPLE = re.compile(
    rb"vllm:(num_requests_waiting|num_requests_running|kv_cache_usage_perc|gpu_cache_usage_perc)"
    rb'[ \t]*(?:\{(?:[^"}\r\n]|"(?:[^"\\\r\n]|\\.)*")*\})?'
    rb"[ \t]+([^ \t\r\n]+)"
)


@dataclass(frozen=True, slots=True)
class LoadSignals:
    waiting: float  # vllm:num_requests_waiting, summed over label sets (engines, models)
    running: float  # vllm:num_requests_running, summed
    kv_cache: float  # vllm:kv_cache_usage_perc, the max over label sets, 0..1; 0.0 if absent
    # The gateway process's own requests in flight to the worker when these were read (the
    # scraper sets it): what ours have added or finished since is the part of the worker's
    # counts the gateway knows fresher than the scrape. None: not known, taken as they are.
    ours: int | None = None


def parse_load(text: bytes) -> LoadSignals | None:
    """The worker's load, or None when the body has neither a waiting nor a running sample.

    Non-finite and unparsable values are skipped as if the sample were absent.
    """
    sums: dict[bytes, float] = {}
    maxima: dict[bytes, float] = {}
    for match in _SAMPLE.finditer(text):
        name, value = match.group(1, 2)
        number = _finite(value)
        if number is None or not _opens_line(text, match.start()):
            continue
        if name in (WAITING, RUNNING):
            sums[name] = sums.get(name, 0.0) + number
        else:
            maxima[name] = max(maxima.get(name, number), number)
    if not sums:
        return None
    kv_cache = maxima.get(KV_CACHE, maxima.get(KV_CACHE_OLD, 0.0))
    # Clamped: a bogus value must not outweigh whole requests in the balancer's score.
    return LoadSignals(sums.get(WAITING, 0.0), sums.get(RUNNING, 0.0), min(max(kv_cache, 0.0), 1.0))


def _opens_line(text: bytes, start: int) -> bool:
    return not text[text.rfind(b"\n", 0, start) + 1 : start].strip(b" \t")


def _finite(value: bytes) -> float | None:
    try:
        number = float(value)
    except ValueError:
        return None
    return number if math.isfinite(number) else None
