"""The master's core: one pool state, the rooms that operate on it, and the gate.

Each concept has its own module: puts (two-phase puts, reclaim), leases (read leases,
pins), reads (get, exists, match), removal, tiering (watermarks, demotion, promotion,
eviction), membership, events, check. The core only decides whether a call may be served
(its role: a ready leader serves, a rebuilding one says NotReady, a standby NotLeader),
starts and ends terms, and runs the periodic sweep.
"""

from __future__ import annotations

import enum
import logging
import time
from typing import Callable

from kvpool.config import MasterConfig
from kvpool.coordinator import Coordinator
from kvpool.errors import NotLeader, NotReady
from kvpool.keys import BlockKey
from master.check import busy, check
from master.drain import Drains
from master.leases import Leases
from master.membership import LinkFactory, Membership
from master.puts import Puts
from master.reads import Reads
from master.replication import Replication
from master.state import PoolState
from master.tiering import Tiering

log = logging.getLogger(__name__)


class Role(enum.Enum):
    LEADER = "leader"  # serves
    REBUILDING = "rebuilding"  # elected, pulling the daemons' inventories: NotReady
    STANDBY = "standby"  # another master leads (or none yet): NotLeader

    @property
    def leads(self) -> bool:
        return self is not Role.STANDBY


_ROLE_CHANGES = {Role.STANDBY: {Role.REBUILDING}, Role.REBUILDING: {Role.LEADER, Role.STANDBY},
                 Role.LEADER: {Role.STANDBY}}


class MasterCore:
    def __init__(self, cfg: MasterConfig, coordinator: Coordinator, *, clustered: bool = False,
                 leader_url: Callable[[], str] = lambda: "",
                 connect: LinkFactory | None = None,
                 lease_sure: Callable[[], bool] = lambda: True) -> None:
        self.cfg = cfg
        self.coord = coordinator
        self.state = PoolState(cfg)
        self.leases = Leases(self.state)
        self.tiering = Tiering(self.state)
        self.puts = Puts(self.state, self.tiering)
        self.reads = Reads(self.state, self.leases, self.tiering)
        self.members = Membership(self.state, coordinator, clustered, connect)
        self.drains = Drains(self.state, self.tiering, self.members)
        self.replication = Replication(self.state, self.tiering, self.members)
        self.clustered = clustered
        self.leader_url = leader_url  # with etcd: the leader as last seen, for NotLeader
        self.lease_sure = lease_sure  # with etcd: whether the leader's lease surely holds
        self.state.sure = lambda: self.lease_sure()
        # A single master leads from the start; with etcd it waits to be elected.
        self.role = Role.STANDBY if clustered else Role.LEADER
        self._carried: dict[int, tuple[float, list[BlockKey]]] = {}  # the last term's read leases

    def _become(self, role: Role) -> None:
        """Change role along _ROLE_CHANGES only (ending a term twice is harmless)."""
        if not (role is self.role is Role.STANDBY) and role not in _ROLE_CHANGES[self.role]:
            raise AssertionError(f"a master that is {self.role.value} cannot become {role.value}")
        self.role = role

    def gate(self) -> None:
        """Engines' and daemons' calls are served by a ready leader only."""
        if self.role is Role.STANDBY:
            url = self.leader_url()
            where = f"the leader is {url}" if url else "no leader is elected yet"
            raise NotLeader(f"this master is a standby; {where}")
        if not self.lease_sure():
            raise NotLeader("this master's leadership lease may have run out (was it paused?); "
                            "it is asking etcd again: retry, or find the leader through etcd")
        if self.role is Role.REBUILDING:
            raise NotReady("this master was just elected and is rebuilding its index from the "
                           "daemons' inventories; retry in a moment")

    async def begin_term(self, resumed: bool = False, generation: int = 0) -> None:
        """Leadership starts: forget everything; the index is rebuilt from the daemons.
        ``resumed``: this master leads again on the etcd lease it held (no other master led
        meanwhile), so the read leases it granted, kept since its last term, are all there
        are (master.leases). ``generation``: the term's (master.election), carried by every
        call to a daemon; 0 (one master, no etcd) fences nothing."""
        table = self._carried if resumed else None
        await self.end_term()
        carried: dict[BlockKey, dict[int, float]] | None = None
        if table is not None:
            self.leases.resume(table)
            carried = {}
            for lease, (expiry, keys) in table.items():
                for key in keys:
                    carried.setdefault(key, {})[lease] = expiry
        self.state.new_term(carried, generation)
        self._become(Role.REBUILDING)

    def rebuilt(self) -> None:
        self._become(Role.LEADER)

    async def end_term(self) -> None:
        """Leadership ends: serve nothing, hold no links. Reservations of the term are lost;
        its read leases are remembered, for a term that resumes it."""
        if self.role is not Role.STANDBY:
            self._carried = self.leases.in_force()
        self._become(Role.STANDBY)
        await self.reads.clear()
        await self.drains.clear()
        nodes = list(self.state.nodes.values())
        self.state.clear()
        self.leases.clear()
        self.tiering.clear()
        self.puts.clear()
        for node in nodes:
            await node.link.close()

    async def sweep(self) -> None:
        """Free the space of calls whose outcome was unknown, reclaim abandoned
        reservations, expire leases, relieve tiers over their watermark, copy again some
        blocks short of their replica count."""
        now = time.monotonic()
        await self.state.settle(now)
        if self.state.diverging:
            await self.state.reconcile(lambda: busy(self.state))
        self.puts.reclaim(now)
        self.leases.expire(now)
        await self.tiering.sweep()
        await self.replication.sweep()

    async def check(self) -> dict[str, int]:
        return await check(self.state)

    async def close(self) -> None:
        await self.reads.clear()
        await self.drains.clear()
        for node in list(self.state.nodes.values()):
            await node.link.close()
