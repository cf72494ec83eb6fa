"""One worker's prefix cache (vLLM's automatic prefix caching, simplified): which full blocks of
prompt tokens (token ids) it holds, and which it evicts first when full (least recently used).

A block is named by a hash chain, as in vLLM: block k's hash covers block k-1's hash and block
k's own tokens, so it matches only when the whole prompt up to and including it matches. The
chain starts from a salt (the model name), so two models never share blocks. A trailing partial
block is never cached. Pure and synchronous: the caller decides when a request queries the cache.

With `on_events` set, every change is also told as vLLM's KV-cache events (`gateway.kvwire`):
a `BlockStored` per run of newly cached blocks (parent hash, token ids), a `BlockRemoved` for
the blocks evicted to make room, with the block hashes as 64-bit integers, vLLM's default.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable, Sequence

import orjson

from gateway.kvwire import BlockRemoved, BlockStored, Event


class PrefixCache:
    """An LRU of at most `capacity_blocks` blocks of `block_tokens` tokens; 0 blocks disables it."""

    def __init__(self, capacity_blocks: int, block_tokens: int) -> None:
        if capacity_blocks < 0 or block_tokens < 1:
            raise ValueError("capacity_blocks must be >= 0 and block_tokens >= 1")
        self.capacity_blocks = capacity_blocks
        self.block_tokens = block_tokens
        self._blocks: OrderedDict[bytes, None] = OrderedDict()  # least recently used first
        self.on_events: Callable[[list[Event]], object] | None = None

    @property
    def enabled(self) -> bool:
        return self.capacity_blocks > 0

    def __len__(self) -> int:
        return len(self._blocks)

    def match(self, tokens: Sequence[int | str], salt: str = "") -> int:
        """Tokens of the prompt's leading full blocks that are cached; changes nothing."""
        return self._leading_hits(self.block_hashes(tokens, salt)) * self.block_tokens

    def admit(self, tokens: Sequence[int | str], salt: str = "") -> int:
        """A request's prefill: the hit tokens (as `match`), then cache all its full blocks.

        Blocks are touched tail first, so the prompt's first block ends up most recently used:
        when the cache must give up part of a prefix it drops the end, never the head that every
        later block depends on (vLLM frees a request's blocks in reverse order for this reason).
        """
        if not self.enabled:
            return 0
        hashes = self.block_hashes(tokens, salt)
        hits = self._leading_hits(hashes)
        held = [block in self._blocks for block in hashes]
        # The request takes its cached blocks first (vLLM takes them off the free queue before
        # it allocates), so making room for its new blocks never evicts them: only a prompt
        # larger than the whole cache can push out its own blocks.
        for block, cached in zip(hashes, held, strict=True):
            if cached:
                self._blocks.move_to_end(block)
        evicted: list[bytes] = []
        for block in reversed(hashes):
            evicted.extend(self._touch(block))
        # The events tell the change as it stands after the admission, so that a subscriber's
        # view equals the cache: a block evicted and stored again within it is no change.
        new = [i for i, block in enumerate(hashes) if not held[i] and block in self._blocks]
        # A prompt larger than the cache can push out blocks it has only just stored: never
        # announced, so not announced as removed either.
        fresh = {block for block, cached in zip(hashes, held, strict=True) if not cached}
        gone = [b for b in dict.fromkeys(evicted) if b not in self._blocks and b not in fresh]
        if self.on_events is not None and (new or gone):
            self.on_events(self._events(tokens, hashes, new, gone))
        return hits * self.block_tokens

    def block_hashes(self, tokens: Sequence[int | str], salt: str = "") -> list[bytes]:
        """The chained hashes of the prompt's full blocks, first block first."""
        parent = hashlib.blake2b(salt.encode(), digest_size=16).digest()
        hashes = []
        size = self.block_tokens
        for start in range(0, len(tokens) - size + 1, size):
            block = orjson.dumps(list(tokens[start : start + size]))
            parent = hashlib.blake2b(parent + block, digest_size=16).digest()
            hashes.append(parent)
        return hashes

    def _leading_hits(self, hashes: list[bytes]) -> int:
        for count, block in enumerate(hashes):
            if block not in self._blocks:
                return count
        return len(hashes)

    def _touch(self, block: bytes) -> list[bytes]:
        """Marks the block most recently used; returns the block it evicted, if any."""
        if block in self._blocks:
            self._blocks.move_to_end(block)
            return []
        self._blocks[block] = None
        if len(self._blocks) > self.capacity_blocks:
            return [self._blocks.popitem(last=False)[0]]
        return []

    def _events(
        self, tokens: Sequence[int | str], hashes: list[bytes], new: list[int], evicted: list[bytes]
    ) -> list[Event]:
        # Removals first, as vLLM sends them: blocks are evicted when a step allocates, and
        # stored once they are full.
        events: list[Event] = []
        if evicted:
            events.append(BlockRemoved([_external(block) for block in evicted], "GPU"))
        size = self.block_tokens
        runs: list[list[int]] = []
        for i in new:
            if runs and runs[-1][-1] == i - 1:
                runs[-1].append(i)
            else:
                runs.append([i])
        for run in runs:
            first, end = run[0], run[-1] + 1
            events.append(
                BlockStored(
                    [_external(hashes[i]) for i in run],
                    _external(hashes[first - 1]) if first > 0 else None,
                    [int(t) for t in tokens[first * size : end * size]],
                    size,
                    medium="GPU",
                )
            )
        return events


def _external(block: bytes) -> int:
    """vLLM's default event form of a block hash: its first 64 bits as an integer."""
    return int.from_bytes(block[:8], "big")
