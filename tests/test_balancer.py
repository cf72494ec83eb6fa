"""Selection policies on plain worker records: two choices, round robin, bounded-load hashing."""

from __future__ import annotations

import math
import random
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass

import pytest

from gateway import balancer
from gateway.balancer import (
    ConsistentHash,
    LeastLoaded,
    Policy,
    RoundRobin,
    Sequencer,
    load_score,
    make_policy,
)
from gateway.loadsignals import LoadSignals


@dataclass(eq=False)
class Worker:
    url: str
    in_flight: int = 0
    last_pick: int = 0
    load: LoadSignals | None = None


def workers(*loads: int, name: str = "w") -> list[Worker]:
    return [Worker(f"http://{name}{i}:8000", in_flight=n) for i, n in enumerate(loads)]


def signals(waiting: float = 0, running: float = 0, kv_cache: float = 0) -> LoadSignals:
    return LoadSignals(waiting, running, kv_cache)


def hashed(
    fallback: Policy | None = None, load_factor: float = 1.25, replicas: int = 100
) -> ConsistentHash:
    return ConsistentHash(fallback or RoundRobin(), load_factor, replicas)


def cap(pool: list[Worker], load_factor: float = 1.25) -> int:
    return math.ceil(load_factor * (sum(w.in_flight for w in pool) + 1) / len(pool))


def owners(policy: ConsistentHash, pool: list[Worker], keys: range) -> dict[int, str]:
    """Which worker each key maps to, with every worker idle."""
    chosen = {k: policy.pick(pool, f"session-{k}") for k in keys}
    return {k: w.url for k, w in chosen.items() if w is not None}


# --- common -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "policy",
    [LeastLoaded(random.Random(1)), RoundRobin(), hashed()],
    ids=["least_loaded", "round_robin", "consistent_hash"],
)
@pytest.mark.parametrize("key", [None, "k"])
def test_no_candidates_picks_none(policy: Policy, key: str | None) -> None:
    assert policy.pick([], key) is None


def test_picks_are_stamped_in_order() -> None:
    pool = workers(0, 0, 0)
    policy = make_policy("least_loaded", "session", random.Random(1))
    stamps = []
    for i in range(10):
        chosen = policy.pick(pool, None if i % 2 else f"key-{i}")
        assert chosen is not None
        stamps.append(chosen.last_pick)
    assert stamps == list(range(1, 11))  # the policy and its fallback share one sequence


def test_sequencer_numbers_from_one() -> None:
    seq, pool = Sequencer(), workers(0, 0)
    assert [seq.stamp(w).last_pick for w in pool + pool] == [1, 2, 3, 4]


# --- load score ---------------------------------------------------------------------------------


def test_score_without_signals_is_our_in_flight() -> None:
    assert load_score(Worker("http://a", in_flight=3)) == 3.0


@pytest.mark.parametrize(
    ("in_flight", "load", "score"),
    [
        (2, signals(waiting=0, running=1), 2.0),  # our count is fresher than the scrape
        (2, signals(waiting=3, running=4), 10.0),  # other replicas' requests: 7, then queue again
        (9, signals(waiting=1, running=2), 10.0),
        (0, signals(kv_cache=0.9), 0.9),  # KV only breaks ties
        # Moved by what ours did since the scrape (``ours``: our in-flight count then):
        (7, LoadSignals(waiting=2, running=8, kv_cache=0, ours=10), 7.0),  # 3 of ours finished
        (11, LoadSignals(waiting=1, running=8, kv_cache=0, ours=9), 12.0),  # 2 more: queue kept
        (3, LoadSignals(waiting=0, running=5, kv_cache=0, ours=1), 7.0),  # others' 4 stay
        (0, LoadSignals(waiting=3, running=4, kv_cache=0, ours=7), 0.0),  # all were ours
        (5, LoadSignals(waiting=3, running=4, kv_cache=0, ours=7), 6.0),  # the queue shrinks
        (5, LoadSignals(waiting=0, running=2, kv_cache=0, ours=6), 5.0),  # never below ours
    ],
)
def test_score_with_signals(in_flight: int, load: LoadSignals, score: float) -> None:
    assert load_score(Worker("http://a", in_flight, load=load)) == pytest.approx(score)


