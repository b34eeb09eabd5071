"""Credentials, with real processes on 127.0.0.1: a master and a daemon that hold one per
role. Every entry point refuses a caller without a credential, with a wrong one and with
another role's, and serves the right one; the attacks issue 12 found now fail."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest

from clients.client import AsyncPoolClient
from kvpool.config import ClientConfig
from kvpool.daemon_link import DAEMON_RPC_PATH, DaemonCall
from kvpool.errors import BadRequest, Forbidden, KVPoolError, Unauthorized, Unavailable
from kvpool.keys import Namespace, block_keys
from kvpool.launcher import spawn, stop
from kvpool.protocol import Call
from kvpool.streamrpc import StreamRpcClient
from kvpool.wire import RpcClient
from tests.integration.conftest import DAEMON_ENV, MASTER_ENV, ROOT, Pool

TOKENS = {"cluster": "cluster-" + "c" * 40, "client": "client-" + "e" * 40,
          "admin": "admin-" + "a" * 40, "viewer": "viewer-" + "v" * 40}
WRONG = "wrong-" + "w" * 40


@pytest.fixture(scope="module")
def secure(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pool]:
    """A master and a daemon with credentials; the cluster's comes from a file (file:PATH)."""
    tmp = tmp_path_factory.mktemp("secure")
    (tmp / "cluster.token").write_text(TOKENS["cluster"] + "\n")
    cluster = f"file:{tmp / 'cluster.token'}"
    master_env = {**MASTER_ENV, "KVPOOL_MASTER_CLUSTER_TOKEN": cluster,
                  "KVPOOL_MASTER_CLIENT_TOKENS": f"other-engine-{'x' * 30},{TOKENS['client']}",
                  "KVPOOL_MASTER_ADMIN_TOKEN": TOKENS["admin"],
                  "KVPOOL_MASTER_VIEWER_TOKEN": TOKENS["viewer"]}
    pool = Pool(tmp, master_env, {**DAEMON_ENV, "KVPOOL_DAEMON_CLUSTER_TOKEN": cluster})
    pool.start_master()
    pool.start_daemon()
    try:
        yield pool
    finally:
        pool.stop()


TRANSPORTS = {"ws": RpcClient, "stream": StreamRpcClient}


def rpc(url: str, method: str, body: dict[str, Any] | None = None, token: str = "",
        path: str = "/v1/rpc", transport: str = "ws") -> Any:
    """One RPC call on a connection of its own (WebSocket or stream), presenting ``token``."""
    async def run() -> Any:
        client = TRANSPORTS[transport](url, timeout_s=10, path=path, token=token)
        try:
            return await client.call(method, body or {})
        finally:
            await client.close()

    with ThreadPoolExecutor(1) as thread:  # callable from sync and async tests alike
        return thread.submit(asyncio.run, run()).result()


def outcome(url: str, method: str, body: dict[str, Any] | None = None, token: str = "",
            path: str = "/v1/rpc", transport: str = "ws") -> str:
    """'unauthorized', 'forbidden', or 'served' (the call got past the credential check: an
    answer, or an error about its body)."""
    try:
        rpc(url, method, body, token, path, transport)
    except Unauthorized:
        return "unauthorized"
    except Forbidden:
        return "forbidden"
    except KVPoolError:
        return "served"
    return "served"


def http(url: str, path: str, method: str = "GET", token: str = "") -> tuple[int, dict]:
    req = urllib.request.Request(url + path, method=method,
                                 data=b"{}" if method in ("POST", "PUT") else None)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            if resp.headers.get("Content-Type", "").startswith("text/event-stream"):
                return resp.status, {}
            body = resp.read()
            return resp.status, json.loads(body) if body.startswith(b"{") else {}
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


def client(pool: Pool, token: str = TOKENS["client"]) -> AsyncPoolClient:
    return AsyncPoolClient(ClientConfig(master_url=pool.master_url, token=token))


def keys(name: str, n: int) -> list[bytes]:
    ns = Namespace(model_id=f"security-{name}", dtype="uint8", kv_layout="raw", block_tokens=4)
    return [k for k in block_keys(ns, list(range(4 * n)))]


ENGINE_CALLS = [Call.RESERVE, Call.COMMIT, Call.ABORT, Call.GET, Call.RELEASE, Call.EXISTS,
                Call.MATCH, Call.REMOVE, Call.PIN, Call.UNPIN, Call.CORRUPT]
