"""One listener per node and server, and nodes across ``os.fork()`` (multiprocessing's
``fork`` start method): what a prefork server (gunicorn --preload, Celery, multiprocessing)
does to a node made before it forks."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import redis

import syncmap
from servers import wait_until
from syncmap._stats import lock_stats
from test_map_support import _Loop

FORK = multiprocessing.get_context("fork")


def cached(m: Any, key: str, value: Any, within: float = 5.0) -> None:
    """Wait until ``m`` serves ``value`` for ``key`` from its local copy."""
    wait_until(lambda: m.get(key) == value and m.get_local(key) == value, within, what="cached")


async def _done(value: Any) -> Any:
    """``value``, awaited if it is a coroutine (one scenario for both kinds of node)."""
    return await value if asyncio.iscoroutine(value) else value


async def _open(url: str, kind: str, names: list[str], **options: Any) -> tuple[Any, list[Any]]:
    """A blocking or asyncio node (``kind``) and its maps of ``names``."""
    if kind == "sync":
        node: Any = syncmap.connect(url)
        return node, [node.map(n, **options) for n in names]
    node = await syncmap.connect_async(url)
    return node, [await node.map(n, **options) for n in names]


async def _sees(m: Any, key: str, value: Any, within: float = 10.0) -> None:
    """Read ``key`` of ``m`` (either kind) until its local copy serves ``value``."""
    deadline = time.monotonic() + within
    while not (await _done(m.get(key)) == value and m.get_local(key) == value):
        assert time.monotonic() < deadline, f"{m.name} never cached {value!r}"
        await asyncio.sleep(0.002)


def _on_loop(scenario: Any) -> Any:
    """Run the coroutine function ``scenario`` on an event loop of its own thread."""
    loop = _Loop()
    try:
        return loop.run(scenario())
    finally:
        loop.stop()


def _pubsub_clients(server: Any) -> list[dict[str, Any]]:
    with server.client() as c:
        return c.client_list(_type="pubsub")


# ---- one listener per node ------------------------------------------------------------------


def test_a_nodes_maps_share_one_listener_and_keep_their_own_contract(server, ns):
    """Many maps of one node: one listener (one thread, one subscriber connection), each map
    with its own max_staleness, zero tolerance per map (a gap drops that map's copy only),
    and closing a map leaves only its channel."""
    before = {c["id"] for c in _pubsub_clients(server)}
    threads = threading.active_count()
    with syncmap.connect(server.url) as writer, syncmap.connect(server.url) as node:
        maps = [node.map(f"{ns}-{i}", max_staleness=0.3 + i / 10) for i in range(20)]
        listener = maps[0]._listener
        assert all(m._listener is listener for m in maps)
        assert threading.active_count() == threads + 1
        mine = _mine(server, before)
        assert int(mine["ssub"]) == 20 and int(mine["sub"]) == 1  # (sub: flush notices)
        wmaps = [writer.map(f"{ns}-{i}") for i in range(20)]
        for i, (w, m) in enumerate(zip(wmaps, maps, strict=True)):
            w["k"] = i
            cached(m, "k", i)
        # each map is proven with its own max_staleness
        assert listener.hub.interval == pytest.approx(0.1)
        for m in maps:
            assert m._state.fresh_until - m._state.verified_at == pytest.approx(m._max_staleness)
        # a gap in one map's messages drops that map's copy only
        resyncs = [m.stats.resyncs for m in maps]
        maps[3]._state.applied -= 1  # as if one of its messages had been lost
        wmaps[3]["k"] = "next"
        wait_until(lambda: maps[3].stats.resyncs > resyncs[3], 5, what="the gap noticed")
        assert maps[3].stats.resync_causes.get("gap") == 1
        cached(maps[3], "k", "next")
        assert [m.stats.resyncs for m in maps[4:]] == resyncs[4:]
        # closing a map leaves its channel only; the others go on
        maps[0].close()
        wait_until(lambda: _ssub(server, mine["id"]) == 19, 5, what="SUNSUBSCRIBE")
        wmaps[1]["k"] = "after"
        cached(maps[1], "k", "after")
        assert listener.restarts == 0 and maps[1].stats.resync_causes.get("resubscribe") is None
    # closing the node closes its listener and connections
    wait_until(lambda: not _mine(server, before, missing_ok=True), 5, what="the listeners closed")
    wait_until(lambda: threading.active_count() == threads, 5, what="the listener thread's end")


def _ssub(server: Any, client_id: str) -> int:
    return sum(int(c["ssub"]) for c in _pubsub_clients(server) if c["id"] == client_id)


def _mine(server: Any, before: set[Any], missing_ok: bool = False) -> Any:
    mine = [c for c in _pubsub_clients(server) if c["id"] not in before]
    if missing_ok:
        return mine
    assert len(mine) == 1, mine
    return mine[0]


def test_two_maps_of_one_name_on_one_node(server, ns):
    """Two maps of one name on one node share the channel: both get every change; closing one
    keeps the channel for the other."""
    with syncmap.connect(server.url) as writer, syncmap.connect(server.url) as node:
        a, b = node.map(ns), node.map(ns)
        w = writer.map(ns)
        w["k"] = 1
        cached(a, "k", 1)
        cached(b, "k", 1)
        a.close()
        w["k"] = 2
        cached(b, "k", 2)
        assert b.stats.resyncs == 0


async def test_an_asyncio_nodes_maps_share_one_task(server, ns):
    before = {c["id"] for c in _pubsub_clients(server)}
    writer = await syncmap.connect_async(server.url)
    node = await syncmap.connect_async(server.url)
    tasks = len(asyncio.all_tasks())
    maps = [await node.map(f"{ns}-{i}") for i in range(10)]
    assert len({id(m._listener) for m in maps}) == 1
    assert len(asyncio.all_tasks()) == tasks + 1
    mine = _mine(server, before)  # (the writer has no map yet: no listener)
    assert int(mine["ssub"]) == 10
    w = await writer.map(f"{ns}-3")
    await w.set("k", "v")
    deadline = time.monotonic() + 5
    while maps[3].get_local("k") != "v":
        assert time.monotonic() < deadline
        await maps[3].get("k")
        await asyncio.sleep(0.001)
    await maps[0].close()
    deadline = time.monotonic() + 5
    while _ssub(server, mine["id"]) != 9:  # the map's channel only was left
        assert time.monotonic() < deadline
        await asyncio.sleep(0.005)
    await node.close()
    await writer.close()
    assert len(asyncio.all_tasks()) == tasks


# ---- FLUSHALL / FLUSHDB: the server tells the listener ----------------------------------------


@pytest.mark.parametrize("flush", ["FLUSHALL", "FLUSHDB", "FLUSHALL ASYNC", "FLUSHDB other db"])
@pytest.mark.parametrize("kind", ["sync", "async"])
def test_a_flush_drops_every_copy_long_before_max_staleness(fresh_server, ns, flush, kind):
    """A flush publishes nothing, and a synced map's probe reads no seq (only one map's, in
    turn): the subscriber connection's CLIENT TRACKING hears of it (a null invalidation) and
    every map of that server drops its copy at once. max_staleness is 60 s here: nothing
    else would notice for a minute. (A FLUSHDB of another db drops them too: harmless.)"""
    args = flush.split()
    other_db = args[-1] == "db"
    if other_db:
        args = ["FLUSHDB"]

    def flush_now() -> None:
        with fresh_server.client(db=5 if other_db else 0) as c:
            c.execute_command(*args)

    async def scenario() -> None:
        names = [f"{ns}-{i}" for i in range(3)]
        node, maps = await _open(fresh_server.url, kind, names, max_staleness=60)
        for m in maps:
            await _done(m.set("k", "old"))
            await _sees(m, "k", "old")
        await asyncio.to_thread(flush_now)
        deadline = time.monotonic() + 5
        while any(m.get_local("k") is not None for m in maps):
            assert time.monotonic() < deadline, "the flush was not noticed"
            await asyncio.sleep(0.005)
        for m in maps:
            assert m.stats.resync_causes.get("flush") == 1
            assert await _done(m.get("k")) == (None if not other_db else "old")
        await _done(node.close())

    _on_loop(scenario)


# ---- fork -----------------------------------------------------------------------------------


def _in_child(conn: Any, body: Any, *args: Any) -> None:
    try:
        conn.send(("ok", body(*args)))
    except BaseException:
        conn.send(("error", traceback.format_exc()))
    finally:
        conn.close()


def _forked(body: Any, *args: Any, timeout: float = 30.0) -> Any:
    """Run ``body(*args)`` in a child forked from this process; its result (or its error)."""
    return _forked_together(1, body, *args, timeout=timeout)[0]


def _forked_together(n: int, body: Any, *args: Any, timeout: float = 30.0) -> list[Any]:
    """Run ``body(*args)`` in ``n`` children forked from this process one after the other,
    running at once; their results (or the first error)."""
    children = []
    for _ in range(n):
        here, there = FORK.Pipe()
        child = FORK.Process(target=_in_child, args=(there, body, *args))
        child.start()
        there.close()
        children.append((child, here))
    results = []
    deadline = time.monotonic() + timeout
    try:
        for _child, here in children:
            if not here.poll(max(0.0, deadline - time.monotonic())):
                raise AssertionError("a forked child did not answer")
            status, value = here.recv()
            assert status == "ok", value
            results.append(value)
    finally:
        for child, _here in children:
            child.join(10)
            if child.is_alive():
                child.kill()
    assert all(child.exitcode == 0 for child, _ in children)
    return results


def _child_of_a_blocking_node(m: syncmap.SyncMap, lock: syncmap.Lock, url: str) -> dict:
    out: dict[str, Any] = {}
    # the lock is the parent's, not the child's
    out["token"] = lock.token
    out["owned"] = lock.owned()
    out["locked"] = lock.locked()  # (anyone: the parent)
    try:
        lock.release()
        out["release"] = "released"
    except syncmap.LockNotHeld:
        out["release"] = "LockNotHeld"
    # the child's counts are its own, from zero (as its metrics are)
    stats = m.stats
    out["counts_at_fork"] = (stats.hits, stats.misses, stats.invalidations, stats.resyncs)
    out["lock_counts_at_fork"] = lock_stats(lock.key).snapshot()[:2]
    # no inherited entry is trusted; the first read starts the child's own listener
    out["local_before"] = m.get_local("k")
    out["resync_causes"] = dict(m.stats.resync_causes)
    assert m.get("k") == "v0"
    cached(m, "k", "v0")  # the child's listener took a base: the copy fills again
    out["resync_causes_cached"] = dict(m.stats.resync_causes)
    hits = m.stats.hits
    for _ in range(2000):
        assert m.get("k") == "v0"
    out["hits"] = m.stats.hits - hits
    out["own_listener"] = m._listener.thread.is_alive() and m._listener.thread.ident
    # another node's write, seen within max_staleness
    with syncmap.connect(url) as other:
        t0 = time.monotonic()
        other.map(m.name)["k"] = "v1"
    wait_until(lambda: m.get_local("k") == "v1", m._max_staleness, what="the other node's write")
    out["seen_after"] = time.monotonic() - t0
    return out


def test_a_blocking_node_made_before_fork_works_in_the_child(server, ns):
    node = syncmap.connect(server.url)
    try:
        m = node.map(ns, max_staleness=0.5)
        m["k"] = "v0"
        cached(m, "k", "v0")
        lock = node.lock(f"{ns}-lock", ttl=30, auto_renew=True)
        assert lock.acquire()
        listener, thread, sock = m._listener, m._listener.thread, m._listener._sock
        ids = {c["id"] for c in _pubsub_clients(server)}
        resyncs, restarts = m.stats.resyncs, listener.restarts

        out = _forked(_child_of_a_blocking_node, m, lock, server.url)

        assert out["token"] is None and out["owned"] is False and out["locked"] is True
        assert out["release"] == "LockNotHeld"
        assert out["local_before"] is None and out["resync_causes"] == {"fork": 1}, out
        assert out["counts_at_fork"] == (0, 0, 0, 1), out  # the fork is the child's first
        assert out["lock_counts_at_fork"] == (0, 0), out  # (the parent's acquisition: its own)
        assert m.stats.hits > 0 and lock_stats(lock.key).acquisitions == 1
        # the child's listener subscribing is its first subscription, not a resubscribe
        before, after = out["resync_causes"], out["resync_causes_cached"]
        assert after.get("resubscribe") == before.get("resubscribe"), out
        assert out["hits"] >= 1800, out  # a near cache in the child
        assert out["own_listener"] and out["own_listener"] != thread.ident
        # the parent is unaffected: same listener, thread and connection; it keeps its hits,
        # sees the child's other node's write, and still holds (and renews) its lock
        assert m._listener is listener and listener._sock is sock and thread.is_alive()
        assert listener.restarts == restarts and m.stats.resyncs == resyncs
        assert {c["id"] for c in _pubsub_clients(server)} >= ids  # its subscriber lives on
        cached(m, "k", "v1")
        hits = m.stats.hits
        for _ in range(1000):
            assert m.get("k") == "v1"
        assert m.stats.hits - hits >= 900
        assert lock.owned()
        lock.release()
    finally:
        node.close()


def _load_in_child(m: syncmap.SyncMap, key: str, url: str) -> int:
    def load() -> int:
        with redis.Redis.from_url(url) as r:
            r.incr(f"{key}:loads")
        time.sleep(0.5)  # (the other children ask meanwhile)
        return os.getpid()

    return int(m.get_or_load(key, load))


def test_get_or_load_runs_once_across_children_of_one_node(server, ns, client):
    """Children forked from one node (the workers of a ``--preload``-ed gunicorn), asking
    ``get_or_load`` of one key at once: its loader runs once (each child makes its own
    tokens: none takes a sibling's load lock for its own)."""
    key = f"{ns}-hot"
    with syncmap.connect(server.url) as node:
        m = node.map(ns)
        m["k"] = "v0"  # the parent has used the map (its listener runs)
        pids = _forked_together(3, _load_in_child, m, key, server.url)
        assert len(set(pids)) == 1, pids  # (the loader's pid: one child's)
        assert int(client.get(f"{key}:loads")) == 1
        assert m.get(key) == pids[0]  # the parent sees the child's value
    client.delete(f"{key}:loads")


def _round_trips_in_child(m: syncmap.SyncMap, n: int) -> int:
    for i in range(n):  # each a write and a read of the server, checked
        key = f"{os.getpid()}-{i}"
        m[key] = i
        assert m.get(key, fresh=True) == i, key
    return n


def test_children_of_one_node_never_share_its_connections(server, ns):
    """Children forked from one node at once, each making its first server calls (the
    workers of a ``--preload``-ed gunicorn answering their first requests): none sends on a
    connection the parent opened (two processes writing on one socket read each other's
    answers), while the parent keeps using its own."""
    with syncmap.connect(server.url) as node:
        m = node.map(ns)
        for round_ in range(5):
            # the parent's map keeps connections aside: several threads' calls at once
            with ThreadPoolExecutor(4) as pool:
                list(pool.map(lambda i, v=round_: m.set(f"parent-{i}", v), range(16)))
            assert _forked_together(3, _round_trips_in_child, m, 20) == [20] * 3
            assert m.get("parent-0", fresh=True) == round_


def _child_of_an_asyncio_node(loop: _Loop, anode: Any, am: Any, alock: Any, url: str) -> dict:
    out: dict[str, Any] = {}
    out["local"] = am.get_local("k")  # nothing inherited is served

    async def scenario() -> None:
        for name, call in [
            ("get", lambda: am.get("k")),
            ("set", lambda: am.set("k", "child")),
            ("map", lambda: anode.map("other")),
            ("lock", lambda: alock.release()),
            ("ping", lambda: anode.ping()),
        ]:
            try:
                await call()
                out[name] = "worked"
            except syncmap.NodeForked:
                out[name] = "NodeForked"
        # the child's own asyncio node works, as a near cache
        await am.close()  # (in the child: leaves the parent's connections alone)
        await anode.close()
        node = await syncmap.connect_async(url)
        m = await node.map(am.name)
        assert await m.get("k") == "v0"
        hits = m.stats.hits
        for _ in range(500):
            await m.get("k")
        out["own_hits"] = m.stats.hits - hits
        await node.close()

    asyncio.run(scenario())
    return out


def test_an_asyncio_node_made_before_fork_raises_nodeforked_in_the_child(server, ns):
    """An asyncio node does not cross a fork (its connections and task belong to the parent's
    event loop): in the child every call of it, its maps and locks raises NodeForked (never
    a silent failure, never a stale read), and a node made in the child works. The parent
    is unaffected."""
    loop = _Loop()
    try:

        async def open_() -> tuple[Any, Any, Any]:
            anode = await syncmap.connect_async(server.url)
            am = await anode.map(ns, max_staleness=0.5)
            await am.set("k", "v0")
            alock = anode.lock(f"{ns}-lock", ttl=30)
            assert await alock.acquire()
            return anode, am, alock

        anode, am, alock = loop.run(open_())
        loop.run(am.get("k"))
        wait_until(lambda: am.get_local("k") == "v0", 5, what="cached")
        task = am._listener.task

        out = _forked(_child_of_an_asyncio_node, loop, anode, am, alock, server.url)

        assert out["local"] is None
        assert {out[k] for k in ("get", "set", "map", "lock", "ping")} == {"NodeForked"}, out
        assert out["own_hits"] >= 450, out
        # the parent: same task, still caching, still holding its lock
        assert am._listener.task is task and not task.done() and not am._listener.forked
        assert loop.run(am.get("k")) == "v0" and am.get_local("k") == "v0"
        assert loop.run(alock.owned())

        async def close() -> None:
            await alock.release()
            await anode.close()

        loop.run(close())
    finally:
        loop.stop()


# ---- a Cluster: one listener per master -----------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["sync", "async"])
def test_a_cluster_nodes_maps_share_one_listener_per_master(ns, kind):
    """30 maps over many slots of a 3-master Cluster: one listener (one subscriber connection)
    per master, each map's channel SSUBSCRIBEd on its slot's master, and every map caches
    and sees another node's writes."""
    from test_cluster_slots import _start_cluster

    servers = _start_cluster()
    url = f"redis+cluster://127.0.0.1:{servers[0].port}"
    names = [f"{ns[:30]}-{i}" for i in range(30)]
    try:

        def subscribers() -> dict[int, list[int]]:
            found = {}
            for srv in servers:
                with srv.client() as c:
                    found[srv.port] = [int(x["ssub"]) for x in c.client_list(_type="pubsub")]
            return found

        async def scenario() -> tuple[int, dict[int, list[int]]]:
            writer = syncmap.connect(url)
            node, maps = await _open(url, kind, names, max_staleness=0.5)
            listeners = {id(m._listener) for m in maps}
            seen = await asyncio.to_thread(subscribers)
            for i, n in enumerate(names):
                await asyncio.to_thread(writer.map(n).set, "k", i)
            for i, m in enumerate(maps):
                await _sees(m, "k", i)
            for m in maps:
                await _done(m.close())
            await _done(node.close())
            writer.close()
            return len(listeners), seen

        count, seen = _on_loop(scenario)
        assert count == 3  # one per master
        for port, counts in seen.items():
            assert len(counts) == 1, (port, counts)  # one subscriber connection per master
        assert sum(c for counts in seen.values() for c in counts) == 30
    finally:
        for srv in servers:
            srv.stop()


def test_idle_traffic_is_two_commands_per_probe_whatever_the_number_of_maps(fresh_server, ns):
    """50 idle maps on one node: each probe of its listener costs the server one PING and one
    HMGET (one synced map's seq, in turn), not one pair per map. Counted by the server."""

    def calls(c: Any) -> dict[str, int]:
        stats = c.info("commandstats")
        return {k: v["calls"] for k, v in stats.items() if k in ("cmdstat_ping", "cmdstat_hmget")}

    with syncmap.connect(fresh_server.url) as node, fresh_server.client() as c:
        maps = [node.map(f"{ns}-{i}", max_staleness=0.3) for i in range(50)]
        hub = maps[0]._listener.hub
        wait_until(lambda: all(m._state.synced for m in maps), 5, what="every map synced")
        wait_until(lambda: hub.token is None, 5, what="no probe in flight")
        before, probes = calls(c), hub._counter
        wait_until(lambda: hub._counter >= probes + 20, 10, what="20 probes")
        wait_until(lambda: hub.token is None, 5, what="no probe in flight")
        after, done = calls(c), hub._counter - probes
        pings = after.get("cmdstat_ping", 0) - before.get("cmdstat_ping", 0)
        hmgets = after.get("cmdstat_hmget", 0) - before.get("cmdstat_hmget", 0)
        # (one probe may start between reading the server's count and the listener's)
        assert abs(pings - done) <= 1 and abs(hmgets - done) <= 1, (pings, hmgets, done)


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_a_node_holds_two_connections_beyond_its_own_whatever_the_number_of_maps(
    fresh_server, ns, kind
):
    """A node with 50 maps (opened in a row, so the listener reads several maps' bases at once,
    then probing one map's seq at a time while idle) holds three connections to the server,
    blocking or asyncio: its own, its listener's subscriber connection and the one its probes
    read on. Counted by the server (CLIENT LIST)."""
    with fresh_server.client() as c:
        before = {x["id"] for x in c.client_list()}

        def mine() -> list[str]:
            return sorted(x["id"] for x in c.client_list() if x["id"] not in before)

        def settled(maps: list[Any]) -> int:
            hub = maps[0]._listener.hub
            wait_until(lambda: all(m._state.synced for m in maps), 5, what="every map synced")
            probes = hub._counter
            wait_until(lambda: hub._counter >= probes + 5, 10, what="5 idle probes")
            return len(mine())

        if kind == "sync":
            with syncmap.connect(fresh_server.url) as node:
                maps = [node.map(f"{ns}-{i}", max_staleness=0.3) for i in range(50)]
                maps[0]["k"] = 1
                assert maps[0]["k"] == 1
                assert settled(maps) == 3
        else:

            async def scenario() -> int:
                node = await syncmap.connect_async(fresh_server.url)
                try:
                    maps = [await node.map(f"{ns}-{i}", max_staleness=0.3) for i in range(50)]
                    await maps[0].set("k", 1)
                    assert await maps[0].get("k") == 1
                    return await asyncio.to_thread(settled, maps)
                finally:
                    await node.close()

            assert asyncio.run(scenario()) == 3
        wait_until(lambda: not mine(), 5, what="the node's connections closed")


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_a_lost_subscriber_connection_drops_every_map_and_all_come_back(fresh_server, ns, kind):
    """The server kills the node's subscriber connection: every map of it drops its copy
    (before its next local read), the listener reconnects, SSUBSCRIBEs every channel again,
    reads all the maps' bases (one pipeline), and every map caches again."""

    async def scenario() -> None:
        writer = syncmap.connect(fresh_server.url)
        names = [f"{ns}-{i}" for i in range(20)]
        node, maps = await _open(fresh_server.url, kind, names, max_staleness=30)
        for m in maps:
            await asyncio.to_thread(writer.map(m.name).set, "k", 1)
            await _sees(m, "k", 1)
        with fresh_server.client() as c:
            killed = c.client_kill_filter(_type="pubsub")
        assert killed >= 1
        deadline = time.monotonic() + 5
        while any(m.get_local("k") is not None for m in maps):  # every copy dropped
            assert time.monotonic() < deadline, "a copy survived the lost connection"
            await asyncio.sleep(0.002)
        for m in maps:
            await _sees(m, "k", 1)
        assert all(m.stats.resync_causes.get("disconnect") == 1 for m in maps)
        for m in maps:
            await asyncio.to_thread(writer.map(m.name).set, "k", 2)
        for m in maps:
            await _sees(m, "k", 2)
        await _done(node.close())
        writer.close()

    _on_loop(scenario)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["sync", "async"])
