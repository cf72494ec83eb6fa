"""The KV index: router keys from token blocks, engine hashes mapped so removals work, prefixes
matched contiguously, LoRA adapters apart, memory bounded."""

from __future__ import annotations

import pytest

from gateway.kvindex import KVIndex
from gateway.kvwire import AllBlocksCleared, BlockRemoved, BlockStored

A, B = "http://a:8000", "http://b:8000"
BLOCK = 4
PROMPT = list(range(1, 17))  # four blocks


def stored(hashes: list[int], tokens: list[int], parent: int | None = None, **kw) -> BlockStored:
    return BlockStored(hashes, parent, tokens, BLOCK, **kw)


def match(index: KVIndex, tokens: list[int], lora: str | None = None) -> dict[str, int]:
    return index.match(index.keys(tokens, BLOCK, lora), [A, B])


def test_blocks_stored_across_events_chain_through_engine_hashes() -> None:
    index = KVIndex()
    index.apply(A, [stored([11, 12], PROMPT[:8])])
    index.apply(A, [stored([13, 14], PROMPT[8:], parent=12)])
    index.apply(B, [stored([91], PROMPT[:4])])  # another engine, other hashes, same tokens
    assert match(index, PROMPT) == {A: 4, B: 1}
    assert match(index, PROMPT[:4] + [0] * 12) == {A: 1, B: 1}
    assert match(index, [0, *PROMPT[1:]]) == {A: 0, B: 0}
    assert index.block_size([A, B]) == BLOCK


def test_removal_breaks_the_prefix_where_the_block_went() -> None:
    index = KVIndex()
    index.apply(A, [stored([11, 12, 13, 14], PROMPT)])
    index.apply(A, [BlockRemoved([12])])
    assert match(index, PROMPT) == {A: 1, B: 0}  # blocks 3 and 4 are unreachable
    index.apply(A, [BlockRemoved([11, 13, 14, 999])])  # unknown hashes are ignored
    assert index.blocks(A) == 0
    assert match(index, PROMPT) == {A: 0, B: 0}


def test_a_block_with_an_unknown_parent_is_not_indexed() -> None:
    index = KVIndex()
    index.apply(A, [stored([13, 14], PROMPT[8:], parent=12)])
    assert index.blocks(A) == 0
    assert index.skipped_blocks == 2


def test_re_announced_blocks_are_idempotent() -> None:
    """vLLM announces a prefix-cache hit's blocks again with BlockStored."""
    index = KVIndex()
    for _ in range(3):
        index.apply(A, [stored([11, 12, 13, 14], PROMPT)])
    assert index.blocks(A) == 4
    index.apply(A, [BlockRemoved([11, 12, 13, 14])])
    assert match(index, PROMPT) == {A: 0, B: 0}


def test_lora_adapters_and_salted_blocks_stay_apart() -> None:
    index = KVIndex()
    index.apply(A, [stored([11], PROMPT[:4], lora_name="sql", extra_keys=[["sql"]])])
    index.apply(B, [stored([21], PROMPT[:4], extra_keys=[["my-salt"]])])
    assert match(index, PROMPT, lora="sql") == {A: 1, B: 0}
    assert match(index, PROMPT) == {A: 0, B: 0}


def test_shapes_that_cannot_be_assigned_are_skipped() -> None:
    index = KVIndex()
    index.apply(A, [stored([11, 12], PROMPT[:4])])  # fewer tokens than blocks
    index.apply(A, [BlockStored([11], None, PROMPT[:4], BLOCK, group=1)])  # another group
    assert index.blocks(A) == 0


def test_clear_reset_and_forget() -> None:
    index = KVIndex()
    index.apply(A, [stored([11], PROMPT[:4])])
    index.apply(B, [stored([21], PROMPT[:4])])
    index.apply(A, [AllBlocksCleared(), stored([31], PROMPT[:4])])
    assert match(index, PROMPT) == {A: 1, B: 1}
    assert index.live(A)
    index.reset(A, live=False)
    assert not index.live(A)
    assert match(index, PROMPT) == {A: 0, B: 1}
    index.forget(B)
    assert match(index, PROMPT) == {A: 0, B: 0}
    assert not index.live(B)


def test_memory_is_bounded_per_worker_oldest_first() -> None:
    index = KVIndex(max_blocks=3)
    index.apply(A, [stored([11, 12, 13, 14], PROMPT)])
    assert index.blocks(A) == 3
    assert match(index, PROMPT) == {A: 0, B: 0}  # the first block went: nothing is reachable
    index.apply(A, [stored([11], PROMPT[:4])])  # stored again: the oldest (12) goes
    assert match(index, PROMPT) == {A: 1, B: 0}
    with pytest.raises(ValueError, match="max_blocks"):
        KVIndex(max_blocks=0)
