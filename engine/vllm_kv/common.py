"""What passes between the scheduler side and the worker side, and the connector's config.

The scheduler computes every block key (it has the token ids); the worker only moves the
blocks the metadata names. Records are slotted dataclasses: vLLM pickles the metadata
when the worker runs in another process.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass, field, fields
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.base import (KVConnectorMetadata,
                                                               KVConnectorWorkerMetadata)

from kvpool.auth import secret
from kvpool.errors import ConfigError
from kvpool.keys import BlockKey, Namespace


@dataclass(frozen=True, slots=True)
class ConnectorConfig:
    """``kv_connector_extra_config``; unknown keys are errors."""

    master_url: str = "http://127.0.0.1:7700"  # the pool's master (or several, comma-separated)
    etcd: str = ""  # or etcd endpoints, to find the leading master there
    cluster: str = "default"  # the cluster's name, with etcd
    token: str = ""  # the engine's pool credential, or "file:PATH" (kept out of vLLM's logged config)
    key_secret: str = ""  # the tenant's (or shared namespace's) secret keying namespace roots, or file:PATH
    namespace: str = ""  # a shared namespace of the tenant to use (empty: the tenant's own)
    tls_ca: str = ""  # PEM CA to verify masters over TLS
    host: str = ""  # interface of the NIXL agent (empty: as the client decides)
    model_id: str = ""  # overrides the model identity in the namespace (default: derived)
    salt: str = ""  # a namespace salt: engines with different salts share nothing
    timeout_s: float = 1.0  # deadline of one metadata call (a prefix match, a put's commit)
    transfer_timeout_s: float = 5.0  # deadline of one NIXL transfer
    load_timeout_s: float = 10.0  # after this a load is given up and its blocks recomputed
    save_timeout_s: float = 10.0  # a save still running after this is abandoned (not committed)
    retry_s: float = 5.0  # after a failure, the pool is left alone this long, then tried again
    save: bool = True  # save new full blocks (a kv_consumer never saves)
    load: bool = True  # load prefixes from the pool
    event_token_ids: bool = False  # put token ids in BlockStored events (they are prompt content)
    audit_path: str = ""  # append one JSON line per block saved or loaded: key and xxh3 of the
    #                       bytes in vLLM's cache (how the tests prove loads are bit-exact)
    stats_path: str = ""  # one JSON line per load and save: blocks, bytes, seconds (benchmarks)

    @classmethod
    def from_extra(cls, extra: dict[str, Any] | None, role: str) -> "ConnectorConfig":
        extra = dict(extra or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(extra) - known)
        if unknown:
            raise ConfigError(f"unknown kv_connector_extra_config key(s) {unknown}; "
                              f"known: {sorted(known)}")
        if role == "kv_consumer":  # a producer loads too: its prompts share prefixes as well
            extra.setdefault("save", False)
        try:
            return cls(**extra)
        except TypeError as exc:
            raise ConfigError(f"bad kv_connector_extra_config: {exc}") from None


@dataclass(slots=True)
class LoadSpec:
    """Blocks to read from the pool into vLLM blocks, for one request: ``keys[r]`` are the
    keys of tensor-parallel rank r, ``block_ids[i]`` the vLLM block of key i."""

    req_id: str
    keys: list[list[BlockKey]]
    block_ids: list[int]


@dataclass(slots=True)
class SaveSpec:
    """Full blocks of one request computed in this step, to write to the pool."""

    req_id: str
    keys: list[list[BlockKey]]
    block_ids: list[int]
    parent: list[BlockKey | None]  # per TP rank: the key the first block chains from


@dataclass
class KVPoolMetadata(KVConnectorMetadata):
    loads: list[LoadSpec] = field(default_factory=list)
    saves: list[SaveSpec] = field(default_factory=list)
    preempted: list[str] = field(default_factory=list)
    idle: bool = False  # nothing computes this step: the worker may block on its loads


@dataclass
class KVPoolWorkerMetadata(KVConnectorWorkerMetadata):
    """Worker → scheduler: blocks whose save landed in the pool, for events."""

    stored: list[tuple[BlockKey, BlockKey | None, str]] = field(default_factory=list)  # key, parent, tier
    dropped: list[tuple[BlockKey, str]] = field(default_factory=list)  # key, tier: arrived
    #                                                   corrupt, so the pool dropped that copy

    def aggregate(self, other: KVConnectorWorkerMetadata) -> "KVPoolWorkerMetadata":
        assert isinstance(other, KVPoolWorkerMetadata)
        return KVPoolWorkerMetadata(self.stored + other.stored, self.dropped + other.dropped)


def namespaces(vllm_config: Any, kv_cache_config: Any, cfg: ConnectorConfig) -> list[Namespace]:
    """One namespace per tensor-parallel rank, from vLLM's configs: model identity, dtype,
    KV layout (platform, layers, heads, head size), TP rank and size, block size."""
    from vllm.platforms import current_platform

    groups = kv_cache_config.kv_cache_groups
    if len(groups) != 1:
        raise ConfigError(f"KVPoolConnector supports models with one KV cache group; this one has "
                          f"{len(groups)} (hybrid attention): serve it without the connector")
    spec = groups[0].kv_cache_spec
    if not all(hasattr(spec, a) for a in ("num_kv_heads", "head_size")):
        raise ConfigError(f"KVPoolConnector needs an attention KV cache, not {type(spec).__name__}")
    mc, cc, pc = vllm_config.model_config, vllm_config.cache_config, vllm_config.parallel_config
    model_id = cfg.model_id or _model_identity(mc)
    dtype = str(spec.dtype).removeprefix("torch.") if cc.cache_dtype == "auto" else cc.cache_dtype
    layout = (f"vllm/{current_platform.device_type}/L{len(groups[0].layer_names)}"
              f"/H{spec.num_kv_heads}/D{spec.head_size}/pp{pc.pipeline_parallel_size}")
    world = pc.tensor_parallel_size
    key = secret(cfg.key_secret, "kv_connector_extra_config key_secret") if cfg.key_secret else ""
    return [Namespace(model_id=model_id, dtype=dtype, kv_layout=layout, tp_rank=r,
                      tp_world_size=world, block_tokens=spec.block_size, salt=cfg.salt, secret=key)
            for r in range(world)]


def _model_identity(mc: Any) -> str:
    """The model's name and revision with a hash of its architecture config: two
    checkpoints under one name but with other shapes still never share a key."""
    try:
        arch = mc.hf_config.to_json_string(use_diff=False)
    except Exception:  # a config that cannot print itself: its repr
        arch = repr(mc.hf_config)
    digest = hashlib.sha256(arch.encode()).hexdigest()[:16]
    return f"{mc.model}@{mc.revision or ''}#{digest}"


def replace(cfg: ConnectorConfig, **changes: Any) -> ConnectorConfig:
    return dataclasses.replace(cfg, **changes)
