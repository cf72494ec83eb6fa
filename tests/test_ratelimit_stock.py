"""A serving process's stock of a key's allowance (gateway/ratelimit_stock.py), given by the
supervisor's keeper (gateway/keeper.py) and spent by ``HostLimits`` (gateway/ratelimit_host.py)
over a real channel (a Unix socket pair, both ends on this loop), on a clock the test moves.

What it must show: with stock, requests are admitted without asking the keeper; a key is never
admitted beyond what an exact limiter admits for the same requests at the same moments,
however long the traffic runs and however it falls on the processes, and refused early by at
most 1/32 of its limit; stock is given only while a key has half its allowance left, for all
of a request's limits or none, not for small limits; a process keeps at most two shares;
unused stock and free slots go back; a dead process's stock comes back.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import pytest

from gateway import ratelimit_stock
from gateway.channel import Channel, Message
from gateway.errors import Overloaded
from gateway.keeper import STOCK_MIN, STOCK_SHARE, Holdings, Keeper
from gateway.ratelimit_host import HostLimits
from gateway.ratelimit_local import LocalLimits, Rate, Scope, Verdict, remaining
from gateway.ratelimit_stock import KEEP, Stock
from tests.helpers import wait_for

pytestmark = pytest.mark.timeout(60)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Process:
    """One serving process's end and the keeper's holdings for it, with the ops it sent."""

    host: HostLimits
    holdings: Holdings
    channels: tuple[Channel, Channel]
    ops: dict[str, int]

    async def acquire(self, rates: list[Rate], scopes: list[Scope]) -> Verdict:
        verdict = await self.host.acquire(rates, scopes)
        await self.settle()
        return verdict

    async def settle(self) -> None:
        """Until the keeper has handled all this process has sent (a stock call included):
        a call answers only after the notes before it, on one ordered channel."""
        while True:
            self.host._flush_spent()
            await self.channels[1].call(5.0, "limit", [], [])
            if not self.host._asking:
                return

    def expire(self) -> None:
        """What the expiry timer does, at the test's clock."""
        self.host._expire()


Connect = Callable[[Keeper, Clock], Awaitable[Process]]


@pytest.fixture
async def connect() -> AsyncIterator[Connect]:
    opened: list[Process] = []

    async def make(keeper: Keeper, clock: Clock) -> Process:
        ours, theirs = socket.socketpair()
        parent, child = await Channel.over(ours), await Channel.over(theirs)
        holdings = keeper.holdings()
        ops: dict[str, int] = {}

        def handle(message: Message) -> Message | None:
            ops[message[0]] = ops.get(message[0], 0) + 1
            return holdings.handle(message)

        parent.start(handle)
        child.start(lambda message: None)
        # A bound far above any answer here: a loaded machine must not fail the test.
        host = HostLimits(child, timeout=30.0, clock=clock)
        process = Process(host, holdings, (parent, child), ops)
        opened.append(process)
        return process

    yield make
    for process in opened:
        await process.host.close()
        for channel in process.channels:
            await channel.close()


def rpm(limit: int) -> Rate:
    return Rate("{team}:rpm", "requests", limit, 1)


def conc(limit: int) -> Scope:
    return Scope("{team}:conc", limit)


def asked(process: Process) -> int:
    return process.ops.get("limit", 0)