# --- least loaded -------------------------------------------------------------------------------


@pytest.mark.parametrize("loads", [(9, 0, 0), (0, 0, 9, 0, 0), (3, 1, 2, 0), (1, 1, 5, 1, 1, 1, 1)])
def test_p2c_never_picks_the_most_loaded(loads: tuple[int, ...]) -> None:
    pool = workers(*loads)
    busiest = max(pool, key=lambda w: w.in_flight)
    policy = LeastLoaded(random.Random(7))
    assert busiest not in {policy.pick(pool) for _ in range(2000)}


def test_p2c_compares_both_of_two() -> None:
    pool = workers(4, 1)
    policy = LeastLoaded(random.Random(7))
    assert [policy.pick(pool) for _ in range(5)] == [pool[1]] * 5


def test_p2c_avoids_a_worker_with_a_scraped_queue() -> None:
    pool = workers(1, 1, 1, 1)
    pool[0].in_flight = 0  # the fewest of ours, but other replicas queued work on it
    pool[0].load = signals(waiting=3, running=8, kv_cache=0.95)
    policy = LeastLoaded(random.Random(3))
    picks = Counter(policy.pick(pool) for _ in range(1000))
    assert pool[0] not in picks
    assert sum(picks.values()) == 1000


def test_p2c_sends_less_to_a_queueing_worker_under_held_load() -> None:
    pool = workers(0, 0, 0, 0)
    pool[0].load = signals(waiting=2, running=4)
    policy = LeastLoaded(random.Random(5))
    for _ in range(40):
        chosen = policy.pick(pool)
        assert chosen is not None
        chosen.in_flight += 1
    others = [w.in_flight for w in pool[1:]]
    assert pool[0].in_flight < min(others)
    assert pool[0].in_flight > 0  # once our own count passes its queue, it is used again


def test_p2c_keeps_held_requests_level() -> None:
    pool = workers(*[0] * 8)
    policy = LeastLoaded(random.Random(11))
    for _ in range(800):
        chosen = policy.pick(pool)
        assert chosen is not None
        chosen.in_flight += 1
    counts = [w.in_flight for w in pool]
    # Two choices keep the gap near log log n (at most 5 over 300 seeds); one random choice
    # would leave about 30 between the extremes here.
    assert max(counts) - min(counts) <= 6, counts


def test_p2c_ties_alternate_between_two() -> None:
    pool = workers(0, 0)
    policy = LeastLoaded(random.Random(1))
    assert [policy.pick(pool) for _ in range(6)] == [pool[0], pool[1]] * 3


def test_p2c_ties_rotate_among_many() -> None:
    pool = workers(0, 0, 0, 0)
    policy = LeastLoaded(random.Random(2))
    picks = Counter(policy.pick(pool) for _ in range(400))
    assert set(picks) == set(pool)
    assert all(80 <= n <= 120 for n in picks.values()), picks


def test_p2c_is_deterministic_for_a_seed() -> None:
    def run() -> list[str]:
        pool = workers(2, 0, 1, 3, 0, 1)
        policy = LeastLoaded(random.Random(42))
        return [w.url for w in (policy.pick(pool) for _ in range(50)) if w is not None]

    assert run() == run()


# --- round robin --------------------------------------------------------------------------------


def test_round_robin_cycles_in_url_order() -> None:
    pool = workers(0, 0, 0)
    policy = RoundRobin()
    picks = [policy.pick(pool[::-1]) for _ in range(9)]
    assert picks == pool * 3


def test_round_robin_ignores_load() -> None:
    pool = workers(5, 0, 9)
    policy = RoundRobin()
    assert [policy.pick(pool) for _ in range(3)] == pool


def test_round_robin_survives_exclusion() -> None:
    pool = workers(0, 0, 0, 0)
    policy = RoundRobin()
    assert [policy.pick(pool) for _ in range(4)] == pool
    without = [w for w in pool if w is not pool[1]]
    picks = [policy.pick(without) for _ in range(6)]
    assert picks == [pool[0], pool[2], pool[3]] * 2  # the rest keep their order, none skipped
    picks = [policy.pick(pool) for _ in range(8)]
    assert picks == [pool[1], pool[0], pool[2], pool[3]] * 2  # back: next once, then the cycle


