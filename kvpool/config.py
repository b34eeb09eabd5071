"""Configuration: one frozen dataclass per component, TOML in, ``KVPOOL_*`` overrides.

A file has one table per component (``[master]``, ``[daemon]``, ``[client]``). An
environment variable ``KVPOOL_<TABLE>_<FIELD>`` overrides a field. Unknown tables or
keys are errors, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, TypeVar, get_type_hints

from kvpool.auth import Credentials, Role, secret
from kvpool.daemon_link import INVENTORY_PAGE, INVENTORY_PAGE_MAX
from kvpool.errors import ConfigError

MiB = 1 << 20
GiB = 1 << 30


def doc(default: Any, text: str) -> Any:
    return field(default=default, metadata={"doc": text})


def secret_doc(text: str) -> Any:
    """A credential field: never shown in a config's repr (nor so in logs or tracebacks)."""
    return field(default="", repr=False, metadata={"doc": text, "secret": True})


_SECRET = " Give the secret itself or file:PATH (its first line); see README 'Security'."


TIERS = ("gpu", "host", "ssd", "object")


@dataclass(frozen=True)
class TenantConfig:
    """One tenant (``[[master.tenants]]``): its credentials, the shared namespaces it may
    use besides its own, and its quotas. Its keys' namespace roots are keyed by a secret
    its engines hold (``[client] key_secret``); the master never needs that secret."""

    name: str = doc("", "The tenant's name (letters, digits, '-', '_', '.'): in stats, errors and logs.")
    token: str = field(default="", repr=False, metadata={
        "doc": "The tenant's client credential (engines present it as [client] token)." + _SECRET,
        "secret": True})
    viewer_token: str = field(default="", repr=False, metadata={
        "doc": "Optional read-only credential of the tenant: /v1/events filtered to its "
               "namespaces and /v1/tenants (its own row)." + _SECRET, "secret": True})
    namespaces_shared: tuple[str, ...] = doc((), "Names of shared namespaces ([[master.namespaces]]) "
                                                 "the tenant may use besides its own.")
    quota_bytes: tuple[tuple[str, int], ...] = doc((), "Bytes the tenant's own namespace may hold "
                                                       "per tier, e.g. {host = \"1GiB\", ssd = \"8GiB\"}; "
                                                       "an absent tier is unlimited.")
    max_puts: int = doc(0, "Puts the tenant may have reserved and not yet committed, all its "
                           "connections together; 0: no limit beyond the per-connection one.")
    arena_share: float = doc(0.0, "Fraction (0-1) of every node's arenas (host, gpu) that is the "
                                  "tenant's own region: its blocks live there, and its engines get "
                                  "NIXL metadata of that region only. 0: the common region, "
                                  "shared with the default tenant and others without a share.")

    def quota(self, tier: str) -> int:
        """The tenant's quota of a tier in bytes; 0: none."""
        return dict(self.quota_bytes).get(tier, 0)


@dataclass(frozen=True)
class SharedNamespace:
    """A namespace several tenants share (``[[master.namespaces]]``): a system prompt
    common to teams, say. Its members' engines key its roots with the namespace's own
    secret (``[client] key_secret``) and name it in ``[client] namespace``."""

    name: str = doc("", "The namespace's name.")
    tenants: tuple[str, ...] = doc((), "The tenants allowed in.")
    quota_bytes: tuple[tuple[str, int], ...] = doc((), "Bytes the namespace may hold per tier; absent: unlimited.")

    def quota(self, tier: str) -> int:
        return dict(self.quota_bytes).get(tier, 0)


