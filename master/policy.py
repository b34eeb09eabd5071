"""Eviction and admission policies: which blocks of a tier go first, and which may enter
a slower tier. One interface; the master holds one policy per (owner, tier)."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Iterator, Protocol


@dataclass(frozen=True, slots=True)
class BlockInfo:
    key: bytes  # 16-byte block key
    size: int  # payload bytes
    parent: bytes | None  # the key this block chains from (None for a first block)


class EvictionPolicy(Protocol):
    """Orders the blocks of one tier of one node (or one shared store) for eviction."""

    name: str

    def admit(self, info: BlockInfo, now: float) -> bool:
        """May this block enter this tier as a demotion target?"""

    def inserted(self, info: BlockInfo, now: float) -> None: ...

    def accessed(self, key: bytes, now: float) -> None: ...

    def removed(self, key: bytes) -> None: ...

    def victims(self) -> Iterator[bytes]:
        """Keys this tier holds, best victim first."""

    def __len__(self) -> int: ...


class PolicyFactory(Protocol):
    name: str

    def make(self, tier: str, capacity_bytes: int) -> EvictionPolicy: ...


class Lru:
    """Least recently used first; admits everything."""

    name = "lru"

    def __init__(self) -> None:
        self._order: OrderedDict[bytes, None] = OrderedDict()

    def admit(self, info: BlockInfo, now: float) -> bool:
        return True

    def inserted(self, info: BlockInfo, now: float) -> None:
        self._order[info.key] = None
        self._order.move_to_end(info.key)

    def accessed(self, key: bytes, now: float) -> None:
        if key in self._order:
            self._order.move_to_end(key)

    def removed(self, key: bytes) -> None:
        self._order.pop(key, None)

    def victims(self) -> Iterator[bytes]:
        return iter(list(self._order))

    def __len__(self) -> int:
        return len(self._order)


class LruFactory:
    name = "lru"

    def make(self, tier: str, capacity_bytes: int) -> EvictionPolicy:
        return Lru()


POLICIES: dict[str, Callable[[], PolicyFactory]] = {"lru": LruFactory}
DEFAULT_POLICY = "lru"
