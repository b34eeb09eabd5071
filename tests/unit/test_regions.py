"""Tenants' arena regions over in-process fake daemons: the layout is a pure function of
the shares and the capacity, each region allocates on its own, a tenant's blocks land
inside its region, a full region demotes that region's blocks only, a rebuilt master finds
the same regions, and each region's clients get that region's metadata only."""

from __future__ import annotations

import pytest

from kvpool.config import MasterConfig, TenantConfig
from kvpool.daemon_link import ArenaRegion
from kvpool.errors import BadRequest, ConfigError
from kvpool.tiers.base import TierKind
from master.regions import COMMON, Region, RegionAllocator, layout
from tests.unit.test_master import BLOCK, fake, key, master
from tests.unit.test_master import put as put_sized
from tests.unit.test_tenants import put

KiB = 1024
TENANTS = (TenantConfig(name="b", token="tb", arena_share=0.25),
           TenantConfig(name="a", token="ta", arena_share=0.25),
           TenantConfig(name="c", token="tc"))  # no share: the common region


def test_the_layout_follows_names_and_shares_and_keeps_the_rest_common() -> None:
    regions = layout(1000 * KiB + 123, 4 * KiB, {"b": 0.25, "a": 0.25, "z": 0.0})
    assert [r.name for r in regions] == ["a", "b", COMMON]
    assert [r.offset for r in regions] == [0, 248 * KiB, 496 * KiB]
    assert all(r.offset % (4 * KiB) == 0 and r.size % (4 * KiB) == 0 for r in regions)
    assert regions[-1].end == 1000 * KiB  # the usable capacity, nothing lost between regions
    assert layout(1000 * KiB, 4 * KiB, {"b": 0.25, "a": 0.25}) == regions  # deterministic
    assert layout(64 * KiB, 4 * KiB, {}) == [Region(COMMON, 0, 64 * KiB)]  # as before tenants
    assert layout(8 * KiB, 4 * KiB, {"a": 0.1}) == [Region(COMMON, 0, 8 * KiB)]  # too small a share


def test_each_region_allocates_inside_itself_only() -> None:
    alloc = RegionAllocator(64 * KiB, 4 * KiB, layout(64 * KiB, 4 * KiB, {"a": 0.25}))
    a = alloc.region("a")
    got = [alloc.allocate(4 * KiB, "a") for _ in range(4)]
    assert sorted(got) == [a.offset + i * 4 * KiB for i in range(4)]  # type: ignore[type-var]
    assert alloc.allocate(4 * KiB, "a") is None  # a's region is full; the common one is not
    common = alloc.allocate(8 * KiB)
    assert common is not None and common >= a.end and alloc.region("nobody").name == COMMON
    assert alloc.used_in("a") == 16 * KiB and alloc.used == 24 * KiB
    alloc.free(got[0])  # type: ignore[arg-type]
    assert alloc.allocate(4 * KiB, "a") == got[0]
    with pytest.raises(BadRequest, match="crosses the end of region 'a'"):
        alloc.reserve_at(a.end - 4 * KiB, 8 * KiB)
    alloc.check()


async def test_a_tenants_blocks_land_in_its_region_and_the_daemon_registers_the_layout() -> None:
    d = fake("n0", host=16 * BLOCK)
    core = await master(d, tenants=TENANTS)
    t = core.state.tenancy
    space = core.state.nodes["n0"].tiers[TierKind.HOST]
    assert space.allocator is not None
    assert d.layout == [ArenaRegion(TierKind.HOST, r.name, r.offset, r.size)
                        for r in space.allocator.regions]
    for tenant in ("a", "b", "c"):
        await put(core, t.resolve(tenant), [key(1), key(2)])
    for tenant, region in (("a", "a"), ("b", "b"), ("c", COMMON)):
        r = space.allocator.region(region)
        for k in (key(1), key(2)):
            [replica] = core.state.index.get(t.resolve(tenant).key(k)).replicas  # type: ignore[union-attr]
            assert r.offset <= replica.location and replica.location + replica.size <= r.end
    members = core.members
    assert members.agent_metadata(["agent-n0"], "a") == {"agent-n0": [b"meta:host:a"]}
    assert members.agent_metadata(["agent-n0"], COMMON) == {"agent-n0": [b"meta:host:"]}
    assert members.agent_metadata(["agent-n0"]) == {"agent-n0": [b"meta"]}  # the whole node
    await core.check()


async def test_a_full_region_demotes_its_own_blocks_and_no_one_elses() -> None:
    core = await master(fake("n0", host=16 * BLOCK), tenants=TENANTS)
    t = core.state.tenancy
    a, c = t.resolve("a"), t.resolve("c")
    await put(core, c, [key(100)])
    await put(core, a, [key(i) for i in range(4)])  # a's region: 4 blocks of 16
    await put(core, a, [key(4)])  # full: one of a's own goes down to the ssd
    index = core.state.index
    assert index.used("a", TierKind.HOST) == 4 * BLOCK and index.used("a", TierKind.SSD) == BLOCK
    assert [r.tier for r in index.get(c.key(key(100))).replicas] == [TierKind.HOST]  # type: ignore[union-attr]
    await core.check()


async def test_a_new_master_finds_the_same_regions_and_takes_the_blocks_back() -> None:
    d = fake("n0", host=16 * BLOCK)
    first = await master(d, tenants=TENANTS)
    a = first.state.tenancy.resolve("a")
    await put(first, a, [key(1), key(2)])
    before = {r.location for k in (key(1), key(2))
              for r in first.state.index.get(a.key(k)).replicas}  # type: ignore[union-attr]
    layout_before = list(d.layout)
    second = await master(d, tenants=TENANTS)  # a failover: the same config, the same daemon
    assert d.layout == layout_before
    space = second.state.nodes["n0"].tiers[TierKind.HOST]
    assert space.allocator is not None and space.allocator.used_in("a") == 2 * BLOCK
    assert {r.location for k in (key(1), key(2))
            for r in second.state.index.get(a.key(k)).replicas} == before  # type: ignore[union-attr]
    await second.check()


async def test_without_shares_the_daemon_keeps_one_registration() -> None:
    d = fake("n0")
    core = await master(d, tenants=(TenantConfig(name="a", token="ta"),))
    assert "regions" not in d.calls and d.layout == []
    assert core.members.agent_metadata(["agent-n0"], COMMON) == {"agent-n0": [b"meta"]}


def test_shares_are_checked() -> None:
    for shares in ((1.0,), (-0.1,), (0.5, 0.5)):
        tenants = tuple(TenantConfig(name=f"t{i}", token=f"x{i}", arena_share=s)
                        for i, s in enumerate(shares))
        with pytest.raises(ConfigError, match="arena_share"):
            MasterConfig(tenants=tenants)


async def test_a_changed_layout_leaves_out_blocks_across_its_boundaries_and_joins() -> None:
    d = fake("n0", host=16 * BLOCK)
    first = await master(d)  # no shares: one common region
    await put_sized(first, [key(i) for i in range(8)], BLOCK + 8 * KiB)  # some cross a's end
    again = await master(d, tenants=TENANTS)  # a's and b's regions now cut the arena
    space = again.state.nodes["n0"].tiers[TierKind.HOST]
    assert space.allocator is not None
    kept = [r for e in again.state.index.entries.values() for r in e.replicas]
    assert 0 < len(kept) < 8 and all(space.allocator.region_at(r.location).end >= r.location + r.size
                        for r in kept)
    assert space.allocator.used == sum(r.size for r in kept)
    space.allocator.check()