@dataclass(frozen=True)
class MasterConfig:
    host: str = doc("127.0.0.1", "Address the master's HTTP server binds to.")
    port: int = doc(0, "Port of the master's HTTP server; 0 picks a free one.")
    rpc_port: int = doc(0, "Port of the master's stream RPC (the engines' hot calls; clients find "
                           "it through the HTTP port); 0 picks a free one.")
    cluster_token: str = secret_doc("Credential of masters and daemons among themselves: daemons "
                                    "register, renew and answer with it. Any credential "
                                    "configured turns the checks on everywhere." + _SECRET)
    client_tokens: str = secret_doc("Engines' credentials, comma-separated (one per engine or "
                                    "team, so each can be revoked), each a secret or "
                                    "file:PATH: the hot RPC." + _SECRET)
    admin_token: str = secret_doc("Credential of operators: forced removes, check, the admin "
                                  "API's mutations; it also does what a client and a viewer "
                                  "may." + _SECRET)
    viewer_token: str = secret_doc("Read-only credential: /metrics, /v1/events and the admin "
                                   "API's GETs." + _SECRET)
    tls_cert: str = doc("", "PEM certificate: serve HTTP and RPC over TLS (https://); with tls_key.")
    tls_key: str = doc("", "PEM private key of tls_cert.")
    tls_ca: str = doc("", "PEM CA file to verify the daemons (their https:// URLs) over TLS; empty: the system's CAs.")
    read_lease_s: float = doc(10.0, "How long a get's read lease protects a replica unless released.")
    kept_grants_share: float = doc(0.05, "Share of each arena that read grants clients keep for "
                                         "hot blocks may pin (a kept grant holds its lease "
                                         "up to half its length); past it a get's grant is "
                                         "handed back once read, so hot reads never take "
                                         "the room puts and promotions need; 0: none kept.")
    put_timeout_s: float = doc(30.0, "A reservation not committed within this time is reclaimed.")
    gpu_high: float = doc(0.90, "GPU arena: above this fraction of capacity, blocks are demoted to host.")
    gpu_low: float = doc(0.75, "GPU arena: demotion stops once it is below this fraction.")
    host_high: float = doc(0.90, "Host arena: above this fraction, blocks are demoted to SSD (or "
                                 "evicted); a fuller fast tier serves more hits.")
    host_low: float = doc(0.75, "Host arena: demotion stops below this fraction; the gap to "
                                "host_high is the room writes land in between sweeps.")
    ssd_high: float = doc(0.90, "SSD tier: above this fraction, blocks are demoted to the object tier.")
    ssd_low: float = doc(0.75, "SSD tier: demotion stops below this fraction.")
    object_high: float = doc(0.90, "Object tier (the last): above this fraction, blocks are removed.")
    object_low: float = doc(0.75, "Object tier: removal stops below this fraction.")
    last_tier_ttl_s: float = doc(0.0, "Blocks unread for this long are removed from a node's last "
                                      "tier (one that came down after its last read, this long "
                                      "after it came); 0 keeps them until space is needed.")
    policy: str = doc("reuse", "Eviction and cold-tier admission policy: 'reuse' (least recently "
                               "used among leaves, a put's trailing block first, read blocks kept "
                               "longer; chosen on the production trace), 'lru', or 'density' "
                               "(least hit density learned per class of block) (master/policy.py).")
    max_block_bytes: int = doc(256 * MiB, "Largest block a put may reserve.")
    client_max_puts: int = doc(256, "Puts one client connection may have reserved and not yet "
                                    "committed; beyond, reserve answers TooManyPending (retryable).")
    client_max_reserved: float = doc(0.5, "Fraction of all arenas' capacity one client "
                                           "connection may hold reserved at once (a lone put "
                                           "may be larger); beyond, "
                                           "TooManyPending, so a writer that never commits "
                                           "cannot fill the arenas for everyone.")
    max_puts: int = doc(4096, "Puts all clients together may have reserved and not yet committed.")
    alignment: int = doc(4096, "Arena offsets are multiples of this many bytes.")
    sweep_interval_s: float = doc(0.5, "Period of the reclaim, lease expiry and watermark sweep.")
    events_ring: int = doc(65536, "KV events the master keeps for /v1/events subscribers that "
                           "resume or read slowly; one that falls further behind is told it lost events.")
    etcd: str = doc("", "etcd endpoints (host:port, comma-separated); empty runs without etcd.")
    cluster: str = doc("default", "Name of the cluster; its keys live under /kvpool/<cluster>/.")
    tenants: tuple[TenantConfig, ...] = doc((), "Tenants ([[master.tenants]] tables); with none, "
                                                "every client credential is the default tenant's.")
    namespaces: tuple[SharedNamespace, ...] = doc((), "Shared namespaces ([[master.namespaces]] tables).")
    leader_ttl_s: float = doc(5.0, "With etcd: the leader's lease; a standby takes over this long after it dies.")
    inventory_page: int = doc(INVENTORY_PAGE, "Blocks per page the master asks of a daemon's "
                                              "inventory (a join, a new leader's rebuild, a "
                                              "check); the loop serves other calls between pages.")

    def credentials(self) -> Credentials:
        """The secrets this master accepts, read now (file:PATH ones from their files)."""
        clients = [secret(t.strip(), "[master] client_tokens")
                   for t in self.client_tokens.split(",") if t.strip()]
        tenants = []
        for t in self.tenants:
            tenants.append((secret(t.token, f"[[master.tenants]] {t.name} token"), Role.CLIENT, t.name))
            if t.viewer_token:
                tenants.append((secret(t.viewer_token, f"[[master.tenants]] {t.name} viewer_token"),
                                Role.VIEWER, t.name))
        return Credentials.of({
            Role.CLUSTER: [secret(self.cluster_token, "[master] cluster_token")],
            Role.CLIENT: clients,
            Role.ADMIN: [secret(self.admin_token, "[master] admin_token")],
            Role.VIEWER: [secret(self.viewer_token, "[master] viewer_token")]}, tenants)

    def watermarks(self, tier: str) -> tuple[float, float]:
        """(high, low) of a tier: "gpu", "host", "ssd" or "object"."""
        return getattr(self, f"{tier}_high"), getattr(self, f"{tier}_low")

    def __post_init__(self) -> None:
        if not 0.0 < self.client_max_reserved <= 1.0:
            raise ConfigError(f"[master] client_max_reserved = {self.client_max_reserved} is "
                              "outside (0, 1]")
        if self.client_max_puts < 1 or self.max_puts < 1:
            raise ConfigError("[master] client_max_puts and max_puts are at least 1")
        _check_tenants(self.tenants, self.namespaces)
        if not 0.0 <= self.kept_grants_share <= 0.5:
            raise ConfigError(f"[master] kept_grants_share = {self.kept_grants_share} is "
                              "outside [0, 0.5]")
        if not 1 <= self.inventory_page <= INVENTORY_PAGE_MAX:
            raise ConfigError(f"[master] inventory_page = {self.inventory_page} is outside "
                              f"1..{INVENTORY_PAGE_MAX}")
        for tier in TIERS:
            high, low = self.watermarks(tier)
            if not 0.0 < low <= high <= 1.0:
                raise ConfigError(f"[master] {tier}_low = {low} and {tier}_high = {high} must "
                                  "satisfy 0 < low <= high <= 1")


