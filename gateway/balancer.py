"""Worker selection policies: pure and synchronous, no I/O, no clocks, randomness injected.

A policy gets the workers that may take the request (healthy, serving the model, not yet tried
by this request, under their connection cap) and an optional affinity key, and returns one, or
None when the list is empty. It stamps the chosen worker's ``last_pick`` from a sequence shared
by the policies of one balancer, so "chosen longest ago" compares across them.

- `LeastLoaded` (the default): power of two choices over `load_score`, which blends our own
  fresh in-flight count with the worker's scraped queue.
- `RoundRobin`: the worker chosen longest ago, in url order on ties.
- `ConsistentHash`: affinity by key (session or prompt prefix) with bounded load, so a worker's
  prefix cache gets hits without one hot key melting it; no key, no affinity.
- `CacheAware`: with the workers' KV-cache events on (`kvindex`), the share of the prompt each
  candidate really holds, traded against `load_score`; any other policy decides when nobody
  holds any of it, when the prompt's token ids are unknown, or when no candidate's events are
  being received.
"""

from __future__ import annotations

import math
import random
import struct
from bisect import bisect_left
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass
from hashlib import blake2b
from typing import Protocol, TypeVar

from gateway.kvindex import KVIndex, source
from gateway.loadsignals import LoadSignals

POLICIES = ("least_loaded", "round_robin")
AFFINITIES = ("none", "session", "prefix")
LOAD_FACTOR = 1.25
RING_REPLICAS = 100
RING_MAX_URLS = 1024  # past this, the ring starts over from the current candidates

_EIGHT_POINTS = struct.Struct(">8Q")


class Pickable(Protocol):
    url: str
    in_flight: int  # requests this gateway has in flight to the worker (always fresh)
    last_pick: int  # the balancer's sequence number when it last chose this worker; 0: never
    load: LoadSignals | None  # last scraped signals; None when unknown or stale


W = TypeVar("W", bound=Pickable)


@dataclass(slots=True)
class Prompt:
    """What cache-aware routing needs of a request: the model and the prompt's token ids, as
    the worker will see them. The cache-aware policy sets ``rank`` when the worker it chose has
    several data-parallel engines: the one holding most of the prompt, for the worker to be
    told (``X-data-parallel-rank``)."""

    model: str
    token_ids: Sequence[int]
    rank: int | None = None


class Policy(Protocol):
    def pick(
        self, candidates: Sequence[W], key: str | None = None, prompt: Prompt | None = None
    ) -> W | None: ...


class Sequencer:
    """Numbers picks; one per balancer, shared by a policy and its fallback."""

    def __init__(self) -> None:
        self._last = 0

    def stamp(self, worker: W) -> W:
        self._last += 1
        worker.last_pick = self._last
        return worker


def load_score(worker: Pickable) -> float:
    """How busy the worker is, in requests; lower is better."""
    load = worker.load
    if load is None:
        return float(worker.in_flight)
    # The worker's own counts include other gateway replicas' requests but are up to one scrape
    # old; our in-flight count is fresh but sees only ours. So the scraped total is moved by
    # what ours did since the scrape (``LoadSignals.ours``), and never taken below ours.
    # Queued requests count twice: they are what delays first tokens, and a queue means the
    # worker is already at its batch or KV limit, so one more request waits too. The scraped
    # queue shrinks with the total (requests that finished since freed slots for it) but is not
    # grown past what was seen: the worker's batch limit is not known.
    # KV usage is below one request: it only breaks ties, against a nearly full cache
    # (preemption ahead).
    moved = 0 if load.ours is None else worker.in_flight - load.ours
    total = max(float(worker.in_flight), load.running + load.waiting + moved)
    waiting = max(0.0, min(load.waiting, total - load.running))
    return total + waiting + load.kv_cache


class LeastLoaded:
    """Power of two choices: the lower `load_score` of two candidates sampled at random.

    Two random choices rather than the global minimum because every gateway replica sees the same
    scraped signals: all of them would send the next burst to the one worker that looked idle.
    Ties go to the worker chosen longest ago.
    """

    def __init__(self, rng: random.Random | None = None, seq: Sequencer | None = None) -> None:
        self._rng = rng or random.Random()  # noqa: S311
        self._seq = seq or Sequencer()

    def pick(
        self, candidates: Sequence[W], key: str | None = None, prompt: Prompt | None = None
    ) -> W | None:
        count = len(candidates)
        if count <= 2:
            pair = candidates
        else:
            first = self._rng.randrange(count)
            second = self._rng.randrange(count - 1)
            pair = (candidates[first], candidates[second + (second >= first)])
        if not pair:
            return None
        return self._seq.stamp(min(pair, key=_score_then_age))


