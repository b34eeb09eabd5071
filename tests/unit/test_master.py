"""The master's logic over in-process fake daemons: two-phase puts, leases, tier moves,
failures reported per key, roles. No processes, no network; ``check`` after mutations."""

from __future__ import annotations

import asyncio
import dataclasses
import time

import numpy as np
import pytest

from kvpool.codec import make_header
from kvpool.config import MasterConfig
from kvpool.coordinator import InProcessCoordinator
from kvpool.daemon_link import InventoryPage, InventoryRequest, StoredBlock, TierDescription
from kvpool.errors import (ArenaBusy, BadRequest, BlockLeased, KVPoolError, NodeGone, NotLeader, NotReady,
                           ReservationLost, TierFull, TooManyPending)
from kvpool.keys import BlockKey
from kvpool.protocol import ReadGrant, ReserveStatus
from kvpool.tiers.base import TierKind
from master import removal
from master.core import MasterCore, Role
from master.index import BlockEntry, BlockState, Replica, StateError
from master.policy import POLICIES
from tests.unit.fake_daemon import FakeDaemon

KiB = 1024
BLOCK = 64 * KiB


def key(i: int) -> BlockKey:
    return i.to_bytes(16, "little")


def fake(node_id: str, host: int = 16 * BLOCK, gpu: int = 0, ssd: int = 1024 * BLOCK) -> FakeDaemon:
    tiers = [TierDescription(TierKind.HOST, host, address=1 << 40)]
    if gpu:
        tiers.insert(0, TierDescription(TierKind.GPU, gpu, address=1 << 44, mem_type="VRAM"))
    if ssd:
        tiers.append(TierDescription(TierKind.SSD, ssd))
    return FakeDaemon(node_id, tiers)


async def master(*daemons: FakeDaemon, **cfg: object) -> MasterCore:
    by_url = {d.url: d for d in daemons}
    core = MasterCore(MasterConfig(**cfg), InProcessCoordinator(),  # type: ignore[arg-type]
                      connect=lambda url: by_url[url])
    for d in daemons:
        await core.members.join(d.registration_now())
    return core


async def put(core: MasterCore, keys: list[BlockKey], size: int = BLOCK) -> list[ReserveStatus]:
    put_id, items = await core.puts.reserve(keys, [size] * len(keys), [], None)
    new = [k for k, item in zip(keys, items) if item.status is ReserveStatus.NEW]
    header = make_header(np.zeros(size, np.uint8), "uint8").encode()
    if new:
        assert await core.puts.commit(put_id, new, [header] * len(new)) == len(new)
    return [item.status for item in items]


async def nine_blocks_in_ten() -> tuple[FakeDaemon, MasterCore, list[BlockKey]]:
    """A host arena of 10 blocks holding 9, over its 0.8 high watermark (low: 0.5). Plain
    LRU: the default policy keeps the trailing block of a put (each of these one-block
    puts) out of the cold tiers."""
    d = fake("n1", host=10 * BLOCK)
    core = await master(d, host_high=0.8, host_low=0.5, policy="lru")
    keys = [key(i) for i in range(9)]
    for k in keys:
        await put(core, [k])
    return d, core, keys


def tiers_of(core: MasterCore, k: BlockKey) -> list[TierKind]:
    entry = core.state.index.readable(k)
    return sorted((r.tier for r in entry.replicas), key=lambda t: t.rank) if entry else []


async def test_a_put_is_invisible_until_the_daemon_recorded_it() -> None:
    d = fake("n1")
    core = await master(d)
    put_id, [item] = await core.puts.reserve([key(1)], [BLOCK], [], None)
    assert item.status is ReserveStatus.NEW and item.locations[0].node == "n1"
    assert await core.reads.exists([key(1)]) == [False] and d.held[TierKind.HOST] == {}
    assert (await core.reads.get([key(1)]))[1] == [None]
    assert await put(core, [key(1)]) == [ReserveStatus.IN_FLIGHT]  # a second writer waits
    header = make_header(np.zeros(BLOCK, np.uint8), "uint8").encode()
    assert await core.puts.commit(put_id, [key(1)], [header]) == 1
    assert key(1) in d.held[TierKind.HOST]
    assert await core.reads.exists([key(1)]) == [True]
    assert await put(core, [key(1)]) == [ReserveStatus.EXISTS]
    await core.check()