def _check_tenants(tenants: tuple[TenantConfig, ...], shared: tuple[SharedNamespace, ...]) -> None:
    import re
    names: set[str] = set()
    for kind, items in (("tenant", tenants), ("namespace", shared)):
        for item in items:
            if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", item.name):
                raise ConfigError(f"[[master.{kind}s]] name {item.name!r}: give 1-64 letters, "
                                  "digits, '-', '_' or '.'")
            if item.name in names:
                raise ConfigError(f"[[master.{kind}s]] the name {item.name!r} is used twice "
                                  "(tenants and shared namespaces share one list of names)")
            names.add(item.name)
            for tier, size in item.quota_bytes:
                if tier not in TIERS or size < 0:
                    raise ConfigError(f"[[master.{kind}s]] {item.name}: quota_bytes.{tier} = "
                                      f"{size}: tiers are {', '.join(TIERS)}, sizes >= 0")
    tenant_names = {t.name for t in tenants}
    shared_names = {n.name for n in shared}
    for t in tenants:
        if not t.token:
            raise ConfigError(f"[[master.tenants]] {t.name}: a tenant needs its token")
        if t.max_puts < 0:
            raise ConfigError(f"[[master.tenants]] {t.name}: max_puts >= 0")
        if not 0.0 <= t.arena_share < 1.0:
            raise ConfigError(f"[[master.tenants]] {t.name}: arena_share = {t.arena_share} is "
                              "outside [0, 1)")
        for ns in t.namespaces_shared:
            if ns not in shared_names:
                raise ConfigError(f"[[master.tenants]] {t.name}: namespaces_shared names "
                                  f"{ns!r}, which no [[master.namespaces]] table defines")
    shares = sum(t.arena_share for t in tenants)
    if shares > 0.9:
        raise ConfigError(f"[[master.tenants]] arena_share adds up to {shares:g}: at most 0.9, so "
                          "the common region (the default tenant, shared namespaces, tenants "
                          "without a share) keeps a tenth of each arena")
    for n in shared:
        for t in n.tenants:
            if t not in tenant_names:
                raise ConfigError(f"[[master.namespaces]] {n.name}: tenants names {t!r}, "
                                  "which no [[master.tenants]] table defines")