# Who gets past the check, per master RPC call (admin acts as a client too).
SERVED = {**{c: {"client", "admin"} for c in ENGINE_CALLS},
          Call.AGENTS: {"client", "admin", "cluster"},
          Call.REGISTER: {"cluster"}, Call.HEARTBEAT: {"cluster"}, Call.CHECK: {"admin"}}


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_the_master_rpc_serves_each_call_to_its_roles_only(secure: Pool, transport: str) -> None:
    assert set(SERVED) == set(Call)
    url = secure.master_url
    for call, roles in SERVED.items():
        assert outcome(url, call, transport=transport) == "unauthorized", call
        assert outcome(url, call, token=WRONG, transport=transport) == "unauthorized", call
        for role, token in TOKENS.items():
            expected = "served" if role in roles else "forbidden"
            assert outcome(url, call, token=token, transport=transport) == expected, (call, role)


def test_a_refusal_says_what_to_do(secure: Pool) -> None:
    with pytest.raises(Unauthorized, match="none was presented.*\\[client\\] token"):
        rpc(secure.master_url, Call.EXISTS, {"keys": []})
    with pytest.raises(Unauthorized, match="requires a credential.*\\[client\\] token"):
        rpc(secure.master_url, Call.EXISTS, {"keys": []}, transport="stream")
    for transport in TRANSPORTS:
        with pytest.raises(Forbidden, match="'check' needs the admin credential.*client credential"):
            rpc(secure.master_url, Call.CHECK, token=TOKENS["client"], transport=transport)


async def test_an_engine_with_its_credential_puts_and_gets(secure: Pool) -> None:
    ks = keys("roundtrip", 2)
    values = [np.frombuffer(os.urandom(1 << 16), np.uint8) for _ in ks]
    async with client(secure) as c:
        assert all(r.stored for r in await c.batch_put(ks, values))
        out = [np.empty_like(v) for v in values]
        assert all(r.hit for r in await c.batch_get(ks, out))
        assert all(np.array_equal(a, b) for a, b in zip(out, values))
        assert await c.match_prefix(ks) == 2
    rpc(secure.master_url, Call.CHECK, token=TOKENS["admin"])  # the admin's check passes


async def test_an_outsider_can_neither_read_nor_pre_place_blocks(secure: Pool) -> None:
    ks = keys("outsider", 1)
    value = np.frombuffer(os.urandom(4096), np.uint8)
    for token in ("", WRONG, TOKENS["viewer"], TOKENS["cluster"]):
        async with client(secure, token) as outsider:
            with pytest.raises((Unauthorized, Forbidden)):
                await outsider.put(ks[0], value)  # no pre-placed block under a victim's key
            with pytest.raises((Unauthorized, Forbidden)):
                await outsider.get_bytes(ks[0])
    async with client(secure) as victim:
        assert (await victim.put(ks[0], value)).stored  # the victim's put is the first
        assert await victim.get_bytes(ks[0]) == value.tobytes()
        async with client(secure, "") as outsider:
            with pytest.raises(Unauthorized):
                await outsider.get_bytes(ks[0])


async def test_only_an_admin_forces_a_remove_and_force_must_be_a_boolean(secure: Pool) -> None:
    ks = keys("force", 1)
    async with client(secure) as c:
        await c.put(ks[0], np.ones(4096, np.uint8))
        assert await c.pin(ks) == 1
    body = {"keys": [ks[0]], "force": True}
    with pytest.raises(Forbidden, match="forced remove"):
        rpc(secure.master_url, Call.REMOVE, body, TOKENS["client"])
    with pytest.raises(BadRequest, match="force"):
        rpc(secure.master_url, Call.REMOVE, {**body, "force": "no"}, TOKENS["admin"])
    assert rpc(secure.master_url, Call.EXISTS, {"keys": ks}, TOKENS["client"])["present"] == [True]
    assert rpc(secure.master_url, Call.REMOVE, body, TOKENS["admin"])["removed"] == [True]
    assert rpc(secure.master_url, Call.EXISTS, {"keys": ks}, TOKENS["client"])["present"] == [False]


READS = ["/v1/cluster", "/v1/nodes", "/metrics", "/openapi.json", "/v1/events", "/v1/stats",
         "/v1/nodes/node0/drain"]