def _score_then_age(worker: Pickable) -> tuple[float, int]:
    return load_score(worker), worker.last_pick


class RoundRobin:
    """Each worker in turn: the candidate chosen longest ago, in url order among the never-chosen.

    The cursor is the pick sequence stamped on the workers rather than an index into the list,
    so the cycle survives a candidate list that shrinks (a worker tried, at its cap or ejected):
    the others keep their order and nobody is skipped or chosen twice in a row. A worker that
    comes back is the one chosen longest ago and is next, once, then rejoins the cycle. It also
    keeps pools fair when requests for different models interleave.
    """

    def __init__(self, seq: Sequencer | None = None) -> None:
        self._seq = seq or Sequencer()

    def pick(
        self, candidates: Sequence[W], key: str | None = None, prompt: Prompt | None = None
    ) -> W | None:
        if not candidates:
            return None
        return self._seq.stamp(min(candidates, key=_age_then_url))


def _age_then_url(worker: Pickable) -> tuple[int, str]:
    return worker.last_pick, worker.url


class ConsistentHash:
    """Consistent hashing with bounded loads (Mirrokni, Thorup and Zadimoghaddam, 2017).

    A key maps to the first worker clockwise from its hash on a ring of ``replicas`` points per
    worker url, skipping workers whose in-flight count has reached
    ``ceil(load_factor * (total in flight + 1) / workers)``: the average is below that cap, so
    one worker always qualifies, and a hot key spills over to the next workers on the ring
    instead of piling onto one. The same keys map to the same workers in every process (blake2b,
    not the salted `hash()`); adding or removing a worker moves only the keys near its points.
    Without a key the fallback policy picks.
    """

    def __init__(
        self,
        fallback: Policy,
        load_factor: float = LOAD_FACTOR,
        replicas: int = RING_REPLICAS,
        seq: Sequencer | None = None,
    ) -> None:
        if not load_factor >= 1:
            raise ValueError(f"load_factor must be at least 1, got {load_factor}")
        if replicas < 1:
            raise ValueError(f"replicas must be at least 1, got {replicas}")
        self._fallback = fallback
        self._load_factor = load_factor
        self._seq = seq or Sequencer()
        self._ring = _Ring(replicas)

    def pick(
        self, candidates: Sequence[W], key: str | None = None, prompt: Prompt | None = None
    ) -> W | None:
        if key is None:
            return self._fallback.pick(candidates)
        if not candidates:
            return None
        by_url = {worker.url: worker for worker in candidates}
        self._ring.cover(by_url)
        total = sum(worker.in_flight for worker in by_url.values())
        cap = math.ceil(self._load_factor * (total + 1) / len(by_url))
        for url in self._ring.walk(_hash(key), by_url):
            if by_url[url].in_flight < cap:
                return self._seq.stamp(by_url[url])
        raise AssertionError("bounded load: the least loaded worker is always under the cap")


class _Ring:
    """The points of every url seen lately, sorted, shared by all candidate sets.

    A walk skips urls that are not candidates, which maps every key exactly as a ring of the
    candidates alone would (their points are the same), so a candidate list that shrinks (a
    worker tried, at its cap, ejected) or belongs to another model's pool costs no rebuild.
    New urls are merged in; urls no longer seen (replaced pods) are dropped when more than
    `RING_MAX_URLS` have accumulated, by starting over from the current candidates.
    """

    def __init__(self, replicas: int) -> None:
        self._replicas = replicas
        self._hashes: list[int] = []
        self._urls: list[str] = []
        self._members: set[str] = set()

    def cover(self, urls: Collection[str]) -> None:
        new = [url for url in urls if url not in self._members]
        if not new:
            return
        points = list(zip(self._hashes, self._urls, strict=True))
        if len(self._members) + len(new) > RING_MAX_URLS:
            points, new = [], list(urls)
            self._members.clear()
        self._members.update(new)
        points.extend((point, url) for url in new for point in _points(url, self._replicas))
        points.sort()  # runs already in order: timsort merges them in linear time
        self._hashes = [point for point, _ in points]
        self._urls = [url for _, url in points]

    def walk(self, start: int, wanted: Collection[str]) -> Iterator[str]:
        """The distinct wanted urls clockwise from the point `start`, nearest first.

        Lazy: the first is almost always under the cap and found with one bisection; the scan
        over further points runs only while workers are skipped.
        """
        count = len(self._urls)
        first = bisect_left(self._hashes, start)
        seen: set[str] = set()
        for index in range(first, first + count):
            url = self._urls[index % count]
            if url in wanted and url not in seen:
                yield url
                seen.add(url)
                if len(seen) == len(wanted):
                    return


