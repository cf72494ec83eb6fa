"""The routing benchmark's oracle: a router that knows every worker's prefix cache exactly.

It stands in for the gateway (the load generator sends each request straight to the worker
it picks) and uses the gateway's own cache-aware rule (``balancer.CacheAware``): the lowest
load minus ``weight`` times the share of the prompt's blocks the worker holds. The difference
is what it knows:

- the cached share, asked of every simulator at the moment of the request
  (``/sim/prefix_cache/match``), where the gateway reads an index built from events that
  arrive a little later and are kept within bounds;
- the load, counted exactly: it is the fleet's only client, so its own in-flight count is
  each worker's running plus waiting requests, with the waiting ones counted twice as
  ``load_score`` counts them.

Its TTFT starts when the request is sent to the worker, after the questions: the oracle is
the hit rate and routing a gateway could reach, not a gateway.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp

from gateway.tokenizer import PromptTokenizer


class Oracle:
    def __init__(
        self, urls: Sequence[str], tokenizer: Path, seqs: int, block: int, weight: float = 8.0
    ) -> None:
        """``seqs``: each worker's batch (more in flight wait); ``block``: its block size;
        ``weight``: the gateway's ``kv_events.weight`` default."""
        self._tokenizer = PromptTokenizer(tokenizer)
        self._in_flight = dict.fromkeys(urls, 0)
        self._last = dict.fromkeys(urls, 0)
        self._picks = 0
        self._seqs, self._block, self._weight = seqs, block, weight
        self.predicted = 0  # cached tokens of the workers picked, summed

    def _load(self, url: str) -> float:
        running = self._in_flight[url]
        return running + max(0, running - self._seqs)

    @asynccontextmanager
    async def route(
        self, session: aiohttp.ClientSession, body: dict[str, Any]
    ) -> AsyncIterator[str]:
        """The worker for ``body``, counted in flight until the block ends."""
        ids = await asyncio.to_thread(self._tokenizer.chat_ids, body) or []
        blocks = len(ids) // self._block
        urls = list(self._in_flight)
        cached = await asyncio.gather(
            *(self._ask(session, url, body["model"], ids) for url in urls)
        )
        held = dict(zip(urls, cached, strict=True))

        def score(url: str) -> tuple[float, int]:
            share = held[url] / self._block / blocks if blocks else 0.0
            return self._load(url) - self._weight * share, self._last[url]

        chosen = min(urls, key=score)
        self._picks += 1
        self._last[chosen] = self._picks
        self.predicted += held[chosen]
        self._in_flight[chosen] += 1
        try:
            yield chosen
        finally:
            self._in_flight[chosen] -= 1

    async def _ask(
        self, session: aiohttp.ClientSession, url: str, model: str, ids: list[int]
    ) -> int:
        if not ids:
            return 0
        body = {"model": model, "token_ids": ids}
        async with session.post(f"{url}/sim/prefix_cache/match", json=body) as resp:
            resp.raise_for_status()
            return int((await resp.json())["cached_tokens"])
