"""The fixture really starts, kills, pauses and restarts servers."""

import pytest
import redis

from servers import wait_until


def test_kill_and_restart_on_same_port(fresh_server):
    c = fresh_server.client(socket_timeout=1)
    c.set("k", "v")
    fresh_server.kill()
    with pytest.raises(redis.ConnectionError):
        c.get("k")
    port = fresh_server.port
    fresh_server.restart()
    assert fresh_server.port == port
    assert wait_until(lambda: c.ping(), what="ping after restart")
    assert c.get("k") is None  # no persistence: memory is gone


def test_pause_blocks_then_resume(fresh_server):
    c = fresh_server.client(socket_timeout=0.2)
    fresh_server.pause()
    try:
        with pytest.raises(redis.TimeoutError):
            c.ping()
    finally:
        fresh_server.resume()
    c2 = fresh_server.client(socket_timeout=2)
    assert c2.ping()


def test_drop_clients(fresh_server):
    c = fresh_server.client()
    c.ping()
    assert fresh_server.drop_clients() >= 1
