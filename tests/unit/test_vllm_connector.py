"""The vLLM connector's pieces that need no engine: its config refuses what it does not
know, and the blocks it saved become vLLM events, one per chained run."""

from __future__ import annotations

import pytest

pytest.importorskip("vllm")

from engine.vllm_kv.common import ConnectorConfig  # noqa: E402
from engine.vllm_kv.events import removed_events, stored_events  # noqa: E402
from kvpool.errors import ConfigError  # noqa: E402
from kvpool.keys import Namespace, block_keys  # noqa: E402


def test_unknown_extra_config_keys_are_errors() -> None:
    with pytest.raises(ConfigError, match="master_ulr"):
        ConnectorConfig.from_extra({"master_ulr": "http://x"}, "kv_both")
    with pytest.raises(ConfigError, match="no_such"):
        ConnectorConfig.from_extra({"no_such": 1}, "kv_both")


def test_roles_decide_what_is_saved_and_loaded() -> None:
    assert not ConnectorConfig.from_extra({}, "kv_consumer").save
    assert ConnectorConfig.from_extra({}, "kv_consumer").load
    producer = ConnectorConfig.from_extra({}, "kv_producer")
    assert producer.save and producer.load  # a prefill instance reuses prefixes too
    both = ConnectorConfig.from_extra({"save": False}, "kv_both")
    assert not both.save and both.load


def test_saved_blocks_become_one_event_per_chained_run() -> None:
    ns = Namespace("m", "float32", "vllm/cpu", block_tokens=4)
    a = block_keys(ns, list(range(12)))
    b = block_keys(ns, list(range(100, 108)))
    stored = [(a[0], None, "host"), (a[1], a[0], "host"), (a[2], a[1], "host"),
              (b[1], b[0], "host")]  # b[0] was in the pool already: not announced
    tokens = {a[0]: [0, 1, 2, 3], a[1]: [4, 5, 6, 7], a[2]: [8, 9, 10, 11]}
    events = stored_events(stored, 4, tokens)
    assert [e.block_hashes for e in events] == [a[:3], [b[1]]]
    assert [e.parent_block_hash for e in events] == [None, b[0]]
    assert events[0].token_ids == list(range(12)) and events[1].token_ids == []
    assert all(e.medium == "host" and e.block_size == 4 for e in events)


def test_dropped_blocks_are_removed_from_the_tier_they_were_read_from() -> None:
    ns = Namespace("m", "float32", "vllm/cpu", block_tokens=4)
    a = block_keys(ns, list(range(12)))
    events = removed_events([(a[0], "host"), (a[1], "gpu"), (a[2], "host")])
    assert [(e.medium, e.block_hashes) for e in events] == [("host", [a[0], a[2]]), ("gpu", [a[1]])]


def test_a_model_with_several_kv_cache_groups_is_refused_at_start() -> None:
    import torch
    from vllm.v1.kv_cache_interface import (FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec,
                                            SlidingWindowSpec)

    from engine.vllm_kv.common import namespaces

    full = FullAttentionSpec(block_size=32, num_kv_heads=2, head_size=64, dtype=torch.float32)
    window = SlidingWindowSpec(block_size=32, num_kv_heads=2, head_size=64, dtype=torch.float32,
                               sliding_window=128)
    hybrid = KVCacheConfig(num_blocks=16, kv_cache_tensors=[], kv_cache_groups=[
        KVCacheGroupSpec(["layers.0.attn"], full), KVCacheGroupSpec(["layers.1.attn"], window)])
    with pytest.raises(ConfigError, match="hybrid attention"):
        namespaces(None, hybrid, ConnectorConfig())


def test_a_tenants_key_secret_keys_every_ranks_namespace_root(tmp_path) -> None:
    from types import SimpleNamespace

    import torch
    from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec

    from engine.vllm_kv.common import namespaces

    spec = FullAttentionSpec(block_size=16, num_kv_heads=2, head_size=64, dtype=torch.float32)
    kv = KVCacheConfig(num_blocks=16, kv_cache_tensors=[],
                       kv_cache_groups=[KVCacheGroupSpec(["layers.0.attn"], spec)])
    hf = SimpleNamespace(to_json_string=lambda use_diff: "{}")
    vllm_config = SimpleNamespace(
        model_config=SimpleNamespace(model="m", revision=None, hf_config=hf),
        cache_config=SimpleNamespace(cache_dtype="auto"),
        parallel_config=SimpleNamespace(pipeline_parallel_size=1, tensor_parallel_size=2))
    (tmp_path / "keys").write_text("team-a-secret\n")
    plain = namespaces(vllm_config, kv, ConnectorConfig())
    keyed = namespaces(vllm_config, kv, ConnectorConfig.from_extra(
        {"key_secret": f"file:{tmp_path / 'keys'}", "namespace": "sys"}, "kv_both"))
    assert [n.secret for n in keyed] == ["team-a-secret"] * 2
    assert {n.root() for n in plain}.isdisjoint({n.root() for n in keyed})
