"""The redis-py internals syncmap reads (``syncmap._redis_compat``) are where it expects them,
on real connections to a real server: a redis-py release that moved one fails here, naming
the attribute, instead of somewhere deep in the driver or a listener."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import hiredis
import pytest
import redis
import redis.asyncio

from syncmap import _redis_compat as compat


def _missing(obj: Any, names: tuple[str, ...]) -> list[str]:
    return [name for name in names if not hasattr(obj, name)]


def _require(obj: Any, where: str) -> None:
    """Every attribute ``PRIVATE`` lists for ``where`` is on ``obj``; else a failure naming
    the attributes, the object and the redis-py release."""
    missing = _missing(obj, compat.PRIVATE[where])
    assert not missing, (
        f"redis-py {redis.__version__}: {where} has no attribute "
        + ", ".join(repr(name) for name in missing)
        + " (syncmap._redis_compat reads it: adapt it there)"
    )


def test_blocking_connection(server):
    client = redis.Redis.from_url(server.url)
    conn = client.connection_pool.get_connection()
    try:
        where = "redis.Connection (connected)"
        _require(conn, where)
        assert isinstance(compat.sock_of(conn), socket.socket)
        assert compat.parser_of(conn) is not None
        assert {"host", "port"} <= set(compat.connection_options(client.connection_pool))
        conn.disconnect()
        assert compat.sock_of(conn) is None  # (the driver reconnects on None)
    finally:
        client.connection_pool.release(conn)
        client.close()


async def test_asyncio_connection(server):
    client = redis.asyncio.Redis.from_url(server.url)
    conn = await client.connection_pool.get_connection()
    try:
        _require(conn, "redis.asyncio.Connection (connected)")
        writer = compat.writer_of(conn)
        assert isinstance(writer, asyncio.StreamWriter)
        _require(writer, "asyncio.StreamWriter (redis.asyncio.Connection._writer)")
        _require(writer._reader, "asyncio.StreamReader (StreamWriter._reader)")
        assert compat.stream_buffered(writer) is False  # nothing received, nothing asked

        parser = compat.parser_of(conn)
        assert compat.HIREDIS_PARSER is not None and compat.NOT_ENOUGH_DATA is not None, (
            f"redis-py {redis.__version__}: redis._parsers.hiredis has no _AsyncHiredisParser "
            "or NOT_ENOUGH_DATA (syncmap._redis_compat imports them)"
        )
        assert type(parser) is compat.HIREDIS_PARSER, (
            f"redis-py {redis.__version__}: an asyncio connection's parser is "
            f"{type(parser).__name__}, not _AsyncHiredisParser"
        )
        _require(parser, "redis._parsers.hiredis._AsyncHiredisParser (connected)")
        assert compat.parser_connected(parser)
        assert isinstance(compat.parser_reader(parser), hiredis.Reader)
        assert compat.parser_reader(parser).gets() is compat.NOT_ENOUGH_DATA

        assert type(conn).send_packed_command is compat.PLAIN_ASYNC_SEND
        assert type(conn).read_response is compat.PLAIN_ASYNC_READ
        assert {"host", "port"} <= set(compat.connection_options(client.connection_pool))
    finally:
        await client.connection_pool.release(conn)
        await client.aclose()


def test_every_listed_attribute_is_checked():
    checked = {
        "redis.Connection (connected)",
        "redis.asyncio.Connection (connected)",
        "asyncio.StreamWriter (redis.asyncio.Connection._writer)",
        "asyncio.StreamReader (StreamWriter._reader)",
        "redis._parsers.hiredis._AsyncHiredisParser (connected)",
    }
    assert set(compat.PRIVATE) == checked


def test_a_moved_attribute_is_named():
    class Moved:
        _parser = None  # (_sock is gone)

    with pytest.raises(AssertionError, match=r"has no attribute '_sock' \(syncmap\._redis_compat"):
        _require(Moved(), "redis.Connection (connected)")
