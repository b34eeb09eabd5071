"""The one ``kvpool`` command: every verb pyproject.toml registers loads as the Verb of its
name, and the shared table helper lays out what the verbs print."""

from __future__ import annotations

import importlib
import tomllib
from pathlib import Path

from kvpool.cli import DAEMON, Verb, human, table

ROOT = Path(__file__).resolve().parents[2]


def _registered() -> dict[str, str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["scripts"]["kvpool"] == "kvpool.cli:main"
    return project["entry-points"]["kvpool.commands"]


def test_every_registered_verb_loads_under_its_name() -> None:
    registered = _registered()
    assert set(registered) | {DAEMON.name} == {"up", "master", "daemon", "cluster", "status",
                                                "events", "purge", "top", "drain", "block", "trace",
                                                "pin", "unpin", "evict", "tenants"}
    for name, target in registered.items():
        module, _, attr = target.partition(":")
        verb = getattr(importlib.import_module(module), attr)
        assert isinstance(verb, Verb) and verb.name == name, target


def test_the_core_verb_is_built_in_not_registered() -> None:
    """`daemon` needs no entry point; every registered verb sits with a package above the core."""
    assert all(not t.startswith("kvpool.") for t in _registered().values())


def test_table_and_sizes() -> None:
    out = table(["node", "blocks"], [["node0", 12], ["n1", 3]]).splitlines()
    assert out == ["node   blocks", "-----  ------", "node0  12", "n1     3"]
    assert [human(512), human(1536), human(3 * 2**30)] == ["512 B", "1.5 KiB", "3.0 GiB"]
