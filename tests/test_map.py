# ruff: noqa: F811  (the ``maps`` fixture is imported)
"""SyncMap against a real Valkey: mapping behaviour, read-your-writes, propagation, fresh
reads, atomic operations, TTL and size bounds, bad input, foreign data and channel garbage.
Most tests run twice (``maps`` fixture): blocking map and asyncio map."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import redis

import syncmap
from servers import wait_until
from syncmap._core.replies import VersionReply
from syncmap._scripts import script_source
from test_map_support import maps  # noqa: F401 (fixture)

LONG = 60.0  # max_staleness long enough that only change messages can make a node fresh


def record_key(name: str, key: str) -> str:
    return f"syncmap:{{{name}}}:v:{key}"


def server_keys(client: redis.Redis, name: str) -> list[bytes]:
    return sorted(client.keys(f"syncmap:{{{name}}}*"))


def test_mutable_mapping(server, ns):
    with syncmap.connect(server.url) as node, node.map(ns) as m:
        assert len(m) == 0 and list(m) == [] and "a" not in m
        m["a"] = 1
        m.update({"b": [1, 2], "c": {"x": None}})
        assert m["a"] == 1 and m["b"] == [1, 2] and m["c"] == {"x": None}
        assert sorted(m) == ["a", "b", "c"] and len(m) == 3
        assert dict(m.items()) == {"a": 1, "b": [1, 2], "c": {"x": None}}
        assert sorted(m.keys()) == ["a", "b", "c"] and m == {"a": 1, "b": [1, 2], "c": {"x": None}}
        del m["a"]
        with pytest.raises(KeyError):
            del m["a"]
        with pytest.raises(KeyError):
            m["a"]
        assert m.get("a") is None and m.get("a", 5) == 5
        assert m.pop("b") == [1, 2] and m.pop("b", "gone") == "gone"
        with pytest.raises(KeyError):
            m.pop("b")
        assert m.setdefault("d", 4) == 4 and m.setdefault("d", 5) == 4
        m.clear()
        assert len(m) == 0 and "c" not in m and m.get("d") is None


def test_read_your_writes_is_local(maps, server, ns):
    """With its listener stalled (its own change messages not processed), a node still reads
    its own acknowledged writes, from its local copy."""
    m = maps(server.url, ns, max_staleness=LONG)
    m.set("k", "v0")
    assert m.get("k") == "v0"
    m.stall_listener()
    for i in range(20):
        m.set("k", f"v{i}")
        hits = m.stats.hits
        assert m.get("k") == f"v{i}"
        assert m.stats.hits == hits + 1  # served locally, not fetched
    assert m.delete("k") and m.get("k") is None
    assert m.incr("n") == 1 and m.get("n") == 1
    assert m.compare_and_set("n", 1, 7) and m.get("n") == 7
    assert m.update_item("n", lambda v: v + 1) == 8 and m.get("n") == 8
    m.resume_listener()


def test_first_write_of_a_new_map_is_served_locally(maps, server, ns):
    """A brand-new map (no data on the server yet): its first write creates the map's epoch,
    and the writer's own copy takes it at once, as for any later write (its listener is
    stalled: the change message plays no part)."""
    m = maps(server.url, ns, max_staleness=LONG)
    m.stall_listener()
    m.set("k", "first")
    hits = m.stats.hits
    assert m.get("k") == "first"
    assert m.stats.hits == hits + 1  # served locally, not fetched
    m.resume_listener()
    m.set("k", "second")
    assert m.get("k") == "second" and m.stats.hits == hits + 2


def test_propagation(maps, server, ns):
    a = maps(server.url, ns, max_staleness=LONG)
    b = maps(server.url, ns, max_staleness=LONG)
    a.set("k", 1)
    # the map's first write creates its epoch; b caches once its listener has seen it
    wait_until(lambda: b.get("k") == 1 and b.stats.hits > 0, 5, what="b caches k")
    for value in range(2, 12):
        a.set("k", value)
        wait_until(lambda v=value: b.get("k") == v, 5, what=f"b sees {value}")
    a.delete("k")
    wait_until(lambda: b.get("k", "none") == "none", 5, what="b sees the delete")
    a.set("c", {"x": 1})
    assert b.get("c") == {"x": 1}
    a.clear()
    wait_until(lambda: b.get("c") is None, 5, what="b sees the clear")
    assert b.stats.invalidations >= 12 and b.stats.resyncs == 0


def test_first_write_of_a_map_reaches_a_cached_miss(server, ns):
    """A node caches a miss before the map has any server-side data (no epoch yet); another
    node's first write creates the epoch: the cached miss must go at once, whatever key the
    first write touched and whether the value rides in the message or not."""
    with syncmap.connect(server.url) as na, syncmap.connect(server.url) as nb:
        for i in range(12):
            name = f"{ns}-{i}"
            a = na.map(name, max_staleness=LONG, push_values=4096 if i % 2 else 0)
            b = nb.map(name, max_staleness=LONG)
            assert b.get("k") is None and b.get("k") is None and b.stats.hits == 1
            if i % 4 >= 2:
                a.set("other", 0)  # the map's first write is of another key
            t0 = time.monotonic()
            a.set("k", i)
            wait_until(lambda b=b, i=i: b.get("k") == i, 5, what="b sees the first write")
            assert time.monotonic() - t0 < 0.1, f"round {i}: b served its cached miss too long"
            a.close()
            b.close()


def test_propagation_does_not_wait_for_a_busy_listener_thread(server, ns):
    """The listener thread is stuck in slow freshness probes (each server read takes 0.3 s);
    a reading thread still applies change messages itself: every write is seen in well under
    the probe's delay, from the local copy (no server round trip)."""
    with syncmap.connect(server.url) as na, syncmap.connect(server.url) as nb:
        a = na.map(ns, max_staleness=1.5)
        b = nb.map(ns, max_staleness=1.5)
        a.set("k", 0)
        wait_until(lambda: b.get("k") == 0 and b.stats.hits > 0, 5, what="b caches k")
        slow_client = b._listener.client
        real = slow_client.execute_command

        def slow(*args, **kwargs):
            if args and args[0] == "HMGET":
                time.sleep(0.3)
            return real(*args, **kwargs)

        slow_client.execute_command = slow
        time.sleep(0.6)  # a probe is under way now
        misses, lags = b.stats.misses, []
        for value in range(1, 21):
            a.set("k", value)
            t0 = time.monotonic()
            while b.get("k") != value and time.monotonic() - t0 < 2:
                pass
            lags.append(time.monotonic() - t0)
            time.sleep(0.02)
        assert max(lags) < 0.05, lags
        assert b.stats.misses == misses  # carried values, applied by the reading thread
        slow_client.execute_command = real
        a.close()
        b.close()


