"""syncmap.django.SyncMapCache inside a real Django project (tests/djproject) against real
Valkey: every BaseCache behaviour, checked side by side with Django's own LocMemCache and
RedisCache (the same test body runs on each), plus what only this backend promises (local
hits, atomicity on the server, one map per process, single flight)."""

from __future__ import annotations

import os
import pickle
import threading
import warnings

import pytest

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "djproject.settings")

import django

django.setup()

from django.core.cache import CacheKeyWarning, caches  # noqa: E402
from django.core.cache.backends.locmem import LocMemCache  # noqa: E402
from django.core.cache.backends.redis import RedisCache  # noqa: E402
from django.http import HttpResponse  # noqa: E402
from django.test import AsyncClient, Client, override_settings  # noqa: E402

import syncmap  # noqa: E402
import syncmap.django  # noqa: E402
from djproject.models import Item  # noqa: E402
from servers import wait_until  # noqa: E402
from syncmap.django import SyncMapCache  # noqa: E402
from test_map_bulk import count_round_trips  # noqa: E402
from test_map_support import SyncHandle  # noqa: E402

BACKENDS = ["syncmap", "locmem", "redis"]


@pytest.fixture(autouse=True)
def _close_shared():
    yield
    syncmap.django.close_all()


def project_caches(url: str, ns: str, *others: str) -> dict:
    """CACHES for the test project: "default" (map ``ns``) and each of ``others``."""
    return {
        alias: {
            "BACKEND": "syncmap.django.SyncMapCache",
            "LOCATION": url,
            "OPTIONS": {"name": ns if alias == "default" else f"{ns}-{alias}"},
        }
        for alias in ("default", *others)
    }


def _syncmap_params(ns: str, **extra):
    options = {"name": ns, "max_staleness": 1.0, **extra.pop("OPTIONS", {})}
    return {"OPTIONS": options, **extra}


@pytest.fixture
def make_cache(request, ns):
    """``make_cache(kind, **params)``: a backend of ``kind`` with Django's cache params."""
    made = []

    def make(kind: str, **params):
        if kind == "syncmap":
            server = request.getfixturevalue("server")
            cache = SyncMapCache(server.url, _syncmap_params(ns, **params))
        elif kind == "locmem":
            cache = LocMemCache(ns, params)
        else:  # Django's RedisCache flushes the whole database in clear(): its own server
            server = request.getfixturevalue("fresh_server")
            cache = RedisCache(server.url, params)
        made.append(cache)
        return cache

    yield make
    for cache in made:
        cache.close()


@pytest.mark.parametrize("kind", BACKENDS)
def test_basic_operations(make_cache, kind):
    cache = make_cache(kind)
    assert cache.get("a") is None and cache.get("a", "dflt") == "dflt"
    cache.set("a", {"x": [1, 2]})
    assert cache.get("a") == {"x": [1, 2]} and cache.has_key("a") and "a" in cache
    cache.set("none", None)
    assert cache.get("none", "dflt") is None and cache.has_key("none")
    assert cache.add("a", "other") is False and cache.get("a") == {"x": [1, 2]}
    assert cache.add("b", 2) is True and cache.get("b") == 2
    assert cache.delete("b") is True and cache.delete("b") is False
    assert not cache.has_key("b")
    assert cache.set_many({"m1": 1, "m2": "two", "m3": [3]}) == []
    assert cache.get_many(["m1", "m2", "m3", "nope"]) == {"m1": 1, "m2": "two", "m3": [3]}
    cache.delete_many(["m1", "m2", "nope"])
    assert cache.get_many(["m1", "m2", "m3"]) == {"m3": [3]}
    cache.set("n", 10)
    assert cache.incr("n") == 11 and cache.incr("n", 5) == 16 and cache.decr("n", 20) == -4
    assert cache.get("n") == -4
    with pytest.raises(ValueError):
        cache.incr("missing")
    with pytest.raises(ValueError):
        cache.decr("missing")
    assert cache.get("missing", "absent") == "absent"
    assert cache.touch("a", 100) is True and cache.touch("missing", 100) is False
    assert cache.get_or_set("g", "value") == "value" and cache.get_or_set("g", "x") == "value"
    assert cache.get_or_set("c", lambda: "called") == "called"
    assert cache.get_or_set("c", lambda: 1 / 0) == "called"
    cache.clear()
    assert cache.get("a") is None and cache.get_many(["m3", "n", "g"]) == {}


