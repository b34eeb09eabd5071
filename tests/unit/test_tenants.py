"""Scoping logic over in-process fake daemons: keys per scope, who may use which
namespace, quotas at reserve and at demotion, the per-scope usage ``check`` verifies, and
the config and key derivation tenants rest on. No processes, no network."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from kvpool.auth import Credentials, Role
from kvpool.codec import make_header
from kvpool.config import MasterConfig, SharedNamespace, TenantConfig, build
from kvpool.errors import ConfigError, Forbidden, QuotaExceeded, TooManyPending
from kvpool.keys import Namespace, block_keys
from kvpool.protocol import ReserveStatus
from kvpool.tiers.base import TierKind
from master.core import MasterCore
from master.tenants import Scope, Tenancy
from tests.unit.test_master import BLOCK, fake, key, master

TENANTS = (TenantConfig(name="a", token="ta", namespaces_shared=("sys",),
                        quota_bytes=(("host", 2 * BLOCK),), max_puts=2),
           TenantConfig(name="b", token="tb"))
SHARED = (SharedNamespace(name="sys", tenants=("a", "b")),)


async def put(core: MasterCore, scope: Scope, keys: list[bytes]) -> list[ReserveStatus]:
    put_id, items = await core.puts.reserve(keys, [BLOCK] * len(keys), [], None, scope=scope)
    new = [k for k, item in zip(keys, items) if item.status is ReserveStatus.NEW]
    header = make_header(np.zeros(BLOCK, np.uint8), "uint8").encode()
    if new:
        assert await core.puts.commit(put_id, new, [header] * len(new), scope) == len(new)
    return [item.status for item in items]


def test_each_scope_names_its_own_blocks_and_the_default_is_unchanged_without_tenants() -> None:
    k = key(7)
    tenancy = Tenancy(MasterConfig(tenants=TENANTS, namespaces=SHARED))
    a, b, sys = tenancy.resolve("a"), tenancy.resolve("b"), tenancy.resolve("a", "sys")
    scoped = {a.key(k), b.key(k), sys.key(k), tenancy.default.key(k)}
    assert len(scoped) == 4 and k not in scoped  # under tenants even the default scope hashes
    assert tenancy.resolve("b", "sys") is sys  # listed by the namespace, not by b: a member too
    assert Tenancy(MasterConfig()).default.key(k) == k  # a pool without tenants: as before


def test_only_members_use_a_shared_namespace() -> None:
    tenancy = Tenancy(MasterConfig(tenants=(*TENANTS, TenantConfig(name="c", token="tc")),
                                   namespaces=SHARED))
    for tenant in ("c", None):
        with pytest.raises(Forbidden, match="may not use the namespace 'sys'"):
            tenancy.resolve(tenant, "sys")
    assert tenancy.visible("a") == {"a", "sys"} and tenancy.visible(None) is None


async def test_two_tenants_putting_one_key_get_two_blocks_and_usage_adds_up() -> None:
    core = await master(fake("n0"), tenants=TENANTS, namespaces=SHARED)
    a, b = core.state.tenancy.resolve("a"), core.state.tenancy.resolve("b")
    assert await put(core, a, [key(1)]) == [ReserveStatus.NEW]
    assert await put(core, b, [key(1)]) == [ReserveStatus.NEW]  # not EXISTS: B's own block
    assert await put(core, a, [key(1)]) == [ReserveStatus.EXISTS]
    assert await core.reads.exists(a.keys([key(1), key(2)])) == [True, False]
    assert core.state.index.used("a", TierKind.HOST) == BLOCK
    assert core.state.index.used("b", TierKind.HOST) == BLOCK
    entry = core.state.index.get(a.key(key(1)))
    assert entry is not None and entry.shown == key(1) and entry.scope == "a"
    await core.check()  # per-scope usage agrees with the index


async def test_a_full_quota_demotes_the_tenants_own_blocks_else_refuses() -> None:
    core = await master(fake("n0"), tenants=TENANTS, namespaces=SHARED)
    a, b = core.state.tenancy.resolve("a"), core.state.tenancy.resolve("b")
    await put(core, b, [key(100)])
    await put(core, a, [key(1), key(2)])
    await core.leases.pin(a.keys([key(1), key(2)]))
    with pytest.raises(QuotaExceeded, match="tenant 'a'.*quota of"):
        await put(core, a, [key(3)])
    assert core.state.index.used("a", TierKind.HOST) == 2 * BLOCK  # the refusal rolled back
    await core.leases.unpin(a.keys([key(1)]))
    await put(core, a, [key(3)])
    index = core.state.index
    assert index.used("a", TierKind.HOST) == 2 * BLOCK and index.used("a", TierKind.SSD) == BLOCK
    assert [r.tier for r in index.get(a.key(key(1))).replicas] == [TierKind.SSD]  # hers went
    assert [r.tier for r in index.get(b.key(key(100))).replicas] == [TierKind.HOST]  # his stayed
    await core.check()


async def test_a_rebuilt_index_gives_blocks_back_to_their_scope_with_their_links() -> None:
    """A new master knows blocks from the daemons' inventories only: each is its tenant's
    again (usage, quota, who may read it) with its prefix link, whatever scope the writer
    wrote in the header."""
    d = fake("n0", host=8 * BLOCK)
    first = await master(d, tenants=TENANTS, namespaces=SHARED)
    a, b = first.state.tenancy.resolve("a"), first.state.tenancy.resolve("b")
    put_id, _ = await first.puts.reserve([key(1), key(2)], [BLOCK] * 2, [None, key(1)], None, scope=a)
    forged = [make_header(np.zeros(BLOCK, np.uint8), "uint8", parent=p) for p in (None, key(1))]
    forged = [dataclasses.replace(h, scope="b").encode() for h in forged]  # a claim it is b's
    assert await first.puts.commit(put_id, [key(1), key(2)], forged, a) == 2
    await put(first, b, [key(9)])
    again = await master(d, tenants=TENANTS, namespaces=SHARED)
    index = again.state.index
    assert index.used("a", TierKind.HOST) == 2 * BLOCK and index.used("b", TierKind.HOST) == BLOCK
    assert index.get(a.key(key(2))).parent == a.key(key(1))
    assert await again.reads.exists(a.keys([key(1), key(2)])) == [True, True]
    assert await again.reads.exists(b.keys([key(1), key(2)])) == [False, False]
    await put(again, again.state.tenancy.resolve("a"), [key(3)])  # her quota counts them:
    assert index.used("a", TierKind.HOST) == 2 * BLOCK  # one of hers left the host arena
    assert index.used("b", TierKind.HOST) == BLOCK  # and nothing of his
    await again.check()


async def test_a_tenants_puts_in_flight_are_capped_across_its_connections() -> None:
    core = await master(fake("n0"), tenants=TENANTS, namespaces=SHARED)
    a = core.state.tenancy.resolve("a")
    await core.puts.reserve([key(1)], [BLOCK], [], None, owner=1, scope=a)
    await core.puts.reserve([key(2)], [BLOCK], [], None, owner=2, scope=a)
    with pytest.raises(TooManyPending, match="max_puts = 2"):
        await core.puts.reserve([key(3)], [1024], [], None, owner=3, scope=a)
    assert core.puts.open_in("a") == 2


def test_a_namespace_with_a_secret_has_keys_no_one_else_computes() -> None:
    fields = dict(model_id="m", dtype="bf16", kv_layout="x", block_tokens=4)
    plain, a, b = (Namespace(**fields, secret=s) for s in ("", "secret-a", "secret-b"))
    assert len({plain.root(), a.root(), b.root()}) == 3
    assert block_keys(a, range(8)) == block_keys(Namespace(**fields, secret="secret-a"), range(8))
    assert "secret-a" not in repr(a)


def test_tenant_config_is_checked_and_credentials_carry_the_tenant() -> None:
    cfg = build(MasterConfig, {"tenants": [{"name": "a", "token": "ta", "quota_bytes": {"host": "1MiB"},
                                            "namespaces_shared": ["sys"]}],
                               "namespaces": [{"name": "sys", "tenants": ["a"]}],
                               "client_tokens": "legacy"}, "[master]")
    assert cfg.tenants[0].quota("host") == 1 << 20
    creds = cfg.credentials()
    assert creds.identify("Bearer ta") == (Role.CLIENT, "a")
    assert creds.identify("Bearer legacy") == (Role.CLIENT, None)
    bad = [{"tenants": [{"name": "a", "token": "t", "namespaces_shared": ["nope"]}]},
           {"tenants": [{"name": "a"}]},
           {"tenants": [{"name": "a", "token": "t", "quota_bytes": {"tape": 1}}]},
           {"tenants": [{"name": "a b", "token": "t"}]},
           {"tenants": [{"name": "a", "token": "t"}], "namespaces": [{"name": "a"}]},
           {"namespaces": [{"name": "s", "tenants": ["ghost"]}]}]
    for values in bad:
        with pytest.raises(ConfigError):
            build(MasterConfig, values, "[master]")
    with pytest.raises(ConfigError, match="same credential"):
        Credentials.of({Role.CLIENT: ["x"]}, [("x", Role.CLIENT, "a")])
