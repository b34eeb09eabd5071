"""Who may call what: bearer credentials, their roles, and the check every entry point makes.

Four roles. The *cluster* credential is shared by masters and daemons: a daemon registers
and renews its membership with it, and the master calls the daemons' RPC with it. A
*client* credential is an engine's (puts, gets, pins, unforced removes). The *admin*
credential may do what a client may and also change the pool by hand (forced removes,
admin HTTP mutations, ``check``). A *viewer* credential reads: metrics, the event stream,
the admin GETs. The admin credential also views.

Credentials are off until one is configured; then every entry point but ``/healthz`` and
``/readyz`` needs one, and a role with no credential configured cannot be used at all.
A secret is compared in constant time, never logged, and is given in the config, in the
environment (``KVPOOL_<TABLE>_<FIELD>``, or ``env:NAME`` for any secret), or as
``file:PATH`` to read it from a file.

A client (or viewer) credential may belong to a *tenant* (``[[master.tenants]]``): the
connection that presents it then carries the tenant's name, from which the master derives
the scope of every key the connection names (master/tenants.py).
"""

from __future__ import annotations

import contextvars
import os
import enum
import hmac
import ipaddress
import secrets
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from kvpool.errors import ConfigError, Forbidden, Unauthorized

AUTH_HEADER = "Authorization"
COOKIE = "kvpool_token"  # a browser's reads (EventSource sends no headers); never a change
FILE_PREFIX = "file:"
ENV_PREFIX = "env:"
NAMESPACE_HEADER = "X-KVPool-Namespace"  # the shared namespace a WebSocket RPC connection uses


class Role(enum.StrEnum):
    CLUSTER = "cluster"
    ADMIN = "admin"
    CLIENT = "client"
    VIEWER = "viewer"


# What a role's credential may act as: the admin's does a client's and a viewer's calls.
_ACTS_AS: dict[Role, frozenset[Role]] = {
    Role.CLUSTER: frozenset({Role.CLUSTER}),
    Role.ADMIN: frozenset({Role.ADMIN, Role.CLIENT, Role.VIEWER}),
    Role.CLIENT: frozenset({Role.CLIENT}),
    Role.VIEWER: frozenset({Role.VIEWER}),
}

# The role of the connection a handler serves; None: credentials are off, or an
# in-process caller (a test, the single-process `kvpool up`) that never crossed a wire.
_CURRENT: contextvars.ContextVar[Role | None] = contextvars.ContextVar("kvpool_role", default=None)
# The connection a call came on (an id the RPC server gives each one): what per-client
# limits count against.
_PEER: contextvars.ContextVar[int | None] = contextvars.ContextVar("kvpool_peer", default=None)
# The tenant the connection's credential belongs to (None: no tenant, the default one) and
# the shared namespace it asked for at its hello ("": the tenant's own).
_TENANT: contextvars.ContextVar[str | None] = contextvars.ContextVar("kvpool_tenant", default=None)
_NAMESPACE: contextvars.ContextVar[str] = contextvars.ContextVar("kvpool_namespace", default="")


def secret(value: str, where: str) -> str:
    """A configured secret: the value itself, or the first line of the file that
    ``file:PATH`` names (so the secret stays out of config files and process listings), or
    the environment variable ``env:NAME`` names."""
    if value.startswith(ENV_PREFIX):
        name = value[len(ENV_PREFIX):].strip()
        text = os.environ.get(name, "").strip()
        if not text:
            raise ConfigError(f"{where}: the environment variable {name} it names is unset or empty")
        return text
    if not value.startswith(FILE_PREFIX):
        return value.strip()
    path = Path(value[len(FILE_PREFIX):]).expanduser()
    try:
        text = path.read_text().strip()
    except OSError as exc:
        raise ConfigError(f"{where}: cannot read the credential file {path}: "
                          f"{exc.strerror or exc}; create it (e.g. `openssl rand -hex 32 > "
                          f"{path}; chmod 600 {path}`) or fix the path") from None
    if not text:
        raise ConfigError(f"{where}: the credential file {path} is empty")
    return text.splitlines()[0].strip()


def new_secret() -> str:
    """A fresh credential: 256 random bits, URL-safe (never contains ':')."""
    return secrets.token_urlsafe(32)


def bearer(token: str) -> dict[str, str]:
    """The request headers that present ``token`` (none when it is empty)."""
    return {AUTH_HEADER: f"Bearer {token}"} if token else {}


