"""Block identity: prefix-chained xxh3-128 keys under a namespace root.

``key_i = xxh3_128(key_{i-1} || tokens_i as little-endian int32)`` with ``key_{-1}`` the
hash of the namespace, so a key names its whole prefix and two models, dtypes or tensor
parallel layouts never share one. A namespace with a ``secret`` (a tenant's, or a shared
namespace's) has an HMAC-SHA256 of its fields under that secret as its root, so whoever
lacks the secret cannot compute any of its keys, nor pre-place blocks under them.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import xxhash

from kvpool.errors import BadRequest

KEY_BYTES = 16
BlockKey = bytes  # 16 raw bytes; printed as 32 hex characters


@dataclass(frozen=True, slots=True)
class Namespace:
    """Everything that must match for two engines to share a block."""

    model_id: str
    dtype: str
    kv_layout: str
    tp_rank: int = 0
    tp_world_size: int = 1
    block_tokens: int = 256
    salt: str = ""
    secret: str = field(default="", repr=False)  # keys the root; never printed

    def __post_init__(self) -> None:
        if self.block_tokens <= 0:
            raise BadRequest(f"block_tokens must be positive, got {self.block_tokens}")
        if not 0 <= self.tp_rank < self.tp_world_size:
            raise BadRequest(f"tp_rank {self.tp_rank} outside world size {self.tp_world_size}")

    def root(self) -> BlockKey:
        """``key_{-1}``: the hash of every field, length-prefixed so fields cannot run together."""
        parts = [
            b"kvpool-namespace-v1",
            self.model_id.encode(), self.dtype.encode(), self.kv_layout.encode(),
            str(self.tp_rank).encode(), str(self.tp_world_size).encode(),
            str(self.block_tokens).encode(), self.salt.encode(),
        ]
        body = b"".join(len(p).to_bytes(4, "little") + p for p in parts)
        if self.secret:
            return hmac.new(self.secret.encode(), body, hashlib.sha256).digest()[:KEY_BYTES]
        return xxhash.xxh3_128_digest(body)


def chain(parent: BlockKey, tokens: Sequence[int] | np.ndarray) -> BlockKey:
    """The key of one block given its parent's key and its tokens."""
    data = np.asarray(tokens, dtype="<i4").tobytes()
    return xxhash.xxh3_128_digest(parent + data)


def block_keys(ns: Namespace, tokens: Sequence[int] | np.ndarray) -> list[BlockKey]:
    """Keys of every full block of ``tokens``; a trailing partial block has none."""
    arr = np.asarray(tokens, dtype="<i4")
    if arr.ndim != 1:
        raise BadRequest(f"tokens must be one-dimensional, got shape {arr.shape}")
    n = ns.block_tokens
    keys: list[BlockKey] = []
    parent = ns.root()
    for i in range(len(arr) // n):
        parent = xxhash.xxh3_128_digest(parent + arr[i * n:(i + 1) * n].tobytes())
        keys.append(parent)
    return keys


def parse_key(value: str | bytes) -> BlockKey:
    """Accept 16 raw bytes or 32 hex characters; anything else is a BadRequest."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        raw = bytes(value)
        if len(raw) == KEY_BYTES:
            return raw
        raise BadRequest(f"a block key is {KEY_BYTES} bytes, got {len(raw)}")
    if isinstance(value, str) and len(value) == 2 * KEY_BYTES:
        try:
            return bytes.fromhex(value)
        except ValueError:
            pass
    raise BadRequest(f"a block key is 32 hex characters, got {value!r:.80}")


def raw_keys(values: Sequence[object]) -> bool:
    """Is every value a key already (16 raw bytes)? Checked at C speed, for batches."""
    return set(map(type, values)) <= {bytes} and set(map(len, values)) <= {KEY_BYTES}  # type: ignore[arg-type]


def parse_keys(values: Sequence[str | bytes]) -> list[BlockKey]:
    """``parse_key`` of each value; a batch of raw keys (the usual case) is taken whole."""
    return list(values) if raw_keys(values) else [parse_key(v) for v in values]  # type: ignore[arg-type]