def test_the_listener_thread_naps_longer_and_longer_while_a_thread_spins_on_hits(server, ns):
    """Each wake-up of the listener thread costs a thread spinning on hits a GIL hand-off.
    While such a thread applies the change messages itself, the listener's naps double up
    to BUSY_NAP_MAX (a nap also ends with its Receive); when the reading stops, it watches the
    socket again and applies another node's writes itself. The naps are read from the
    listener's plan (its next nap, at each wait), not timed: how long a nap lasts, or how
    often the OS lets either thread run on a busy machine, is not the mechanism."""
    from syncmap._listener import BUSY_NAP, BUSY_NAP_MAX

    class NapLog(threading.Event):
        """The listener's ``nudge`` event (what it naps on): each timed wait, with the nap planned
        after it."""

        def __init__(self, listener) -> None:
            super().__init__()
            self.listener = listener
            self.naps: list[tuple[float, float]] = []  # (the wait, the listener's next nap)

        def wait(self, timeout: float | None = None) -> bool:
            if timeout is not None:
                self.naps.append((timeout, self.listener._nap))
            return super().wait(timeout)

    with syncmap.connect(server.url) as na, syncmap.connect(server.url) as nb:
        a = na.map(ns)
        b = nb.map(ns)
        a.set("k", 0)
        wait_until(lambda: b.get("k") == 0 and b.stats.hits > 0, 5, what="b caches k")
        listener = b._listener
        wait_until(lambda: listener._nap == BUSY_NAP, 5, what="the listener to watch the socket")
        log = listener.nudge = NapLog(listener)
        deadline = time.monotonic() + 10
        while not any(planned == BUSY_NAP_MAX for _, planned in log.naps):
            assert time.monotonic() < deadline, f"the naps never grew: {log.naps[-20:]}"
            for _ in range(1000):
                b.get("k")
        naps = list(log.naps)
        # short at first, doubled up to the longest, never longer
        assert naps[0][1] < BUSY_NAP_MAX, naps
        assert all(wait <= BUSY_NAP_MAX and planned <= BUSY_NAP_MAX for wait, planned in naps)
        # quiet again: the listener thread watches the socket and applies what arrives (nobody
        # reads b meanwhile)
        wait_until(lambda: listener._nap == BUSY_NAP, 5, what="the listener's naps to reset")
        changes = b.stats.invalidations
        a.set("k", 1)
        wait_until(lambda: b.stats.invalidations > changes, 2, what="b's listener applies it")
        a.close()
        b.close()


async def test_async_reader_spinning_on_local_hits_sees_changes(server, ns):
    """A task that only awaits local hits (they never suspend) must not starve its map's
    listener task: another node's writes reach it in well under max_staleness, from the local
    copy (no server round trip)."""
    na = await syncmap.connect_async(server.url)
    nb = await syncmap.connect_async(server.url)
    try:
        a = await na.map(ns, max_staleness=60.0)
        b = await nb.map(ns, max_staleness=60.0)
        await a.set("k", 0)
        deadline = time.monotonic() + 5
        while await b.get("k") != 0 or b.stats.hits == 0:  # cached
            assert time.monotonic() < deadline
            await asyncio.sleep(0.001)
        misses, lags = b.stats.misses, []
        for value in range(1, 11):
            await a.set("k", value)
            t0 = time.monotonic()
            while await b.get("k") != value and time.monotonic() - t0 < 3:
                pass  # no await that suspends: only the map's own yielding lets the listener run
            lags.append(time.monotonic() - t0)
        assert max(lags) < 0.1, lags
        assert b.stats.misses == misses
        await a.close()
        await b.close()
    finally:
        await na.close()
        await nb.close()