def test_the_admin_api_wants_a_viewer_to_read_and_an_admin_to_change(secure: Pool) -> None:
    ks = keys("admin-api", 1)
    asyncio.run(_put(secure, ks[0]))
    url = secure.master_url
    for path in ("/healthz", "/readyz"):
        assert http(url, path)[0] == 200, path
    for path in READS + [f"/v1/blocks/{ks[0].hex()}"]:
        assert http(url, path)[0] == 401, path
        assert http(url, path, token=WRONG)[0] == 401, path
        assert http(url, path, token=TOKENS["client"])[0] == 403, path
        assert http(url, path, token=TOKENS["cluster"])[0] == 403, path
        assert http(url, path, token=TOKENS["viewer"])[0] == 200, path
        assert http(url, path, token=TOKENS["admin"])[0] == 200, path
    status, body = http(url, "/v1/events")
    assert status == 401 and body["error"] == "unauthorized"
    assert _with_cookie(url, "/v1/events", "GET", TOKENS["viewer"]) == 200  # a browser's
    assert _with_cookie(url, "/v1/events", "GET", TOKENS["client"]) == 403
    assert _with_cookie(url, f"/v1/blocks/{ks[0].hex()}/pin", "POST", TOKENS["admin"]) == 401
    pin = f"/v1/blocks/{ks[0].hex()}/pin"
    for token in ("", WRONG):
        assert http(url, pin, "POST", token)[0] == 401
    for role in ("viewer", "client", "cluster"):
        status, body = http(url, pin, "POST", TOKENS[role])
        assert (status, body["error"]) == (403, "forbidden"), role
    assert http(url, pin, "POST", TOKENS["admin"])[0] == 200
    assert http(url, f"/v1/blocks/{ks[0].hex()}?force=no", "DELETE", TOKENS["admin"])[0] == 400
    assert http(url, f"/v1/blocks/{ks[0].hex()}", "DELETE", TOKENS["viewer"])[0] == 403
    assert http(url, f"/v1/blocks/{ks[0].hex()}?force=true", "DELETE", TOKENS["admin"])[0] == 200
    assert http(url, "/v1/evict", "POST", TOKENS["client"])[0] == 403
    for change in ("/v1/purge", "/v1/nodes/node0/drain"):  # refused before any body is read
        assert http(url, change, "POST")[0] == 401, change
        assert http(url, change, "POST", WRONG)[0] == 401, change
        for role in ("viewer", "client", "cluster"):
            assert http(url, change, "POST", TOKENS[role])[0] == 403, (change, role)
    assert http(url, "/v1/nodes/node0/drain", "DELETE", TOKENS["viewer"])[0] == 403


def _with_cookie(url: str, path: str, method: str, token: str) -> int:
    req = urllib.request.Request(url + path, method=method, data=b"{}" if method == "POST" else None,
                                 headers={"Cookie": f"kvpool_token={token}"})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status
    except urllib.error.HTTPError as err:
        return err.code


async def _put(pool: Pool, key: bytes) -> None:
    async with client(pool) as c:
        await c.put(key, np.ones(4096, np.uint8))


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_the_daemon_answers_the_cluster_credential_only(secure: Pool, transport: str) -> None:
    url, path = secure.daemon_url, DAEMON_RPC_PATH
    for call in DaemonCall:
        assert outcome(url, call, path=path, transport=transport) == "unauthorized", call
        assert outcome(url, call, token=WRONG, path=path, transport=transport) == "unauthorized", call
        for role in ("client", "admin", "viewer"):  # the daemon knows the cluster's only
            assert outcome(url, call, token=TOKENS[role], path=path,
                           transport=transport) == "unauthorized"
    health = rpc(url, DaemonCall.HEALTH, token=TOKENS["cluster"], path=path, transport=transport)
    assert health["node_id"] == "node0"
    assert http(url, "/healthz")[0] == 200


def test_the_daemon_probes_of_issue_12_are_refused(secure: Pool) -> None:
    """drop, copy, adopt and registration (NIXL metadata, arena address) without the
    cluster credential: refused, and the pool still serves what it held."""
    ks = keys("daemon-probes", 1)
    asyncio.run(_put(secure, ks[0]))
    url = secure.daemon_url
    probes = [(DaemonCall.DROP, {"tier": "host", "keys": ks}),
              (DaemonCall.COPY, {"keys": ks, "src": "host", "dst": "host", "locations": [1 << 20]}),
              (DaemonCall.ADOPT, {"blocks": [[ks[0], "host", 1 << 20, 4096, b"x" * 64]]}),
              (DaemonCall.REGISTRATION, {})]
    for call, body in probes:
        for token in ("", TOKENS["client"], TOKENS["admin"]):
            for transport in TRANSPORTS:
                with pytest.raises((Unauthorized, Forbidden)):
                    rpc(url, call, body, token, DAEMON_RPC_PATH, transport)
    with pytest.raises(BadRequest, match="rescan"):
        rpc(url, DaemonCall.REGISTRATION, {"rescan": "no"}, TOKENS["cluster"], DAEMON_RPC_PATH)

    async def read() -> bytes | None:
        async with client(secure) as c:
            return await c.get_bytes(ks[0])

    assert asyncio.run(read()) == bytes(np.ones(4096, np.uint8))
    rpc(secure.master_url, Call.CHECK, token=TOKENS["admin"])


