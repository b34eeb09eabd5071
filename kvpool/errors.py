"""One root exception and its typed subclasses.

Every error crosses process boundaries as ``{"error": code, "message": text}``; ``code``
maps back to the class on the other side, so a caller catches the same type whether the
failure happened locally, in the master, in a daemon or in an engine. Every class is
defined here, the engines' too: a class elsewhere would be unknown to a process that has
not imported its module, and would arrive as a bare ``KVPoolError``.
"""

from __future__ import annotations

_BY_CODE: dict[str, type[KVPoolError]] = {}


class KVPoolError(Exception):
    """Root of every error kvpool raises on purpose."""

    code = "internal"
    http_status = 500
    retryable = False

    def __init_subclass__(cls, **kwargs: object) -> None:
        """Enter each class in the code table; a class without a code of its own, or with
        another's, could not be told apart on the wire."""
        super().__init_subclass__(**kwargs)
        code = cls.__dict__.get("code")
        if not isinstance(code, str):
            raise TypeError(f"{cls.__name__} needs a wire code of its own (class attribute `code`)")
        if code in _BY_CODE:
            raise TypeError(f"{cls.__name__} takes the code {code!r} of {_BY_CODE[code].__name__}")
        _BY_CODE[code] = cls


_BY_CODE[KVPoolError.code] = KVPoolError


class BadRequest(KVPoolError):
    """The request is malformed: bad key, wrong size, truncated body, unknown field."""

    code = "bad_request"
    http_status = 400


class TooLarge(BadRequest):
    """A call names more keys or bytes than one call may carry; the message gives the
    limit. Split the batch."""

    code = "too_large"
    http_status = 413


class TooManyPending(KVPoolError):
    """This client has as many puts (or reserved bytes) in flight as it may; retry once
    some are committed or aborted. Keeps one writer from filling the arenas with
    reservations it never commits."""

    code = "too_many_pending"
    http_status = 429
    retryable = True


class QuotaExceeded(KVPoolError):
    """The tenant's namespace holds as many bytes in this tier as its quota allows, and
    none of its own blocks there could make room (they are leased, pinned or in flight).
    Not retryable as such: release or remove some of the tenant's blocks, or raise its
    ``quota_bytes``."""

    code = "quota_exceeded"
    http_status = 429


class NoRoute(KVPoolError):
    """No endpoint at this path."""

    code = "no_route"
    http_status = 404


class MethodNotAllowed(KVPoolError):
    """The endpoint exists but not for this HTTP method."""

    code = "method_not_allowed"
    http_status = 405


class BlockNotFound(KVPoolError):
    """The key names no complete block."""

    code = "not_found"
    http_status = 404


class BlockLeased(KVPoolError):
    """The block holds a read lease or a pin and the call may not touch it unforced."""

    code = "leased"
    http_status = 409


class TierFull(KVPoolError):
    """No tier has room, even after demoting every block that may move."""

    code = "no_space"
    http_status = 507


class ArenaBusy(TierFull):
    """A stored cold block cannot be read now: the host arena it would be promoted into is
    full of blocks being read or pinned. It is still stored; retry once their leases end."""

    code = "arena_busy"
    http_status = 503
    retryable = True


class ChecksumMismatch(KVPoolError):
    """The bytes of a block do not match its checksum; the block was dropped."""

    code = "checksum_mismatch"
    http_status = 422


class NodeGone(KVPoolError):
    """The node holding the block is no longer a member of the pool."""

    code = "node_gone"
    http_status = 410
    retryable = True


class NodeNotFound(KVPoolError):
    """No node of that id is in the pool (an admin call named one)."""

    code = "node_not_found"
    http_status = 404


class NotLeader(KVPoolError):
    """This master is not the leader; the client retries on the one that is."""

    code = "not_leader"
    http_status = 421
    retryable = True


class NotReady(KVPoolError):
    """The master is still rebuilding its index and serves nothing yet."""

    code = "not_ready"
    http_status = 503
    retryable = True


class NodeIdTaken(KVPoolError):
    """Another live daemon already holds this node id in the cluster."""

    code = "node_id_taken"
    http_status = 409


class ReservationLost(KVPoolError):
    """The put's reservation belonged to a master that is no longer leader; put again."""

    code = "reservation_lost"
    http_status = 409
    retryable = True


class Unauthorized(KVPoolError):
    """The call came without a credential, or with one this server does not know."""

    code = "unauthorized"
    http_status = 401


class Forbidden(KVPoolError):
    """The credential is valid but its role may not make this call (a client's on an
    admin call, a viewer's on a put, a client's on the daemons' own RPC)."""

    code = "forbidden"
    http_status = 403


class TransferFailed(KVPoolError):
    """A NIXL transfer failed or passed its deadline."""

    code = "transfer_failed"
    http_status = 502
    retryable = True


class InventoryExpired(KVPoolError):
    """A page was asked of an inventory snapshot the daemon no longer keeps (read to its
    end, idle too long, or overtaken by newer ones): list again from the first page."""

    code = "inventory_expired"
    http_status = 410
    retryable = True


class Unavailable(KVPoolError):
    """A server could not be reached before the deadline."""

    code = "unavailable"
    http_status = 503
    retryable = True


class ConfigError(KVPoolError):
    """A config file or override is invalid: unknown key, wrong type."""

    code = "config"
    http_status = 400


class ProtocolMismatch(KVPoolError):
    """The two ends of a connection speak incompatible versions of kvpool's RPC."""

    code = "protocol_mismatch"
    http_status = 426


class LeaseExpired(KVPoolError):
    """The coordinator lease was revoked or ran out; keys attached to it are gone."""

    code = "lease_expired"
    http_status = 410
    retryable = True


class CacheFull(KVPoolError):
    """An engine's KV cache has no free page for a request; retry when others finish."""

    code = "cache_full"
    http_status = 503
    retryable = True


def error_from_code(code: str, message: str) -> KVPoolError:
    """Rebuild the typed error a server reported."""
    return _BY_CODE.get(code, KVPoolError)(message)


def all_codes() -> list[str]:
    """Every error code a caller can meet on the wire (the OpenAPI document lists them)."""
    return sorted(_BY_CODE)
