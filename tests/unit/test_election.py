"""Leader election over the in-process coordinator (the same interface etcd serves): one
leader at a time, a standby takes over when the leader's lease lapses or it stops."""

from __future__ import annotations

import asyncio

from kvpool.coordinator import InProcessCoordinator
from kvpool.keyspace import Keyspace
from master.election import Election


class Candidate:
    def __init__(self, coord: InProcessCoordinator, name: str, ttl: float = 0.4) -> None:
        self.log: list[str] = []
        self.election = Election(coord, "t", name, ttl, self.gain, self.lose)
        self.task = asyncio.get_running_loop().create_task(self.election.run())

    async def gain(self, resumed: bool) -> None:
        self.log.append("resume" if resumed else "gain")

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
    await a.stop()
    await b.stop()
    await coord.close()
