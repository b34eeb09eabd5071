"""The master's arena allocator: alignment, coalescing, rejects, and fragmentation."""

from __future__ import annotations

import random
import time

import pytest

from kvpool.errors import BadRequest
from master.allocator import ArenaAllocator

KiB, MiB = 1 << 10, 1 << 20


def test_aligned_offsets_exhaustion_and_coalescing() -> None:
    a = ArenaAllocator(1 * MiB, alignment=4 * KiB)
    offs = [a.allocate(100_000) for _ in range(10)]
    assert all(o is not None and o % (4 * KiB) == 0 for o in offs)
    assert a.used == 10 * 100 * KiB  # 100,000 bytes round up to 25 pages of 4 KiB
    assert a.allocate(200 * KiB) is None
    for o in offs[::2] + offs[1::2]:
        a.free(o)  # type: ignore[arg-type]
        a.check()
    assert a.largest_free == a.capacity and a.fragmentation == 0.0


def test_bad_frees_and_reservations_change_nothing() -> None:
    a = ArenaAllocator(1 * MiB)
    off = a.allocate(8 * KiB)
    a.free(off)  # type: ignore[arg-type]
    for bad in (off, 12345):
        with pytest.raises(BadRequest):
            a.free(bad)  # type: ignore[arg-type]
    a.check()
    a.reserve_at(64 * KiB, 8 * KiB)
    with pytest.raises(BadRequest):
        a.reserve_at(68 * KiB, 8 * KiB)  # overlaps
    with pytest.raises(BadRequest):
        a.reserve_at(1 * MiB - 4 * KiB, 8 * KiB)  # past the end
    with pytest.raises(BadRequest):
        a.allocate(0)
    a.check()
    assert a.used == 8 * KiB


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_fragmentation_under_mixed_churn(seed: int) -> None:
    """Blocks of 4 KiB to 4 MiB come and go at 70% occupancy for 20,000 steps."""
    rng = random.Random(seed)
    a = ArenaAllocator(256 * MiB)
    live: list[int] = []
    worst = 0.0
    for step in range(20_000):
        if a.used < 0.7 * a.capacity:
            off = a.allocate(rng.choice([4 * KiB, 64 * KiB, 256 * KiB, 1 * MiB, 4 * MiB]))
            assert off is not None, f"allocation failed with {a.free_bytes >> 20} MiB free"
            live.append(off)
        else:
            a.free(live.pop(rng.randrange(len(live))))
        if step > 2000:
            worst = max(worst, a.fragmentation)
        if step % 1000 == 0:
            a.check()
    # Best fit with coalescing keeps the largest hole at least ~45% of the free space here
    # (measured worst over six seeds: fragmentation 0.47-0.55); 0.7 leaves room for noise
    # yet fails an allocator that crumbles free space into block-sized holes.
    assert worst < 0.7, worst
    for off in live:
        a.free(off)
    a.check()
    assert a.largest_free == a.capacity


def test_fast_enough_for_many_blocks() -> None:
    a = ArenaAllocator(4 << 30)
    t = time.perf_counter()
    offs = [a.allocate(256 * KiB) for _ in range(10_000)]
    for o in offs:
        a.free(o)  # type: ignore[arg-type]
    assert time.perf_counter() - t < 2.0


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_reserving_a_page_at_once_takes_what_one_at_a_time_would(seed: int) -> None:
    """An inventory page reserved in one call holds the same extents as reserve_at one by
    one, and refuses the same items: used space, overlaps, misaligned or empty extents."""
    rng = random.Random(seed)
    one, many = ArenaAllocator(4 * MiB, 4 * KiB), ArenaAllocator(4 * MiB, 4 * KiB)
    for a in (one, many):  # some space already in use
        a.reserve_at(64 * KiB, 8 * KiB)
        a.reserve_at(1 * MiB, 100 * KiB)
    extents = [(rng.randrange(0, 1024) * 4 * KiB + rng.choice([0, 0, 0, 0, 512]),
                rng.choice([4 * KiB, 4 * KiB, 10_000, 0])) for _ in range(400)]
    extents = sorted(dict(extents).items())  # distinct offsets; the lower wins an overlap
    refused_one = []
    for n, (offset, size) in enumerate(extents):
        try:
            one.reserve_at(offset, size)
        except BadRequest:
            refused_one.append(n)
    rng.shuffle(order := list(range(len(extents))))
    shuffled = [extents[n] for n in order]
    refused_many = sorted(order[n] for n in many.reserve_many(shuffled))
    assert refused_many == refused_one and 0 < len(refused_one) < len(extents)
    assert many._allocated == one._allocated and many.used == one.used
    many.check()
