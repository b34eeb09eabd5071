"""Every typed error crosses a process boundary as its code and comes back as its class."""

from __future__ import annotations

import gc

import pytest

from kvpool import errors
from kvpool.errors import KVPoolError, error_from_code


def _classes(root: type[KVPoolError] = KVPoolError) -> list[type[KVPoolError]]:
    out = [root]
    for sub in root.__subclasses__():
        out += _classes(sub)
    return out


def test_every_error_has_its_own_code_and_comes_back_as_itself() -> None:
    classes = _classes()
    names = {c.__name__ for c in classes}
    assert {"LeaseExpired", "CacheFull", "NotLeader", "TierFull", "ChecksumMismatch"} <= names
    assert len({c.code for c in classes}) == len(classes)
    for cls in classes:
        back = error_from_code(cls.code, f"a {cls.__name__}")
        assert type(back) is cls and str(back) == f"a {cls.__name__}"
        assert 400 <= back.http_status < 600


def test_every_error_is_defined_with_the_table() -> None:
    """A class defined elsewhere would be unknown where its module is not imported."""
    assert all(c.__module__ == errors.__name__ for c in _classes())


def test_the_old_homes_name_the_same_classes() -> None:
    from engine.cache import CacheFull
    from kvpool.coordinator import LeaseExpired

    assert CacheFull is errors.CacheFull and LeaseExpired is errors.LeaseExpired


def test_an_unknown_code_is_the_root() -> None:
    assert type(error_from_code("from_a_newer_peer", "x")) is KVPoolError


def test_a_class_without_its_own_code_or_with_anothers_is_refused() -> None:
    with pytest.raises(TypeError, match="code of its own"):
        type("Uncoded", (errors.BadRequest,), {})
    with pytest.raises(TypeError, match="'not_found' of BlockNotFound"):
        type("Twin", (KVPoolError,), {"code": "not_found"})
    assert type(error_from_code("not_found", "x")) is errors.BlockNotFound
    gc.collect()  # the refused classes leave KVPoolError.__subclasses__() once collected
    assert {"Uncoded", "Twin"}.isdisjoint(c.__name__ for c in _classes())