@dataclass(frozen=True, slots=True)
class Credentials:
    """The secrets a server accepts, each with its role and tenant (None: no tenant).
    Empty: every call is open."""

    entries: tuple[tuple[bytes, Role, str | None], ...] = ()

    @classmethod
    def of(cls, by_role: dict[Role, Iterable[str]],
           tenants: Iterable[tuple[str, Role, str]] = ()) -> "Credentials":
        """``by_role``: credentials of no tenant; ``tenants``: (token, role, tenant name)."""
        listed = [(token, role, None) for role, tokens in by_role.items() for token in tokens]
        entries: list[tuple[bytes, Role, str | None]] = []
        seen: dict[bytes, str] = {}
        for token, role, tenant in [*listed, *tenants]:
            if not token:
                continue
            raw = token.encode()
            who = f"the {role} role" + (f" of tenant {tenant!r}" if tenant else "")
            if raw in seen:
                if seen[raw] == who:
                    continue
                raise ConfigError(f"the same credential is configured for {seen[raw]} and for "
                                  f"{who}; give each its own")
            seen[raw] = who
            entries.append((raw, role, tenant))
        return cls(tuple(entries))

    @property
    def enabled(self) -> bool:
        return bool(self.entries)

    def __repr__(self) -> str:  # never print a secret, not even in a traceback
        return f"Credentials({len(self.entries)} configured)"

    def role_of(self, header: str | None) -> Role | None:
        """The role an ``Authorization`` header proves (None when credentials are off)."""
        return self.identify(header)[0]

    def identify(self, header: str | None) -> tuple[Role | None, str | None]:
        """The role and tenant an ``Authorization`` header proves ((None, None) when
        credentials are off).

        Every configured secret is compared, in constant time, whether or not an earlier
        one matched, so the time taken says nothing about which one was close."""
        if not self.entries:
            return None, None
        if not header:
            raise Unauthorized("this server requires a credential: send 'Authorization: "
                               "Bearer <token>' (clients: set [client] token, or "
                               "KVPOOL_CLIENT_TOKEN; see README 'Security')")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise Unauthorized("the Authorization header must read 'Bearer <token>'")
        given = token.strip().encode()
        found: tuple[Role, str | None] | None = None
        for raw, role, tenant in self.entries:
            if hmac.compare_digest(raw, given) and found is None:
                found = role, tenant
        if found is None:
            raise Unauthorized("this server does not know the credential presented; check "
                               "the token configured on this side against the server's")
        return found


def allows(role: Role | None, needed: Iterable[Role]) -> bool:
    return role is None or any(n in _ACTS_AS[role] for n in needed)


def require(*needed: Role, role: Role | None = None, what: str = "this call") -> None:
    """Raise Forbidden unless the caller (``role``, else the current connection's) may act
    as one of ``needed``."""
    role = current() if role is None else role
    if not allows(role, needed):
        raise Forbidden(f"{what} needs the {' or '.join(n.value for n in needed)} credential; "
                        f"the one presented is a {role.value if role else '?'} credential")


def current() -> Role | None:
    return _CURRENT.get()


def peer() -> int | None:
    """The connection the current call came on (None outside an RPC call)."""
    return _PEER.get()


def tenant() -> str | None:
    """The tenant of the current call's credential (None: none, the default tenant)."""
    return _TENANT.get()


def namespace() -> str:
    """The shared namespace the current call's connection asked for ("": its tenant's own)."""
    return _NAMESPACE.get()


def enter(role: Role | None, connection: int | None = None, tenant: str | None = None,
          namespace: str = "") -> contextvars.Token[Role | None]:
    """Make ``role`` (and ``connection``, ``tenant``, ``namespace``) the current call's;
    tasks created after inherit them."""
    _PEER.set(connection)
    _TENANT.set(tenant)
    _NAMESPACE.set(namespace)
    return _CURRENT.set(role)


# -- the network surface ------------------------------------------------------------------

def is_loopback(host: str) -> bool:
    if not host or host == "localhost":
        return bool(host)
    host = host.strip("[]")
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        try:
            return ipaddress.ip_address(socket.gethostbyname(host)).is_loopback
        except (OSError, ValueError):
            return False


def guard_bind(host: str, creds: Credentials, what: str) -> None:
    """A server reachable from the network must not run open: refuse to start it."""
    if not creds.enabled and not is_loopback(host):
        raise ConfigError(
            f"{what} would listen on {host or 'every interface'}, reachable from the network, "
            "with no credentials configured: anyone there could join, read, change or poison "
            "the pool. Configure credentials (README 'Security': cluster_token, client_tokens, "
            "admin_token) or bind host = \"127.0.0.1\"")



# -- membership keys in etcd --------------------------------------------------------------

def membership_proof(token: str, node_id: str, url: str, agent: str) -> str:
    """What a daemon's etcd key carries to show it holds the cluster credential: an HMAC of
    what the key says, so a key written by anyone else (or changed) names no daemon the
    master will connect to, and present its credential to."""
    message = f"kvpool-node\n{node_id}\n{url}\n{agent}".encode()
    return hmac.new(token.encode(), message, "sha256").hexdigest()


def membership_proof_ok(token: str, node_id: str, info: dict[str, object]) -> bool:
    expected = membership_proof(token, node_id, str(info.get("url", "")), str(info.get("agent", "")))
    return hmac.compare_digest(expected, str(info.get("proof", "")))


# -- TLS ----------------------------------------------------------------------------------

def server_tls(cert: str, key: str, where: str) -> ssl.SSLContext | None:
    """The TLS context a server serves with: both files, or neither (plain HTTP)."""
    if not cert and not key:
        return None
    if not (cert and key):
        raise ConfigError(f"{where}: set both tls_cert and tls_key (PEM files), or neither")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        ctx.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"{where}: cannot load the certificate {cert} with key {key}: {exc}") from None
    return ctx


def client_tls(ca: str, where: str) -> ssl.SSLContext | None:
    """What a caller verifies https:// servers against: the CA file ``ca``, or the
    system's CAs when empty (None)."""
    if not ca:
        return None
    try:
        return ssl.create_default_context(cafile=ca)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"{where}: cannot load the CA file {ca}: {exc}") from None
