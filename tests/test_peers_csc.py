"""What the peers' client-side caches do, as bench_map relies on it: each check names the peer
versions it was checked on and skips outside them (a peer's new release is checked on purpose,
with ``make test-latest``, never by a red CI). When one skips there, check the peer again,
widen the range or drop the check, and update benchmarks/_peers_map.py and
docs/benchmarks.md.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import importlib.util
import time

import pytest
import redis
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from servers import wait_until


def holds_for(dist: str, versions: str) -> pytest.MarkDecorator:
    """Run the check only where ``dist``'s installed version is in ``versions``."""
    installed = importlib.metadata.version(dist)
    return pytest.mark.skipif(
        Version(installed) not in SpecifierSet(versions),
        reason=f"a check of {dist} {versions}; {installed} is installed: check the peer again",
    )


@holds_for("redis", ">=5.1,<=8.2.0")
def test_redis_py_csc_refuses_valkey_and_the_name_workaround_works(server):
    from redis.cache import CacheConfig
    from redis.connection import CacheProxyConnection

    hello = server.client(protocol=3).execute_command("HELLO", 3)
    if hello[b"server"] != b"valkey":
        pytest.skip("the test server is not Valkey")
    refused = redis.Redis(
        host="127.0.0.1", port=server.port, protocol=3, cache_config=CacheConfig()
    )
    with pytest.raises(redis.ConnectionError, match=r"7\.4 or later"):
        refused.ping()

    saved = CacheProxyConnection.DEFAULT_SERVER_NAME
    CacheProxyConnection.DEFAULT_SERVER_NAME = "valkey"
    try:
        r = redis.Redis(host="127.0.0.1", port=server.port, protocol=3, cache_config=CacheConfig())
        other = server.client()
        other.set("peers:csc", "1")
        assert r.get("peers:csc") == b"1"
        assert len(r.get_cache().collection) == 1  # really cached
        other.set("peers:csc", "2")
        wait_until(lambda: r.get("peers:csc") == b"2", timeout=5, what="redis-py CSC invalidation")
        r.close()
        other.close()
    finally:
        CacheProxyConnection.DEFAULT_SERVER_NAME = saved


async def _cashews(url: str):
    from cashews import Cache

    cache = Cache()
    cache.setup(url, client_side=True)
    await cache.init()
    return cache


@holds_for("cashews", ">=7,<=7.6.0")
@holds_for("redis", ">=5,<=8.2.0")
# (cashews 7.6.0 closes its redis-py 8.2 client with the deprecated close(): the peer's warning)
@pytest.mark.filterwarnings("ignore:Call to deprecated close:DeprecationWarning")
async def test_cashews_never_invalidates_under_resp3(server, ns):
    """cashews' listener expects RESP2 pub/sub messages; redis-py 8 defaults to RESP3."""
    writer = await _cashews(server.url + "?protocol=2")
    control = await _cashews(server.url + "?protocol=2")
    default = await _cashews(server.url)  # redis-py 8's default protocol: 3
    key = f"{ns}-k"
    try:
        await writer.set(key, 1)
        assert await control.get(key) == 1
        assert await default.get(key) == 1
        await writer.set(key, 2)
        deadline = time.monotonic() + 5
        while await control.get(key) != 2:  # RESP2: the invalidation arrives
            assert time.monotonic() < deadline, "cashews over RESP2 did not invalidate"
            await asyncio.sleep(0.005)
        # The same push reached the RESP3 reader's connection just as fast; give it 0.3 s more.
        deadline = time.monotonic() + 0.3
        while time.monotonic() < deadline:
            assert await default.get(key) == 1  # stale, and stays stale
            await asyncio.sleep(0.01)
    finally:
        for c in (writer, control, default):
            await c.close()


@holds_for("valkey", ">=6,<=6.2.0")
def test_valkey_py_csc_with_libvalkey_breaks(server):
    if importlib.util.find_spec("libvalkey") is None:
        pytest.skip("libvalkey is not installed (valkey-py's CSC works without it)")
    import valkey

    with pytest.raises(AttributeError, match="set_invalidation_push_handler"):
        valkey.Valkey(host="127.0.0.1", port=server.port, protocol=3, cache_enabled=True).ping()


@holds_for("valkey", ">=6,<=6.2.0")
def test_valkey_py_csc_without_libvalkey_invalidates(server, ns):
    import valkey

    if importlib.util.find_spec("libvalkey") is not None:
        pytest.skip("libvalkey installed: valkey-py's CSC is broken (see the test above)")
    v = valkey.Valkey(host="127.0.0.1", port=server.port, protocol=3, cache_enabled=True)
    other = server.client()
    key = f"{ns}-k"
    other.set(key, "1")
    assert v.get(key) == b"1"
    other.set(key, "2")
    wait_until(lambda: v.get(key) == b"2", timeout=5, what="valkey-py CSC invalidation")
    v.close()
    other.close()


@holds_for("redis", ">=5.1,<8.2")
def test_redis_py_csc_invalidation_scans_every_entry(server, ns):
    """redis-py before 8.2 deletes an invalidated key by scanning its whole cache (O(local
    size)); 8.2 and later do not (benchmark (d) measures what it costs)."""
    from redis.cache import CacheConfig, CacheEntry, CacheEntryStatus, CacheKey, DefaultCache

    calls = 0

    class Counting(tuple):
        def __contains__(self, item):
            nonlocal calls
            calls += 1
            return super().__contains__(item)

    cache = DefaultCache(CacheConfig(max_size=10_000))
    for i in range(1_000):
        key = CacheKey(command="GET", redis_keys=Counting((f"{ns}{i}".encode(),)), redis_args=())
        cache.set(CacheEntry(key, b"v", CacheEntryStatus.VALID, None))
    cache.delete_by_redis_keys([f"{ns}7".encode()])
    assert len(cache.collection) == 999
    assert calls >= 1_000  # every entry was looked at for one invalidated key