def test_round_robin_retry_skips_the_tried_worker() -> None:
    pool = workers(0, 0, 0)
    policy = RoundRobin()
    first = policy.pick(pool)
    retry = policy.pick([w for w in pool if w is not first])
    assert retry is pool[1]
    assert policy.pick(pool) is pool[2]


def test_round_robin_is_fair_per_pool_when_pools_interleave() -> None:
    chat, embed = workers(0, 0, 0, name="chat"), workers(0, 0, name="embed")
    policy = RoundRobin()
    picks: Counter[Worker | None] = Counter()
    for _ in range(60):
        picks[policy.pick(chat)] += 1
        picks[policy.pick(embed)] += 1
    assert picks == {**dict.fromkeys(chat, 20), **dict.fromkeys(embed, 30)}


# --- consistent hash ----------------------------------------------------------------------------


def test_same_key_same_worker() -> None:
    pool = workers(0, 0, 0, 0)
    policy = hashed()
    first = policy.pick(pool, "session-a")
    assert all(policy.pick(pool, "session-a") is first for _ in range(20))


def test_candidate_order_does_not_matter() -> None:
    pool = workers(0, 0, 0, 0, 0)
    policy = hashed()
    shuffled = pool[:]
    random.Random(3).shuffle(shuffled)
    keys = range(200)
    assert owners(policy, pool, keys) == owners(policy, shuffled, keys)


def test_keys_spread_evenly() -> None:
    pool = workers(0, 0, 0, 0)
    spread = Counter(owners(hashed(), pool, range(10_000)).values())
    assert len(spread) == 4
    assert all(0.75 * 2500 <= n <= 1.25 * 2500 for n in spread.values()), spread


def test_adding_a_worker_moves_about_one_in_n_keys() -> None:
    pool = workers(0, 0, 0, 0, 0)
    policy, keys = hashed(), range(10_000)
    before = owners(policy, pool[:4], keys)
    after = owners(policy, pool, keys)
    moved = [k for k in keys if before[k] != after[k]]
    assert 0.12 <= len(moved) / len(keys) <= 0.28
    assert {after[k] for k in moved} == {pool[4].url}  # only onto the new worker


def test_removing_a_worker_moves_only_its_keys() -> None:
    pool = workers(0, 0, 0, 0)
    policy, keys = hashed(), range(5_000)
    before = owners(policy, pool, keys)
    gone = pool[2].url
    after = owners(policy, [w for w in pool if w.url != gone], keys)
    for k in keys:
        if before[k] == gone:
            assert after[k] != gone
        else:
            assert after[k] == before[k]


def test_hot_key_spills_over_within_the_cap() -> None:
    pool = workers(0, 0, 0, 0)
    policy = hashed()
    home = policy.pick(pool, "hot")
    assert home is not None
    for _ in range(200):
        limit = cap(pool)
        chosen = policy.pick(pool, "hot")
        assert chosen is not None
        assert chosen.in_flight < limit
        chosen.in_flight += 1
    counts = [w.in_flight for w in pool]
    assert max(counts) <= math.ceil(1.25 * 200 / 4)
    assert min(counts) > 0  # spilled onto every worker
    assert home.in_flight == max(counts)


def test_spill_over_goes_to_the_next_worker_on_the_ring() -> None:
    pool = workers(0, 0, 0, 0)
    policy = hashed()
    home = policy.pick(pool, "k")
    assert home is not None
    home.in_flight = 10  # over the cap of ceil(1.25 * 11 / 4) = 4
    second = policy.pick(pool, "k")
    assert second is not None and second is not home
    assert all(policy.pick(pool, "k") is second for _ in range(3))


def test_load_factor_one_keeps_workers_level() -> None:
    pool = workers(0, 0, 0)
    policy = hashed(load_factor=1.0)
    for _ in range(30):
        chosen = policy.pick(pool, "hot")
        assert chosen is not None
        chosen.in_flight += 1
    assert [w.in_flight for w in pool] == [10, 10, 10]


