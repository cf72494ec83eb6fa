"""The routing benchmark's approximate prefix router: the rule of the ``cache_aware`` policy of
SGLang's router and of vllm-router, applied to the text of the chat messages, for the third
level of routing (a guess of each worker's cache from the text of the requests sent to it, no
tokenizer, no events). It stands beside vllm-router itself because vllm-router 0.1.17, on the
benchmark's chat requests, gets least-loaded's hit rate: it does not route them by their text
(we have not found out why); this shows what the rule achieves when it does.

- Each worker has a tree of the request texts routed to it (the messages' contents joined),
  here at a granularity of ``GRAIN`` characters: a set of hashed text prefixes, one per grain,
  which answers "the longest prefix this worker has seen" as a radix tree of those texts does,
  with least recently used eviction beyond ``max_chars`` characters per worker.
- When the load is imbalanced (the busiest worker more than ``balance_abs`` requests and
  ``balance_rel`` times busier than the idlest), the idlest worker takes the request.
- Otherwise the worker with the longest matched prefix takes it if the match covers more than
  ``threshold`` of the text; else the worker whose tree is smallest (the most room).
- The chosen worker's tree then holds the request's text.

The defaults are vllm-router 0.1.17's. The load is each worker's in-flight count, exact: like
the oracle (``tests/bench/oracle.py``) it routes from the load generator, which is the fleet's
only client, so it pays no proxy hop: a flattering comparison for it, not for us.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from hashlib import blake2b
from typing import Any

import aiohttp

GRAIN = 32  # characters per tree step: finer than any shared prefix here


class Radix:
    def __init__(
        self,
        urls: Sequence[str],
        threshold: float = 0.3,
        balance_abs: int = 64,
        balance_rel: float = 1.5,
        max_chars: int = 33_554_432,
    ) -> None:
        self._trees: dict[str, OrderedDict[bytes, None]] = {url: OrderedDict() for url in urls}
        self._in_flight = dict.fromkeys(urls, 0)
        self._threshold, self._abs, self._rel = threshold, balance_abs, balance_rel
        self._max_steps = max_chars // GRAIN

    @asynccontextmanager
    async def route(
        self, session: aiohttp.ClientSession, body: dict[str, Any]
    ) -> AsyncIterator[str]:
        """The worker for ``body``, counted in flight until the block ends."""
        del session  # asks nobody
        steps = _steps(_text(body))
        chosen = self._choose(steps)
        tree = self._trees[chosen]
        # Longest prefix first, so that eviction takes the longer prefixes (a tree's leaves)
        # before the shorter ones they extend.
        for step in reversed(steps):
            tree[step] = None
            tree.move_to_end(step)
        while len(tree) > self._max_steps:
            tree.popitem(last=False)
        self._in_flight[chosen] += 1
        try:
            yield chosen
        finally:
            self._in_flight[chosen] -= 1

    def _choose(self, steps: list[bytes]) -> str:
        loads = self._in_flight
        idlest = min(loads, key=loads.__getitem__)
        busiest = max(loads.values())
        low = loads[idlest]
        if busiest - low > self._abs and busiest > low * self._rel:
            return idlest
        matched = {url: _matched(tree, steps) for url, tree in self._trees.items()}
        best = max(matched, key=matched.__getitem__)
        if steps and matched[best] / len(steps) > self._threshold:
            return best
        return min(self._trees, key=lambda url: len(self._trees[url]))


def _text(body: dict[str, Any]) -> str:
    parts = []
    for message in body.get("messages") or ():
        content = message.get("content")
        if isinstance(content, str):
            parts.append(content)
    return "".join(parts)


def _steps(text: str) -> list[bytes]:
    """One hash per whole grain of ``text``, each over the whole prefix up to it."""
    hasher = blake2b(digest_size=8)
    out = []
    for start in range(0, len(text) - GRAIN + 1, GRAIN):
        hasher.update(text[start : start + GRAIN].encode())
        out.append(hasher.copy().digest())
    return out


def _matched(tree: OrderedDict[bytes, None], steps: list[bytes]) -> int:
    """How many leading steps the tree holds (its prefixes are closed under shortening, so
    a binary search finds the end)."""
    low, high = 0, len(steps)
    while low < high:
        mid = (low + high + 1) // 2
        if steps[mid - 1] in tree:
            low = mid
        else:
            high = mid - 1
    return low