def test_pushed_values_update_the_local_copy(maps, server, ns):
    """A write of a small value with no TTL carries it in the change message: another node
    that had the key cached takes it without asking the server. Large values, TTL writes and
    ``push_values=0`` only invalidate; a key that was not cached is not added."""
    a = maps(server.url, ns, max_staleness=LONG, push_values=64)
    b = maps(server.url, ns, max_staleness=LONG)
    a.set("k", 0)
    a.set("other", 0)
    wait_until(lambda: b.get("k") == 0 and b.stats.hits > 0, 5, what="b caches k")
    misses = b.stats.misses
    for value in range(1, 6):
        a.set("k", {"n": value})
        wait_until(lambda v=value: b.get("k") == {"n": v}, 5, what=f"b sees {value}")
    a.incr("other")  # "other" is not in b's copy: it stays out of it
    wait_until(lambda: b.stats.invalidations >= 7, 5, what="b's listener saw the changes")
    assert b.stats.misses == misses and b.stats.local_size == 1
    assert b.get("other") == 1 and b.stats.misses == misses + 1
    for value, options in (("x" * 65, {}), ("ttl", {"ttl": 60})):
        a.set("k", value, **options)  # too large / with a TTL: an invalidation only
        wait_until(lambda v=value: b.get("k") == v, 5, what="b fetches k")
    assert b.stats.misses == misses + 3
    c = maps(server.url, ns, max_staleness=LONG, push_values=0)
    c.set("k", "plain")
    wait_until(lambda: b.get("k") == "plain", 5, what="b fetches k")
    assert b.stats.misses == misses + 4


def test_every_write_op_carries_a_small_value(maps, server, ns):
    """set, compare_and_set (cas and casv), incr, touch and add each carry a small value with
    no TTL: a node that had the key cached takes it without asking the server, also for a key
    whose length in bytes is not its length in characters (the message says the bytes)."""
    a = maps(server.url, ns, max_staleness=LONG)
    b = maps(server.url, ns, max_staleness=LONG)
    key = "clé ✓"  # 5 characters, 8 bytes
    a.set(key, 1)
    wait_until(lambda: b.get(key) == 1 and b.stats.hits > 0, 5, what="b caches the key")
    misses = b.stats.misses
    writes = [
        (lambda: a.set(key, {"n": 2}), {"n": 2}),
        (lambda: a.compare_and_set(key, {"n": 2}, 3), 3),
        (lambda: a.update_item(key, lambda v: v + 1), 4),
        (lambda: a.incr(key, 10), 14),
        (lambda: a.touch(key), 14),
    ]
    for write, value in writes:
        seen = b.stats.invalidations
        write()
        wait_until(lambda s=seen: b.stats.invalidations > s, 5, what="b saw the change")
        assert b.get(key) == value
    assert b.stats.misses == misses and b.stats.resync_causes == {}
    b.delete(key)  # a's copy drops it; add (setnx) carries its value to a
    wait_until(lambda: a.get_local(key) is None, 5, what="a saw the delete")
    assert a.get(key) is None
    seen, a_misses = a.stats.invalidations, a.stats.misses
    assert b.add(key, "added")
    wait_until(lambda: a.stats.invalidations > seen, 5, what="a saw the add")
    assert a.get(key) == "added" and a.stats.misses == a_misses


def test_fresh_read_is_linearizable_and_small(maps, server, ns):
    a = maps(server.url, ns, max_staleness=LONG)
    b = maps(server.url, ns, max_staleness=LONG)
    big = "x" * 400_000
    a.set("k", big)
    wait_until(lambda: b.get("k") == big and b.stats.hits > 0, 5, what="b caches k")
    info = server.client()
    out0 = info.info("stats")["total_net_output_bytes"]
    for _ in range(5):
        assert b.get("k", fresh=True) == big
    out1 = info.info("stats")["total_net_output_bytes"]
    assert out1 - out0 < 50_000, "fresh reads of an unchanged entry re-transferred the value"
    b.stall_listener()  # b's copy is now stale and knows nothing of it
    a.set("k", "new")
    assert b.get("k") == big  # allowed: within max_staleness
    assert b.get("k", fresh=True) == "new"
    assert b.get("k") == "new"  # and the fetched value is what b now holds
    a.delete("k")
    assert b.get("k", "none", fresh=True) == "none"
    b.resume_listener()


def test_atomic_operations(maps, server, ns):
    m = maps(server.url, ns)
    assert m.incr("n") == 1 and m.incr("n", 41) == 42 and m.incr("n", -2) == 40
    m.set("s", "text")
    with pytest.raises(syncmap.InvalidArgument):
        m.incr("s")
    assert m.get("s") == "text"
    assert not m.compare_and_set("missing", None, 1) and m.get("missing") is None
    m.set("d", {"a": 1, "b": 2})
    assert not m.compare_and_set("d", {"a": 1}, "no")
    assert m.compare_and_set("d", {"b": 2, "a": 1}, "yes")  # equal values, other key order
    assert m.get("d") == "yes"
    assert m.update_item("u", lambda v: [*v, 1], default=[]) == [1]
    assert m.update_item("u", lambda v: [*v, 2]) == [1, 2]
    assert m.setdefault("sd", 1) == 1 and m.setdefault("sd", 2) == 1
    assert m.pop("sd") == 1 and m.pop("sd", None) is None
    assert m.get_or_load("lo", lambda: {"loaded": True}) == {"loaded": True}
    assert m.get_or_load("lo", lambda: 1 / 0) == {"loaded": True}


def test_incr_msgpack_and_generic_codecs(server, ns):
    with syncmap.connect(server.url) as node:
        for codec in ("msgpack", "pickle"):
            with node.map(f"{ns}-{codec}", codec=codec) as m:
                assert m.incr("n", 5) == 5 and m.incr("n") == 6 and m.get("n") == 6


