"""Typed decoders for the fields of a request body, used at every boundary.

Each returns the value with its type and range checked, or raises BadRequest naming the
field, so a handler never meets a wrong type halfway through a mutation (and never turns
it into an ``internal`` error). Booleans are booleans and integers are integers: ``True``
is not 1 and ``"no"`` is not false. Batches are bounded (TooLarge names the limit), so
one call cannot hold a server's event loop for seconds.
"""

from __future__ import annotations

import math
from typing import Any, Callable, TypeVar

from kvpool.errors import BadRequest, TooLarge
from kvpool.keys import BlockKey, parse_key, raw_keys

T = TypeVar("T")
MAX_KEYS = 16384  # keys per call: a prompt of 4 M tokens at 256 per block; 2 MiB of frame
MAX_ITEMS = 65536  # entries of any other list in a call (leases, agents, nodes)
MAX_HEADER_BYTES = 4096  # an encoded block header is about a hundred bytes
U64 = (1 << 64) - 1
_MISSING: Any = object()


def body_map(raw: Any, what: str) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise BadRequest(f"{what} is a map of fields, not {type(raw).__name__}")
    return raw


def only(body: dict[str, Any], allowed: frozenset[str], what: str) -> None:
    """Refuse fields a call does not know (a typo must not be silently ignored)."""
    unknown = sorted(str(k) for k in body if k not in allowed)
    if unknown:
        raise BadRequest(f"{what} has unknown field(s) {', '.join(unknown)[:200]}; "
                         f"it takes {', '.join(sorted(allowed))}")


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def field(body: dict[str, Any], name: str, check: Callable[[Any, str], T],
          default: Any = _MISSING) -> T:
    """``body[name]`` through ``check``; absent (or null) gives ``default``, or a
    BadRequest when the field is required."""
    value = body.get(name)
    if value is None:
        if default is _MISSING:
            raise BadRequest(f"missing field '{name}'")
        return default  # type: ignore[no-any-return]
    return check(value, name)


def need(body: dict[str, Any], name: str, typ: type | tuple[type, ...]) -> Any:
    """A required field of a given type (``int`` never accepts a boolean)."""
    def check(value: Any, what: str) -> Any:
        if not isinstance(value, typ) or (isinstance(value, bool) and bool not in (
                typ if isinstance(typ, tuple) else (typ,))):
            raise BadRequest(f"field '{what}' has the wrong type ({_type_name(value)})")
        return value
    if name not in body:
        raise BadRequest(f"missing field '{name}'")
    return check(body[name], name)


def integer(lo: int = 0, hi: int = U64) -> Callable[[Any, str], int]:
    def check(value: Any, what: str) -> int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise BadRequest(f"'{what}' is an integer, not {_type_name(value)}")
        if not lo <= value <= hi:
            raise BadRequest(f"'{what}'={value} is outside {lo}..{hi}")
        return value
    return check


def number(lo: float, hi: float) -> Callable[[Any, str], float]:
    """A finite number in [lo, hi] (NaN and infinities are refused)."""
    def check(value: Any, what: str) -> float:
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise BadRequest(f"'{what}' is a number, not {_type_name(value)}")
        if not math.isfinite(value) or not lo <= value <= hi:
            raise BadRequest(f"'{what}'={value!r} is outside [{lo}, {hi}]")
        return float(value)
    return check


def boolean(value: Any, what: str) -> bool:
    if not isinstance(value, bool):
        raise BadRequest(f"'{what}' is true or false, not {_type_name(value)} {value!r:.40}")
    return value


def text(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise BadRequest(f"'{what}' is a string, not {_type_name(value)}")
    if len(value) > 1024:
        raise BadRequest(f"'{what}' is longer than 1024 characters")
    return value


def blob(limit: int) -> Callable[[Any, str], bytes]:
    def check(value: Any, what: str) -> bytes:
        if not isinstance(value, (bytes, bytearray)):
            raise BadRequest(f"'{what}' is binary, not {_type_name(value)}")
        if len(value) > limit:
            raise TooLarge(f"'{what}' has {len(value)} bytes, more than {limit}")
        return bytes(value)
    return check


def key(value: Any, what: str) -> BlockKey:
    try:
        return parse_key(value)
    except BadRequest as exc:
        raise BadRequest(f"'{what}': {exc}") from None


def optional_key(value: Any, what: str) -> BlockKey | None:
    return None if value is None else key(value, what)


def items(check: Callable[[Any, str], T], limit: int = MAX_ITEMS) -> Callable[[Any, str], list[T]]:
    """A list whose every element passes ``check``; longer than ``limit`` is TooLarge."""
    def decode(value: Any, what: str) -> list[T]:
        if not isinstance(value, list):
            raise BadRequest(f"'{what}' is a list, not {_type_name(value)}")
        if len(value) > limit:
            raise TooLarge(f"'{what}' has {len(value)} entries; at most {limit} per call "
                           "(split the batch)")
        return [check(v, f"{what}[{i}]") for i, v in enumerate(value)]
    return decode


def keys(value: Any, what: str) -> list[BlockKey]:
    """A list of block keys (``items(key)``), checked at C speed when every one is 16 raw
    bytes, as a client sends them: a 1000-key batch then costs ~40 us here, not ~300."""
    if isinstance(value, list) and len(value) <= MAX_KEYS and raw_keys(value):
        return value
    return _keys(value, what)


_keys = items(key, MAX_KEYS)


def same_length(what: str, first: tuple[str, list[Any]], *others: tuple[str, list[Any]]) -> None:
    for name, values in others:
        if len(values) != len(first[1]):
            raise BadRequest(f"{what}: '{name}' has {len(values)} entries but '{first[0]}' "
                             f"has {len(first[1])}; they go one per key")