def test_no_key_uses_the_fallback() -> None:
    pool = workers(0, 0, 0)
    policy = hashed(RoundRobin())
    assert [policy.pick(pool) for _ in range(6)] == pool * 2


def test_hashing_is_stable_across_instances() -> None:
    pool = workers(0, 0, 0, 0, 0, 0)
    keys = range(500)
    assert owners(hashed(), pool, keys) == owners(hashed(replicas=100), pool[::-1], keys)


def test_hashing_is_stable_across_processes() -> None:
    script = (
        "from gateway.balancer import ConsistentHash, RoundRobin\n"
        "from tests.test_balancer import owners, workers\n"
        "pool = workers(0, 0, 0, 0)\n"
        "print(sorted(owners(ConsistentHash(RoundRobin()), pool, range(300)).items()))\n"
    )
    outputs = {
        subprocess.run(
            [sys.executable, "-c", script],
            capture_output=True,
            check=True,
            env={"PYTHONHASHSEED": seed, "PYTHONPATH": "."},
            text=True,
            timeout=30,
        ).stdout
        for seed in ("1", "2")
    }
    assert len(outputs) == 1
    assert outputs == {f"{sorted(owners(hashed(), workers(0, 0, 0, 0), range(300)).items())}\n"}


def test_a_subset_maps_as_a_ring_of_the_subset_alone() -> None:
    pool = workers(*[0] * 8)
    shared, keys = hashed(), range(1_000)
    owners(shared, pool, keys)  # the ring now holds all eight
    rng = random.Random(9)
    for _ in range(20):
        subset = rng.sample(pool, rng.randrange(1, 8))
        assert owners(shared, subset, keys) == owners(hashed(), subset, keys)


def test_pools_and_replaced_workers_share_one_ring(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(balancer, "RING_MAX_URLS", 10)
    chat, embed = workers(0, 0, 0, name="chat"), workers(0, 0, name="embed")
    policy, keys = hashed(), range(300)
    expected = {id(pool): owners(hashed(), pool, keys) for pool in (chat, embed)}
    for generation in range(10):  # replaced pods: new urls each time, past the ring's bound
        pods = workers(0, 0, name=f"pod{generation}-")
        assert owners(policy, pods, keys) == owners(hashed(), pods, keys)
        for pool in (chat, embed):
            assert owners(policy, pool, keys) == expected[id(pool)]


@pytest.mark.parametrize(("load_factor", "replicas"), [(0.99, 100), (1.25, 0)])
def test_rejects_bad_parameters(load_factor: float, replicas: int) -> None:
    with pytest.raises(ValueError, match="must be at least 1"):
        ConsistentHash(RoundRobin(), load_factor, replicas)


# --- make_policy --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "affinity", "kind"),
    [
        ("least_loaded", "none", LeastLoaded),
        ("round_robin", "none", RoundRobin),
        ("least_loaded", "session", ConsistentHash),
        ("round_robin", "prefix", ConsistentHash),
    ],
)
def test_make_policy(name: str, affinity: str, kind: type) -> None:
    assert isinstance(make_policy(name, affinity), kind)


def test_make_policy_without_affinity_ignores_the_key() -> None:
    pool = workers(0, 0, 0)
    policy = make_policy("round_robin", "none")
    assert [policy.pick(pool, "same") for _ in range(3)] == pool


def test_make_policy_passes_the_load_factor() -> None:
    pool = workers(0, 0, 0)
    policy = make_policy("least_loaded", "session", random.Random(1), load_factor=1.0)
    for _ in range(9):
        chosen = policy.pick(pool, "hot")
        assert chosen is not None
        chosen.in_flight += 1
    assert [w.in_flight for w in pool] == [3, 3, 3]


@pytest.mark.parametrize(
    ("name", "affinity", "message"),
    [("random", "none", "policy 'random'"), ("least_loaded", "cookie", "affinity 'cookie'")],
)
def test_make_policy_rejects_unknown_names(name: str, affinity: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make_policy(name, affinity)
