"""Build a node's tiers from its DaemonConfig, fastest first."""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from kvpool.codec import Codec, ColdCodec
from kvpool.config import DaemonConfig
from kvpool.errors import BadRequest
from kvpool.tiers.arena import ArenaTier, cuda_available
from kvpool.tiers.base import Tier, TierKind
from kvpool.tiers.object import ObjectTier
from kvpool.tiers.ssd import SsdTier

log = logging.getLogger(__name__)
_CODECS = {"zstd": Codec.ZSTD_PLANES, "raw": Codec.RAW}


def cold_codec(cfg: DaemonConfig) -> ColdCodec:
    """The cold tiers' codec as the daemon's config names it."""
    try:
        kind = _CODECS[cfg.cold_codec.lower()]
    except KeyError:
        raise BadRequest(f"cold_codec {cfg.cold_codec!r} is not one of {', '.join(_CODECS)}") from None
    return ColdCodec(kind, cfg.zstd_level, cfg.cold_min_saving)


def open_tiers(cfg: DaemonConfig, executor: ThreadPoolExecutor | None) -> dict[TierKind, Tier]:
    """Open every configured tier. Blocking (cold tiers scan their stores), so call it from
    a thread. If one tier fails to open, the ones already open are dropped (their memory
    and files are released with the last reference) and the error propagates."""
    codec = cold_codec(cfg)
    data_dir = Path(cfg.data_dir)
    tiers: dict[TierKind, Tier] = {}
    try:
        if cfg.gpu_bytes > 0:
            if cuda_available():
                tiers[TierKind.GPU] = ArenaTier.gpu(cfg.gpu_bytes, cfg.gpu_device, executor=executor)
            else:
                log.warning("gpu tier skipped: gpu_bytes = %d but this machine has no CUDA device",
                            cfg.gpu_bytes)
        tiers[TierKind.HOST] = ArenaTier.host(cfg.host_bytes, executor=executor)
        if cfg.ssd_bytes > 0:
            tiers[TierKind.SSD] = SsdTier(data_dir / "ssd", cfg.ssd_bytes, codec, executor)
        if cfg.object_bytes > 0:
            url = cfg.object_url or str(data_dir / "objects")
            tier = ObjectTier.from_url(url, cfg.object_bytes, cfg.s3_endpoint, codec, executor)
            tier.shared = bool(cfg.object_url)  # a configured store is the cluster's, shared
            tiers[TierKind.OBJECT] = tier
    except BaseException:
        tiers.clear()
        raise
    return tiers