def test_a_map_whose_slot_moves_goes_to_the_new_masters_listener(ns, kind):
    """A slot moves to another master: the old master unsubscribes the map's channel, the
    listener hands the map to the listener of the new owner (after a MOVED answer to its
    SSUBSCRIBE, if the slot table did not know yet), which subscribes it there; the map
    caches and sees writes again. A sibling map on the old master is not disturbed: same
    listener, no resync, its copy kept."""
    from test_cluster import _assign, _ids, _move_keys
    from test_cluster_slots import _owner, key_slot

    servers = _start()
    try:
        url = f"redis+cluster://127.0.0.1:{servers[0].port}"
        ids = _ids(servers)
        name = ns.replace("_", "-")[:40]
        slot = key_slot(name)
        src = _owner(servers, slot)
        dst = next(s for s in servers if s is not src)
        sibling = next(
            f"{name}-{i}"
            for i in range(1000)
            if _owner(servers, key_slot(f"{name}-{i}")) is src and key_slot(f"{name}-{i}") != slot
        )

        async def scenario() -> None:
            writer = syncmap.connect(url)
            node, (m, sib) = await _open(url, kind, [name, sibling], max_staleness=0.5)
            assert m._listener is sib._listener
            old = m._listener

            async def sees(mp: Any, value: Any) -> None:
                await _sees(mp, "k", value)

            await asyncio.to_thread(writer.map(name).set, "k", 1)
            await sees(m, 1)
            await asyncio.to_thread(writer.map(sibling).set, "k", 0)
            await sees(sib, 0)
            sib_resyncs = sib.stats.resyncs

            def move() -> None:
                with dst.client() as c:
                    c.execute_command(
                        "CLUSTER", "SETSLOT", slot, "IMPORTING", ids[servers.index(src)]
                    )
                with src.client() as c:
                    c.execute_command(
                        "CLUSTER", "SETSLOT", slot, "MIGRATING", ids[servers.index(dst)]
                    )
                _move_keys(src, dst, slot)
                _assign(servers, slot, ids[servers.index(dst)])

            await asyncio.to_thread(move)
            await asyncio.to_thread(writer.map(name).set, "k", 2)  # (the writer follows MOVED)
            await sees(m, 2)
            assert m._listener is not old and m._listener.home == ("127.0.0.1", dst.port)
            assert sib._listener is old
            assert sib.stats.resyncs == sib_resyncs  # the move did not disturb the sibling
            assert sib.get_local("k") == 0
            await asyncio.to_thread(writer.map(sibling).set, "k", 3)
            await sees(sib, 3)
            await _done(node.close())
            writer.close()

        _on_loop(scenario)
    finally:
        for srv in servers:
            srv.stop()


