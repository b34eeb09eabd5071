"""Tenants and their scopes: where the keys a connection names live, and what each may hold.

A scope is a tenant's own namespace, a shared namespace its members use, or the default
one (credentials of no tenant: the legacy ``client_tokens``, the admin's, or none at all).
The master derives a call's scope from the connection's credential (``auth.tenant``) and
the shared namespace it asked for at its hello (``auth.namespace``), never from the body of
a call. Once any tenant is configured the index keys every block by
``blake2b(scope name, key)``: one key put by two tenants is two blocks, and no client can
name, read, match, pin or remove a block of another scope, whatever key it sends. With no
tenant configured the default scope keeps keys as they are, so an existing pool is
unchanged. Scope names are unique across tenants and shared namespaces (the config checks),
so the name alone identifies a scope.

Blocks a master learns of from a daemon's inventory (a daemon restart, a new leader) keep
their scoped key, so they stay reachable by their scope and no other, and their header
names their scope (the master writes it at the commit), so they count against its quotas
and show in its events again. Blocks written before headers said so (format version 2 or
older), or of a scope no longer configured, count as UNKNOWN: against no quota, in no
tenant's events.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Sequence

from kvpool import auth
from kvpool.codec import BlockHeader
from kvpool.config import MasterConfig
from kvpool.errors import Forbidden
from kvpool.keys import BlockKey
from kvpool.tiers.base import TierKind
from master.regions import COMMON

DEFAULT = ""  # the scope of credentials that belong to no tenant
UNKNOWN = "?"  # a block rebuilt from an inventory, once tenants are configured


@dataclass(frozen=True, slots=True, eq=False)
class Scope:
    name: str
    hashed: bool  # False only for the default scope of a pool without tenants
    quotas: dict[TierKind, int] = field(default_factory=dict)  # bytes per tier; absent: none
    max_puts: int = 0  # puts reserved and not committed, all its connections; 0: no limit
    members: tuple[str, ...] = ()  # the tenants allowed in (a shared namespace)
    # The keyed hash with its key already absorbed: a copy per key costs a third of a new one.
    _mac: Any = field(init=False, repr=False, default=None)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_mac", hashlib.blake2b(
            digest_size=16, person=b"kvpool-scope", key=self.name.encode() or b"\0"))

    def key(self, key: BlockKey) -> BlockKey:
        """The index's key of the block this scope's client names ``key``."""
        if not self.hashed:
            return key
        mac = self._mac.copy()
        mac.update(key)
        return mac.digest()

    def keys(self, keys: Sequence[BlockKey]) -> list[BlockKey]:
        if not self.hashed:
            return list(keys)
        out, template = [], self._mac
        for key in keys:
            mac = template.copy()
            mac.update(key)
            out.append(mac.digest())
        return out

    def parent(self, key: BlockKey | None) -> BlockKey | None:
        return None if key is None else self.key(key)

    @property
    def label(self) -> str:
        return self.name or "default"


class Tenancy:
    def __init__(self, cfg: MasterConfig) -> None:
        self.enabled = bool(cfg.tenants)
        self.default = Scope(DEFAULT, self.enabled)
        self.scopes: dict[str, Scope] = {DEFAULT: self.default}
        self.kinds: dict[str, str] = {DEFAULT: "default"}
        for t in cfg.tenants:
            self.scopes[t.name] = Scope(t.name, True, _quotas(t.quota_bytes), t.max_puts, (t.name,))
            self.kinds[t.name] = "tenant"
        # A tenant is in a shared namespace that either names the other (the union).
        shared = {t.name: set(t.namespaces_shared) for t in cfg.tenants}
        for n in cfg.namespaces:
            for t in n.tenants:
                shared.setdefault(t, set()).add(n.name)
        self._shared = {t: frozenset(names) for t, names in shared.items()}
        for n in cfg.namespaces:
            members = tuple(sorted(t for t, names in shared.items() if n.name in names))
            self.scopes[n.name] = Scope(n.name, True, _quotas(n.quota_bytes), 0, members)
            self.kinds[n.name] = "shared"
        self._resolved: dict[tuple[str | None, str], Scope] = {}
        # The tenants owning a region of every arena (master.regions); the rest share one.
        self.shares = {t.name: t.arena_share for t in cfg.tenants if t.arena_share > 0}

    def region_of(self, scope: str) -> str:
        """The arena region a scope's blocks live in: a tenant's own when it has a share,
        else the common one (the default scope, shared namespaces, tenants without one)."""
        return scope if scope in self.shares else COMMON

    def current(self) -> Scope:
        """The scope of the current call: its connection's tenant and namespace."""
        return self.resolve(auth.tenant(), auth.namespace())

    def resolve(self, tenant: str | None, namespace: str = "") -> Scope:
        """The scope a tenant (None: the default one) works in, given the shared namespace
        it asked for ("": its own); Forbidden when it may not use that namespace."""
        found = self._resolved.get((tenant, namespace))
        if found is not None:
            return found
        if not namespace:
            scope = self.default if tenant is None else self.scopes[tenant]
        elif tenant is not None and namespace in self._shared.get(tenant, ()):
            scope = self.scopes[namespace]
        else:
            who = f"tenant {tenant!r}" if tenant is not None else "a credential of no tenant"
            raise Forbidden(f"{who} may not use the namespace {namespace!r}: it is not one of "
                            "its namespaces_shared (see [[master.tenants]] in the master's config)")
        self._resolved[(tenant, namespace)] = scope
        return scope

    def rebuilt(self, header: BlockHeader) -> tuple[str, BlockKey | None]:
        """The scope and parent (an index key) of a block known from an inventory only."""
        if not self.enabled:
            return DEFAULT, header.parent
        if header.version < 3 or header.scope not in self.scopes:
            return UNKNOWN, None  # an older header's parent is its writer's key, not the index's
        return header.scope, header.parent

    def visible(self, tenant: str | None) -> frozenset[str] | None:
        """The scopes whose events a viewer sees: all (None) for a viewer of the whole pool,
        a tenant's own and its shared namespaces for the tenant's viewer."""
        if tenant is None:
            return None
        return frozenset({tenant, *self._shared.get(tenant, ())})


def _quotas(raw: tuple[tuple[str, int], ...]) -> dict[TierKind, int]:
    return {TierKind(tier): size for tier, size in raw if size > 0}