@dataclass(frozen=True)
class DaemonConfig:
    node_id: str = doc("node0", "Unique id of this node in the pool.")
    host: str = doc("127.0.0.1", "Address the daemon's HTTP server binds to.")
    port: int = doc(0, "Port of the daemon's HTTP server; 0 picks a free one.")
    rpc_port: int = doc(0, "Port of the daemon's stream RPC (the master's calls, a put's commit "
                           "among them); 0 picks a free one.")
    master_url: str = doc("", "URL of the master (http://host:port); set by `kvpool up`.")
    data_dir: str = doc("./data/node0", "Folder for this node's SSD tier and default object tier.")
    host_bytes: int = doc(1 * GiB, "Size of the host (DRAM) arena registered with NIXL.")
    gpu_bytes: int = doc(0, "Size of the GPU arena; 0 disables it, and so does a machine without CUDA.")
    gpu_device: int = doc(0, "CUDA device index of the GPU arena.")
    ssd_bytes: int = doc(8 * GiB, "Capacity of the SSD tier (LMDB map size); 0 disables it.")
    object_url: str = doc("", "Object tier: s3://bucket/prefix or file:///path, shared by every node "
                              "that names it; empty: a private folder, <data_dir>/objects.")
    object_bytes: int = doc(64 * GiB, "Capacity this node may use in the object tier; 0 disables it.")
    s3_endpoint: str = doc("", "Endpoint URL of an S3-compatible service; empty uses AWS defaults.")
    cold_codec: str = doc("zstd", "Codec of cold tiers: 'zstd' (byte planes + zstd) or 'raw'.")
    zstd_level: int = doc(1, "zstd level for cold tiers (1..22: higher packs tighter, writes slower).")
    cold_min_saving: float = doc(0.05, "A cold block that zstd shrinks by less than this fraction is "
                                       "stored raw (decoding it would cost more than it saves).")
    io_threads: int = doc(4, "Threads for blocking LMDB, file and S3 calls.")
    heartbeat_s: float = doc(1.0, "Without etcd: how often the daemon renews its membership with the master.")
    etcd: str = doc("", "etcd endpoints (host:port, comma-separated): join a cluster; master_url is then unused.")
    cluster: str = doc("default", "Name of the cluster to join (with etcd).")
    cluster_token: str = secret_doc("The cluster credential (the masters' cluster_token): the "
                                    "daemon registers with it and accepts only it on its "
                                    "RPC; required when host is not loopback." + _SECRET)
    tls_cert: str = doc("", "PEM certificate: serve HTTP and RPC over TLS (https://); with tls_key.")
    tls_key: str = doc("", "PEM private key of tls_cert.")
    tls_ca: str = doc("", "PEM CA file to verify the master (an https:// master_url) over TLS; empty: the system's CAs.")
    node_ttl_s: float = doc(5.0, "The daemon's membership lease (in etcd, or kept by a single master): "
                                 "a dead daemon leaves the index this long after its last renewal.")


@dataclass(frozen=True)
class ClientConfig:
    master_url: str = doc("http://127.0.0.1:7700", "URL of the master (or several, comma-separated).")
    verify_checksum: bool = doc(True, "Verify every block's checksum after a get; a mismatch is a miss.")
    timeout_s: float = doc(10.0, "Deadline of one call, retries included.")
    transfer_timeout_s: float = doc(5.0, "Deadline of one NIXL transfer.")
    layout: str = doc("", "Layout tag written into the header of blocks this client puts.")
    etcd: str = doc("", "etcd endpoints: find the leading master there (instead of master_url).")
    cluster: str = doc("default", "Name of the cluster (with etcd).")
    token: str = secret_doc("This engine's credential: one of the master's client_tokens (an "
                            "admin_token works too); empty when the pool runs open." + _SECRET)
    tls_ca: str = doc("", "PEM CA file to verify masters over TLS (https:// URLs); empty: the "
                          "system's CAs.")
    rpc: str = doc("stream", "Transport of the hot calls: 'stream' (length-prefixed msgpack frames "
                             "on the master's RPC port) or 'ws' (the WebSocket RPC on its HTTP "
                             "port, for a path that passes HTTP only).")
    rpc_socket: str = doc("auto", "Where the stream RPC connects: 'auto' (the master's local "
                                  "Unix socket when it runs on this host, in this network "
                                  "namespace, without TLS: a third off each call; else TCP), "
                                  "'tcp', or 'unix' (an error where it cannot be used).")
    data_path: str = doc("auto", "How bytes move: 'auto' (a daemon on this host, reachable by the "
                                 "kernel's cross-memory copy, takes the same-host path; others "
                                 "NIXL), 'nixl', or 'same-host' (an error where it cannot be used).")
    hot_grants: int = doc(64, "Read grants of hot blocks (single-key gets of a key read "
                              "before) kept while their leases last, so such a get costs a copy, "
                              "not a call; each holds its lease (at most half of it); 0: none.")
    host: str = doc("", "Interface the client's NIXL (UCX) agent listens on; empty: the loopback "
                        "interface when every master or etcd endpoint is on loopback, else all.")
    key_secret: str = secret_doc("Secret keying this engine's namespace roots (HMAC-SHA256 of "
                                 "the namespace fields), so no one without it can compute its "
                                 "keys: its tenant's secret, or with namespace set the shared "
                                 "namespace's; empty: plain (unkeyed) roots." + _SECRET)
    namespace: str = doc("", "A shared namespace (one of the tenant's namespaces_shared) this "
                             "client's keys live in; empty: its tenant's own.")