async def test_check_names_what_a_daemon_lost_or_holds_unknown_not_what_lands_meanwhile() -> None:
    """An inventory is one moment's snapshot and the index goes on changing while its pages
    come: a put committed meanwhile is on one side only, every time the check reads it,
    and is no fault; a block the daemon lost, one it holds unindexed, or one elsewhere in
    the arena is, and the check names it."""
    d = fake("n1", host=64 * BLOCK)
    core = await master(d, inventory_page=1)
    await put(core, [key(1), key(2), key(3)])
    served, landed = d.inventory, [10]

    async def paged_under_load(req: InventoryRequest) -> InventoryPage:
        page = await served(req)
        if req.offset == 0:  # the snapshot is taken: a writer commits before the next page
            landed[0] += 1
            assert await put(core, [key(landed[0])]) == [ReserveStatus.NEW]
        return page

    d.inventory = paged_under_load  # type: ignore[method-assign]
    await core.check()
    await core.check()
    assert landed[0] >= 12 and await core.reads.exists([key(11), key(12)]) == [True, True]
    d.inventory = served  # type: ignore[method-assign]

    host = d.held[TierKind.HOST]
    lost = host.pop(key(1))
    with pytest.raises(AssertionError, match=f"{key(1).hex()} is indexed on n1/host, which lacks it"):
        await core.check()
    host[key(1)] = dataclasses.replace(lost, location=lost.location + BLOCK)
    with pytest.raises(AssertionError, match=f"{key(1).hex()}: location differs"):
        await core.check()
    host[key(1)] = lost
    host[key(99)] = dataclasses.replace(lost, key=key(99), location=60 * BLOCK)
    with pytest.raises(AssertionError, match=f"n1 holds 1 blocks the index does not know, "
                                             f"e.g. {key(99).hex()}"):
        await core.check()
    del host[key(99)]
    await core.check()


async def test_a_commit_whose_daemon_fails_leaves_nothing_visible_and_frees_the_space() -> None:
    d = fake("n1")
    core = await master(d)
    put_id, _ = await core.puts.reserve([key(1), key(2)], [BLOCK, BLOCK], [], None)
    d.down = True
    header = make_header(np.zeros(BLOCK, np.uint8), "uint8").encode()
    with pytest.raises(NodeGone, match="could not record"):
        await core.puts.commit(put_id, [key(1), key(2)], [header, header])
    d.down = False
    assert await core.reads.exists([key(1), key(2)]) == [False, False]
    assert core.state.nodes["n1"].tiers[TierKind.HOST].used == 0
    await core.check()


async def test_both_copies_are_recorded_at_once_and_undone_together_when_one_node_fails() -> None:
    """A put of two copies waits for both daemons' records side by side; when one fails,
    the other's record is dropped again: nothing visible, no daemon holds a stray block."""
    d1, d2 = fake("n1"), fake("n2")
    core = await master(d1, d2)
    header = make_header(np.zeros(BLOCK, np.uint8), "uint8").encode()
    put_id, _ = await core.puts.reserve([key(1)], [BLOCK], [], None, replicas=2)
    d1.hold["adopt"], d2.hold["adopt"] = asyncio.Event(), asyncio.Event()
    committing = asyncio.create_task(core.puts.commit(put_id, [key(1)], [header]))
    await asyncio.sleep(0.05)
    assert d1.calls.count("adopt") == d2.calls.count("adopt") == 1  # both asked, neither answered
    d2.lose_answers.add("adopt")
    d1.hold.pop("adopt").set()
    d2.hold.pop("adopt").set()
    with pytest.raises(NodeGone, match="could not record"):
        await committing
    assert await core.reads.exists([key(1)]) == [False]
    assert not d1.held[TierKind.HOST] and not d2.held[TierKind.HOST]
    await core.check()


async def test_a_commit_a_daemon_fences_off_is_not_leader_and_leaves_no_copy_anywhere() -> None:
    """A daemon that a newer leader has been to refuses this master's record (it believes
    it leads, its lease ended early): the writer is sent to find the leader, and the other
    node's copy goes again, so no daemon holds a block the new leader never saw."""
    d1, d2 = fake("n1"), fake("n2")
    core = await master(d1, d2)
    header = make_header(np.zeros(BLOCK, np.uint8), "uint8").encode()
    put_id, _ = await core.puts.reserve([key(1)], [BLOCK], [], None, replicas=2)
    d2.deposed = True
    with pytest.raises(NotLeader, match="node n2 refused this master's commit"):
        await core.puts.commit(put_id, [key(1)], [header])
    assert await core.reads.exists([key(1)]) == [False]
    assert not d1.held[TierKind.HOST] and not d2.held[TierKind.HOST]
    assert d2.calls.count("drop") == 0  # it recorded nothing, so it is asked to drop nothing


