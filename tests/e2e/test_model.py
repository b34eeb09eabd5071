"""The reference model on its own (no pool): splitting the work never changes a bit."""

from __future__ import annotations

import pytest
import torch

from engine.cache import PagedKVCache
from engine.config import ModelConfig
from engine.model import DecodeRow, Transformer, generate, tiled_linear
from engine.sampling import Sampling
from kvpool.errors import CacheFull

BT = 16


@pytest.fixture(scope="module")
def model() -> Transformer:
    torch.set_num_threads(1)
    return Transformer.random(ModelConfig())


def prompt(n: int, seed: int = 0) -> list[int]:
    return torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_tiled_linear_rows_do_not_depend_on_their_neighbours() -> None:
    torch.manual_seed(0)
    w, x = torch.randn(96, 64), torch.randn(20, 64)
    alone = torch.cat([tiled_linear(x[i:i + 1], w, 8) for i in range(20)])
    together = tiled_linear(x, w, 8)
    assert torch.equal(alone, together)
    # the reason it exists: plain matmuls round differently for different row counts
    plain = torch.cat([torch.nn.functional.linear(x[i:i + 1], w) for i in range(20)])
    assert not torch.equal(plain, torch.nn.functional.linear(x, w))


def test_same_seed_same_weights_and_other_seed_other_model() -> None:
    a, b = Transformer.random(ModelConfig(seed=1)), Transformer.random(ModelConfig(seed=1))
    c = Transformer.random(ModelConfig(seed=2))
    assert torch.equal(a.lm_head, b.lm_head) and a.model_id == b.model_id
    assert c.model_id != a.model_id


def test_checkpoint_round_trip(model: Transformer, tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "tiny.pt"
    model.save(path)
    loaded = Transformer.load(path)
    p = prompt(21)
    assert generate(loaded, p, 8, BT) == generate(model, p, 8, BT)
    assert "ckpt" in loaded.model_id


@pytest.mark.parametrize("length", [16, 37, 48])
def test_prefill_from_a_copied_prefix_gives_the_same_bits(model: Transformer, length: int) -> None:
    """Pages computed by one cache, copied into another, then the rest computed there:
    identical pages and logits (what a fetch from the pool does)."""
    p = prompt(length, seed=length)
    a = PagedKVCache(model.cfg, 8, BT)
    pa = a.allocate(4)
    full = model.prefill(a, pa, p, 0)
    b = PagedKVCache(model.cfg, 8, BT)
    pb = b.allocate(4)
    reused = (length - 1) // BT
    for i in range(reused):
        b.kv[pb[i]] = a.kv[pa[i]]
    rest = model.prefill(b, pb, p, reused * BT)
    assert torch.equal(full, rest)
    for i in range(length // BT):
        assert torch.equal(a.kv[pa[i]], b.kv[pb[i]])


def test_decode_step_does_not_depend_on_the_batch(model: Transformer) -> None:
    cache = PagedKVCache(model.cfg, 32, BT)
    seqs = []
    for n in (5, 16, 23, 40, 9):
        pages = cache.allocate(4)
        model.prefill(cache, pages, prompt(n, seed=n), 0)
        seqs.append((pages, n))
    rows = [DecodeRow(pages, 7, n) for pages, n in seqs]
    snapshot = cache.kv.clone()
    together = model.decode(cache, rows)
    for j, row in enumerate(rows):
        cache.kv.copy_(snapshot)
        alone = model.decode(cache, [row])
        assert torch.equal(alone[0], together[j]), f"row {j} changed with the batch"
    cache.kv.copy_(snapshot)
    reordered = model.decode(cache, rows[::-1])
    assert torch.equal(reordered.flip(0), together)


def test_sampling_is_a_function_of_seed_and_step(model: Transformer) -> None:
    p = prompt(30)
    hot = Sampling(temperature=1.0, seed=5)
    assert generate(model, p, 12, BT, hot) == generate(model, p, 12, BT, hot)
    assert generate(model, p, 12, BT, hot) != generate(model, p, 12, BT, Sampling(1.0, 6))


def test_cache_keeps_published_pages_until_memory_is_needed(model: Transformer) -> None:
    cache = PagedKVCache(model.cfg, 4, BT)
    pages = cache.allocate(3)
    cache.publish(pages[0], b"k" * 16)
    cache.publish(pages[1], b"l" * 16)
    cache.release(pages)
    cache.check()
    assert cache.lookup([b"k" * 16, b"l" * 16, b"m" * 16]) == pages[:2]
    cache.release(pages[:2])
    assert cache.allocate(2) and cache.cached_blocks == 2  # free pages go first
    got = cache.allocate(1)  # then the least recently used cached page: the prefix's leaf
    assert got == [pages[1]] and cache.lookup([b"k" * 16]) == [pages[0]]
    cache.release([pages[0]])
    with pytest.raises(CacheFull, match="available"):
        cache.allocate(2)
    cache.check()
