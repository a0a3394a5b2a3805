# ruff: noqa: F811  (the ``maps`` fixture is imported)
"""SyncMap under faults, against real servers: the fill race forced, subscriber connections
killed, server restarted, FLUSHALL, server paused (SIGSTOP), listener stalled."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

import syncmap
from servers import wait_until
from syncmap._core.ops import Script
from test_map_support import maps  # noqa: F401 (fixture)

LONG = 60.0


def cached(m, key, value):
    """Wait until ``m`` serves ``key`` == ``value`` from its local copy."""

    def hit():
        hits = m.stats.hits
        return m.get(key) == value and m.get(key) == value and m.stats.hits > hits

    wait_until(hit, 5, what=f"{key!r} cached")


def fill_holder(m, key):
    """A ``fill_hook`` for map handle ``m`` that holds its first fetch of ``key`` between the
    server's reply and the install until ``release`` is set (``fetched`` is set once it is
    held); later fetches go through. Returns ``(hook, fetched, release)``."""
    fetched, release = threading.Event(), threading.Event()

    def hold(k):
        if k != key or fetched.is_set():
            return None
        fetched.set()
        if m.kind == "sync":
            release.wait(10)
            return None

        async def wait_async():
            while not release.is_set():
                await asyncio.sleep(0.001)

        return wait_async()

    return hold, fetched, release


@pytest.mark.parametrize("guarded", [True, False], ids=["placeholder", "no-placeholder"])
def test_no_fill_race_forced_interleaving(maps, server, ns, guarded):
    """A fetch's reply is held between the server and the install; meanwhile another node
    writes and this node processes that write's invalidation; then the install runs. The old
    value must not be installed. With the placeholder disabled the race shows (the test can
    fail)."""
    a = maps(server.url, ns, max_staleness=LONG)
    a.node._hooks.fill_guard = guarded  # (a's node: its one map)
    b = maps(server.url, ns, max_staleness=LONG)
    b.set("warm", 0)
    cached(a, "warm", 0)
    seen = a.stats.invalidations
    b.set("k", "old")
    # (a has processed "old": the invalidation awaited below can only be the one of "new")
    wait_until(lambda: a.stats.invalidations > seen, 5, what="a processed the first write")
    hold, fetched, release = fill_holder(a, "k")
    a.m._state.hooks.fill_hook = hold
    result = {}
    reader = threading.Thread(target=lambda: result.setdefault("v", a.get("k")))
    reader.start()
    assert fetched.wait(5)
    seen = a.stats.invalidations
    b.set("k", "new")
    wait_until(lambda: a.stats.invalidations > seen, 5, what="a processed the invalidation")
    release.set()
    reader.join(5)
    a.m._state.hooks.fill_hook = None
    assert result["v"] == "old"  # the read itself was concurrent with the write: fine
    if guarded:
        assert a.get("k") == "new"
        assert a.get("k") == "new"
    else:
        assert a.get("k") == "old"  # the phantom value the placeholder prevents


def test_own_write_wins_over_a_concurrent_read_of_the_same_node(maps, server, ns):
    """Read-your-writes with two threads (tasks) of one node on one key, the interleaving
    forced: a read fetches the old value and is held; the node writes the key (the write's
    own change message is not processed: the listener is stalled); the held read installs
    its older value before the write's reply is handled. The node must still read its own
    write. (The demo does this: its ``watch()`` thread reads every changed key while the
    main thread writes.)"""
    a = maps(server.url, ns, max_staleness=LONG)
    a.set("warm", 0)
    cached(a, "warm", 0)
    b = maps(server.url, ns, max_staleness=LONG)
    b.set("k", "old")
    a.stall_listener()
    hold, fetched, release = fill_holder(a, "k")
    result = {}

    def read():
        result["v"] = a.get("k")

    a.m._state.hooks.fill_hook = hold
    reader = threading.Thread(target=read)
    orig = a.m._driver.perform

    def after_write(op):
        return isinstance(op, Script) and op.name == "map_write" and not release.is_set()

    if a.kind == "sync":

        def perform(op):
            reply = orig(op)
            if after_write(op):
                release.set()
                reader.join(10)
            return reply

    else:

        async def perform(op):
            reply = await orig(op)
            if after_write(op):
                release.set()
                while "v" not in result:
                    await asyncio.sleep(0.001)
            return reply

    a.m._driver.perform = perform
    reader.start()
    try:
        assert fetched.wait(5)
        a.set("k", "mine")
        reader.join(5)
    finally:
        release.set()
        a.m._state.hooks.fill_hook = None
        a.m._driver.perform = orig
    assert result["v"] == "old"  # the read was concurrent with the write: fine
    hits = a.stats.hits
    assert a.get("k") == "mine"
    assert a.stats.hits == hits + 1  # from the local copy: the write's value was installed
    a.resume_listener()


@pytest.mark.slow
def test_subscriber_connection_killed(maps, fresh_server, ns):
    a = maps(fresh_server.url, ns, max_staleness=LONG)
    b = maps(fresh_server.url, ns, max_staleness=LONG)
    a.set("k", 1)
    cached(b, "k", 1)
    resyncs = b.stats.resyncs
    assert fresh_server.drop_clients("pubsub") >= 2
    a.set("k", 2)  # its message may be lost: b's subscriber connection is gone
    wait_until(lambda: b.get("k") == 2, 10, what="b no longer serves the old value")
    assert b.stats.resyncs > resyncs
    wait_until(lambda: b.stats.verified_age < 1, 10, what="b resynced")
    a.set("k", 3)
    wait_until(lambda: b.get("k") == 3, 5, what="propagation after the reconnect")


@pytest.mark.slow
def test_server_restart(maps, fresh_server, ns):
    a = maps(fresh_server.url, ns, max_staleness=LONG)
    b = maps(fresh_server.url, ns, max_staleness=LONG)
    a.set("k", "before")
    a.set("gone", "before")
    cached(b, "k", "before")
    cached(b, "gone", "before")
    fresh_server.restart()  # no persistence: the data is lost
    wait_until(lambda: _try(a.set, "k", "after") is None, 10, what="server back")
    # (a pooled connection of the node's own client may fail once after the restart)
    wait_until(lambda: _try(b.get, "k") == "after", 10, what="b sees the new value")
    assert b.get("gone") is None  # lost with the server, never served from the old copy
    assert b.stats.resyncs >= 1


def _try(fn, *args):
    try:
        return fn(*args)
    except syncmap.ServerUnavailable:
        return "unavailable"


def test_flushall_then_write_no_tolerance(maps, fresh_server, ns):
    a = maps(fresh_server.url, ns, max_staleness=LONG)
    b = maps(fresh_server.url, ns, max_staleness=LONG)
    a.set("k", "old")
    a.set("x", "old")
    cached(b, "k", "old")
    cached(b, "x", "old")
    with fresh_server.client() as c:
        c.flushall()
    seen = b.stats.invalidations
    a.set("x", "new")  # a new epoch, seq 1
    wait_until(lambda: b.stats.invalidations > seen, 5, what="b got the new epoch's message")
    assert b.get("k") is None  # dropped with the copy before this read
    assert b.get("x") == "new"
    assert b.stats.resyncs >= 1


def test_flushall_silent_is_bounded_by_max_staleness(maps, fresh_server, ns):
    a = maps(fresh_server.url, ns, max_staleness=0.3)
    a.set("k", "old")
    cached(a, "k", "old")
    with fresh_server.client() as c:
        c.flushall()
    t0 = time.monotonic()
    wait_until(lambda: a.get("k") is None, 5, what="the lost data is noticed")
    assert time.monotonic() - t0 < 2.0
    assert a.stats.resync_causes.get("flush", 0) >= 1  # told by the server (CLIENT TRACKING)


@pytest.mark.slow
def test_paused_server_stops_local_reads(maps, fresh_server, ns):
    m = maps(fresh_server.url, ns, max_staleness=0.3, on_stale="raise")
    m.set("k", 1)
    cached(m, "k", 1)
    fresh_server.pause()
    try:
        t0 = time.monotonic()

        def refused():
            try:
                m.get_local("k")
                return False
            except syncmap.StaleRead:
                return True

        wait_until(refused, 3, what="StaleRead once max_staleness has passed")
        assert time.monotonic() - t0 < 1.5
    finally:
        fresh_server.resume()

    def fresh_again():
        try:
            return m.get("k") == 1 and m.stats.verified_age < 0.3
        except (syncmap.StaleRead, syncmap.ServerUnavailable):
            return False

    wait_until(fresh_again, 10, what="fresh again")


def test_stalled_listener_bounded_staleness(maps, server, ns):
    a = maps(server.url, ns, max_staleness=0.3)
    b = maps(server.url, ns, max_staleness=0.3)
    a.set("k", "old")
    cached(b, "k", "old")
    b.stall_listener()  # holds every message and every probe
    a.set("k", "new")
    acked = time.monotonic()
    while time.monotonic() - acked < 0.3:
        assert b.get("k") in ("old", "new")  # within max_staleness either is allowed
    assert b.get("k") == "new"  # past it: from the server, never the stale copy
    assert b.stats.verified_age > 0.3
    b.resume_listener()
    wait_until(lambda: b.stats.verified_age < 0.3, 5, what="b proven fresh again")
    assert b.get("k") == "new"


def _retrying_client(kind, server):
    """A client as a user builds one: redis-py's default Retry resends a command whose answer
    timed out (the hazard this test is about)."""
    import redis
    import redis.asyncio

    cls = redis.Redis if kind == "sync" else redis.asyncio.Redis
    client = cls(host="127.0.0.1", port=server.port, socket_timeout=0.3)
    assert client.get_retry().get_retries() > 0
    return client


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_write_cut_off_mid_flight_is_not_resent(fresh_server, ns, kind):
    """The server stops (SIGSTOP) after an increment was sent: the answer never comes in time.
    The increment must not be resent (it would count twice when the server resumes and runs
    both): the caller gets OutcomeUnknown, the server applies it exactly once, and the local
    copy does not keep serving the old value."""
    import asyncio

    async def scenario():
        if kind == "sync":
            node = syncmap.connect(_retrying_client(kind, fresh_server))
            m = node.map(ns, max_staleness=LONG)

            async def call(fn, *args):
                return await asyncio.to_thread(fn, *args)
        else:
            node = await syncmap.connect_async(_retrying_client(kind, fresh_server))
            m = await node.map(ns, max_staleness=LONG)

            async def call(fn, *args):
                return await fn(*args)

        try:
            assert await call(m.incr, "n", 1) == 1
            assert await call(m.get, "n") == 1
            fresh_server.pause()
            try:
                with pytest.raises(syncmap.OutcomeUnknown) as caught:
                    await asyncio.wait_for(call(m.incr, "n", 1), 10)
                assert isinstance(caught.value, syncmap.ServerUnavailable)
            finally:
                fresh_server.resume()
            deadline = time.monotonic() + 10
            while True:  # the server runs the increment it had received, once
                try:
                    if await call(m.get, "n", None, True) == 2:
                        break
                except syncmap.ServerUnavailable:
                    pass
                assert time.monotonic() < deadline, "the increment never landed"
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.5)  # (a resent increment would land within its timeouts)
            assert await call(m.get, "n", None, True) == 2
            assert await call(m.get, "n") == 2
            assert await call(m.incr, "n", 1) == 3
        finally:
            if kind == "sync":
                m.close()
                node.close()
            else:
                await m.close()
                await node.close()

    asyncio.run(scenario())


def test_write_after_connections_killed_is_not_unknown(maps, fresh_server, ns):
    """A kept connection the server closed between two writes is noticed before sending: the
    next write just works (no OutcomeUnknown)."""
    m = maps(fresh_server.url, ns, max_staleness=LONG)
    m.set("k", 1)
    assert fresh_server.drop_clients("normal") >= 1
    for i in range(5):
        m.incr("n", 1)
        m.set("k", i)
    assert m.get("k", fresh=True) == 4
    assert m.get("n", fresh=True) == 5


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_async_write_after_kill_the_loop_has_not_seen_is_not_unknown(fresh_server, ns, loop):
    """The server closes the asyncio map's kept connection, and the very next write is sent
    before the event loop has run once: the transport knows nothing of the close yet. The
    write must still go out on a live connection (no OutcomeUnknown). The kill is made with a
    blocking client from inside the loop, so the loop cannot process the close in between."""
    import asyncio

    async def scenario():
        node = await syncmap.connect_async(fresh_server.url)
        try:
            m = await node.map(ns, max_staleness=LONG)
            await m.set("k", 1)
            for i in range(3):
                assert fresh_server.drop_clients("normal") >= 1  # blocks the loop: no yield
                assert await m.incr("n", 1) == i + 1
            assert await m.get("n", fresh=True) == 3
        finally:
            await node.close()

    if loop == "uvloop":
        uvloop = pytest.importorskip("uvloop")
        uvloop.run(scenario())
    else:
        asyncio.run(scenario())


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_a_pooled_connection_the_server_closed_is_not_used(fresh_server, ns, kind):
    """The user's client has a connection in its pool that the server has since closed (a
    restart, a timeout, CLIENT KILL). Connecting with that client and writing must just work:
    no ServerUnavailable from the first PING, no OutcomeUnknown from the first write.
    redis-py 8.1's asyncio pool hands such a connection out unchecked (the async case failed
    before syncmap checked pool connections itself); its blocking pool checks."""
    import asyncio

    import redis.asyncio

    if kind == "sync":
        client = redis.Redis.from_url(fresh_server.url)
        client.ping()
        assert fresh_server.drop_clients("normal") >= 1
        node = syncmap.connect(client)
        m = node.map(ns, max_staleness=LONG)
        assert m.incr("n", 1) == 1
        node.close()
        client.close()
        return

    async def scenario():
        client = redis.asyncio.Redis.from_url(fresh_server.url)
        await client.ping()
        assert fresh_server.drop_clients("normal") >= 1  # blocks the loop: no yield
        node = await syncmap.connect_async(client)
        m = await node.map(ns, max_staleness=LONG)
        assert await m.incr("n", 1) == 1
        # two writes at once: one takes the map's kept connection, the other the pool's
        await client.ping()  # (the user's own command leaves a connection in the pool)
        assert fresh_server.drop_clients("normal") >= 2
        assert sorted(await asyncio.gather(m.incr("n", 1), m.incr("n", 1))) == [2, 3]
        await node.close()
        await client.aclose()

    asyncio.run(scenario())
