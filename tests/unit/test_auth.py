"""Credentials: which role a header proves, secrets from files, and secrets never shown."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvpool import auth
from kvpool.auth import Credentials, Role
from kvpool.config import ClientConfig, DaemonConfig, MasterConfig, load
from kvpool.errors import ConfigError, Forbidden, Unauthorized


def test_a_header_proves_its_role_and_nothing_else() -> None:
    creds = Credentials.of({Role.CLIENT: ["e1", "e2"], Role.ADMIN: ["root"]})
    assert creds.role_of("Bearer e2") is Role.CLIENT
    assert creds.role_of("bearer root") is Role.ADMIN
    for bad in (None, "", "Bearer", "Basic e1", "Bearer e3", "Bearer e1x"):
        with pytest.raises(Unauthorized):
            creds.role_of(bad)
    assert Credentials().role_of(None) is None  # none configured: open


def test_what_each_role_may_act_as() -> None:
    auth.require(Role.CLIENT, role=Role.ADMIN)
    auth.require(Role.VIEWER, role=Role.ADMIN)
    auth.require(Role.CLIENT, Role.CLUSTER, role=Role.CLUSTER)
    for role, needed in ((Role.CLIENT, Role.ADMIN), (Role.VIEWER, Role.CLIENT),
                         (Role.ADMIN, Role.CLUSTER), (Role.CLUSTER, Role.CLIENT)):
        with pytest.raises(Forbidden, match=f"needs the {needed.value} credential"):
            auth.require(needed, role=role)


def test_one_secret_for_two_roles_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="its own"):
        MasterConfig(cluster_token="same", admin_token="same").credentials()


def test_secrets_come_from_files_and_never_show(tmp_path: Path) -> None:
    (tmp_path / "c.token").write_text("from-a-file\n")
    cfg = load(None, environ={"KVPOOL_MASTER_CLUSTER_TOKEN": f"file:{tmp_path / 'c.token'}",
                              "KVPOOL_MASTER_CLIENT_TOKENS": f"e1, file:{tmp_path / 'c.token'}x",
                              "KVPOOL_CLIENT_TOKEN": "engine-secret"})
    with pytest.raises(ConfigError, match="cannot read the credential file"):
        cfg.master.credentials()
    cfg = load(None, environ={"KVPOOL_MASTER_CLUSTER_TOKEN": f"file:{tmp_path / 'c.token'}",
                              "KVPOOL_MASTER_CLIENT_TOKENS": "e1,e2"})
    creds = cfg.master.credentials()
    assert creds.role_of("Bearer from-a-file") is Role.CLUSTER
    assert creds.role_of("Bearer e2") is Role.CLIENT
    shown = repr(cfg) + repr(creds) + repr(ClientConfig(token="engine-secret"))
    shown += repr(DaemonConfig(cluster_token="node-secret"))
    for secret in ("from-a-file", "e1", "e2", "engine-secret", "node-secret"):
        assert secret not in shown
    (tmp_path / "empty.token").write_text("")
    with pytest.raises(ConfigError, match="is empty"):
        auth.secret(f"file:{tmp_path / 'empty.token'}", "x")


def test_only_loopback_may_run_open() -> None:
    auth.guard_bind("127.0.0.1", Credentials(), "the master")
    auth.guard_bind("localhost", Credentials(), "the master")
    auth.guard_bind("0.0.0.0", Credentials.of({Role.CLUSTER: ["c"]}), "the master")
    for host in ("0.0.0.0", "::", "192.0.2.1"):
        with pytest.raises(ConfigError, match="no credentials configured"):
            auth.guard_bind(host, Credentials(), "the master")


def test_a_membership_proof_binds_what_the_key_says() -> None:
    proof = auth.membership_proof("c", "node1", "http://h:1", "agent")
    info = {"url": "http://h:1", "agent": "agent", "proof": proof}
    assert auth.membership_proof_ok("c", "node1", info)
    assert not auth.membership_proof_ok("other", "node1", info)
    assert not auth.membership_proof_ok("c", "node2", info)
    assert not auth.membership_proof_ok("c", "node1", {**info, "url": "http://evil:1"})
    assert not auth.membership_proof_ok("c", "node1", {**info, "proof": ""})


def test_nixl_listens_on_the_interface_of_the_configured_host() -> None:
    from kvpool.transfer import _interface_of, _net_devices, client_host

    assert _interface_of("127.0.0.1") == _interface_of("::1") == _interface_of("localhost") == "lo"
    assert _net_devices("0.0.0.0") is None and _net_devices("") is None
    with pytest.raises(ConfigError, match="no network interface"):
        _interface_of("203.0.113.77")  # TEST-NET-3: no interface of this machine
    assert client_host("", "http://127.0.0.1:7700,http://localhost:7701") == "127.0.0.1"
    assert client_host("", "127.0.0.1:2379") == "127.0.0.1"
    assert client_host("", "http://127.0.0.1:7700,http://10.0.0.10:7700") == ""
    assert client_host("10.0.0.5", "http://127.0.0.1:7700") == "10.0.0.5"


def test_the_cluster_example_configs_will_not_start_without_their_credentials() -> None:
    root = Path(__file__).resolve().parents[2] / "configs" / "cluster"
    master = load(root / "master.toml", environ={}).master
    assert master.host == "0.0.0.0"
    with pytest.raises(ConfigError, match="cannot read the credential file /etc/kvpool/"):
        master.credentials()
    daemon = load(root / "node1.toml", environ={}).daemon
    assert daemon.cluster_token == "file:/etc/kvpool/cluster.token"
    client = load(root / "client.toml", environ={}).client
    assert client.token == "file:/etc/kvpool/client.token"
