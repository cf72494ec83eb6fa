"""The continuous-batching scheduler: which requests hold one of `max_num_seqs` batch slots,
which wait (strictly FIFO), how full the KV cache is, and how many requests were aborted.

The engine only hands out slots; each request paces its own tokens (see `generate.py`). A slot
is released in a `finally`, so a finished, failed or cancelled request (client disconnect) frees
it at once and the next waiter is admitted in the same loop iteration.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field


class QueueFull(Exception):
    """Admission control: `max_num_queued_reqs` requests are already waiting."""


@dataclass(eq=False, slots=True)
class Seq:
    """One request inside the engine. `finish_reason` stays None unless it completed."""

    model: str
    prompt_tokens: int
    max_tokens: int
    arrival: float = field(default_factory=time.monotonic)
    admitted_at: float | None = None
    generated: int = 0
    finish_reason: str | None = None
    _admitted: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def reserved_tokens(self) -> int:
        """KV cache tokens set aside at admission, so a running request never needs preemption."""
        return self.prompt_tokens + self.max_tokens

    @property
    def used_tokens(self) -> int:
        return self.prompt_tokens + self.generated

    async def wait_admitted(self) -> None:
        await self._admitted.wait()


class Engine:
    """Slots for at most `max_num_seqs` running requests within `kv_cache_tokens` of cache."""

    def __init__(
        self, max_num_seqs: int, kv_cache_tokens: int, max_num_queued_reqs: int | None = None
    ) -> None:
        self.max_num_seqs = max_num_seqs
        self.kv_cache_tokens = kv_cache_tokens
        self.max_num_queued_reqs = max_num_queued_reqs
        self.running: list[Seq] = []
        self.waiting: deque[Seq] = deque()
        self.aborted = 0
        self.finished = 0

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def kv_cache_usage(self) -> float:
        """Fraction (0..1) of the cache held by prompt and generated tokens of running requests."""
        used = sum(seq.used_tokens for seq in self.running)
        return min(1.0, used / self.kv_cache_tokens)

    def running_for(self, model: str) -> int:
        return sum(1 for seq in self.running if seq.model == model)

    def waiting_for(self, model: str) -> int:
        return sum(1 for seq in self.waiting if seq.model == model)

    @contextmanager
    def submit(self, model: str, prompt_tokens: int, max_tokens: int) -> Iterator[Seq]:
        """Queue a request; the caller awaits `seq.wait_admitted()` inside the block.

        Raises `QueueFull` when the request would have to wait behind `max_num_queued_reqs`
        others (admission control). Leaving the block
        releases the slot (or the queue place); leaving it without `seq.finish_reason` set
        counts the request as aborted.
        """
        seq = Seq(model, prompt_tokens, max_tokens)
        if seq.reserved_tokens > self.kv_cache_tokens:
            raise ValueError(f"request needs {seq.reserved_tokens} KV tokens, cache has fewer")
        self.waiting.append(seq)
        self._schedule()
        limit = self.max_num_queued_reqs
        if limit is not None and seq in self.waiting and self.num_waiting > limit:
            self.waiting.remove(seq)
            raise QueueFull(f"{limit} requests are already waiting")
        try:
            yield seq
        finally:
            self._release(seq)

    def _release(self, seq: Seq) -> None:
        if seq in self.running:
            self.running.remove(seq)
        else:
            self.waiting.remove(seq)
        if seq.finish_reason is None:
            self.aborted += 1
        else:
            self.finished += 1
        self._schedule()

    def _schedule(self) -> None:
        """Admit waiters in arrival order while a slot and enough cache are free."""
        reserved = sum(seq.reserved_tokens for seq in self.running)
        while self.waiting and len(self.running) < self.max_num_seqs:
            head = self.waiting[0]
            if reserved + head.reserved_tokens > self.kv_cache_tokens:
                return
            self.waiting.popleft()
            self.running.append(head)
            reserved += head.reserved_tokens
            head.admitted_at = time.monotonic()
            head._admitted.set()
