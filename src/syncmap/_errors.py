"""Every error syncmap raises, in one place.

::

    SyncMapError
     ├── InvalidArgument (ValueError)        bad TTL, bad name, bad option: nothing was sent
     │    ├── InvalidURL                     a URL that cannot be parsed or is not supported
     │    ├── UnsupportedKey (TypeError)     a key of a type a map does not take
     │    ├── SerializationError (TypeError) a value the codec cannot encode
     │    └── TooLarge                       key, value or metadata over its size limit
     ├── ServerUnavailable                   cannot reach / lost the server (names the address)
     │    └── OutcomeUnknown                 lost mid-write: the write may or may not have happened
     ├── ServerError                         the server answered with an error we did not expect
     ├── CorruptData                         foreign or malformed data found under our keys
     ├── EmbeddedServerError                 the embedded Valkey could not be started or found
     ├── StaleRead                           a local read could not be proven fresh (max_staleness)
     ├── GuardRejected                       a guarded write whose lock is no longer current
     └── LockError
          ├── NotObtained                    obtain() gave up: someone else holds the lock
          ├── LockNotHeld                    release/refresh of a lock this holder no longer owns
          └── LockLost                       a held lock expired or was taken while in use

redis-py's exceptions are translated at one boundary (:func:`translated`); no
builtin name (``TimeoutError``, ``ConnectionError``) is shadowed.
"""

from __future__ import annotations

__all__ = [
    "CorruptData",
    "EmbeddedServerError",
    "GuardRejected",
    "InvalidArgument",
    "InvalidURL",
    "LockError",
    "LockLost",
    "LockNotHeld",
    "NodeForked",
    "NotObtained",
    "OutcomeUnknown",
    "SerializationError",
    "ServerError",
    "ServerUnavailable",
    "StaleRead",
    "SyncMapError",
    "TooLarge",
    "UnsupportedKey",
]


class SyncMapError(Exception):
    """Root of every error syncmap raises."""


class InvalidArgument(SyncMapError, ValueError):
    """An argument is out of range or of the wrong kind; nothing was sent to the server."""


class InvalidURL(InvalidArgument):
    """A server URL that cannot be parsed or uses an unsupported scheme."""


class UnsupportedKey(InvalidArgument, TypeError):
    """A map key of a type the map does not accept."""


class SerializationError(InvalidArgument, TypeError):
    """A value the map's codec cannot encode."""


class TooLarge(InvalidArgument):
    """A key, value or lock metadata over its configured size limit."""


class ServerUnavailable(SyncMapError):
    """The server cannot be reached, or the connection to it was lost."""

    def __init__(self, message: str, address: str | None = None) -> None:
        super().__init__(message)
        self.address = address


class OutcomeUnknown(ServerUnavailable):
    """The connection failed after a non-idempotent request (a map write) was sent and before
    its answer came: it may or may not have been applied, so it is not retried automatically.
    Read the key (``fresh=True``) to find out; other nodes see whichever happened."""


class ServerError(SyncMapError):
    """The server answered with an error syncmap did not expect."""


class CorruptData(SyncMapError):
    """Data under one of syncmap's keys is not in syncmap's format."""


class EmbeddedServerError(SyncMapError):
    """The embedded Valkey server could not be started or found."""


class StaleRead(SyncMapError):
    """A local read could not be proven fresh within ``max_staleness`` (``on_stale='raise'``)."""


class NodeForked(SyncMapError):
    """An asyncio node (or one of its maps or locks) made before ``os.fork()`` was used in the
    child: its connections and task belong to the parent's event loop. Call
    ``connect_async()`` in the child. (A blocking node works across a fork.)"""


class GuardRejected(SyncMapError):
    """A write guarded by a lock was refused: a newer holder of that lock exists, or it expired."""


class LockError(SyncMapError):
    """Base of the lock errors."""


class NotObtained(LockError):
    """The lock could not be obtained within the retry strategy."""


class LockNotHeld(LockError):
    """The lock is not (or no longer) held by this holder."""


class LockLost(LockError):
    """A lock held in a ``with`` block expired or was taken by another holder meanwhile."""


def translated(exc: Exception, address: str | None = None) -> Exception:
    """The one boundary where redis-py's exceptions become syncmap's: the exception to raise
    (``raise translated(exc, address) from exc``) or to hand on for ``exc``. A syncmap error,
    or an exception that is not redis-py's, is returned as it is."""
    if isinstance(exc, SyncMapError):
        return exc
    import redis.exceptions as rexc

    where = address or "the server"
    if isinstance(exc, rexc.AuthenticationError | rexc.AuthorizationError):
        return ServerUnavailable(f"authentication failed at {where}: {exc}", address)
    if isinstance(exc, rexc.ConnectionError | rexc.TimeoutError):
        return ServerUnavailable(f"cannot reach the server at {where}: {exc}", address)
    if isinstance(exc, rexc.ResponseError):
        return ServerError(f"server at {where} answered with an error: {exc}")
    if isinstance(exc, rexc.RedisError):
        return ServerError(f"redis client error talking to {where}: {exc}")
    if isinstance(exc, rexc.RedisClusterException):  # (not a RedisError)
        return ServerUnavailable(f"cannot reach the cluster at {where}: {exc}", address)
    return exc
