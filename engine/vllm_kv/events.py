"""KV events in vLLM's own schema for the blocks this instance saved to the pool, so that
vLLM's event publisher carries them beside its own cache events: ``block_hashes`` are the
kvpool keys (16 bytes), ``medium`` the pool tier that took them."""

from __future__ import annotations

from vllm.distributed.kv_events import BlockRemoved, BlockStored

from kvpool.keys import BlockKey


def stored_events(stored: list[tuple[BlockKey, BlockKey | None, str]], block_tokens: int,
                  token_ids: dict[BlockKey, list[int]] | None = None) -> list[BlockStored]:
    """BlockStored events for blocks newly saved (key, parent key, tier), in order: one
    event per run of blocks that chain on each other in one tier, as vLLM emits them.
    ``token_ids`` (taken from as they are announced) only where the config asks for them."""
    events: list[BlockStored] = []
    run: list[tuple[BlockKey, BlockKey | None, str]] = []
    for item in stored:
        if run and (item[1] != run[-1][0] or item[2] != run[-1][2]):
            events.append(_stored(run, block_tokens, token_ids))
            run = []
        run.append(item)
    if run:
        events.append(_stored(run, block_tokens, token_ids))
    return events


def _stored(run: list[tuple[BlockKey, BlockKey | None, str]], block_tokens: int,
            token_ids: dict[BlockKey, list[int]] | None) -> BlockStored:
    tokens = [t for k, _, _ in run for t in token_ids.pop(k, [])] if token_ids else []
    return BlockStored(block_hashes=[k for k, _, _ in run], parent_block_hash=run[0][1],
                       token_ids=tokens, block_size=block_tokens, lora_id=None,
                       medium=run[0][2], lora_name=None)


def removed_events(dropped: list[tuple[BlockKey, str]]) -> list[BlockRemoved]:
    """One BlockRemoved per tier, in first-seen order, for blocks the pool dropped (key,
    tier the copy was in)."""
    by_tier: dict[str, list[BlockKey]] = {}
    for key, tier in dropped:
        by_tier.setdefault(tier, []).append(key)
    return [BlockRemoved(block_hashes=keys, medium=tier) for tier, keys in by_tier.items()]
