"""Leader election over the in-process coordinator (the same interface etcd serves): one
leader at a time, a standby takes over when the leader's lease lapses or it stops, each
term a newer leader generation, by which a daemon's endpoint fences a deposed leader off."""

from __future__ import annotations

import asyncio

import pytest

from kvpool.coordinator import InProcessCoordinator
from kvpool.daemon_link import DaemonCall, Fence, PinMark, TierDescription, daemon_endpoint
from kvpool.errors import BadRequest, NotLeader
from kvpool.tiers.base import TierKind
from tests.unit.fake_daemon import FakeDaemon
from kvpool.keyspace import Keyspace
from master.election import Election


class Candidate:
    def __init__(self, coord: InProcessCoordinator, name: str, ttl: float = 0.4) -> None:
        self.log: list[str] = []
        self.generations: list[int] = []
        self.election = Election(coord, "t", name, ttl, self.gain, self.lose)
        self.task = asyncio.get_running_loop().create_task(self.election.run())

    async def gain(self, resumed: bool, generation: int) -> None:
        self.log.append("resume" if resumed else "gain")
        self.generations.append(generation)

    async def lose(self) -> None:
        self.log.append("lose")

    async def stop(self) -> None:
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)


async def wait_until(predicate, timeout: float = 3.0) -> None:  # type: ignore[no-untyped-def]
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.01)


async def test_one_leader_and_a_standby_that_takes_over_when_it_stops() -> None:
    coord = InProcessCoordinator()
    a = Candidate(coord, "http://a")
    await wait_until(lambda: a.election.leading)
    b = Candidate(coord, "http://b")
    await asyncio.sleep(0.3)
    assert not b.election.leading and b.election.leader_url == "http://a"
    await a.stop()  # a clean stop revokes the lease: b leads within a poll
    await wait_until(lambda: b.election.leading, timeout=1.0)
    assert await coord.get(Keyspace("t").leader) == b"http://b"
    assert (a.generations, b.generations) == ([1], [2])  # each term a newer generation
    await b.stop()
    await coord.close()


async def test_a_leader_whose_lease_is_gone_steps_down_and_another_leads() -> None:
    coord = InProcessCoordinator()
    a = Candidate(coord, "http://a")
    await wait_until(lambda: a.election.leading)
    b = Candidate(coord, "http://b")
    await coord.revoke(a.election._lease)  # as if etcd had expired it during a partition
    await wait_until(lambda: "lose" in a.log)
    await wait_until(lambda: a.election.leading != b.election.leading and
                     (a.election.leading or b.election.leading))
    assert [a.election.leading, b.election.leading].count(True) == 1
    # Whoever leads now, on a new lease or on its own again, leads a newer generation
    # than a did (daemons refuse a's calls once they hear from it).
    assert max(a.generations[1:] + b.generations) > a.generations[0]
    await a.stop()
    await b.stop()
    await coord.close()


async def test_each_term_counts_a_generation_whatever_became_of_the_count_key() -> None:
    coord = InProcessCoordinator()
    key = Keyspace("t").generation
    await coord.put(key, b"41")  # terms led before (by masters since gone)
    a = Candidate(coord, "http://a")
    await wait_until(lambda: a.election.leading)
    assert a.generations == [42] and await coord.get(key) == b"42"
    await a.stop()
    await coord.put(key, b"forty-two")
    b = Candidate(coord, "http://b")
    await asyncio.sleep(0.3)  # a count that is no count: b refuses to lead on it
    assert not b.election.leading and b.generations == []
    await coord.put(key, b"50")
    await wait_until(lambda: b.election.leading)
    assert b.generations == [51]
    await b.stop()
    await coord.close()


async def test_a_daemon_serves_the_newest_leader_it_heard_from_and_refuses_older_ones() -> None:
    d = FakeDaemon("n1", [TierDescription(TierKind.HOST, 1 << 20, address=1 << 40)])
    fence = Fence()
    call = daemon_endpoint(d, fence)
    mark = {"marks": [PinMark(b"k" * 16, 1).pack()]}
    await call[DaemonCall.MARK]({**mark, "generation": 3})  # the field is the fence's, not mark's
    assert fence.newest == 3 and d.marks[b"k" * 16].pins == 1
    await call[DaemonCall.MARK]({**mark, "generation": 3})  # the same leader again
    with pytest.raises(NotLeader, match="mark from a master of leader generation 2, but one "
                                        "of generation 3 leads now"):
        await call[DaemonCall.MARK]({"marks": [PinMark(b"k" * 16, 0).pack()], "generation": 2})
    assert d.marks[b"k" * 16].pins == 1  # refused before it changed anything
    await call[DaemonCall.HEALTH]({})  # a probe leads nothing: never fenced
    for bad in (0, -1, "3", True, 2.5):
        with pytest.raises(BadRequest, match="generation is a positive integer"):
            await call[DaemonCall.HEALTH]({"generation": bad})
    await call[DaemonCall.MARK]({**mark, "generation": 7})  # a newer leader
    assert fence.newest == 7
