"""Which worker holds which prompt prefix in its KV cache, from the workers' own KV-cache events.

The index names a block by the router's own chained hash: block k's key covers block k-1's key
and block k's token ids, starting from a root per LoRA adapter (None: the base model), so a key
matches only when the whole prefix up to and including it matches, as in vLLM's prefix cache.
The engine's own hashes are not reused: they depend on the engine's hash algorithm and seed,
which the gateway cannot reproduce in general. Instead each worker's engine hashes are mapped
onto router keys as its ``BlockStored`` events arrive (the event carries the token ids), which
is what lets ``BlockRemoved``, which names engine hashes only, find the entries to drop.

A block whose parent the index does not know (events missed before a reset, or blocks with
extra hash keys such as a cache salt or images, which a token-only lookup can never match) is
not indexed, and neither are its descendants.

Memory is bounded per worker: past ``max_blocks`` mapped blocks, the worker's oldest mapping is
evicted, as its engine would evict its least recently stored block. The index may then believe a
worker lacks a block it has (a missed hit), never the reverse beyond one event batch's delay.

Pure and synchronous: the subscriber (`kvevents`) feeds it, the balancer queries it.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

from gateway.kvwire import AllBlocksCleared, BlockRemoved, BlockStored, EngineHash, Event

MAX_BLOCKS = 200_000


def root_key(lora_name: str | None) -> int:
    return hash(("vllm-gateway-kv-root", lora_name))


def chain(parent: int, tokens: Sequence[int]) -> int:
    """The router key of a block: its parent's key and its own token ids."""
    return hash((parent, *tokens))


@dataclass(slots=True)
class _WorkerBlocks:
    engine: dict[EngineHash, int] = field(default_factory=dict)  # insertion order: oldest first
    block_size: int = 0  # the last full-block size it reported; 0: none yet
    live: bool = False  # its events are being received and applied in order


def source(url: str, rank: int) -> str:
    """The index's name for data-parallel engine ``rank`` of the worker at ``url`` (its own
    cache): the URL itself for rank 0, so a worker without data parallelism is its URL."""
    return url if rank == 0 else f"{url}#dp{rank}"


