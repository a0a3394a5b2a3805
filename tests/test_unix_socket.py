"""Maps and locks over a Unix socket (``unix://``), sync and asyncio: the listeners read the
subscriber socket themselves there too (AF_UNIX is a plain socket)."""

from __future__ import annotations

import time

import pytest

import syncmap
from servers import ServerProcess, wait_until


@pytest.fixture(scope="module")
def unix_server(tmp_path_factory):
    path = tmp_path_factory.mktemp("sock") / "valkey.sock"
    server = ServerProcess(extra_args=("--unixsocket", str(path), "--unixsocketperm", "700"))
    server.start()
    yield server, f"unix://{path}"
    server.stop()


LONG = 60.0  # only change messages (or a resync) make a node fresh again


def test_sync_map_and_lock_over_a_unix_socket(unix_server, ns):
    _, url = unix_server
    with syncmap.connect(url) as na, syncmap.connect(url) as nb:
        a, b = na.map(ns, max_staleness=LONG), nb.map(ns, max_staleness=LONG)
        assert b._listener._raw is not None  # read directly, not through redis-py
        a["k"] = 1
        wait_until(lambda: b.get("k") == 1, 5)
        hits = b.stats.hits
        assert b.get("k") == 1 and b.stats.hits == hits + 1  # cached
        a["k"] = 2  # reaches b by its change message (LONG: no probe makes it fresh)
        wait_until(lambda: b.get("k") == 2 and b.stats.hits > hits + 1, 5)
        with na.lock(f"{ns}:lock", ttl=5) as held:
            assert held.fence is not None
            assert not nb.lock(f"{ns}:lock", ttl=5).acquire(blocking=False)
        a.close()
        b.close()


async def test_async_map_over_a_unix_socket(unix_server, ns):
    _, url = unix_server
    na = await syncmap.connect_async(url)
    nb = await syncmap.connect_async(url)
    a = await na.map(ns + "a", max_staleness=LONG)
    b = await nb.map(ns + "a", max_staleness=LONG)
    try:
        assert b._listener.reader == "raw"
        await a.set("k", 1)
        deadline = time.monotonic() + 5
        while await b.get("k") != 1:
            assert time.monotonic() < deadline
        hits = b.stats.hits
        await a.set("k", 2)
        while not (await b.get("k") == 2 and b.stats.hits > hits):
            assert time.monotonic() < deadline
    finally:
        await a.close()
        await b.close()
        await na.close()
        await nb.close()
