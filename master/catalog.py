"""What a writer may say about its blocks beyond their bytes: the namespace they belong
to (so an operator can purge a model or a namespace), tokens per block, and, only when
the writer chooses to send them (they are prompt content), the token ids, which go out
once in the block's ``BlockStored`` event and are not kept.

The master keeps this in memory only; blocks a new leader rebuilds from the daemons'
inventories have none (they can still be purged with the whole pool).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kvpool.errors import BadRequest
from kvpool.keys import BlockKey, parse_key

MAX_MODEL_CHARS = 256


@dataclass(slots=True)
class BlockMeta:
    namespace: BlockKey | None = None  # the namespace root (key_{-1}) the block chains from
    model: str | None = None
    block_tokens: int | None = None
    token_ids: list[int] | None = None  # until the BlockStored event carried them


def _int(value: Any, what: str, low: int, high: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise BadRequest(f"{what} must be an integer in {low}..{high}, got {value!r:.40}")
    return value


def parse(raw: Any, n: int) -> list[BlockMeta] | None:
    """The ``meta`` of a reserve call for its ``n`` keys: ``{"namespace": root, "model":
    str, "block_tokens": int, "token_ids": [[int, ...] per key]}``, every field optional."""
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise BadRequest("meta must be a map of namespace, model, block_tokens, token_ids")
    unknown = set(raw) - {"namespace", "model", "block_tokens", "token_ids"}
    if unknown:
        raise BadRequest(f"meta has unknown fields: {', '.join(sorted(map(str, unknown)))}")
    ns = parse_key(raw["namespace"]) if raw.get("namespace") is not None else None
    model = raw.get("model")
    if model is not None and (not isinstance(model, str) or not 0 < len(model) <= MAX_MODEL_CHARS):
        raise BadRequest(f"meta.model must be a string of 1..{MAX_MODEL_CHARS} characters")
    tokens = (_int(raw["block_tokens"], "meta.block_tokens", 1, 1 << 20)
              if raw.get("block_tokens") is not None else None)
    ids = raw.get("token_ids")
    if ids is not None:
        if not isinstance(ids, list) or len(ids) != n:
            raise BadRequest(f"meta.token_ids must list one token list per key ({n})")
        for row in ids:
            if not isinstance(row, list) or (tokens is not None and len(row) > tokens):
                raise BadRequest("each meta.token_ids entry is a list of at most block_tokens ids")
            for t in row:
                _int(t, "a token id", 0, (1 << 31) - 1)
    return [BlockMeta(ns, model, tokens, list(ids[i]) if ids is not None else None)
            for i in range(n)]


def matches(meta: BlockMeta | None, namespaces: frozenset[BlockKey], models: frozenset[str]) -> bool:
    """Whether a block belongs to one of the namespaces or models a purge names."""
    return meta is not None and (meta.namespace in namespaces or meta.model in models)
