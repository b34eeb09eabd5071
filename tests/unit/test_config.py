"""Config files and environment overrides: typos are errors, never silent defaults."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvpool.config import load
from kvpool.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "kvpool.toml"
    path.write_text(text)
    return path


def test_tables_sizes_and_overrides(tmp_path: Path) -> None:
    path = write(tmp_path, '[master]\nport = 7711\n[daemon]\nhost_bytes = "2GiB"\n'
                           '[client]\nverify_checksum = false\n')
    cfg = load(path, environ={"KVPOOL_DAEMON_SSD_BYTES": "64MiB", "KVPOOL_CLIENT_VERIFY_CHECKSUM": "yes"})
    assert cfg.master.port == 7711 and cfg.daemon.host_bytes == 2 << 30
    assert cfg.daemon.ssd_bytes == 64 << 20 and cfg.client.verify_checksum is True


@pytest.mark.parametrize("text,needle", [
    ("[mastr]\nport = 1\n", "mastr"),
    ("[daemon]\nhost_byte = 1\n", "host_byte"),
    ("[master]\nport = 'eighty'\n", "port"),
    ("[client]\nverify_checksum = 'maybe'\n", "verify_checksum"),
    ("[master\n", "TOML"),
])
def test_mistakes_are_errors_that_name_the_problem(tmp_path: Path, text: str, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        load(write(tmp_path, text), environ={})


def test_unknown_environment_override_is_an_error() -> None:
    with pytest.raises(ConfigError, match="KVPOOL_MASTER_FOO"):
        load(None, environ={"KVPOOL_MASTER_FOO": "1"})


def test_example_configs_load() -> None:
    files = sorted((ROOT / "configs").glob("**/*.toml"))
    assert len(files) >= 8
    for path in files:
        load(path, environ={})