def test_ttl_server_and_local(maps, server, ns, client):
    m = maps(server.url, ns, max_staleness=LONG)
    m.set("t", 1, ttl=0.3)
    m.set("p", 2)
    assert 0 < client.pttl(record_key(ns, "t")) <= 300
    assert client.pttl(record_key(ns, "p")) == -1
    assert m.get("t") == 1 and m.length() == 2
    time.sleep(0.35)
    assert m.get("t") is None  # expired locally (no message is sent when the server expires it)
    assert m.length() == 1 and m.keys() == ["p"]


def test_map_default_ttl(server, ns, client):
    with syncmap.connect(server.url) as node, node.map(ns, ttl=5) as m:
        m["a"] = 1
        assert 4000 < client.pttl(record_key(ns, "a")) <= 5000


def test_bounded_memory(maps, server, ns):
    m = maps(server.url, ns, maxsize=10)
    for i in range(60):
        m.set(f"k{i}", i)
        assert m.get(f"k{i // 2}") == i // 2
    assert m.stats.local_size <= 10
    assert m.length() == 60


def test_hits_refresh_recency_and_count_once(server, ns, monkeypatch):
    """The blocking map's hit path (get, [], in): a hit makes its key the most recently used
    one of the local copy, and a cached absence is one hit that gives the default (get),
    KeyError ([]) or False (in), with no server read. (No poll falls due here, so every hit
    after the first takes the hit path, not the poll's.)"""
    monkeypatch.setattr(syncmap._map, "POLL_INTERVAL", LONG)
    with syncmap.connect(server.url) as node, node.map(ns, maxsize=3, max_staleness=LONG) as m:
        for k in "abc":
            m[k] = k  # own writes, installed locally: a is the least recently used
        assert m.get("c") == "c"  # the first hit sets the hit path's deadline
        assert m.get("a") == "a"  # a hit: a is the most recent now, b the least
        m["d"] = "d"  # makes room: drops b
        hits, misses = m.stats.hits, m.stats.misses
        assert m["a"] == "a" and m.get("c") == "c" and m.get("d") == "d"
        assert (m.stats.hits, m.stats.misses) == (hits + 3, misses)
        assert m["c"] == "c"  # a, d, c
        m["e"] = "e"  # drops a
        assert m.get("d") == "d" and m.stats.misses == misses
        assert m.get("b") == "b" and m.get("a") == "a" and m.stats.misses == misses + 2
        assert m.get("nope") is None  # fetched: cached as absent
        hits, misses = m.stats.hits, m.stats.misses
        assert m.get("nope", 5) == 5 and "nope" not in m
        with pytest.raises(KeyError):
            m["nope"]
        assert (m.stats.hits, m.stats.misses) == (hits + 3, misses)


def test_the_hit_path_follows_the_local_copy_when_it_is_dropped(server, ns, monkeypatch):
    """Dropping the local copy swaps its store for a new one; the hit path reads the new one
    (it keeps the store's dict itself): once the key is cached again, hits take the hit path,
    not the slower one."""
    monkeypatch.setattr(syncmap._map, "POLL_INTERVAL", LONG)
    with syncmap.connect(server.url) as node, node.map(ns, max_staleness=LONG) as m:
        m["k"] = 1
        assert m.get("k") == 1  # sets the hit path's deadline
        m._state.resync("test")  # the copy is dropped: a new store
        wait_until(lambda: m._state.synced, 5, what="a new base")
        assert m.get("k") == 1  # fetched and cached again
        assert m.get("k") == 1  # (sets the deadline again)
        slow = []
        real = m._read
        monkeypatch.setattr(m, "_read", lambda *args: slow.append(args) or real(*args))
        for _ in range(10):
            assert m.get("k") == 1 and m["k"] == 1
        assert slow == [], f"{len(slow)} of 20 hits took the slow path"


async def test_async_hits_refresh_recency_and_count_once(server, ns):
    """The asyncio map's local reads (get_local, await get): a hit makes its key the most
    recently used one of the local copy (contract §10) and counts once; an expired entry
    is not served."""
    node = await syncmap.connect_async(server.url)
    try:
        m = await node.map(ns, maxsize=3, max_staleness=LONG)
        for k in "abc":
            await m.set(k, k)  # own writes, installed locally: a is the least recently used
        hits, misses = m.stats.hits, m.stats.misses
        assert m.get_local("a") == "a"  # a hit: a is the most recent now, b the least
        await m.set("d", "d")  # makes room: drops b
        assert m.get_local("b") is None
        assert await m.get("a") == "a" and m.get_local("c") == "c" and m.get_local("d") == "d"
        assert (m.stats.hits, m.stats.misses) == (hits + 4, misses)
        assert m.get_local("c") == "c"  # a, d, c
        await m.set("e", "e", ttl=0.3)  # drops a
        assert m.get_local("a") is None and m.get_local("d") == "d"
        assert m.get_local("e") == "e"
        deadline = time.monotonic() + 5
        while m.get_local("e") is not None:  # expired locally
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        assert m.stats.misses == misses
        await m.close()
    finally:
        await node.close()


