"""Everything syncmap reads of redis-py's (and asyncio streams') private attributes, in one
place. redis-py does not promise these; ``tests/test_redis_compat.py`` checks each one on the
installed release, on real connections, and names the one that moved.

The accessors are ``operator.attrgetter`` objects (a C call: the driver's read and send paths
use them on every operation).
"""

from __future__ import annotations

from operator import attrgetter
from typing import Any, Final

import redis.asyncio.connection

__all__ = [
    "HIREDIS_PARSER",
    "NOT_ENOUGH_DATA",
    "PLAIN_ASYNC_READ",
    "PLAIN_ASYNC_SEND",
    "PRIVATE",
    "connection_options",
    "parser_connected",
    "parser_of",
    "parser_reader",
    "push_type",
    "sock_of",
    "stream_buffered",
    "writer_of",
]

PRIVATE: Final[dict[str, tuple[str, ...]]] = {
    # where (what the test makes) -> the attributes read
    "redis.Connection (connected)": ("_sock", "_parser"),
    "redis.asyncio.Connection (connected)": ("_writer", "_parser"),
    "redis._parsers.hiredis._AsyncHiredisParser (connected)": (
        "_connected",
        "_reader",
        "_hiredis_PushNotificationType",
    ),
    "asyncio.StreamWriter (redis.asyncio.Connection._writer)": ("_reader",),
    "asyncio.StreamReader (StreamWriter._reader)": ("_buffer",),
}
"""The private attributes syncmap reads, by the object that carries them."""

# -- a blocking connection (redis.Connection and its subclasses) ------------------------------
sock_of: Final = attrgetter("_sock")
"""``conn._sock``: the connection's socket, ``None`` while not connected."""

# -- an asyncio connection (redis.asyncio.Connection) -------------------------------------------
writer_of: Final = attrgetter("_writer")
"""``conn._writer``: the connection's ``asyncio.StreamWriter``, ``None`` while not connected."""

# -- either: the reply parser ----------------------------------------------------------------
parser_of: Final = attrgetter("_parser")
"""``conn._parser``: the connection's reply parser."""
parser_connected: Final = attrgetter("_connected")
"""``parser._connected`` of the asyncio hiredis parser: it has a stream to read."""
parser_reader: Final = attrgetter("_reader")
"""``parser._reader`` of the asyncio hiredis parser: its ``hiredis.Reader``."""
push_type: Final = attrgetter("_hiredis_PushNotificationType")
"""``parser._hiredis_PushNotificationType``: the type of a RESP3 push (``None``: none)."""

PLAIN_ASYNC_SEND: Final = redis.asyncio.connection.AbstractConnection.send_packed_command
"""redis-py's own send (a connection class that overrides it is not bypassed)."""
PLAIN_ASYNC_READ: Final = redis.asyncio.connection.AbstractConnection.read_response
"""redis-py's own read (likewise)."""

HIREDIS_PARSER: Any
NOT_ENOUGH_DATA: Any
try:
    from redis._parsers.hiredis import NOT_ENOUGH_DATA
    from redis._parsers.hiredis import _AsyncHiredisParser as HIREDIS_PARSER
except ImportError:  # pragma: no cover - redis[hiredis] is a dependency
    HIREDIS_PARSER = NOT_ENOUGH_DATA = None


def stream_buffered(writer: Any) -> bool:
    """Whether the ``StreamReader`` behind an asyncio connection's ``writer`` holds received
    data not read yet."""
    return bool(getattr(getattr(writer, "_reader", None), "_buffer", None))


def connection_options(holder: Any) -> dict[str, Any]:
    """A copy of the options a pool (or an asyncio cluster node) makes its connections with
    (``connection_kwargs``: host, port, password, TLS, timeouts...)."""
    return dict(holder.connection_kwargs)