@pytest.mark.parametrize("kind", BACKENDS)
def test_a_read_returns_a_fresh_object(make_cache, kind):
    """Changing what a read returned never changes the cache (every Django backend unpickles
    a new object per read)."""
    cache = make_cache(kind)
    mine = {"items": [1]}
    cache.set("d", mine)
    mine["items"].append("after set")
    for read in (
        lambda: cache.get("d"),
        lambda: cache.get_many(["d"])["d"],
        lambda: cache.get_or_set("d", None),
    ):
        got = read()
        assert got == {"items": [1]}
        got["items"].append("changed")
    assert cache.get_or_set("made", lambda: [0]) == [0]
    cache.get("made").append(1)
    assert cache.get("made") == [0] and cache.get("d") == {"items": [1]}


@pytest.mark.parametrize("kind", BACKENDS)
def test_timeouts(make_cache, kind):
    """Django's timeout rules: default TIMEOUT, None forever, 0 or negative: expired."""
    cache = make_cache(kind, TIMEOUT=1)
    cache.set("default", 1)  # the cache's TIMEOUT (1 s)
    cache.set("forever", 1, timeout=None)
    cache.set("later", 1, timeout=100)
    wait_until(lambda: cache.get("default") is None, 10, 0.05, what="TIMEOUT=1 to pass")
    assert cache.get("forever") == 1 and cache.get("later") == 1
    for timeout in (0, -1):
        cache.set("gone", 1)
        cache.set("gone", 2, timeout=timeout)  # deletes what was there
        assert cache.get("gone") is None
        assert cache.add("gone", 3, timeout=timeout) is True  # stored, and expired at once
        assert cache.get("gone") is None
        assert cache.get_or_set("gone", 4, timeout=timeout) == 4
        assert cache.get("gone") is None
        cache.set_many({"s1": 1, "s2": 2}, timeout=timeout)
        assert cache.get_many(["s1", "s2"]) == {}
    cache.set("t", 1, timeout=100)
    assert cache.touch("t", None) is True  # no expiry any more
    assert cache.touch("t", 0) is True and cache.get("t") is None  # expired
    cache.set("short", 1, timeout=100)
    assert cache.touch("short", 1) is True
    wait_until(lambda: cache.get("short") is None, 10, 0.05, what="the touched TTL to pass")


@pytest.mark.parametrize("kind", BACKENDS)
def test_versions_prefix_and_key_function(make_cache, kind):
    v1 = make_cache(kind, VERSION=1, KEY_PREFIX="app")
    v2 = make_cache(kind, VERSION=2, KEY_PREFIX="app")
    other = make_cache(kind, VERSION=1, KEY_PREFIX="other")
    if kind == "locmem":  # each LocMemCache name is its own store: share the first one's
        v2._cache, v2._expire_info, v2._lock = v1._cache, v1._expire_info, v1._lock
        other._cache, other._expire_info, other._lock = v1._cache, v1._expire_info, v1._lock
    elif kind == "redis":  # one server for the three
        v2._servers = other._servers = v1._servers
    v1.set("k", "one")
    v2.set("k", "two")
    assert v1.get("k") == "one" and v2.get("k") == "two" and other.get("k") is None
    assert v1.get("k", version=2) == "two" and v2.get("k", version=1) == "one"
    assert v1.incr_version("k") == 2  # v1's "k" moves to version 2, over v2's
    assert v1.get("k") is None and v2.get("k") == "one"
    assert v2.decr_version("k") == 1 and v1.get("k") == "one" and v2.get("k") is None
    v1.set_many({"a": 1, "b": 2}, version=7)
    assert v2.get_many(["a", "b"], version=7) == {"a": 1, "b": 2}

    keyed = make_cache(kind, KEY_FUNCTION=lambda key, prefix, version: f"custom|{key}")
    if kind == "locmem":
        keyed._cache, keyed._expire_info, keyed._lock = v1._cache, v1._expire_info, v1._lock
    elif kind == "redis":
        keyed._servers = v1._servers
    keyed.set("x", 5, version=3)
    assert keyed.get("x", version=9) == 5  # the key function ignores the version
    keyed_too = make_cache(kind, KEY_FUNCTION="test_django.prefix_free_key")
    if kind == "locmem":
        keyed_too._cache, keyed_too._expire_info = v1._cache, v1._expire_info
        keyed_too._lock = v1._lock
    elif kind == "redis":
        keyed_too._servers = v1._servers
    assert keyed_too.get("x") == 5  # a dotted path to the same function


