"""The KV index: router keys from token blocks, engine hashes mapped so removals work, prefixes
matched contiguously, LoRA adapters apart, memory bounded; and the cache-aware policy on top."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from gateway.balancer import CacheAware, LeastLoaded, Prompt, RoundRobin, make_policy
from gateway.kvindex import KVIndex
from gateway.kvwire import AllBlocksCleared, BlockRemoved, BlockStored
from gateway.loadsignals import LoadSignals

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


def test_held_answers_only_for_a_block_it_can_see() -> None:
    index = KVIndex()
    assert index.held(PROMPT) is None  # no block size reported yet
    index.apply(A, [stored([11, 12], PROMPT[:8])])
    assert index.held(PROMPT[:8]) is True
    assert index.held(PROMPT[:11]) is True  # the last full block is the second
    assert index.held(PROMPT[:12]) is False  # the third is nobody's
    assert index.held(PROMPT[:12], lora_name="sql") is False
    assert index.held(PROMPT[:3]) is None  # no full block
    assert index.held(PROMPT[:11], after=8) is None  # nothing new after 8 tokens
    assert index.held(PROMPT[:12], after=8) is False


# --- the cache-aware policy over the index ---------------------------------------------------


@dataclass(eq=False)
class Node:
    url: str
    in_flight: int = 0
    last_pick: int = 0
    load: LoadSignals | None = None


def policy(index: KVIndex, weight: float = 2.0) -> CacheAware:
    return CacheAware(index, RoundRobin(), weight)


def test_the_worker_holding_the_prompt_wins_until_it_is_weight_requests_busier() -> None:
    index = KVIndex()
    index.apply(B, [stored([11, 12, 13, 14], PROMPT)])
    index.reset(A, live=True)
    a, b = Node(A), Node(B)
    pick = policy(index).pick
    prompt = Prompt("m", PROMPT)
    assert pick([a, b], prompt=prompt) is b
    b.in_flight = 2  # score 2 - 2 * 1.0 = 0 against A's 0: a tie, A chosen longer ago
    assert pick([a, b], prompt=prompt) is a
    b.in_flight, a.in_flight = 1, 0
    assert pick([a, b], prompt=prompt) is b
    half = Prompt("m", PROMPT[:8] + [0] * 8)  # B holds half of it
    b.in_flight = 1  # 1 - 2 * 0.5 = 0 against 0: tie again, A chosen longer ago
    assert pick([a, b], prompt=half) is a


def test_the_fallback_decides_when_the_index_cannot_tell() -> None:
    index = KVIndex()
    a, b = Node(A), Node(B)
    pick = policy(index).pick
    prompt = Prompt("m", PROMPT)
    assert pick([a, b], prompt=prompt) is a  # nothing live: round-robin
    assert pick([a, b], prompt=prompt) is b
    index.apply(B, [stored([11, 12, 13, 14], PROMPT)])
    assert pick([a, b], prompt=Prompt("m", [9] * 16)) is a  # nobody holds any of it
    assert pick([a, b], prompt=Prompt("m", PROMPT[:3])) is b  # not one full block
    assert pick([a, b]) is a  # no token ids
    index.reset(B, live=False)  # events stale: B's entries are gone with them
    assert pick([a, b], prompt=prompt) is b
    assert pick([], prompt=prompt) is None


def test_a_lora_adapter_prompt_matches_the_adapter_s_blocks() -> None:
    index = KVIndex()
    index.apply(A, [stored([11, 12, 13, 14], PROMPT, lora_name="sql")])
    index.apply(B, [stored([21, 22, 23, 24], PROMPT)])
    pick = policy(index).pick
    a, b = Node(A), Node(B)
    assert pick([a, b], prompt=Prompt("sql", PROMPT)) is a
    assert pick([a, b], prompt=Prompt("base", PROMPT)) is b


def test_make_policy_puts_cache_awareness_in_front_of_the_configured_policy() -> None:
    index = KVIndex()
    chosen = make_policy("least_loaded", "prefix", kv_index=index, kv_weight=1.0)
    assert isinstance(chosen, CacheAware)
    assert isinstance(make_policy("least_loaded", "none"), LeastLoaded)
    with pytest.raises(ValueError, match="weight"):
        CacheAware(index, RoundRobin(), -1)