async def test_stock_admits_without_asking_and_headers_count_down(connect: Connect) -> None:
    clock = Clock()
    keeper = Keeper(clock)
    process = await connect(keeper, clock)
    limit = 6400
    share = limit // STOCK_SHARE  # one process: the whole 64th
    first = await process.acquire([rpm(limit)], [])
    assert first.admitted and process.ops["stock"] == 1
    before = asked(process)
    seen = [remaining(rpm(limit), first.ahead[0])]
    for _ in range(share // 2):
        verdict = await process.acquire([rpm(limit)], [])
        assert verdict.admitted
        seen.append(remaining(rpm(limit), verdict.ahead[0]))
    assert asked(process) == before + share // 2  # the test's own barrier calls only
    # The x-ratelimit-remaining header counts down by one a request, as without stock.
    assert seen == list(range(limit - 1, limit - 2 - share // 2, -1))
    # Spent stock is charged at the keeper; what is left stays reserved there.
    spent = keeper.limits.acquire([Rate(rpm(limit).key, "requests", limit, 0)], []).ahead[0]
    assert spent == pytest.approx((1 + share) * rpm(limit).interval)


@pytest.mark.parametrize("later", [0.3, 0.9])
async def test_headers_from_stock_say_what_the_keeper_says(connect: Connect, later: float) -> None:
    """Later, the header still says what the keeper says, plus this process's unspent stock:
    the charged part has refilled with time, the reserved part has not."""
    clock = Clock()
    keeper = Keeper(clock)
    process = await connect(keeper, clock)
    rate = rpm(6400)
    assert (await process.acquire([rate], [])).admitted
    clock.now += later
    for _ in range(10):
        verdict = await process.acquire([rate], [])
    unspent = process.host.stock._units[rate.key].left
    said = keeper.limits.acquire([Rate(rate.key, "requests", rate.limit, 0)], []).ahead[0]
    assert remaining(rate, verdict.ahead[0]) == remaining(rate, said) + unspent


async def test_a_small_limit_is_asked_for_every_request(connect: Connect) -> None:
    clock = Clock()
    keeper = Keeper(clock)
    process = await connect(keeper, clock)
    limit = STOCK_SHARE * STOCK_MIN - 1  # its share rounds below the minimum
    for _ in range(5):
        assert (await process.acquire([rpm(limit)], [])).admitted
    assert len(process.host.stock) == 0
    assert keeper.limits.reserved(rpm(limit).key) == 0


async def test_all_of_a_request_s_limits_get_stock_or_none(connect: Connect) -> None:
    """A large rate with a small cap: stock of the rate alone could never be spent, and would
    sit reserved; so none is given. Likewise a rate whose share is below the request's cost."""
    clock = Clock()
    keeper = Keeper(clock)
    process = await connect(keeper, clock)
    rate = rpm(12800)
    for _ in range(20):
        assert (await process.acquire([rate], [conc(3)])).admitted
        process.host.release([conc(3)])
        clock.now += 0.3
    assert keeper.limits.reserved(rate.key) == 0 and len(process.host.stock) == 0
    tokens = Rate("{team}:tpm", "tokens", 64_000, 2000)  # share 1000 < cost
    assert (await process.acquire([tokens], [])).admitted
    assert keeper.limits.reserved(tokens.key) == 0 and len(process.host.stock) == 0


@pytest.mark.parametrize("processes", [2, 4])
async def test_never_beyond_an_exact_limiter_over_time(connect: Connect, processes: int) -> None:
    """Ten minutes of steady traffic on one process (stock topped up all along), then a burst
    on all of them: at every step no more admitted than an exact limiter fed the same
    requests at the same moments, and at the end at most 1/32 of the limit fewer."""
    clock = Clock()
    keeper = Keeper(clock)
    ends = [await connect(keeper, clock) for _ in range(processes)]
    exact = LocalLimits(clock)
    limit = 12800
    rate = rpm(limit)
    ours = theirs = 0

    async def one(process: Process) -> None:
        nonlocal ours, theirs
        ours += (await process.acquire([rate], [])).admitted
        theirs += exact.acquire([rate], []).admitted
        assert ours <= theirs

    for _ in range(2400):  # 4 a second, for 600 s
        clock.now += 0.25
        for process in ends:
            process.expire()
        await one(ends[0])
    assert len(ends[0].host.stock) == 1  # stock was used all along
    for turn in range(2 * limit):  # a burst at one moment, uneven over the processes
        await one(ends[turn % processes] if turn % 3 else ends[0])
    assert ours >= theirs - limit // 32


async def test_a_process_keeps_at_most_two_shares_of_slots(connect: Connect) -> None:
    """Short requests on one process for a while: the slots counted at the keeper stay within
    what is in flight plus two shares, so another process is not refused early by more."""
    clock = Clock()
    keeper = Keeper(clock)
    busy, other = await connect(keeper, clock), await connect(keeper, clock)
    cap = conc(1280)
    share = cap.limit // (STOCK_SHARE * 2)
    for _ in range(120):  # one short request every 0.25 s for 30 s
        clock.now += 0.25
        busy.expire()
        assert (await busy.acquire([], [cap])).admitted
        busy.host.release([cap])
        await busy.settle()
        assert keeper.limits.in_flight(cap.key) <= KEEP * share
    admitted = 0
    while (await other.acquire([], [cap])).admitted:
        admitted += 1
    assert admitted >= cap.limit - KEEP * share - KEEP * share  # the other's own stock too


async def test_stock_is_given_only_while_half_the_allowance_is_left(connect: Connect) -> None:
    clock = Clock()
    keeper = Keeper(clock)
    process = await connect(keeper, clock)
    limit = 640
    for _ in range(limit // 2):  # half the minute spent, straight at the keeper
        assert keeper.limits.acquire([rpm(limit)], []).admitted
    assert (await process.acquire([rpm(limit)], [])).admitted
    assert process.ops["stock"] == 1 and len(process.host.stock) == 0


async def test_unused_stock_and_free_slots_go_back(connect: Connect) -> None:
    clock = Clock()
    keeper = Keeper(clock)
    process = await connect(keeper, clock)
    rate, cap = rpm(6400), conc(640)
    assert (await process.acquire([rate], [cap])).admitted  # asked; stock arrives after
    assert keeper.limits.in_flight(cap.key) == 1 + cap.limit // STOCK_SHARE
    assert keeper.limits.reserved(rate.key) == rate.limit // STOCK_SHARE
    assert (await process.acquire([rate], [cap])).admitted  # from stock
    process.host.release([cap])  # kept as stock: the keeper still counts it
    await process.settle()
    assert keeper.limits.in_flight(cap.key) == 1 + cap.limit // STOCK_SHARE
    charged = keeper.limits._tat[rate.key]  # the two requests' charge, from now
    assert charged == pytest.approx(clock.now + 2 * rate.interval)
    clock.now += ratelimit_stock.STOCK_SECONDS
    process.expire()
    await process.settle()
    # What is left: the first request's slot, and the two requests' charge, nothing more.
    assert len(process.host.stock) == 0
    assert keeper.limits.in_flight(cap.key) == 1
    assert keeper.limits.reserved(rate.key) == 0
    assert keeper.limits._tat[rate.key] == charged  # nothing refunded from the charge


async def test_token_corrections_of_requests_from_stock_reach_the_keeper(
    connect: Connect,
) -> None:
    """A tpm is charged an estimate at admission and corrected once the answer's tokens are
    known (``adjust``, as ``RateLimiter.settle`` sends it). For requests admitted from stock,
    the keeper's charge ends where an exact limiter's does, given the same requests and
    corrections at the same moments (the stock still reserved is counted apart)."""
    clock = Clock()
    keeper = Keeper(clock)
    process = await connect(keeper, clock)
    exact = LocalLimits(clock)
    rate = Rate("{team}:tpm", "tokens", 64000, 100)
    for delta in (50, -30, -100, 7, 0, -99):
        clock.now += 0.01
        assert (await process.acquire([rate], [])).admitted
        assert exact.acquire([rate], []).admitted
        if delta:
            process.host.adjust(rate, delta)
            exact.adjust(rate, delta)
        await process.settle()
        assert keeper.limits._tat[rate.key] == pytest.approx(exact._tat[rate.key])
    assert process.ops["spend"] == 5  # all but the first admitted from stock
    assert keeper.limits.reserved(rate.key) > 0


async def test_a_dead_process_gives_its_stock_back(connect: Connect) -> None:
    clock = Clock()
    keeper = Keeper(clock)
    process = await connect(keeper, clock)
    rate, cap = rpm(6400), conc(6400)
    assert (await process.acquire([rate], [cap])).admitted
    assert keeper.limits.in_flight(cap.key) > 1 and keeper.limits.reserved(rate.key) > 0
    process.holdings.release_all()
    assert keeper.limits.in_flight(cap.key) == 0 and keeper.limits.reserved(rate.key) == 0
    assert keeper.processes == 0


def test_the_stock_alone() -> None:
    clock = Clock()
    stock = Stock(clock)
    rate, cap = rpm(600), conc(100)
    assert stock.take([rate], [cap]) is None
    assert stock.wanted([rate], [cap]) == ([True], [True])
    assert not stock.add([rate], [cap], [None], [0], [0])  # refused: nothing comes back
    assert stock.wanted([rate], [cap]) is None  # refused a moment ago: not asked
    clock.now += ratelimit_stock.REFUSED_PAUSE
    # 2 s charged ahead, and 30 units reserved at the keeper in all: these 10, 20 elsewhere.
    returned = stock.add([rate], [cap], [(2.0, 30)], [10], [4])
    assert not returned
    assert stock.wanted([rate], [cap]) is None  # both whole
    # Spent ahead as the keeper sees it, less the 9 units this process holds unspent.
    assert stock.take([rate], [cap]) == (pytest.approx(2.0 + (30 - 9) * rate.interval),)
    # Topped up past two shares: the rest goes back at once.
    assert not stock.add([rate], [cap], [(2.0, 40)], [10], [4])  # 19 units, 7 slots: kept
    returned = stock.add([rate], [cap], [(2.0, 50)], [10], [4])
    assert returned.units == ((rate.key, 29 - KEEP * 10),)
    assert returned.slots == (cap.key,) * (11 - KEEP * 4)
    clock.now += ratelimit_stock.STOCK_SECONDS
    assert stock.take([rate], []) is None  # its time is up
    returned = stock.expire()
    assert returned.units == ((rate.key, 20),) and returned.slots == (cap.key,) * 8
    assert stock.next_expiry() is None


async def test_answers_after_the_bound_are_undone_or_taken() -> None:
    """The keeper answers after the process gave up (503 for the request): a late admission's
    slot goes back, a late stock is still taken; nothing stays counted for nobody."""
    ours, theirs = socket.socketpair()
    child = await Channel.over(theirs)
    child.start(lambda message: None)
    reader, writer = await asyncio.open_unix_connection(sock=ours)
    host = HostLimits(child, timeout=0.2)
    try:
        cap = conc(6400)
        with pytest.raises(Overloaded):
            await host.acquire([], [cap])
        calls = [json.loads(await reader.readline()) for _ in range(2)]
        by_op = {call[2]: call[1] for call in calls}
        assert set(by_op) == {"limit", "stock"}
        await wait_for(lambda: not host._asking, 5, "the stock call gave up too")
        writer.write(json.dumps(["re", by_op["limit"], True, [], "", 0.0]).encode() + b"\n")
        writer.write(json.dumps(["re", by_op["stock"], [], [], [50]]).encode() + b"\n")
        note = json.loads(await asyncio.wait_for(reader.readline(), 5))
        assert note == ["release", [cap.key]]
        await wait_for(lambda: len(host.stock) == 1, 5, "the late stock taken")
        assert (await host.acquire([], [cap])).admitted  # from the late stock, not asked
    finally:
        await host.close()
        await child.close()
        writer.close()


@pytest.mark.parametrize("how", ["answer-in-the-turn-the-bound-ends", "caller-cancelled"])
async def test_an_admission_the_caller_never_took_is_released(how: str) -> None:
    """The keeper's answer is read in the very loop turn the call's bound runs out, or the
    request is cancelled (its client left) while the call is out: either way the slot the
    keeper counted goes back."""
    ours, theirs = socket.socketpair()
    child = await Channel.over(theirs)
    child.start(lambda message: None)
    reader, writer = await asyncio.open_unix_connection(sock=ours)
    host = HostLimits(child, timeout=0.05)
    cap = conc(10)  # too small for stock: only the limit call matters
    try:
        task = asyncio.create_task(host.acquire([], [cap]))
        calls = [json.loads(await reader.readline()) for _ in range(2)]
        limit = next(call for call in calls if call[2] == "limit")
        answer = json.dumps(["re", limit[1], True, [], "", 0.0]).encode() + b"\n"
        if how == "caller-cancelled":
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            writer.write(answer)
        else:
            writer.write(answer)
            await writer.drain()
            time.sleep(0.1)  # the loop held: the answer and the bound's end come in one turn
            with pytest.raises(Overloaded):
                await task
        note = json.loads(await asyncio.wait_for(reader.readline(), 5))
        assert note == ["release", [cap.key]]
    finally:
        await host.close()
        await child.close()
        writer.close()