def test_a_rogue_daemon_cannot_join(secure: Pool, tmp_path: Path) -> None:
    for token in ("", WRONG, TOKENS["client"]):
        env = {**os.environ, **DAEMON_ENV, "KVPOOL_DAEMON_CLUSTER_TOKEN": token}
        proc = subprocess.run([sys.executable, "-m", "kvpool", "daemon", "--master",
                               secure.master_url, "--node-id", "rogue", "--data-dir",
                               str(tmp_path / "rogue")], env=env, cwd=ROOT,
                              capture_output=True, timeout=120)
        assert proc.returncode != 0
        assert b"Unauthorized" in proc.stderr or b"Forbidden" in proc.stderr, proc.stderr[-2000:]
    nodes = http(secure.master_url, "/v1/nodes", token=TOKENS["viewer"])[1]["nodes"]
    assert [n["node_id"] for n in nodes] == ["node0"]
    # A fake registration (junk metadata, a 1 TiB host tier) with an engine's credential:
    fake = {"node_id": "fake", "url": "http://127.0.0.1:1", "agent": "fake", "metadata": b"junk",
            "ttl_s": 15.0, "tiers": [["host", 1 << 40, 4096, "DRAM", 0, ""]], "inventory": []}
    with pytest.raises(Forbidden):
        rpc(secure.master_url, Call.REGISTER, fake, TOKENS["client"])
    with pytest.raises(Forbidden):
        rpc(secure.master_url, Call.HEARTBEAT, {"node_id": "node0", "agent": "x"}, TOKENS["admin"])


def _listeners(pid: int) -> list[str]:
    """Local addresses of the TCP sockets process ``pid`` listens on."""
    out = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, check=True).stdout
    return [line.split()[3] for line in out.splitlines() if f"pid={pid}," in line]


async def test_nothing_listens_beyond_the_configured_host(secure: Pool) -> None:
    """The daemon (HTTP and NIXL/UCX), the master, and a client's own NIXL agent."""
    async with client(secure) as c:
        await c.put(keys("listen", 1)[0], np.ones(4096, np.uint8))  # the agent exists now
        for pid in (secure.procs["daemon"].pid, secure.procs["master"].pid, os.getpid()):
            found = _listeners(pid)
            assert found, pid
            assert all(a.startswith("127.0.0.1:") for a in found), (pid, found)
        assert len(_listeners(secure.procs["daemon"].pid)) >= 2  # its HTTP and UCX listeners


@pytest.mark.parametrize("verb", ["master", "daemon"])
def test_a_server_reachable_from_the_network_will_not_run_open(verb: str, tmp_path: Path) -> None:
    args = [sys.executable, "-m", "kvpool", verb, "--host", "0.0.0.0"]
    if verb == "daemon":
        args += ["--master", "http://127.0.0.1:1", "--data-dir", str(tmp_path / "d")]
    env = {**os.environ, **DAEMON_ENV}
    proc = subprocess.run(args, env=env, cwd=ROOT, capture_output=True, timeout=120)
    assert proc.returncode == 2
    assert b"no credentials configured" in proc.stderr, proc.stderr[-2000:]


def test_a_secured_single_process_pool_needs_one_credential_per_role(tmp_path: Path) -> None:
    """`kvpool up` hands the master's cluster credential to its own daemon."""
    env = {"KVPOOL_MASTER_CLUSTER_TOKEN": TOKENS["cluster"], "KVPOOL_MASTER_CLIENT_TOKENS":
           TOKENS["client"], **DAEMON_ENV}
    proc, info = spawn("kvpool", ["up", "--port", "0", "--data-dir", str(tmp_path / "d")], env,
                       tmp_path / "up.log")
    try:
        pool = Pool(tmp_path, {}, {}, master_url=info["master"])

        async def roundtrip() -> bytes | None:
            async with client(pool) as c:
                await c.put(keys("up", 1)[0], np.ones(4096, np.uint8))
                return await c.get_bytes(keys("up", 1)[0])

        assert asyncio.run(roundtrip()) == bytes(np.ones(4096, np.uint8))
        assert http(info["master"], "/v1/nodes")[0] == 401
    finally:
        stop(proc)