@dataclass(frozen=True)
class PoolConfig:
    master: MasterConfig = field(default_factory=MasterConfig)
    daemon: DaemonConfig = field(default_factory=DaemonConfig)
    client: ClientConfig = field(default_factory=ClientConfig)


T = TypeVar("T")


def _coerce(value: Any, typ: type, where: str) -> Any:
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            return value.lower() in ("1", "true", "yes", "on")
    elif typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return parse_size(value)
            except ValueError:
                pass
    elif typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif typ is str and isinstance(value, str):
        return value
    raise ConfigError(f"{where}: expected {typ.__name__}, got {value!r}")


def parse_size(text: str) -> int:
    """'4096', '64MiB', '2GiB', '1.5GB' -> bytes."""
    text = text.strip()
    units = {"kib": 1 << 10, "mib": MiB, "gib": GiB, "tib": 1 << 40,
             "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "b": 1}
    low = text.lower()
    for suffix, mult in units.items():
        if low.endswith(suffix):
            return int(float(low[: -len(suffix)]) * mult)
    return int(text)


def build(cls: type[T], values: Mapping[str, Any], where: str) -> T:
    """A component config from a mapping; unknown keys and wrong types are errors."""
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(values) - names
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}; "
                          f"known: {', '.join(sorted(names))}")
    return cls(**{k: _value(v, hints[k], f"{where}.{k}") for k, v in values.items()})


def _value(value: Any, typ: Any, where: str) -> Any:
    """A field's value: a scalar, a list of names, a table of sizes, or a list of tables."""
    if typ in (tuple[TenantConfig, ...], tuple[SharedNamespace, ...]):
        item = typ.__args__[0]
        if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
            raise ConfigError(f"{where}: expected an array of tables ([[...]])")
        return tuple(build(item, v, f"{where}[{i}]") for i, v in enumerate(value))
    if typ == tuple[str, ...]:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{where}: expected a list of names, got {value!r}")
        return tuple(value)
    if typ == tuple[tuple[str, int], ...]:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a table of tier = size, got {value!r}")
        return tuple((str(k), _coerce(v, int, f"{where}.{k}")) for k, v in value.items())
    return _coerce(value, typ, where)


def apply_env(cfg: T, section: str, environ: Mapping[str, str] | None = None) -> T:
    """Override fields from ``KVPOOL_<SECTION>_<FIELD>``; an unknown variable is an error."""
    env = os.environ if environ is None else environ
    prefix = f"KVPOOL_{section.upper()}_"
    hints = get_type_hints(type(cfg))
    names = {f.name for f in dataclasses.fields(cfg)}
    changes = {}
    for var, raw in env.items():
        if not var.startswith(prefix):
            continue
        name = var[len(prefix):].lower()
        if name not in names:
            raise ConfigError(f"environment variable {var} names no field of [{section}]; "
                              f"known: {', '.join(sorted(names))}")
        if hints[name] not in (bool, int, float, str):
            raise ConfigError(f"{var}: [{section}] {name} is a table or list; set it in the config file")
        changes[name] = _coerce(raw, hints[name], var)
    return dataclasses.replace(cfg, **changes)


def load(path: str | Path | None = None, environ: Mapping[str, str] | None = None) -> PoolConfig:
    """Read a TOML file (optional), then apply environment overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            data = tomllib.loads(Path(path).read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    sections = {"master": MasterConfig, "daemon": DaemonConfig, "client": ClientConfig}
    unknown = set(data) - set(sections)
    if unknown:
        raise ConfigError(f"{path}: unknown table(s) {', '.join(sorted(unknown))}; "
                          f"known: master, daemon, client")
    parts = {}
    for name, cls in sections.items():
        table = data.get(name, {})
        if not isinstance(table, dict):
            raise ConfigError(f"{path}: [{name}] must be a table")
        parts[name] = apply_env(build(cls, table, f"[{name}]"), name, environ)
    return PoolConfig(**parts)
