"""A serving process's stock of a key's allowance (gateway/ratelimit_stock.py), given by the
supervisor's keeper (gateway/keeper.py) and spent by ``HostLimits`` (gateway/ratelimit_host.py)
over a real channel (a Unix socket pair, both ends on this loop).

What it must show: with stock, requests are admitted without asking the keeper; stock is
charged when given, so a key is never admitted beyond its limit however its requests fall on
the processes; stock is given only while a key has half its allowance left, not for small
limits; unused stock and free slots go back to the keeper; a dead process's slots come back.
"""

from __future__ import annotations

import asyncio
import socket
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import pytest

from gateway import ratelimit_stock
from gateway.channel import Channel, Message
from gateway.keeper import STOCK_MIN, STOCK_SHARE, Holdings, Keeper
from gateway.ratelimit_host import HostLimits
from gateway.ratelimit_local import Rate, Scope, remaining
from gateway.ratelimit_stock import Stock
from tests.helpers import wait_for

pytestmark = pytest.mark.timeout(30)


@dataclass
class Process:
    """One serving process's end, the keeper's holdings for it, and the ops the keeper got."""

    host: HostLimits
    holdings: Holdings
    ops: Counter[str] = field(default_factory=Counter)
    channels: tuple[Channel, Channel] | None = None


Connect = Callable[[Keeper], Awaitable[Process]]


@pytest.fixture
async def connect() -> AsyncIterator[Connect]:
    opened: list[Process] = []

    async def make(keeper: Keeper) -> Process:
        ours, theirs = socket.socketpair()
        parent, child = await Channel.over(ours), await Channel.over(theirs)
        process = Process(HostLimits(child), keeper.holdings(), channels=(parent, child))

        def handle(message: Message) -> Message | None:
            process.ops[message[0]] += 1
            return process.holdings.handle(message)

        parent.start(handle)
        child.start(lambda message: None)
        opened.append(process)
        return process

    yield make
    for process in opened:
        assert process.channels is not None
        await process.host.close()
        for channel in process.channels:
            await channel.close()


def rpm(limit: int) -> Rate:
    return Rate("{team}:rpm", "requests", limit, 1)


def conc(limit: int) -> Scope:
    return Scope("{team}:conc", limit)


async def stocked(process: Process) -> None:
    await wait_for(lambda: len(process.host.stock) > 0, 5, "stock arrived")


