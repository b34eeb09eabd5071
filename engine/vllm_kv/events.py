"""KV events in vLLM's own schema for the blocks this instance saved to the pool, so that
vLLM's event publisher carries them beside its own cache events: ``block_hashes`` are the
kvpool keys (16 bytes), ``medium`` the pool tier that took them."""

from __future__ import annotations

from vllm.distributed.kv_events import BlockRemoved, BlockStored

from kvpool.keys import BlockKey


def stored_event(stored: list[tuple[BlockKey, BlockKey | None, str]], block_tokens: int
                 ) -> BlockStored:
    """One BlockStored for blocks saved in one step (a prefix chain: the first block's
    parent is the event's parent)."""
    return BlockStored(block_hashes=[k for k, _, _ in stored], parent_block_hash=stored[0][1],
                       token_ids=[], block_size=block_tokens, lora_id=None,
                       medium=stored[0][2], lora_name=None)


def removed_event(keys: list[BlockKey], tier: str) -> BlockRemoved:
    return BlockRemoved(block_hashes=list(keys), medium=tier)