def prefix_free_key(key: str, prefix: str, version: int) -> str:
    return f"custom|{key}"


@pytest.mark.parametrize("kind", BACKENDS)
def test_key_validation_warnings(make_cache, kind):
    cache = make_cache(kind)
    long_key = "k" * 300
    for key in ("has space", "tab\there", long_key):
        with pytest.warns(CacheKeyWarning):
            cache.set(key, key)
        with pytest.warns(CacheKeyWarning):
            assert cache.get(key) == key
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cache.set("fine:key", 1)


@pytest.mark.parametrize("kind", BACKENDS)
def test_values_round_trip_pickled(make_cache, kind):
    cache = make_cache(kind)
    response = HttpResponse("<p>hello</p>", headers={"X-Test": "1"})
    item = Item(id=3, name="pen", price=120)
    value = {"set": {1, 2}, "tuple": (1, "a"), "bytes": b"\x00\x80", "big": 2**70, "neg": -5}
    cache.set_many({"response": response, "item": item, "value": value, "flag": True})
    back = cache.get("response")
    assert back.content == b"<p>hello</p>" and back["X-Test"] == "1"
    got = cache.get("item")
    assert isinstance(got, Item) and (got.pk, got.name, got.price) == (3, "pen", 120)
    assert cache.get("value") == value and cache.get("flag") is True


@pytest.fixture
def items_table():
    from django.db import connection

    with connection.schema_editor() as editor:
        editor.create_model(Item)
    Item.objects.bulk_create([Item(name="pen", price=120), Item(name="ink", price=40)])
    yield
    with connection.schema_editor() as editor:
        editor.delete_model(Item)


@pytest.mark.parametrize("kind", BACKENDS)
def test_querysets_round_trip(make_cache, kind, items_table):
    cache = make_cache(kind)
    cache.set("cheap", Item.objects.filter(price__lt=100).order_by("name"))
    back = cache.get("cheap")
    assert [(i.name, i.price) for i in back] == [("ink", 40)]
    assert back.model is Item


def test_counters_are_stored_as_numbers_on_the_server(make_cache, client, ns):
    cache = make_cache("syncmap")
    cache.set("n", 41)
    cache.set("t", True)
    record = client.get(f"syncmap:{{{ns}}}:v:{cache.make_key('n')}")
    assert record.endswith(b"\n41")
    assert cache.incr("n") == 42 and cache.get("n") == 42
    with pytest.raises(ValueError):  # a bool (pickled) is not a counter: nothing is written
        cache.incr("t")
    assert cache.get("t") is True
    cache.set("s", "text")
    with pytest.raises(ValueError):
        cache.incr("s")
    assert syncmap.django.DjangoCodec().decode(pickle.dumps(7)) == 7