def test_hits_refresh_recency_in_the_new_store_after_a_drop(server, ns, monkeypatch):
    """Dropping the local copy swaps its store for a new one: the hit path's LRU move follows
    it, so a hit still makes its key the most recently used one (contract §10)."""
    monkeypatch.setattr(syncmap._map, "POLL_INTERVAL", LONG)
    with syncmap.connect(server.url) as node, node.map(ns, maxsize=3, max_staleness=LONG) as m:
        m._state.resync("test")  # the copy is dropped: a new store
        wait_until(lambda: m._state.synced, 5, what="a new base")
        for k in "abc":
            m[k] = k  # own writes, installed locally: a is the least recently used
        assert m.get("c") == "c"  # sets the hit path's deadline
        assert m.get("a") == "a"  # a hit: a is the most recent now, b the least
        misses = m.stats.misses
        m["d"] = "d"  # makes room: drops b
        assert m.get("a") == "a" and m["c"] == "c" and m.get("d") == "d"
        assert m.stats.misses == misses
        assert m.get("b") == "b" and m.stats.misses == misses + 1


def test_the_hit_path_ends_at_the_earliest_local_ttl(server, ns, monkeypatch):
    """The hit path reads no entry's own deadline: its one deadline comes no later than the
    earliest local TTL, also for an entry written after that deadline was set (contract
    §10: a local deadline is never later than the server's)."""
    monkeypatch.setattr(syncmap._map, "POLL_INTERVAL", LONG)
    with syncmap.connect(server.url) as node, node.map(ns, max_staleness=LONG) as m:
        m["p"] = 1
        assert m.get("p") == 1 and m["p"] == 1  # sets the hit path's deadline, LONG away
        m.set("t", 2, ttl=0.3)
        m.set("u", 3, ttl=0.6)
        assert m.get("t") == 2 and m["t"] == 2 and m.get("u") == 3
        wait_until(lambda: m.get("t") is None, 5, what="t expired locally")
        with pytest.raises(KeyError):
            m["t"]
        assert m.get("u") == 3 and m["u"] == 3 and m["p"] == 1  # u lives on, p has no TTL
        wait_until(lambda: m.get("u") is None, 5, what="u expired locally")
        with pytest.raises(KeyError):
            m["u"]
        assert m.get("p") == 1 and m.stats.misses >= 2


BAD_KEYS = [1, b"bytes", None, ("t",), 1.5, "\ud800"]


@pytest.mark.parametrize("key", BAD_KEYS, ids=repr)
def test_unsupported_keys(maps, server, ns, client, key):
    m = maps(server.url, ns)
    with pytest.raises(syncmap.UnsupportedKey):
        m.set(key, 1)
    with pytest.raises(syncmap.UnsupportedKey):
        m.get(key)
    with pytest.raises(syncmap.UnsupportedKey):
        m.incr(key)
    assert server_keys(client, ns) == []


def test_bad_values_and_sizes(maps, server, ns, client):
    m = maps(server.url, ns, max_value_bytes=1000, max_key_bytes=50)
    for bad in (object(), {1, 2}, float("nan"), b"bytes-in-json"):
        with pytest.raises(syncmap.SerializationError):
            m.set("k", bad)
    with pytest.raises(syncmap.TooLarge):
        m.set("k", "x" * 1000)
    with pytest.raises(syncmap.TooLarge):
        m.set("k" * 51, 1)
    for ttl in (0, -1, float("nan"), float("inf"), "1", True):
        with pytest.raises(syncmap.InvalidArgument):
            m.set("k", 1, ttl=ttl)
    with pytest.raises(syncmap.SerializationError):
        m.compare_and_set("k", 1, object())
    with pytest.raises(syncmap.InvalidArgument):
        m.incr("k", 1.5)
    with pytest.raises(syncmap.SerializationError):
        m.get_or_load("k", object)
    with pytest.raises(syncmap.SerializationError):
        m.update_item("k", lambda v: object())
    assert server_keys(client, ns) in ([], [f"syncmap:{{{ns}}}:meta".encode()])
    assert not client.exists(record_key(ns, "k"))
    assert m.get("k") is None


@pytest.mark.parametrize(
    "options",
    [
        {"max_staleness": 0},
        {"max_staleness": "1"},
        {"on_stale": "ignore"},
        {"maxsize": 0},
        {"ttl": -1},
        {"codec": "yaml"},
        {"max_value_bytes": 0},
        {"push_values": -1},
        {"push_values": True},
    ],
    ids=repr,
)
def test_bad_options(server, ns, options):
    with syncmap.connect(server.url) as node, pytest.raises(syncmap.InvalidArgument):
        node.map(ns, **options)


@pytest.mark.parametrize("name", ["", "a{b}", "a}", 5, None], ids=repr)
def test_bad_map_names(server, name):
    with syncmap.connect(server.url) as node, pytest.raises(syncmap.InvalidArgument):
        node.map(name)


def test_foreign_data_under_keys(maps, server, ns, client):
    m = maps(server.url, ns)
    client.set(record_key(ns, "s"), b"not ours")
    client.hset(record_key(ns, "h"), "f", "v")
    client.set(record_key(ns, "j"), b"SM\x01nonsense")
    for key in ("s", "h", "j"):
        with pytest.raises(syncmap.CorruptData):
            m.get(key)
        with pytest.raises(syncmap.CorruptData):
            m.get(key, fresh=True)
        with pytest.raises(syncmap.CorruptData):
            m.get_or_load(key, lambda: pytest.fail("a loader ran over foreign data"))
    # a fresh read of a cached key reads only the record's head: foreign, absent, or the head
    version = client.register_script(script_source("map_version"))
    meta = f"syncmap:{{{ns}}}:meta"
    heads = [VersionReply.parse(version(keys=[meta, record_key(ns, key)]))
             for key in ("h", "absent", "s")]  # fmt: skip
    assert [(v.head, v.foreign) for v in heads] == [
        (None, True),
        (None, False),
        (b"not ours", False),
    ]
    for op in (lambda: m.incr("s"), lambda: m.compare_and_set("h", 1, 2),
               lambda: m.setdefault("s", 1), lambda: m.update_item("j", lambda v: 1)):  # fmt: skip
        with pytest.raises(syncmap.CorruptData):
            op()
    assert client.get(record_key(ns, "s")) == b"not ours"  # nothing half-written
    m.set("s", "ours")  # a plain write replaces foreign data
    assert m.get("s") == "ours"
    # a value the codec cannot decode, in a well-formed record
    client.set(record_key(ns, "bad"), b"SM\x01abc 1\n{not json")
    with pytest.raises(syncmap.CorruptData):
        m.get("bad")
    assert m.delete("h") and not client.exists(record_key(ns, "h"))  # a delete may remove it
    assert not m.delete("h") and m.get("h") is None