async def test_a_commit_with_a_wrong_header_is_refused_and_rolled_back() -> None:
    core = await master(fake("n1"))
    put_id, _ = await core.puts.reserve([key(1)], [BLOCK], [], None)
    small = make_header(np.zeros(BLOCK // 2, np.uint8), "uint8").encode()
    with pytest.raises(BadRequest, match="were reserved"):
        await core.puts.commit(put_id, [key(1)], [small])
    assert core.state.index.get(key(1)) is None
    await core.check()


async def test_abandoned_reservations_are_reclaimed_after_their_deadline() -> None:
    core = await master(fake("n1"), put_timeout_s=5.0)
    await core.puts.reserve([key(1)], [BLOCK], [], None)
    assert core.puts.reclaim(time.monotonic()) == 0
    assert core.puts.reclaim(time.monotonic() + 6.0) == 1
    assert core.state.nodes["n1"].tiers[TierKind.HOST].used == 0
    await core.check()


async def test_a_reservation_that_waited_for_room_is_held_from_its_answer() -> None:
    """A reserve that waits on demotions to make room hands the writer the whole hold:
    counted from the start, a wait longer than the hold would answer a closed window."""
    d = fake("n1", host=10 * BLOCK)
    core = await master(d, host_high=0.8, host_low=0.5, policy="lru", put_timeout_s=1.0)
    for i in range(10):
        await put(core, [key(i)])
    d.hold["copy"] = asyncio.Event()
    reserving = asyncio.create_task(core.puts.reserve([key(99)], [BLOCK], [], None))
    await asyncio.sleep(1.2)  # longer than the hold
    d.hold.pop("copy").set()
    _, items = await reserving
    answered = time.monotonic()
    assert items[0].status is ReserveStatus.NEW
    assert core.puts.reclaim(answered) == 0
    assert core.state.index.get(key(99)).deadline >= answered + 0.9  # type: ignore[union-attr]
    await core.check()


async def test_grants_kept_for_hot_reads_pin_at_most_their_share_of_an_arena() -> None:
    """Clients keep only the grants the master allows, so hot reads cannot pin the room
    that puts and promotions need; a handed-back lease frees its share for the next."""
    core = await master(fake("n1", host=100 * BLOCK), kept_grants_share=0.05)  # 5 blocks
    keys = [key(i) for i in range(8)]
    await put(core, keys)
    leases, kept = [], []
    for k in keys:
        lease, [grant] = await core.reads.get([k])
        assert grant is not None
        leases.append(lease)
        kept.append(core.reads.keep(lease, k))
    assert [s > 0 for s in kept] == [True] * 5 + [False] * 3
    assert all(s <= core.cfg.read_lease_s / 2 for s in kept)
    core.leases.release(leases[:1] + leases[5:])
    lease, _ = await core.reads.get([keys[0]])
    assert core.reads.keep(lease, keys[0]) > 0 and core.leases.kept == 5
    assert core.reads.keep(lease, keys[0]) == 0  # once per lease


async def test_pressure_demotes_the_coldest_unleased_blocks_and_keeps_them_readable() -> None:
    d, core, keys = await nine_blocks_in_ten()
    lease, _ = await core.reads.get([keys[0]])  # the coldest block, but a reader holds it
    await core.sweep()
    host = core.state.nodes["n1"].tiers[TierKind.HOST]
    assert host.used <= 0.5 * host.capacity
    assert tiers_of(core, keys[0]) == [TierKind.HOST]  # leased: not moved
    moved = [k for k in keys if tiers_of(core, k) == [TierKind.SSD]]
    assert moved == keys[1:1 + len(moved)] and len(moved) >= 4  # coldest first
    assert all(k in d.held[TierKind.SSD] and k not in d.held[TierKind.HOST] for k in moved)
    core.leases.release([lease])
    await core.check()
    # A read of a demoted block promotes it back into the host arena.
    _, [grant] = await core.reads.get([moved[0]])
    assert grant is not None and grant.location.mem_type == "DRAM"
    assert TierKind.HOST in tiers_of(core, moved[0])
    await core.check()


async def test_the_last_tier_drops_blocks_unread_for_its_ttl_and_keeps_read_or_pinned_ones() -> None:
    """With ``last_tier_ttl_s``, a sweep removes the last tier's blocks unread for that
    long, and only those: not one read since, written since, hard-pinned or leased."""
    ttl = 0.4
    d = fake("n1", host=32 * BLOCK, ssd=0)  # the host arena is the last tier
    core = await master(d, last_tier_ttl_s=ttl)
    old, young = [key(i) for i in range(1, 7)], [key(i) for i in range(11, 14)]
    await put(core, old)
    await core.sweep()  # notes the tier's clock: what came before it is what may go
    await asyncio.sleep(ttl / 2)
    await put(core, young)
    assert await core.leases.pin(old[1:2]) == 1
    held, _ = await core.reads.get([old[2]])  # read now, and the lease held
    read, _ = await core.reads.get([old[3]])  # read now
    core.leases.release([read])
    await asyncio.sleep(ttl * 0.75)
    await core.sweep()
    gone = [k for k in old + young if core.state.index.get(k) is None]
    assert gone == [old[0], old[4], old[5]], [k.hex() for k in gone]
    assert all(k not in d.held[TierKind.HOST] for k in gone)
    assert core.state.counters["expired"] == 3
    await core.check()
    core.leases.release([held])
    await asyncio.sleep(ttl)
    await core.sweep()  # now the read and the young ones are unread for the TTL too
    assert [k for k in old + young if core.state.index.get(k) is not None] == [old[1]]  # pinned
    assert core.state.counters["expired"] == 8
    await core.check()


async def test_pressure_on_one_chain_evicts_from_its_end_and_keeps_a_whole_prefix() -> None:
    # One leaf at a time: each eviction makes the block before it the next leaf, so the
    # relief runs in rounds rather than cutting the chain in the middle.
    d = fake("n1", host=10 * BLOCK, ssd=0)
    core = await master(d, host_high=0.8, host_low=0.5)
    keys = [key(i) for i in range(9)]
    put_id, _ = await core.puts.reserve(keys, [BLOCK] * 9, [None, *keys[:-1]], None)
    header = make_header(np.zeros(BLOCK, np.uint8), "uint8").encode()
    await core.puts.commit(put_id, keys, [header] * 9)
    await core.sweep()
    host = core.state.nodes["n1"].tiers[TierKind.HOST]
    assert host.used <= 0.5 * host.capacity
    kept = [k for k in keys if core.state.index.readable(k) is not None]
    assert kept == keys[:len(kept)] and len(kept) == 5
    await core.check()


async def test_a_full_destination_leaves_the_block_where_it_is() -> None:
    d, core, keys = await nine_blocks_in_ten()
    d.full.add(TierKind.SSD)
    await core.sweep()
    assert all(tiers_of(core, k) == [TierKind.HOST] for k in keys)  # nothing lost
    assert core.state.counters["move_failed_ssd"] > 0
    await core.check()


async def test_a_corrupt_cold_replica_is_dropped_and_read_as_a_miss() -> None:
    d, core, keys = await nine_blocks_in_ten()
    await core.sweep()
    cold = next(k for k in keys if tiers_of(core, k) == [TierKind.SSD])
    d.corrupt.add((TierKind.SSD, cold))
    assert (await core.reads.get([cold]))[1] == [None]
    assert core.state.index.get(cold) is None
    assert core.state.counters["dropped_checksum_mismatch"] == 1
    await core.check()


async def test_gpu_blocks_demote_into_distinct_host_offsets() -> None:
    d = fake("n1", gpu=8 * BLOCK, host=64 * BLOCK)
    core = await master(d, gpu_high=0.7, gpu_low=0.2)
    keys = [key(i) for i in range(7)]
    for k in keys:
        await put(core, [k])
    assert all(tiers_of(core, k) == [TierKind.GPU] for k in keys)
    await core.sweep()
    on_host = [k for k in keys if tiers_of(core, k) == [TierKind.HOST]]
    assert len(on_host) >= 4
    offsets = [d.held[TierKind.HOST][k].location for k in on_host]
    assert len(set(offsets)) == len(offsets)
    await core.check()


async def test_removal_respects_pins_and_leases_unless_forced() -> None:
    d = fake("n1")
    core = await master(d)
    await put(core, [key(1), key(2)])
    await core.leases.pin([key(1)])
    with pytest.raises(BlockLeased, match="pinned"):
        await removal.remove(core.state, [key(1), key(2)], force=False)
    assert await core.reads.exists([key(1), key(2)]) == [True, True]  # nothing removed
    assert await removal.remove(core.state, [key(1), key(2), key(3)], force=True) == [True, True, False]
    assert d.held[TierKind.HOST] == {}
    assert core.state.nodes["n1"].tiers[TierKind.HOST].used == 0
    await core.check()


async def test_a_node_that_leaves_takes_its_replicas_out_of_the_index_at_once() -> None:
    a, b = fake("a"), fake("b")
    core = await master(a, b)
    put_id, items = await core.puts.reserve([key(1)], [BLOCK], [], "a", replicas=2)
    assert sorted(loc.node for loc in items[0].locations) == ["a", "b"]
    header = make_header(np.zeros(BLOCK, np.uint8), "uint8").encode()
    await core.puts.commit(put_id, [key(1)], [header])
    await core.members.drop("a", "test")
    _, [grant] = await core.reads.get([key(1)])
    assert grant is not None and grant.location.node == "b"
    await core.check()


async def test_no_room_anywhere_is_tier_full_and_changes_nothing() -> None:
    core = await master(fake("n1", host=4 * BLOCK, ssd=0))
    await put(core, [key(1)])
    await core.leases.pin([key(1)])
    with pytest.raises(TierFull):
        await core.puts.reserve([key(2)], [8 * BLOCK], [], None)
    assert core.state.index.get(key(2)) is None
    await core.check()


async def test_roles_gate_calls_and_change_only_along_their_transitions() -> None:
    core = MasterCore(MasterConfig(), InProcessCoordinator(), clustered=True,
                      leader_url=lambda: "http://other:7700")
    assert core.role is Role.STANDBY
    with pytest.raises(NotLeader, match="http://other:7700"):
        core.gate()
    await core.begin_term()
    with pytest.raises(NotReady):
        core.gate()
    core.rebuilt()
    core.gate()
    with pytest.raises(AssertionError, match="cannot become"):
        core.rebuilt()
    await core.end_term()
    assert core.role is Role.STANDBY


def test_block_states_move_only_along_their_transitions() -> None:
    entry = BlockEntry(key(1), BLOCK, BlockState.PENDING, [Replica("n1", TierKind.HOST, 0, BLOCK)])
    with pytest.raises(StateError, match="is pending; moving it to moving expects complete"):
        entry.advance(BlockState.MOVING, BlockState.COMPLETE)
    entry.advance(BlockState.COMPLETE, BlockState.PENDING)
    entry.advance(BlockState.MOVING, BlockState.COMPLETE)
    assert entry.state.readable
    entry.advance(BlockState.REMOVED, BlockState.MOVING)
    with pytest.raises(StateError, match="is removed"):
        entry.advance(BlockState.COMPLETE, BlockState.REMOVED)


def test_an_inherited_lease_holds_until_its_end_beside_the_block_s_own() -> None:
    now = time.monotonic()
    a, b = (BlockEntry(key(i), BLOCK, BlockState.COMPLETE, []) for i in (1, 2))
    for entry in (a, b):
        entry.inherit(now + 10)
    assert a.leased(now) and not a.movable(now) and not a.leased(now + 11)
    b.leases[7] = now + 20  # a lease of this term on top: both count, each to its end
    assert b.leased(now + 11) and not b.leased(now + 21)
    b.drop_lease(7)
    assert not b.leased(now)


async def test_prefix_links_come_back_from_the_inventory_after_a_restart() -> None:
    """A new master (or a restarted one) rebuilds parent links from the blocks' headers:
    leaves still go before the blocks they chain from."""
    d = fake("n1", host=10 * BLOCK)
    first = await master(d)
    put_id, _ = await first.puts.reserve([key(1), key(2), key(3)], [BLOCK] * 3,
                                          [None, key(1), key(2)], None)
    headers = [make_header(np.zeros(BLOCK, np.uint8), "uint8", parent=p).encode()
               for p in (None, key(1), key(2))]
    await first.puts.commit(put_id, [key(1), key(2), key(3)], headers)
    d.held[TierKind.HOST] = dict(reversed(list(d.held[TierKind.HOST].items())))  # any order
    again = await master(d)
    assert again.state.index.get(key(3)).parent == key(2)
    now = time.monotonic()
    assert [e.key for e in again.state.index.coldest("n1", TierKind.HOST, now)] == [key(3), key(2), key(1)]
    await again.check()


async def test_a_client_s_uncommitted_puts_are_bounded_and_partial_aborts_do_not_hide_them() -> None:
    d = fake("n1", host=64 * BLOCK)
    core = await master(d, client_max_puts=3, client_max_reserved=0.25)
    held = []
    for i in range(3):
        held.append((await core.puts.reserve([key(i)], [BLOCK], [], None, owner=1))[0])
    with pytest.raises(TooManyPending, match="client_max_puts"):
        await core.puts.reserve([key(9)], [BLOCK], [], None, owner=1)
    await core.puts.reserve([key(10)], [BLOCK], [], None, owner=2)  # another client is served
    core.puts.abort(held[0], [])  # naming no key releases nothing
    with pytest.raises(TooManyPending):
        await core.puts.reserve([key(9)], [BLOCK], [], None, owner=1)
    core.puts.abort(held[0], [key(0)])
    put_id, _ = await core.puts.reserve([key(11), key(12)], [8 * BLOCK] * 2, [], None, owner=3)
    with pytest.raises(TooManyPending, match="client_max_reserved"):  # 16 blocks held of 64
        await core.puts.reserve([key(13)], [BLOCK], [], None, owner=3)
    header = make_header(np.zeros(8 * BLOCK, np.uint8), "uint8").encode()
    assert await core.puts.commit(put_id, [key(11), key(12)], [header] * 2) == 2
    await core.puts.reserve([key(13)], [BLOCK], [], None, owner=3)  # committed: allowance back
    await core.check()


async def test_a_resumed_term_keeps_its_own_read_leases_and_leases_nothing_else() -> None:
    """A leader that leads again on the lease it held (a renewal failed, then went through)
    knows every lease granted: only those blocks stay put, so its arenas can still make
    room for puts and for promoting cold blocks. After another master's term, every block
    taken in counts as leased for a lease's length."""
    d = fake("n1", host=4 * BLOCK)
    core = await master(d)
    await put(core, [key(1), key(2)])
    lease, grants = await core.reads.get([key(1)])
    assert grants[0] is not None

    async def lead_again(resumed: bool) -> list[bool]:
        await core.end_term()
        await core.begin_term(resumed)
        await core.members.join(d.registration_now())
        core.rebuilt()
        now = time.monotonic()
        return [core.state.index.get(key(i)).leased(now) for i in (1, 2)]

    assert await lead_again(resumed=True) == [True, False]
    node = core.state.nodes["n1"]
    assert await core.tiering.make_room(node, TierKind.HOST, BLOCK)  # key(2) can move
    assert [r.tier for r in core.state.index.get(key(2)).replicas] == [TierKind.SSD]
    assert [r.tier for r in core.state.index.get(key(1)).replicas] == [TierKind.HOST]
    assert await lead_again(resumed=True) == [True, False]  # still held, through a second one
    core.leases.release([lease])  # a release of the first term's lease still counts
    assert await lead_again(resumed=True) == [False, False]
    assert await lead_again(resumed=False) == [True, True]  # another master's readers, maybe
    await core.check()


async def _until_called(d: FakeDaemon, name: str) -> None:
    for _ in range(1000):
        if name in d.calls:
            return
        await asyncio.sleep(0.001)
    raise AssertionError(f"the daemon was never asked to {name}")


async def test_a_get_while_a_demotion_drops_the_source_is_never_sent_to_reused_space() -> None:
    """A demotion copied its blocks down and is dropping their host replicas, on a daemon
    slow to answer (frozen, loaded): a get arriving meanwhile must be sent where the
    block's bytes stay, never to host space that is about to be handed to another block."""
    d, core, keys = await nine_blocks_in_ten()
    d.hold["drop"] = asyncio.Event()
    sweep = asyncio.create_task(core.sweep())
    await _until_called(d, "drop")
    dropping = [k for k in keys if k in d.held[TierKind.SSD]]
    assert dropping
    reader = asyncio.create_task(core.reads.get([dropping[0]]))
    await asyncio.sleep(0.01)
    d.hold.pop("drop").set()
    await sweep
    _, [grant] = await reader
    await put(core, [key(100 + i) for i in range(4)])  # the freed host space is used again
    host = core.state.nodes["n1"].tiers[TierKind.HOST]
    at = {host.address + r.location: e.key for e in core.state.index.entries.values()
          for r in e.replicas if r.tier is TierKind.HOST}
    assert isinstance(grant, ReadGrant)
    assert at.get(grant.location.address) == dropping[0], "the reader was sent to another block's bytes"
    await core.check()


async def test_a_stored_cold_block_that_cannot_be_promoted_says_why_instead_of_a_miss() -> None:
    d = fake("n1", host=2 * BLOCK)
    core = await master(d, policy="lru")
    await put(core, [key(1)])
    assert await core.tiering.make_room(core.state.nodes["n1"], TierKind.HOST, BLOCK)
    assert tiers_of(core, key(1)) == [TierKind.SSD]
    await put(core, [key(2), key(3)])
    await core.reads.get([key(2), key(3)])  # readers hold the whole host arena
    _, [item] = await core.reads.get([key(1)])
    assert isinstance(item, ArenaBusy) and item.retryable, item
    assert (await core.reads.get([key(9)]))[1] == [None]  # a block never stored: a plain miss
    await core.check()


async def test_a_demotion_in_flight_across_a_term_change_leaves_the_next_term_alone() -> None:
    """A same-process re-lead reuses the pool state: a demotion of the old term whose copy
    answers after the new term rebuilt its index must not drop replicas or free space the
    new term's index holds."""
    d, core, keys = await nine_blocks_in_ten()
    d.hold["copy"] = asyncio.Event()
    sweep = asyncio.create_task(core.sweep())
    await _until_called(d, "copy")
    await core.end_term()
    await core.begin_term(resumed=True)
    await core.members.join(d.registration_now())
    core.rebuilt()
    d.hold.pop("copy").set()
    await sweep
    assert all(k in d.held[TierKind.HOST] for k in keys), "the old term dropped the new term's replicas"
    host = core.state.nodes["n1"].tiers[TierKind.HOST]
    assert all(tiers_of(core, k) == [TierKind.HOST] for k in keys)
    assert host.used == 9 * BLOCK, "the old term freed space the new term's blocks hold"
    # (The old term's copies that landed late are strays to the new one: taken in at the
    # next rebuild, never pointing a reader at wrong bytes.)


async def test_a_commit_that_finishes_after_its_term_ended_is_reservation_lost() -> None:
    d = fake("n1")
    core = await master(d)
    put_id, _ = await core.puts.reserve([key(1)], [BLOCK], [], None)
    header = make_header(np.zeros(BLOCK, np.uint8), "uint8").encode()
    d.hold["adopt"] = asyncio.Event()
    commit = asyncio.create_task(core.puts.commit(put_id, [key(1)], [header]))
    await _until_called(d, "adopt")
    await core.end_term()
    await core.begin_term(resumed=True)
    d.hold.pop("adopt").set()
    with pytest.raises(ReservationLost):
        await commit


async def test_space_a_lost_answer_may_have_filled_is_reused_only_once_settled() -> None:
    """A promotion's copy was carried out but its answer lost (the link cut): the daemon
    may hold the block there, so that space is not handed to the next put; the sweep
    settles it once the call's deadline passed: the daemon forgets it, the space is free."""
    d = fake("n1", host=2 * BLOCK)
    core = await master(d, policy="lru")
    await put(core, [key(1)])
    assert await core.tiering.make_room(core.state.nodes["n1"], TierKind.HOST, BLOCK)
    d.lose_answers.add("copy")
    _, [item] = await core.reads.get([key(1)])
    assert isinstance(item, KVPoolError) and item.retryable, item
    assert key(1) in d.held[TierKind.HOST]  # the daemon did copy it
    d.lose_answers.clear()
    await core.check()  # the held space is accounted for
    host = core.state.nodes["n1"].tiers[TierKind.HOST]
    assert host.used == BLOCK, "space the daemon may still write was handed out again"
    await core.state.settle(time.monotonic() + 60)
    assert key(1) not in d.held[TierKind.HOST] and host.used == 0
    await core.check()
    _, [grant] = await core.reads.get([key(1)])  # and the block reads again
    assert isinstance(grant, ReadGrant)


async def test_a_leader_paused_mid_demotion_drops_nothing_once_its_lease_is_in_doubt() -> None:
    """A leader frozen (SIGSTOP) while a demotion copied: thawed, its lease may have run
    out and another master may serve these daemons; it tells them to forget nothing
    until the election settles it, and nothing at all once its term ended."""
    d, core, keys = await nine_blocks_in_ten()
    d.hold["copy"] = asyncio.Event()
    sweep = asyncio.create_task(core.sweep())
    await _until_called(d, "copy")
    core.lease_sure = lambda: False  # thawed past its lease
    d.hold.pop("copy").set()
    await asyncio.sleep(0.2)
    assert "drop" not in d.calls and not sweep.done()
    await core.end_term()  # the election says: another leads
    await sweep
    assert "drop" not in d.calls
    assert all(k in d.held[TierKind.HOST] for k in keys)


async def test_a_put_that_got_fewer_copies_than_asked_is_queued_for_more() -> None:
    """No room on a second node at put time: the block is stored with one copy, and the
    re-replication sweep is told it is short, so a later loss of that node's copy is not
    the loss of the block."""
    n1, n2 = fake("n1", host=4 * BLOCK), fake("n2", host=BLOCK)
    core = await master(n1, n2)
    put_id, items = await core.puts.reserve([key(1), key(2)], [BLOCK] * 2, [], None, replicas=2)
    assert [i.replicas for i in items] == [2, 1]  # n2 had room for one block only
    header = make_header(np.zeros(BLOCK, np.uint8), "uint8").encode()
    assert await core.puts.commit(put_id, [key(1), key(2)], [header] * 2) == 2
    assert core.state.short == {key(2)}


async def test_a_daemon_holding_records_the_index_forgot_is_reconciled() -> None:
    """A daemon kept a block the index forgot (its drop was never confirmed): it refuses
    the next block the master places there. The next sweep has it forget what the index
    does not hold, and the put goes through again."""
    d = fake("n1", host=1 * BLOCK)
    core = await master(d)
    header = make_header(np.zeros(BLOCK, np.uint8), "uint8").encode()
    d.held[TierKind.HOST][key(99)] = StoredBlock(key(99), TierKind.HOST, 0, BLOCK, header)
    with pytest.raises(NodeGone):
        await put(core, [key(1)])
    assert core.state.diverging == {"n1"}
    await core.sweep()
    assert key(99) not in d.held[TierKind.HOST]
    await put(core, [key(1)])
    await core.check()


@pytest.mark.parametrize("policy", sorted(POLICIES))
async def test_room_for_many_callers_at_once_walks_the_eviction_order_once_per_batch(policy: str) -> None:
    """Many callers need room in a full arena at once while demotions are in flight (puts
    and promotions under pressure). One walk of the eviction order serves a batch of them,
    so the entries visited grow with the blocks moved. A walk per caller stepped over every
    block already in flight each time (callers x blocks moving): on a live pool that
    starved the master's loop until the daemon's membership lease expired."""
    small, n, callers = 4 * KiB, 2000, 256
    d = fake("n1", host=n * small, ssd=4 * n * small)
    core = await master(d, host_high=0.9, host_low=0.5, client_max_reserved=1.0, policy=policy)
    keys = [key(i) for i in range(n)]
    for at in range(0, n, 200):
        await put(core, keys[at:at + 200], size=small)
    index = core.state.index
    walk, visited = index.coldest, [0]

    def counted(*args, **kwargs):
        for entry in walk(*args, **kwargs):
            visited[0] += 1
            yield entry

    index.coldest = counted  # type: ignore[method-assign]
    d.hold["copy"] = asyncio.Event()  # every demotion stays in flight until released
    node = core.state.nodes["n1"]
    tasks = [asyncio.create_task(core.tiering.make_room(node, TierKind.HOST, small))
             for _ in range(callers)]
    await _until_called(d, "copy")
    for _ in range(5):
        await asyncio.sleep(0)
    assert visited[0] <= 3 * callers, f"{visited[0]} entries visited to make room for {callers} blocks"
    d.hold.pop("copy").set()
    assert all(await asyncio.gather(*tasks))
    host = node.tiers[TierKind.HOST]
    in_ssd = [k for k in keys if tiers_of(core, k) == [TierKind.SSD]]
    assert callers * small <= n * small - host.used == len(in_ssd) * small
    assert all(index.readable(k) is not None for k in keys)  # moved, nothing lost
    await core.check()
