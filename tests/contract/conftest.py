"""One harness per tier, so the contract suite runs unchanged against each of them.

A harness opens the tier (again, on the same storage, for the restart tests), picks
arena offsets the way the master would, and gives cold-tier tests raw access to stored
blobs (used only while the tier is closed) so they can damage them.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import AsyncIterator, Callable

import boto3
import lmdb
import pytest
import torch

from kvpool.keys import BlockKey
from kvpool.tiers.arena import ArenaTier
from kvpool.tiers.base import Tier, TierKind
from kvpool.tiers.object import ObjectTier
from kvpool.tiers.ssd import SsdTier

MiB = 1 << 20
CAPACITY = 24 * MiB
ALIGN = 4096

RawGet = Callable[[BlockKey], bytes | None]
RawPut = Callable[[BlockKey, bytes], None]


@dataclass
class Harness:
    name: str
    kind: TierKind
    capacity: int
    factory: Callable[[], Tier]
    raw_get: RawGet | None = None  # cold tiers: the stored blob (None: absent), bypassing the tier
    raw_put: RawPut | None = None
    opened: list[Tier] = field(default_factory=list)
    _next: int = 0

    @property
    def cold(self) -> bool:
        return not self.kind.is_arena

    def open(self) -> Tier:
        """A new instance over the same storage (a restart, for cold tiers)."""
        tier = self.factory()
        self.opened.append(tier)
        return tier

    def place(self, size: int) -> int:
        """Where a block goes: the next aligned offset in an arena, 0 in a cold tier."""
        if self.cold:
            return 0
        location = self._next
        self._next = -(-(location + size) // ALIGN) * ALIGN
        return location


def _ssd(tmp: Path) -> Harness:
    path = tmp / "ssd"

    def raw_get(key: BlockKey) -> bytes | None:
        with lmdb.open(str(path), map_size=1 << 30) as env, env.begin() as txn:
            return txn.get(key)

    def raw_put(key: BlockKey, blob: bytes) -> None:
        with lmdb.open(str(path), map_size=1 << 30) as env, env.begin(write=True) as txn:
            txn.put(key, blob)

    return Harness("ssd", TierKind.SSD, CAPACITY, lambda: SsdTier(path, CAPACITY), raw_get, raw_put)


def _folder(tmp: Path) -> Harness:
    root = tmp / "objects"

    def raw_get(key: BlockKey) -> bytes | None:
        path = root / "blocks" / key.hex()
        return path.read_bytes() if path.exists() else None

    return Harness("object-folder", TierKind.OBJECT, CAPACITY,
                   lambda: ObjectTier.from_url(f"file://{root}", CAPACITY), raw_get,
                   lambda key, blob: (root / "blocks" / key.hex()).write_bytes(blob))


def _s3(endpoint: str) -> Harness:
    bucket, prefix = f"kvpool-test-{uuid.uuid4().hex[:12]}", "node0"
    client = boto3.client("s3", endpoint_url=endpoint)

    def name(key: BlockKey) -> str:
        return f"{prefix}/blocks/{key.hex()}"

    def raw_get(key: BlockKey) -> bytes | None:
        try:
            return client.get_object(Bucket=bucket, Key=name(key))["Body"].read()
        except client.exceptions.NoSuchKey:
            return None

    return Harness("object-s3", TierKind.OBJECT, CAPACITY,
                   lambda: ObjectTier.from_url(f"s3://{bucket}/{prefix}", CAPACITY, s3_endpoint=endpoint),
                   raw_get,
                   lambda key, blob: client.put_object(Bucket=bucket, Key=name(key), Body=blob) and None)


_NO_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
TIERS = [
    pytest.param("gpu", marks=[_NO_CUDA, pytest.mark.gpu]),
    "host", "ssd", "object-folder", "object-s3",
]
ARENAS = [pytest.param("gpu", marks=[_NO_CUDA, pytest.mark.gpu]), "host"]


def make_harness(name: str, request: pytest.FixtureRequest, tmp_path: Path) -> Harness:
    if name == "gpu":
        return Harness(name, TierKind.GPU, CAPACITY, lambda: ArenaTier.gpu(CAPACITY, 0))
    if name == "host":
        return Harness(name, TierKind.HOST, CAPACITY, lambda: ArenaTier.host(CAPACITY))
    if name == "ssd":
        return _ssd(tmp_path)
    if name == "object-folder":
        return _folder(tmp_path)
    return _s3(request.getfixturevalue("moto_server"))


@pytest.fixture(params=TIERS)
async def harness(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Harness]:
    h = make_harness(request.param, request, tmp_path)
    yield h
    for tier in h.opened:
        await tier.close()


@pytest.fixture(params=ARENAS)
async def arena_harness(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Harness]:
    h = make_harness(request.param, request, tmp_path)
    yield h
    for tier in h.opened:
        await tier.close()


@pytest.fixture
def tier(harness: Harness) -> Tier:
    """The tier under test, opened once; the harness closes it."""
    return harness.open()