def test_garbage_on_the_channel(maps, server, ns, client):
    a = maps(server.url, ns, max_staleness=LONG)
    b = maps(server.url, ns, max_staleness=LONG)
    channel = f"syncmap:{{{ns}}}:ch"
    a.set("k", 1)
    wait_until(lambda: b.get("k") == 1 and b.stats.hits > 0, 5, what="b caches k")
    for junk in (b"hello", b"", b"\xff\xfe", b"SM2 x 1 S k"):
        client.spublish(channel, junk)  # the map listens with SSUBSCRIBE
    wait_until(lambda: b.stats.skipped_messages == 4, 5, what="garbage skipped")
    assert b.stats.resyncs == 0
    # one of ours but malformed: the copy is dropped (it may have hidden a change)
    client.spublish(channel, b"SM1 e notanumber S k")
    wait_until(lambda: b.stats.resync_causes.get("malformed") == 1, 5, what="resync")
    # the listener lives on: changes still propagate
    wait_until(lambda: b.get("k") == 1 and b.stats.verified_age < 1, 5, what="resynced")
    a.set("k", 2)
    wait_until(lambda: b.get("k") == 2, 5, what="propagation after garbage")


def test_lost_message_is_detected_with_zero_tolerance(maps, server, ns, client):
    """A change whose message was dropped (written with the real script, published to a
    channel nobody hears): the next message shows a gap, and the local copy is dropped before
    the next local read."""
    a = maps(server.url, ns, max_staleness=LONG)
    b = maps(server.url, ns, max_staleness=LONG)
    a.set("k", "old")
    wait_until(lambda: b.get("k") == "old" and b.stats.hits > 0, 5, what="b caches k")
    write = client.register_script(script_source("map_write"))
    meta, idx = f"syncmap:{{{ns}}}:meta", f"syncmap:{{{ns}}}:idx"
    keys = [meta, record_key(ns, "k"), idx, f"syncmap:{{{ns}}}:fences", "unused-load"]
    write(keys=keys, args=["set", "k", "e", "nobody-listens", b'"new"', 0, ""])
    assert b.get("k") == "old"  # not yet detectable: allowed within max_staleness
    seen = b.stats.invalidations
    a.set("other", 1)  # its message carries seq + 2
    wait_until(lambda: b.stats.invalidations > seen, 5, what="b got the next message")
    assert b.get("k") == "new"  # no tolerance: no read after the gap was seen is stale
    assert b.stats.resync_causes.get("gap") == 1


def test_seq_bumped_on_server_is_a_gap(maps, server, ns, client):
    a = maps(server.url, ns, max_staleness=LONG)
    b = maps(server.url, ns, max_staleness=LONG)
    a.set("k", 1)
    wait_until(lambda: b.get("k") == 1 and b.stats.hits > 0, 5, what="b caches k")
    client.hincrby(f"syncmap:{{{ns}}}:meta", "seq", 1)
    seen = b.stats.invalidations
    a.set("j", 1)
    wait_until(lambda: b.stats.invalidations > seen, 5, what="next message")
    assert b.stats.resync_causes.get("gap") == 1
    assert b.stats.local_size <= 1


class Guard:
    """What a guarded write reads of a held Lock."""

    def __init__(self, key, token, fence):
        self.key, self.token, self.fence = key, token, fence


def test_guarded_writes_by_hand(maps, server, ns, client):
    """A lock key in redislock format (token + metadata), and a holder-like guard object."""
    m = maps(server.url, ns)
    lock_key = f"{{{ns}}}:writer"
    client.set(lock_key, "tokenA" + "meta")
    a = Guard(lock_key, "tokenA", 10)
    m.set("k", 1, guard=a)
    assert m.delete("k", guard=a)
    assert m.compare_and_set("k", None, 1, guard=a) is False
    client.set(lock_key, "tokenB")
    with pytest.raises(syncmap.GuardRejected):
        m.set("k", 2, guard=a)
    b = Guard(lock_key, "tokenB", 11)
    m.set("k", 3, guard=b)
    client.set(lock_key, "tokenA")  # the old holder's token back, but its fence is older
    with pytest.raises(syncmap.GuardRejected):
        m.set("k", 4, guard=a)
    client.delete(lock_key)
    with pytest.raises(syncmap.GuardRejected):
        m.set("k", 5, guard=b)
    assert m.get("k", fresh=True) == 3
    with pytest.raises(syncmap.GuardRejected):
        m.set("k", 6, guard=Guard(lock_key, None, None))  # a released lock
    with pytest.raises(syncmap.InvalidArgument):
        m.set("k", 6, guard="not a lock")
    assert m.get("k", fresh=True) == 3


