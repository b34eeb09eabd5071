"""One root exception and its typed subclasses.

Every error crosses process boundaries as ``{"error": code, "message": text}``; ``code``
maps back to the class on the other side, so a caller catches the same type whether the
failure happened locally, in the master or in a daemon.
"""

from __future__ import annotations


class KVPoolError(Exception):
    """Root of every error kvpool raises on purpose."""

    code = "internal"
    http_status = 500
    retryable = False


class BadRequest(KVPoolError):
    """The request is malformed: bad key, wrong size, truncated body, unknown field."""

    code = "bad_request"
    http_status = 400


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


class ChecksumMismatch(KVPoolError):
    """The bytes of a block do not match its checksum; the block was dropped."""

    code = "checksum_mismatch"
    http_status = 422


class NodeGone(KVPoolError):
    """The node holding the block is no longer a member of the pool."""

    code = "node_gone"
    http_status = 410
    retryable = True


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
    """A mutating admin call came without the configured bearer token."""

    code = "unauthorized"
    http_status = 401


class TransferFailed(KVPoolError):
    """A NIXL transfer failed or passed its deadline."""

    code = "transfer_failed"
    http_status = 502
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


_BY_CODE: dict[str, type[KVPoolError]] = {
    cls.code: cls
    for cls in (
        KVPoolError, BadRequest, BlockNotFound, BlockLeased, TierFull, ChecksumMismatch,
        NodeGone, NodeIdTaken, NotLeader, NotReady, ReservationLost, Unauthorized,
        TransferFailed, Unavailable, ConfigError, ProtocolMismatch,
    )
}


def error_from_code(code: str, message: str) -> KVPoolError:
    """Rebuild the typed error a server reported."""
    return _BY_CODE.get(code, KVPoolError)(message)
