"""syncmap: a hash-map cache shared coherently by many processes and machines, and the
distributed locks to coordinate them, on Redis or Valkey.

Layers (each usable alone): :class:`SafeHashMap` (thread-safe local map), ``Lock``
(distributed lock), ``SyncMap`` (coherent near-cache map). Start with :func:`connect`.
"""

import logging as _logging

from ._codec import BytesCodec, Codec, JSONCodec, MsgpackCodec, PickleCodec
from ._core.retry import ExponentialBackoff, LimitRetry, LinearBackoff, NoRetry, RetryStrategy
from ._errors import (
    CorruptData,
    EmbeddedServerError,
    GuardRejected,
    InvalidArgument,
    InvalidURL,
    LockError,
    LockLost,
    LockNotHeld,
    NodeForked,
    NotObtained,
    OutcomeUnknown,
    SerializationError,
    ServerError,
    ServerUnavailable,
    StaleRead,
    SyncMapError,
    TooLarge,
    UnsupportedKey,
)
from ._local import LocalStats, SafeHashMap
from ._lock import AsyncLock, Lock
from ._map import AsyncSyncMap, MapChange, MapStats, SyncMap
from ._node import AsyncNode, Node, connect, connect_async

__version__ = "0.1.0"

# A library logs; the application decides where to (the listener's warnings go to "syncmap.*").
_logging.getLogger("syncmap").addHandler(_logging.NullHandler())

__all__ = [
    "AsyncLock",
    "AsyncNode",
    "AsyncSyncMap",
    "BytesCodec",
    "Codec",
    "CorruptData",
    "EmbeddedServerError",
    "ExponentialBackoff",
    "GuardRejected",
    "InvalidArgument",
    "InvalidURL",
    "JSONCodec",
    "LimitRetry",
    "LinearBackoff",
    "LocalStats",
    "Lock",
    "LockError",
    "LockLost",
    "LockNotHeld",
    "MapChange",
    "MapStats",
    "MsgpackCodec",
    "NoRetry",
    "Node",
    "NodeForked",
    "NotObtained",
    "OutcomeUnknown",
    "PickleCodec",
    "RetryStrategy",
    "SafeHashMap",
    "SerializationError",
    "ServerError",
    "ServerUnavailable",
    "StaleRead",
    "SyncMap",
    "SyncMapError",
    "TooLarge",
    "UnsupportedKey",
    "connect",
    "connect_async",
]