def test_every_write_takes_a_guard(maps, server, ns, client):
    """Not only set: delete, pop, popitem, setdefault, compare_and_set, update_item and incr
    are refused on the server for a holder that a newer one superseded, and write nothing;
    the current holder's go through."""
    m = maps(server.url, ns)
    lock_key = f"{{{ns}}}:writer"
    client.set(lock_key, "tokenB")
    old, new = Guard(lock_key, "tokenA", 10), Guard(lock_key, "tokenB", 11)
    m.set("k", 1, guard=new)
    m.set("n", 5, guard=new)
    refused = {
        "delete": lambda: m.delete("k", guard=old),
        "pop": lambda: m.pop("k", guard=old),
        "popitem": lambda: m.popitem(guard=old),
        "setdefault": lambda: m.setdefault("new", 1, guard=old),
        "compare_and_set": lambda: m.compare_and_set("k", 1, 2, guard=old),
        "update_item": lambda: m.update_item("k", lambda v: v + 1, guard=old),
        "incr": lambda: m.incr("n", guard=old),
    }
    for name, call in refused.items():
        with pytest.raises(syncmap.GuardRejected):
            call()
            pytest.fail(f"{name} with a superseded guard was not refused")
    assert [m.get(k, fresh=True) for k in ("k", "n", "new")] == [1, 5, None]
    with pytest.raises(syncmap.InvalidArgument):
        m.incr("n", guard="not a lock")
    assert m.incr("n", guard=new) == 6
    assert m.update_item("k", lambda v: v + 1, guard=new) == 2
    assert m.setdefault("new", 7, guard=new) == 7
    assert m.pop("new", guard=new) == 7
    assert m.compare_and_set("k", 2, 3, guard=new)
    assert m.delete("k", guard=new)
    assert m.popitem(guard=new) == ("n", 6)
    assert m.length() == 0


def test_guarded_writes_with_a_real_lock(server, ns):
    with syncmap.connect(server.url) as node, node.map(ns) as m:
        first = node.obtain(f"{{{ns}}}:writer", ttl=0.2)
        m.set("k", "first", guard=first)
        wait_until(lambda: not node.client.exists(first.key), 5, what="lock expiry")
        second = node.obtain(f"{{{ns}}}:writer", ttl=5)
        if first.fence is not None:
            assert second.fence > first.fence
        with pytest.raises(syncmap.GuardRejected):
            m.set("k", "zombie", guard=first)  # a GC pause outlived the lease
        m.set("k", "second", guard=second)
        assert m.get("k", fresh=True) == "second"
        second.release()


def test_watch_yields_changes(server, ns):
    import threading

    with syncmap.connect(server.url) as node, node.map(ns) as a, node.map(ns) as b:
        seen: list = []
        started = threading.Event()

        def watch():
            started.set()
            for change in b.watch(timeout=5):
                seen.append((change.op, change.key, change.value))
                if change.op == "clear":
                    return

        t = threading.Thread(target=watch)
        t.start()
        started.wait(5)
        wait_until(lambda: b._state.watchers, 5, what="watcher registered")
        a.set("k", 1)
        a.delete("k")
        a.clear()
        t.join(10)
        assert [op for op, _, _ in seen] == ["set", "del", "clear"]
        assert seen[0][1] == "k" and seen[1][1] == "k"
        assert not b._state.watchers


def test_update_checks_every_pair_before_writing(maps, server, ns):
    """``update`` takes what ``dict.update`` takes; a bad key or value anywhere in it is a
    typed error before the first write (MutableMapping's own update wrote the pairs before
    the bad one)."""
    m = maps(server.url, ns)
    m.update({"a": 1}, b=2)
    m.update([("c", 3)])
    assert [m.get(k, fresh=True) for k in "abc"] == [1, 2, 3]
    with pytest.raises(syncmap.SerializationError):
        m.update({"x": 1, "y": object()})
    with pytest.raises(syncmap.UnsupportedKey):
        m.update([("x", 1), (5, 2)])
    with pytest.raises(syncmap.InvalidArgument):
        m.update(["x"])
    assert m.get("x", fresh=True) is None and m.length() == 3


def test_items_values_and_popitem(maps, server, ns):
    m = maps(server.url, ns)
    m.update({"a": 1, "b": [2], "c": None})
    assert sorted(m.items()) == [("a", 1), ("b", [2]), ("c", None)]
    assert sorted(map(str, m.values())) == ["1", "None", "[2]"]
    popped = {}
    for _ in range(3):
        key, value = m.popitem()
        popped[key] = value
        assert m.get(key, "gone", fresh=True) == "gone"
    assert popped == {"a": 1, "b": [2], "c": None}
    with pytest.raises(KeyError):
        m.popitem()


def test_items_skip_keys_another_node_deleted_while_iterating(server, ns):
    """Iterating a blocking map's items lists the keys first and reads each value as it
    goes: a key that another node deleted in between is skipped, not a KeyError."""
    with syncmap.connect(server.url) as node, node.map(ns) as a, node.map(ns) as b:
        b.update({f"k{i}": i for i in range(5)})  # (not cached in a: a's reads ask the server)
        items = iter(a.items())
        first_key, _ = next(items)
        for i in range(5):
            if f"k{i}" != first_key:
                b.delete(f"k{i}")
        assert list(items) == []
        a.set("v", 1)
        values = iter(a.values())
        assert next(values) in (1, int(first_key[1:]))