class KVIndex:
    """Router block key → workers holding it, fed by each worker's event batches."""

    def __init__(self, max_blocks: int = MAX_BLOCKS) -> None:
        if max_blocks < 1:
            raise ValueError(f"max_blocks must be at least 1, got {max_blocks}")
        self._max_blocks = max_blocks
        self._holders: dict[int, set[str]] = {}
        self._workers: dict[str, _WorkerBlocks] = {}
        self._loras: set[str] = set()  # adapter names seen in events
        self._engines: dict[str, int] = {}  # worker URL: its data-parallel engines, when not 1
        # Told each routing decision made on the index: the worker and the tokens it should hit.
        self.on_prediction: Callable[[str, int], object] = lambda worker, tokens: None
        self.skipped_blocks = 0  # stored blocks not indexed (unknown parent, extra keys, shape)

    # --- feeding ------------------------------------------------------------------------------

    def reset(self, worker: str, live: bool) -> None:
        """Forget everything about the worker's cache: a (re)connect, a gap that replay could
        not fill, a restart, or the subscriber stopping (``live=False``)."""
        blocks = self._workers.get(worker)
        if blocks is not None:
            for key in blocks.engine.values():
                self._drop(key, worker)
        self._workers[worker] = _WorkerBlocks(live=live)

    def set_engines(self, url: str, count: int) -> None:
        """The worker at ``url`` runs ``count`` data-parallel engines, each its own source
        (``source(url, rank)``); 0 when it left the fleet."""
        if count == 1 or count == 0:
            self._engines.pop(url, None)
        else:
            self._engines[url] = count

    def engines(self, url: str) -> int:
        return self._engines.get(url, 1)

    def forget(self, worker: str) -> None:
        """The worker left the fleet."""
        self.reset(worker, live=False)
        del self._workers[worker]

    def apply(self, worker: str, events: Iterable[Event]) -> None:
        blocks = self._workers.get(worker)
        if blocks is None:
            blocks = self._workers[worker] = _WorkerBlocks(live=True)
        for event in events:
            if isinstance(event, BlockStored):
                self._store(worker, blocks, event)
            elif isinstance(event, BlockRemoved):
                self._remove(worker, blocks, event)
            elif isinstance(event, AllBlocksCleared):
                self.reset(worker, live=blocks.live)
                blocks = self._workers[worker]

    def _store(self, worker: str, blocks: _WorkerBlocks, event: BlockStored) -> None:
        count, size = len(event.block_hashes), event.block_size
        if event.group != 0 or size < 1 or len(event.token_ids) != count * size:
            # Another KV-cache group (hybrid models), or blocks skipped inside the range
            # (sliding window): the tokens cannot be assigned to hashes.
            self.skipped_blocks += count
            return
        if event.lora_name is not None and event.lora_name not in self._loras:
            self._loras.add(event.lora_name)
        if event.parent is None:
            parent = root_key(event.lora_name)
        elif (known := blocks.engine.get(event.parent)) is not None:
            parent = known
        else:
            self.skipped_blocks += count
            return
        extra = event.extra_keys
        tokens = event.token_ids
        engine = blocks.engine
        for i, engine_hash in enumerate(event.block_hashes):
            if extra is not None and extra[i] is not None and not _lora_only(extra[i], event):
                self.skipped_blocks += count - i
                return
            key = chain(parent, tokens[i * size : (i + 1) * size])
            old = engine.pop(engine_hash, None)
            if old is not None and old != key:
                self._drop(old, worker)
            engine[engine_hash] = key  # re-inserted: now the newest
            self._holders.setdefault(key, set()).add(worker)
            parent = key
        blocks.block_size = size
        while len(engine) > self._max_blocks:
            oldest = next(iter(engine))
            self._drop(engine.pop(oldest), worker)

    def _remove(self, worker: str, blocks: _WorkerBlocks, event: BlockRemoved) -> None:
        if event.group != 0:
            return
        for engine_hash in event.block_hashes:
            key = blocks.engine.pop(engine_hash, None)
            if key is not None:
                self._drop(key, worker)

    def _drop(self, key: int, worker: str) -> None:
        holders = self._holders.get(key)
        if holders is None:
            return
        holders.discard(worker)
        if not holders:
            del self._holders[key]

    # --- querying -----------------------------------------------------------------------------

    def live(self, worker: str) -> bool:
        blocks = self._workers.get(worker)
        return blocks is not None and blocks.live

    def lora_of(self, model: str) -> str | None:
        """The adapter a request for ``model`` runs with: vLLM serves a LoRA adapter under its
        own name, which its events carry; any other name is a base model (None)."""
        return model if model in self._loras else None

    def held(
        self, tokens: Sequence[int], lora_name: str | None = None, after: int = 0
    ) -> bool | None:
        """Whether some worker holds the prefix ending with the last full block of ``tokens``,
        at the block size the workers report; None when that block does not end after the
        first ``after`` tokens (or no worker has reported a block size): the index cannot tell
        anything new."""
        size = self.block_size(self._workers)
        full = len(tokens) // size if size else 0
        if full == 0 or full * size <= after:
            return None
        return self.keys(tokens[: full * size], size, lora_name)[-1] in self._holders

    def block_size(self, workers: Iterable[str]) -> int:
        """The block size the given workers report (the largest if they differ); 0: unknown."""
        return max((b.block_size for w in workers if (b := self._workers.get(w))), default=0)

    def blocks(self, worker: str) -> int:
        blocks = self._workers.get(worker)
        return len(blocks.engine) if blocks is not None else 0

    def keys(
        self, tokens: Sequence[int], block_size: int, lora_name: str | None = None
    ) -> list[int]:
        """The router keys of the prompt's full blocks, first block first."""
        parent = root_key(lora_name)
        keys = []
        for start in range(0, len(tokens) - block_size + 1, block_size):
            parent = chain(parent, tokens[start : start + block_size])
            keys.append(parent)
        return keys

    def chained(
        self, tokens: Sequence[int], block_size: int, lora_name: str | None = None
    ) -> Iterator[int]:
        """``keys``, computed as they are read: a lookup that stops at the first block nobody
        holds (a cold prompt, a prefix no worker shares) hashes no further."""
        parent = root_key(lora_name)
        for start in range(0, len(tokens) - block_size + 1, block_size):
            parent = chain(parent, tokens[start : start + block_size])
            yield parent

    def match(self, keys: Iterable[int], workers: Collection[str]) -> dict[str, int]:
        """For each of ``workers``, how many of the leading blocks ``keys`` it holds.

        Walks down the chain while some worker still holds every block so far; a worker
        holding a later block but not an earlier one gets no credit for it (vLLM's cache only
        hits a contiguous prefix). ``keys`` is read only that far (see ``chained``).
        """
        matched = dict.fromkeys(workers, 0)
        alive = set(workers)
        for depth, key in enumerate(keys, 1):
            holders = self._holders.get(key)
            if not holders:
                break
            alive &= holders
            if not alive:
                break
            for worker in alive:
                matched[worker] = depth
        return matched


def _lora_only(keys: object, event: BlockStored) -> bool:
    """Extra keys that only name the event's own LoRA adapter, which the root already covers."""
    return isinstance(keys, list | tuple) and list(keys) == [event.lora_name]