def _start() -> Any:
    from test_cluster_slots import _start_cluster

    return _start_cluster()


def test_without_flush_notices_every_probe_reads_every_maps_seq(fresh_server, ns, caplog):
    """A server that refuses CLIENT TRACKING (here by ACL): the listener says so, and each
    probe reads every synced map's (epoch, seq) (counted by the server), so a FLUSHALL is
    still noticed (as another epoch) by each map's next probe."""
    with fresh_server.client() as c:
        c.execute_command("ACL", "SETUSER", "default", "-client|tracking")
    with syncmap.connect(fresh_server.url) as node, fresh_server.client() as c:
        maps = [node.map(f"{ns}-{i}", max_staleness=0.3) for i in range(20)]
        hub = maps[0]._listener.hub
        assert not hub.flush_notices
        assert "refuses CLIENT TRACKING" in caplog.text
        for m in maps:
            m["k"] = "old"
            cached(m, "k", "old")
        wait_until(lambda: hub.token is None, 5, what="no probe in flight")
        before, probes = c.info("commandstats")["cmdstat_hmget"]["calls"], hub._counter
        wait_until(lambda: hub._counter >= probes + 5, 10, what="5 probes")
        wait_until(lambda: hub.token is None, 5, what="no probe in flight")
        hmgets = c.info("commandstats")["cmdstat_hmget"]["calls"] - before
        done = hub._counter - probes
        assert abs(hmgets - 20 * done) <= 20, (hmgets, done)  # (a probe may straddle)
        c.flushall()
        for m in maps:
            wait_until(lambda m=m: m.get_local("k") is None, 5, what="the flush noticed")
            assert m.stats.resync_causes.get("epoch") == 1
            assert m.get("k") is None