async def test_in_a_cluster_a_daemon_without_the_cluster_credential_is_not_taken_in(
        tmp_path: Path) -> None:
    """With etcd, daemons join by writing their key there; a key without a proof of the
    cluster credential names no daemon the leader connects to (nor shows its credential to)."""
    from tests.integration.cluster import DAEMON_ENV as NODE_ENV, MASTER_ENV as LEADER_ENV, TTL, Cluster

    if shutil.which("etcd") is None:
        pytest.skip("needs an etcd server binary: apt-get install etcd-server")
    c = Cluster(tmp_path, cluster="sec", ttl_s=TTL, master_env=LEADER_ENV, daemon_env=NODE_ENV)
    creds = c.generate_credentials()
    try:
        c.start_etcd()
        c.start_master("m0")
        c.wait_leader()
        c.start_daemon("node0")
        c.start_daemon("rogue", env={"KVPOOL_DAEMON_CLUSTER_TOKEN": ""})
        c.wait_nodes({"node0"})
        await asyncio.sleep(2 * TTL)  # the leader has seen the rogue's key and passed on it
        assert c.nodes() == {"node0"}
        assert "lacks a valid proof" in c.procs["m0"].log.read_text()
        async with AsyncPoolClient(c.client_config(token=creds["client"])) as engine:
            key = keys("cluster", 1)[0]
            assert (await engine.put(key, np.ones(4096, np.uint8))).stored
            assert await engine.get_bytes(key) == bytes(np.ones(4096, np.uint8))
        async with AsyncPoolClient(c.client_config(token=creds["viewer"])) as viewer:
            with pytest.raises(Forbidden):
                await viewer.exists(key)
    finally:
        c.stop()


def _self_signed(folder: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 (and its key), signed by itself: its own CA."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    import ipaddress

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kvpool-test")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


async def test_with_a_certificate_the_rpc_and_http_speak_tls(tmp_path: Path) -> None:
    pytest.importorskip("cryptography")
    import ssl

    cert, key = _self_signed(tmp_path)
    tls = {"TLS_CERT": str(cert), "TLS_KEY": str(key), "TLS_CA": str(cert)}
    pool = Pool(tmp_path,
                {**MASTER_ENV, "KVPOOL_MASTER_CLUSTER_TOKEN": TOKENS["cluster"],
                 "KVPOOL_MASTER_CLIENT_TOKENS": TOKENS["client"],
                 **{f"KVPOOL_MASTER_{k}": v for k, v in tls.items()}},
                {**DAEMON_ENV, "KVPOOL_DAEMON_CLUSTER_TOKEN": TOKENS["cluster"],
                 **{f"KVPOOL_DAEMON_{k}": v for k, v in tls.items()}})
    pool.start_master()
    pool.start_daemon()
    try:
        assert pool.master_url.startswith("https://") and pool.daemon_url.startswith("https://")
        ks = keys("tls", 1)
        cfg = ClientConfig(master_url=pool.master_url, token=TOKENS["client"], tls_ca=str(cert))
        async with AsyncPoolClient(cfg) as c:
            assert (await c.put(ks[0], np.ones(4096, np.uint8))).stored
            assert await c.get_bytes(ks[0]) == bytes(np.ones(4096, np.uint8))
            assert c.rpc_over == "tcp"  # under TLS: no local socket, whatever the host
        local = dataclasses.replace(cfg, rpc_socket="unix")
        async with AsyncPoolClient(local) as c:
            with pytest.raises(Unavailable, match='rpc_socket = "auto"'):
                await c.exists(ks[0])
        untrusting = ClientConfig(master_url=pool.master_url, token=TOKENS["client"])
        async with AsyncPoolClient(untrusting) as c:  # the system's CAs do not know it
            with pytest.raises(KVPoolError, match="certificate"):
                await c.exists(ks[0])
        plain = pool.master_url.replace("https://", "http://")
        with pytest.raises((urllib.error.URLError, ConnectionError)):
            urllib.request.urlopen(plain + "/healthz", timeout=5)
        ctx = ssl.create_default_context(cafile=str(cert))
        with urllib.request.urlopen(pool.master_url + "/healthz", timeout=5, context=ctx) as resp:
            assert resp.status == 200
    finally:
        pool.stop()