async def test_stock_admits_without_asking_and_headers_count_down(connect: Connect) -> None:
    keeper = Keeper()
    process = await connect(keeper)
    limit = 6400
    share = limit // STOCK_SHARE  # one process: the whole 64th
    first = await process.host.acquire([rpm(limit)], [])
    assert first.admitted and process.ops["limit"] == 1
    await stocked(process)
    assert process.ops["stock"] == 1
    seen = [remaining(rpm(limit), first.ahead[0])]
    for _ in range(share // 2):
        verdict = await process.host.acquire([rpm(limit)], [])
        assert verdict.admitted
        seen.append(remaining(rpm(limit), verdict.ahead[0]))
    assert process.ops["limit"] == 1  # none of these asked
    # The x-ratelimit-remaining header counts down by one a request, as without stock.
    assert seen == list(range(limit - 1, limit - 2 - share // 2, -1))


async def test_a_small_limit_is_asked_for_every_request(connect: Connect) -> None:
    keeper = Keeper()
    process = await connect(keeper)
    limit = STOCK_SHARE * STOCK_MIN - 1  # its share rounds below the minimum
    for _ in range(5):
        assert (await process.host.acquire([rpm(limit)], [])).admitted
    await wait_for(lambda: process.ops["stock"] >= 1, 5, "stock asked for")
    assert process.ops["limit"] == 5
    assert len(process.host.stock) == 0


@pytest.mark.parametrize("processes", [2, 4])
async def test_never_beyond_the_limit_however_requests_fall(
    connect: Connect, processes: int
) -> None:
    keeper = Keeper(clock=lambda: 0.0)  # no refill while the test runs
    ends = [await connect(keeper) for _ in range(processes)]
    limit = 1280
    admitted, asked = 0, 0
    for turn in range(3 * limit):
        process = ends[turn % processes] if turn % 7 else ends[0]  # uneven, as connections are
        verdict = await process.host.acquire([rpm(limit)], [])
        admitted += verdict.admitted
        if admitted == limit // 2 and not asked:
            asked = sum(process.ops["limit"] for process in ends)
        if turn % 4 == 0:
            await asyncio.sleep(0)  # let stock calls be answered along the way
    # Until half the allowance was spent, nearly all came from stock; past it every request
    # asks, so that the refusals are the keeper's own.
    assert 0 < asked < limit // 20
    # Never beyond; early only by stock other processes held unused (under 1/40 of it).
    assert limit - limit // 40 <= admitted <= limit


async def test_stock_is_given_only_while_half_the_allowance_is_left(connect: Connect) -> None:
    keeper = Keeper()
    process = await connect(keeper)
    limit = 640
    for _ in range(limit // 2):  # half the minute spent, straight at the keeper
        assert keeper.limits.acquire([rpm(limit)], []).admitted
    assert (await process.host.acquire([rpm(limit)], [])).admitted
    await wait_for(lambda: process.ops["stock"] == 1, 5, "stock asked for")
    await asyncio.sleep(0)
    assert len(process.host.stock) == 0


async def test_unused_stock_and_free_slots_go_back(
    connect: Connect, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ratelimit_stock, "STOCK_SECONDS", 0.2)
    keeper = Keeper()
    process = await connect(keeper)
    rate, cap = rpm(6400), conc(640)
    first = await process.host.acquire([rate], [cap])
    await stocked(process)
    assert keeper.limits.in_flight(cap.key) == 1 + cap.limit // STOCK_SHARE
    second = await process.host.acquire([rate], [cap])
    assert second.admitted and process.ops["limit"] == 1
    process.host.release([cap])  # kept as stock: the keeper still counts it
    assert keeper.limits.in_flight(cap.key) == 1 + cap.limit // STOCK_SHARE
    await wait_for(lambda: len(process.host.stock) == 0, 5, "stock expired")
    # What is left: the first request's slot, and the two requests' charge, nothing more.
    await wait_for(lambda: keeper.limits.in_flight(cap.key) == 1, 5, "free slots released")
    spent = keeper.limits.acquire([Rate(rate.key, rate.kind, rate.limit, 0)], []).ahead[0]
    assert spent == pytest.approx(2 * rate.interval, abs=0.05)
    assert first.admitted


async def test_a_dead_process_gives_its_stocked_slots_back(connect: Connect) -> None:
    keeper = Keeper()
    process = await connect(keeper)
    cap = conc(6400)
    assert (await process.host.acquire([], [cap])).admitted
    await stocked(process)
    assert keeper.limits.in_flight(cap.key) > 1
    process.holdings.release_all()
    assert keeper.limits.in_flight(cap.key) == 0
    assert keeper.processes == 0


def test_the_stock_alone() -> None:
    now = [100.0]
    stock = Stock(lambda: now[0])
    rate, cap = rpm(600), conc(100)
    assert stock.take([rate], [cap]) is None
    assert stock.wanted([rate], [cap]) == ([rate], [cap])
    stock.add([rate], [cap], [2.0], [10], [0])  # slots refused: no stock for the cap
    assert stock.take([rate], [cap]) is None  # both are needed
    assert stock.wanted([rate], [cap]) == ([], [])  # refused a moment ago: not asked
    now[0] += ratelimit_stock.REFUSED_PAUSE
    assert stock.wanted([rate], [cap]) == ([], [cap])  # the rate's stock is still whole
    assert stock.take([rate], []) == (pytest.approx(2.0 - 0.25 - 9 * rate.interval),)
    now[0] += ratelimit_stock.STOCK_SECONDS
    assert stock.take([rate], []) is None  # its time is up
    returns = stock.expire()
    assert returns.refunds == ((rate, 9),) and returns.releases == ()
    assert stock.next_expiry() is None