def _points(url: str, replicas: int) -> list[int]:
    # Eight points per 64-byte digest: one blake2b call per point would make building the
    # ring of a large fleet take milliseconds in the event loop.
    points: list[int] = []
    for block in range(-(-replicas // 8)):
        points.extend(_EIGHT_POINTS.unpack(_digest(f"{url}#{block}", 64)))
    return points[:replicas]


def _hash(key: str) -> int:
    return int.from_bytes(_digest(key, 8), "big")


def _digest(text: str, size: int) -> bytes:
    return blake2b(text.encode("utf-8", "surrogatepass"), digest_size=size).digest()


class CacheAware:
    """The candidate with the lowest `load_score` minus ``weight`` times the share of the
    prompt's blocks it holds (its cached leading blocks over the prompt's full blocks).

    A worker holding the whole prompt is preferred until it is ``weight`` requests busier than
    the others: then a hot prefix spills to the next worker, which caches it too, and the two
    share it. Ties go to the worker chosen longest ago. The global best, not two random
    choices: the cached share differs between workers where load alone would not, so the herd
    that two choices avoid is already broken up by the prompt.
    """

    def __init__(
        self,
        index: KVIndex,
        fallback: Policy,
        weight: float,
        seq: Sequencer | None = None,
    ) -> None:
        if not weight >= 0:
            raise ValueError(f"weight must be at least 0, got {weight}")
        self._index = index
        self._fallback = fallback
        self._weight = weight
        self._seq = seq or Sequencer()

    def pick(
        self, candidates: Sequence[W], key: str | None = None, prompt: Prompt | None = None
    ) -> W | None:
        shares = self.cached(candidates, prompt) if prompt is not None else None
        if shares is None:
            return self._fallback.pick(candidates, key)
        held, size, block = shares
        weight = self._weight

        def score(worker: W) -> tuple[float, int]:
            blocks = held[worker.url][0] if worker.url in held else 0
            return load_score(worker) - weight * blocks / size, worker.last_pick

        chosen = self._seq.stamp(min(candidates, key=score))
        blocks, rank = held.get(chosen.url, (0, None))
        if prompt is not None and blocks and self._index.engines(chosen.url) > 1:
            prompt.rank = rank
        self._index.on_prediction(chosen.url, blocks * block)
        return chosen

    def cached(
        self, candidates: Sequence[Pickable], prompt: Prompt
    ) -> tuple[dict[str, tuple[int, int]], int, int] | None:
        """Each live candidate's cached leading blocks of the prompt with the rank of its engine
        holding the most, the prompt's full blocks, and the block size; None when the index
        cannot tell the candidates apart (no live events, no full block, nobody holds any)."""
        index = self._index
        sources = {
            source(w.url, r): (w.url, r)
            for w in candidates
            for r in range(index.engines(w.url))
            if index.live(source(w.url, r))
        }
        size = index.block_size(sources) if sources else 0
        if size == 0:
            return None
        full = len(prompt.token_ids) // size
        if not full:
            return None
        keys = index.chained(prompt.token_ids, size, index.lora_of(prompt.model))
        held: dict[str, tuple[int, int]] = {}
        for name, blocks in index.match(keys, sources).items():
            url, rank = sources[name]
            if blocks > held.get(url, (-1, 0))[0]:
                held[url] = (blocks, rank)
        if not any(blocks for blocks, _ in held.values()):
            return None
        return held, full, size


def make_policy(
    name: str,
    affinity: str,
    rng: random.Random | None = None,
    load_factor: float = LOAD_FACTOR,
    kv_index: KVIndex | None = None,
    kv_weight: float = 8.0,
) -> Policy:
    """The policy for the settings' ``routing.policy``, ``routing.affinity`` and
    ``routing.kv_events``.

    With affinity, the caller passes the session id or prompt prefix as the key; without it the
    key is ignored. With a KV index, the caller passes the prompt's token ids when it knows
    them, and the cache-aware policy decides first.
    """
    seq = Sequencer()
    base: Policy
    if name == "least_loaded":
        base = LeastLoaded(rng, seq)
    elif name == "round_robin":
        base = RoundRobin(seq)
    else:
        raise ValueError(f"unknown balancing policy {name!r}; expected one of {POLICIES}")
    if affinity not in AFFINITIES:
        raise ValueError(f"unknown affinity {affinity!r}; expected one of {AFFINITIES}")
    if affinity != "none":
        base = ConsistentHash(base, load_factor, seq=seq)
    if kv_index is not None:
        return CacheAware(kv_index, base, kv_weight, seq)
    return base
