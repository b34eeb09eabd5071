"""Leader election among masters through the coordinator: a leased ``master/leader`` key.

A master campaigns by creating the key (only if absent) under a lease of its own. The
leader renews that lease a few times per TTL and steps down the moment a renewal fails:
after that it cannot know whether the key is still its own. Standbys poll the key and
campaign as soon as it is gone. A leader that renews again (etcd came back with the
lease intact) leads again, through the same rebuild as a new leader.

A leader also knows until when its lease surely holds (the last renewal's start plus
the TTL): one that was paused (SIGSTOP, a stalled VM) past that serves nothing until it
has asked etcd again, since a standby may lead by then. That bound is not enough: etcd
3.4 before 3.4.28 revokes every lease early when its own raft leader resumes from a pause
(etcd-io/etcd#15247), so a deposed master may believe it leads for up to a TTL. Each term
therefore takes the next leader generation, counted in etcd; its calls to daemons carry
it, and a daemon refuses an older one than it has seen (kvpool.daemon_link.Fence).
"""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import suppress
from typing import Awaitable, Callable

from kvpool.coordinator import Coordinator
from kvpool.errors import KVPoolError, LeaseExpired
from kvpool.keyspace import Keyspace

log = logging.getLogger(__name__)


class Election:
    """Campaign forever; ``on_gain``/``on_loss`` run as leadership starts and ends
    (``on_gain`` is told whether the term resumes on the lease held before, and the term's
    leader generation)."""

    def __init__(self, coord: Coordinator, cluster: str, me: str, ttl_s: float,
                 on_gain: Callable[[bool, int], Awaitable[None]],
                 on_loss: Callable[[], Awaitable[None]]) -> None:
        self.coord = coord
        self.key = Keyspace(cluster).leader
        self.generation_key = Keyspace(cluster).generation
        self.me = me
        self.ttl_s = ttl_s
        self.poll_s = min(0.25, ttl_s / 8)
        self._on_gain, self._on_loss = on_gain, on_loss
        self.leading = False
        self.leader_url = ""  # the leader as last seen; empty while there is none
        self._lease: int | None = None
        self._held_until = 0.0  # monotonic: the lease surely holds until then

    @property
    def sure(self) -> bool:
        """Leading, with a lease that cannot have run out yet."""
        return self.leading and time.monotonic() < self._held_until

    async def run(self) -> None:
        try:
            while True:
                try:
                    await self._step()
                except LeaseExpired:
                    self._lease = None
                    await self._lose("its lease expired")
                except KVPoolError as exc:
                    await self._lose(f"etcd did not answer: {exc}")
                    await asyncio.sleep(self.poll_s)
        finally:
            if self._lease is not None:  # a clean stop hands over at once
                with suppress(KVPoolError, asyncio.CancelledError):
                    await asyncio.shield(self.coord.revoke(self._lease))
                self._lease = None

    async def _step(self) -> None:
        if self._lease is None:
            holder = await self.coord.get(self.key)
            if holder is None:
                asked = time.monotonic()
                lease = await self.coord.grant_lease(self.ttl_s)
                if await self.coord.compare_and_set(self.key, None, self.me.encode(), lease):
                    self._lease = lease
                    self._held_until = asked + self.ttl_s
                    await self._gain(resumed=False)
                    return
                await self.coord.revoke(lease)
                holder = await self.coord.get(self.key)
            self.leader_url = holder.decode() if holder else ""
            await asyncio.sleep(self.poll_s)
            return
        await asyncio.sleep(self.ttl_s / 4 if self.leading else self.poll_s)
        asked = time.monotonic()
        await self.coord.keepalive(self._lease)
        self._held_until = asked + self.ttl_s
        if not self.leading:  # renewed again after a failure: lead again if the key is ours
            if await self.coord.get(self.key) == self.me.encode():
                await self._gain(resumed=True)
            else:
                await self.coord.revoke(self._lease)
                self._lease = None

    async def _gain(self, resumed: bool) -> None:
        """``resumed``: on the lease held before, so no other master led meanwhile."""
        generation = await self._next_generation()
        self.leading, self.leader_url = True, self.me
        log.info("%s is the leader%s (generation %d)", self.me,
                 " again (its lease held)" if resumed else "", generation)
        await self._on_gain(resumed, generation)

    async def _next_generation(self) -> int:
        """Count this term in etcd: one more than any term before, whoever led it. Only
        the holder of the leader key counts, but the count is a compare-and-set anyway."""
        while True:
            raw = await self.coord.get(self.generation_key)
            try:
                generation = int(raw or b"0") + 1
            except ValueError:
                why = (f"{self.generation_key} holds {raw!r}, not a count of terms: put a number "
                       "there above any term led so far (daemons refuse a lower one)")
                log.error("%s cannot lead: %s", self.me, why)
                raise KVPoolError(why) from None
            if await self.coord.compare_and_set(self.generation_key, raw, str(generation).encode()):
                return generation

    async def _lose(self, why: str) -> None:
        if self.leading:
            self.leading, self.leader_url = False, ""
            log.warning("%s steps down: %s", self.me, why)
            await self._on_loss()