async def test_async_watch_yields_changes(server, ns):
    import contextlib

    anode = await syncmap.connect_async(server.url)
    a, b = await anode.map(ns), await anode.map(ns)
    seen: list = []

    async def watch():
        async with contextlib.aclosing(b.watch(timeout=5)) as changes:
            async for change in changes:
                seen.append((change.op, change.key, change.value))
                if change.op == "clear":
                    return

    task = asyncio.ensure_future(watch())
    deadline = time.monotonic() + 5
    while not b._state.watchers and time.monotonic() < deadline:
        await asyncio.sleep(0.001)
    await a.set("k", 1)
    deadline = time.monotonic() + 5
    while not seen and time.monotonic() < deadline:
        await asyncio.sleep(0.001)
    await a.delete("k")
    await a.clear()
    await asyncio.wait_for(task, 10)
    assert seen[0] == ("set", "k", 1)
    assert [op for op, _, _ in seen] == ["set", "del", "clear"] and seen[1][1] == "k"
    assert not b._state.watchers
    started = time.monotonic()
    async for _ in b.watch(timeout=0.2):  # nothing happens: it ends at its timeout
        pass
    assert 0.15 < time.monotonic() - started < 2
    await a.close()
    await b.close()
    await anode.close()


def test_raw_subscriber_drains_in_order_and_keeps_a_backlog(monkeypatch):
    """The subscriber socket's own reader: events applied in the connection's order, a
    drain stopped by its limit leaves a backlog that is applied next time (not stranded)."""
    import socket

    from syncmap import _listener

    class State:
        def __init__(self) -> None:
            self.seen: list[object] = []

        def on_message(self, data: bytes) -> None:
            self.seen.append(data)

        def on_pong(self, token: str) -> None:
            self.seen.append(("pong", token))

        def on_subscribed(self) -> None:
            self.seen.append("subscribed")

        probe_interval = probe_timeout = 1.0

    from syncmap._core.keys import MapKeys
    from syncmap._core.map_listen import Hub, Member

    ours, server_end = socket.socketpair()
    ours.settimeout(1.0)
    raw = _listener._RawSubscriber(ours)
    state = State()
    member = Member(state, MapKeys("m"))  # type: ignore[arg-type]
    member.channel = b"ch"
    hub = Hub(lambda: 0.0)
    hub.add(member)
    hub.token = "t"  # the probe in flight
    assert raw.drain(hub) == 0 and not raw.backlog  # nothing there: no wait
    wire = b"*3\r\n$10\r\nssubscribe\r\n$2\r\nch\r\n:1\r\n"  # sharded pub/sub
    for i in range(5):
        wire += b"*3\r\n$8\r\nsmessage\r\n$2\r\nch\r\n$2\r\nm%d\r\n" % i
    wire += b"*3\r\n$8\r\nsmessage\r\n$5\r\nother\r\n$1\r\nx\r\n*2\r\n$4\r\npong\r\n$1\r\nt\r\n"
    server_end.sendall(wire[:-7])  # the last event arrives in two pieces
    monkeypatch.setattr(_listener, "DRAIN_LIMIT", 3)
    assert raw.drain(hub) == 3 and raw.backlog
    assert raw.drain(hub) == 3 and raw.backlog
    assert raw.drain(hub) == 1 and not raw.backlog  # half an event: wait for it
    server_end.sendall(wire[-7:])
    assert raw.drain(hub) == 1
    assert state.seen == ["subscribed", b"m0", b"m1", b"m2", b"m3", b"m4", ("pong", "t")]
    server_end.close()
    with pytest.raises(redis.ConnectionError):
        raw.drain(hub)
    raw.sock.close()
    ours.close()


def test_closing_a_map_closes_its_connections(server, ns):
    """A closed blocking map leaves no socket open (its listener's subscriber and its
    freshness-probe connections included)."""
    import gc
    import os

    def open_fds() -> int:
        gc.collect()  # sockets of earlier tests' garbage close now, not mid-count
        return len(os.listdir("/proc/self/fd"))

    with syncmap.connect(server.url) as node:
        m = node.map(ns)
        m["k"] = 1  # the node's own command connection is kept: open it before counting
        wait_until(lambda: m.stats.verified_age < 1.0, 5)
        m.close()
        before = open_fds()
        for i in range(5):
            other = node.map(f"{ns}-{i}", max_staleness=0.3)
            other["k"] = i
            wait_until(lambda other=other: other._state.last_probe > 0, 5)  # probe connection
            other.close()
        assert open_fds() <= before  # a leak: one or more sockets per closed map


def test_a_writing_thread_applies_its_own_messages_even_when_answers_come_at_once(server, ns):
    """A writer skips applying waiting change messages when the server's answer is already
    in; but not for long: a busy write-only thread (the listener thread keeps out of its way)
    must not let its own change messages, and the freshness probe's PONG, pile up."""
    with syncmap.connect(server.url) as node:
        node._hooks.answered = lambda: True  # as on a one-CPU machine
        with node.map(ns) as m:
            m["k"] = 0
            wait_until(lambda: m._state.applied >= 1, 5)
            first = m._state.applied
            lags = []
            for i in range(1, 301):
                m["k"] = i
                lags.append(first + i - m._state.applied)  # own messages not applied yet
                time.sleep(0.0005)
            assert max(lags[100:]) < 100, max(lags)  # applied within ~20 ms, not never
            assert m.stats.resyncs == 0