def test_atomic_add_and_incr_under_threads(make_cache):
    cache = make_cache("syncmap")
    cache.set("n", 0)
    added: list[bool] = []
    barrier = threading.Barrier(6)

    def work(i: int) -> None:
        barrier.wait()
        added.append(cache.add("once", i))
        for _ in range(50):
            cache.incr("n")

    threads = [threading.Thread(target=work, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(added) == [False] * 5 + [True]
    assert cache.get("n") == 300


def test_get_is_a_local_hit(make_cache, ns):
    cache = make_cache("syncmap")
    cache.set("k", "v")
    hits, misses = cache.map.stats.hits, cache.map.stats.misses
    for _ in range(100):
        assert cache.get("k") == "v"
    assert cache.map.stats.hits == hits + 100 and cache.map.stats.misses == misses


def test_instances_share_one_map_per_process(server, ns):
    """Django's handler makes an instance per thread; they share the node and map; close()
    (after every request) costs nothing and keeps them."""
    with override_settings(CACHES=project_caches(server.url, ns, "other")):
        seen = []

        def use() -> None:
            cache = caches["default"]
            cache.set(f"from-{threading.get_ident()}", 1)
            cache.close()
            seen.append((cache, cache.map, caches["other"].map))  # (kept: ids stay unique)

        threads = [threading.Thread(target=use) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert len({id(instance) for instance, _, _ in seen}) == 4  # one per thread
        assert len({id(m) for _, m, _ in seen}) == 1  # one map
        assert len({id(o) for _, _, o in seen}) == 1 and seen[0][2] is not seen[0][1]
        m = seen[0][1]
        assert len(m) == 4 and m.get_local(next(iter(m))) == 1  # still open after close()
        Client().get("/get/x/")  # a request (request_finished closes the caches)
        assert caches["default"].map is m and m.get_local(next(iter(m))) == 1


def test_views_with_the_test_client(server, ns):
    with override_settings(CACHES=project_caches(server.url, ns)):
        client = Client()
        assert client.get("/set/k/?v=hello").status_code == 200
        assert client.get("/get/k/").json()["value"] == "hello"
        first = client.get("/page/").content
        assert first.startswith(b"page ") and client.get("/page/").content == first


async def test_async_views_and_methods(server, ns):
    with override_settings(CACHES=project_caches(server.url, ns)):
        client = AsyncClient()
        assert (await client.get("/aset/k/?v=async")).status_code == 200
        body = (await client.get("/aget/k/")).json()
        assert body["value"] == "async"
        hits = body["hits"]
        assert (await client.get("/aget/k/")).json()["hits"] == hits + 1  # a local hit

        cache = caches["default"]
        await cache.aset("n", 1)
        assert await cache.aincr("n", 4) == 5 and await cache.adecr("n") == 4
        assert await cache.aadd("n", 0) is False and await cache.ahas_key("n")
        assert await cache.aget_or_set("g", lambda: "made") == "made"
        await cache.aset_many({"a": 1, "b": 2})
        assert await cache.aget_many(["a", "b", "z"]) == {"a": 1, "b": 2}
        await cache.adelete_many(["a"])
        assert await cache.aget("a", "gone") == "gone" and await cache.adelete("b") is True
        assert await cache.atouch("n", None) is True
        with pytest.raises(ValueError):
            await cache.aincr("missing")
        await cache.aclear()
        assert await cache.aget("n") is None


def test_empty_location_is_the_embedded_server(embedded_dir, ns):
    cache = SyncMapCache("", {"OPTIONS": {"name": ns}})
    cache.set("k", [1, 2])
    assert cache.get("k") == [1, 2]
    assert cache.map.node.address.startswith("unix://") or "127.0.0.1" in cache.map.node.address
    assert any(embedded_dir.iterdir())  # the embedded server's state lives there


def test_bad_configuration_is_a_typed_error(server, ns):
    with pytest.raises(syncmap.InvalidArgument):
        SyncMapCache(server.url, {"OPTIONS": {"name": ""}})
    with pytest.raises(syncmap.InvalidArgument):
        SyncMapCache([server.url, server.url], {})
    cache = SyncMapCache(server.url, {"OPTIONS": {"name": ns, "max_staleness": -1}})
    with pytest.raises(syncmap.InvalidArgument):
        cache.get("k")  # checked when the map opens (at first use)
    cache = SyncMapCache(server.url, {"OPTIONS": {"name": ns}})
    with pytest.raises(syncmap.InvalidArgument):
        cache.set("k", 1, timeout="soon")
    assert cache.get("k") is None
    with pytest.raises(syncmap.InvalidURL):
        SyncMapCache("http://nope", {"OPTIONS": {"name": ns}}).get("k")


def test_batch_methods_take_one_round_trip(make_cache):
    """get_many/set_many/delete_many: one round trip for the batch, not one per key."""
    cache = make_cache("syncmap")
    cache.set_many({"warm": 1})  # (the scripts' first use loads them: one more round trip)
    cache.map._state.resync("test")
    wait_until(lambda: cache.map._state.synced, 5, what="a new base for the local copy")
    cache.get_many(["warm"])
    cache.delete_many(["warm"])
    trips = count_round_trips(SyncHandle(None, cache.map))
    data = {f"k{i}": i for i in range(300)}
    cache.set_many(data, timeout=60)
    assert trips == [1]
    cache.map._state.resync("test")  # drop the local copy: every key is read from the server
    wait_until(lambda: cache.map._state.synced, 5, what="a new base for the local copy")
    assert cache.get_many([*data, "absent"]) == data and trips == [2]
    assert cache.get_many(list(data)) == data and trips == [2]  # now all local
    cache.delete_many([*data, "absent"])
    assert cache.get_many(list(data)) == {} and trips == [3]  # deleted here: known locally
    cache.set_many(data, timeout=0)  # expired at once: deleted, in one round trip
    assert trips == [4]
