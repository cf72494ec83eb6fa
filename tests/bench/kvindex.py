"""Micro benchmark of the KV-event path: decoding a batch, applying it to the index, and the
lookup a routing decision makes. ``python -m tests.bench.kvindex`` prints microseconds per
operation (best of 5 runs of timeit).

Shapes follow vLLM: a request's prefill stores its prompt's full blocks in one ``BlockStored``
(block size 16 on GPUs, 128 on the CPU build); eviction removes blocks a few at a time.
"""

from __future__ import annotations

import random
import timeit

from gateway.kvindex import KVIndex
from gateway.kvwire import BlockRemoved, BlockStored, Event, decode_payload, encode_batch

WORKERS = [f"http://10.0.0.{i}:8000" for i in range(8)]


def prompt(rng: random.Random, tokens: int) -> list[int]:
    return [rng.randrange(150_000) for _ in range(tokens)]


def stored_batch(rng: random.Random, tokens: int, block: int) -> list[Event]:
    ids = prompt(rng, tokens)
    count = tokens // block
    hashes = [rng.getrandbits(64) for _ in range(count)]
    return [BlockStored(hashes, None, ids[: count * block], block, None, "GPU")]


def best(stmt: object, number: int) -> float:
    return min(timeit.repeat(stmt, number=number, repeat=5)) / number * 1e6  # type: ignore[arg-type]


def measure(rng: random.Random, tokens: int, block: int) -> str:
    events = stored_batch(rng, tokens, block)
    stored = events[0]
    assert isinstance(stored, BlockStored)
    payload = encode_batch(0.0, events)
    index = KVIndex(max_blocks=1_000_000)
    decode_us = best(lambda: decode_payload(payload), 200)
    apply_us = best(lambda: index.apply(WORKERS[0], events), 200)
    removal: list[Event] = [BlockRemoved(list(stored.block_hashes), "GPU")]
    both_us = best(lambda: index.apply(WORKERS[0], events + removal), 200)
    index.apply(WORKERS[0], events)
    for worker in WORKERS[1:]:
        index.apply(worker, events)
    keys_us = best(lambda: index.keys(stored.token_ids, block), 200)
    keys = index.keys(stored.token_ids, block)
    match_us = best(lambda: index.match(keys, WORKERS), 200)
    return (
        f"{tokens} tokens, block {block} ({len(payload)} B payload): decode {decode_us:.0f} us,"
        f" apply stored {apply_us:.0f} us, remove them all {both_us - apply_us:.0f} us;"
        f" lookup: keys {keys_us:.0f} us, match over 8 workers {match_us:.0f} us"
    )


def main() -> None:
    rng = random.Random(1)
    for tokens, block in ((2048, 16), (2048, 128), (8192, 16)):
        print(measure(rng, tokens, block))


if __name__ == "__main__":
    main()
