"""The asyncio map and lock on uvloop, against a real Valkey.

uvicorn and FastAPI run on uvloop when it is installed. There, as on asyncio's selector loops,
syncmap's asyncio listener reads the subscriber socket itself (``_RawSubscriber``: uvloop
watches file descriptors with ``add_reader``, and its transports hand out a socket to
duplicate); over TLS it keeps redis-py's ``PubSub.get_message``. These tests run the ideas of
``test_async_listener.py`` and ``test_tls.py`` on uvloop, with each reader (redis-py's with the
raw one turned off): every change message applied promptly by the listener alone (after a
quiet period, the last of a burst, after a drain cut short at ``DRAIN_LIMIT``), a killed
subscriber connection, the lock's BLPOP wake-ups and cancellation, and no connection left
open.

Each test runs its scenario on a uvloop loop of its own (``asyncio.Runner`` with uvloop's
loop factory: explicit, and independent of pytest-asyncio's loop plumbing), and checks that
the loop it runs on is uvloop's.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

import syncmap
from syncmap import _driver, _listener
from test_async_listener import (
    a_read_after_a_block_while_the_listener_is_elsewhere,
    cached,
    survives_a_killed_subscriber,
    until,
)

uvloop = pytest.importorskip(
    "uvloop", reason="uvloop is not installed (it is in the dev extra; it has no Windows build)"
)

LONG = 60.0  # max_staleness: only change messages (or a resync) make a node fresh again
PROMPT = 2.0  # s: a change message is applied within this (a probe would take LONG / 3)
READER = "raw"  # the listener's reader in this test (AsyncListener.reader); see `reader`


@pytest.fixture(autouse=True, params=["raw", "redis-py"])
def reader(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every test with each reader: the raw one (uvloop's default), and redis-py's."""
    if request.param == "redis-py":
        monkeypatch.setattr(_listener._RawSubscriber, "of_stream", classmethod(lambda c, w: None))
    monkeypatch.setitem(globals(), "READER", request.param)
    return str(request.param)


def on_uvloop(scenario: Callable[..., Awaitable[Any]], *args: Any) -> Any:
    """Run ``scenario(*args)`` on a new uvloop loop (closed afterwards)."""

    async def checked() -> Any:
        loop = asyncio.get_running_loop()
        assert isinstance(loop, uvloop.Loop), f"not on uvloop: {type(loop)}"
        async with asyncio.timeout(60):  # (a hung scenario fails here, with its traceback)
            return await scenario(*args)

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(checked())


async def served(m: syncmap.AsyncSyncMap, key: str, value: object, within: float = PROMPT) -> None:
    """Wait until ``m`` serves ``key`` == ``value`` from its local copy (a hit)."""
    await cached(m, key, value, within)


async def applied(m: syncmap.AsyncSyncMap, count: int, within: float = PROMPT) -> None:
    """Wait until ``m``'s listener applied ``count`` change messages in all, without reading
    the map: the listener alone."""
    try:
        await until(lambda: m.stats.invalidations >= count, within, f"{count} applied")
    except AssertionError as exc:
        raise AssertionError(f"{exc} (only {m.stats.invalidations})") from None


@contextlib.asynccontextmanager
async def two_maps(url: str, name: str) -> AsyncIterator[list[syncmap.AsyncSyncMap]]:
    """Two maps of one name on two nodes (closed afterwards), listened to on this loop by
    redis-py's reader."""
    async with contextlib.AsyncExitStack() as stack:
        maps = []
        for _ in range(2):
            node = await stack.enter_async_context(
                await syncmap.connect_async(url, socket_timeout=5)
            )
            maps.append(await stack.enter_async_context(await node.map(name, max_staleness=LONG)))
        for m in maps:
            listener = m._listener
            assert listener.task is not None
            assert listener.task.get_loop() is asyncio.get_running_loop()
            assert listener.reader == READER
        yield maps


async def stall(m: syncmap.AsyncSyncMap) -> None:
    m._listener.hooks.running.clear()
    await until(m._listener.hooks.parked.is_set, 5, "the listener parked")


# ---- maps ---------------------------------------------------------------------------------


def test_map_on_uvloop(server, ns):
    async def scenario() -> None:
        async with two_maps(server.url, ns) as (a, b):
            # redis-py reads the subscriber connection only if its transport is not paused
            # (the raw reader pauses it and reads the socket itself)
            transport = b._listener.pubsub.connection._writer.transport
            assert transport.is_reading() is (READER == "redis-py")
            await a.set("k", 1)
            assert await a.get("k") == 1 and await a.get("k", fresh=True) == 1  # read-your-writes
            await served(b, "k", 1)
            await a.set("k", 2)  # reaches b by its change message (LONG: no probe)
            await served(b, "k", 2)
            assert await b.get("k", fresh=True) == 2
            assert await a.delete("k") is True
            await served(b, "k", None)
            assert await b.get("k", fresh=True) is None and await a.get("k") is None
            await b.set("j", "from b")  # and the other way
            await served(a, "j", "from b")
            assert a.stats.resyncs == 0 and b.stats.resyncs == 0

    on_uvloop(scenario)


@contextlib.asynccontextmanager
async def primed(url: str, name: str) -> AsyncIterator[list[syncmap.AsyncSyncMap]]:
    """:func:`two_maps`, with "k" = 0 written by the first and served by the second."""
    async with two_maps(url, name) as (a, b):
        await a.set("k", 0)
        await served(b, "k", 0)
        yield [a, b]


def test_a_change_after_a_quiet_period_is_applied_at_once(server, ns):
    async def scenario() -> None:
        async with primed(server.url, ns) as (a, b):
            for value in range(1, 4):
                seen = b.stats.invalidations
                await asyncio.sleep(0.3)  # a quiet period on purpose (no result waited for)
                started = time.monotonic()
                await a.set("k", value)
                await applied(b, seen + 1)
                await served(b, "k", value, within=0.5)
                assert time.monotonic() - started < PROMPT
            assert b.stats.resyncs == 0

    on_uvloop(scenario)


def test_the_last_of_back_to_back_changes_is_applied_without_more_traffic(server, ns):
    async def scenario() -> None:
        async with primed(server.url, ns) as (a, b):
            for burst in range(3):
                seen = b.stats.invalidations
                for value in range(1, 11):
                    await a.set("k", burst * 100 + value)
                await applied(b, seen + 10)  # nothing is sent after the last one
                assert b.get_local("k") in (None, burst * 100 + 10)
                await served(b, "k", burst * 100 + 10)
            assert b.stats.resyncs == 0

    on_uvloop(scenario)


def test_a_burst_of_small_and_large_values_all_arrive(server, ns):
    """500 small writes and some ~100 KB values, while a task keeps reading b on the same
    loop: every change message is applied, in order (no resync), no value read goes
    backwards, and the local copies equal the server's."""

    async def scenario() -> None:
        async with two_maps(server.url, ns) as (a, b):
            keys = [f"k{i}" for i in range(50)]
            for key in keys:
                await a.set(key, -1)
            for key in keys:
                await served(b, key, -1)
            stop, problems, reads = asyncio.Event(), [], [0]

            async def read_b() -> None:
                last = dict.fromkeys(keys, -1)
                while not stop.is_set():
                    for key in keys:
                        value = await b.get(key)
                        number = value if isinstance(value, int) else int(value[:8])
                        if number < last[key]:
                            problems.append(f"{key}: read {number} after {last[key]}")
                        last[key] = number
                        reads[0] += 1
                    await asyncio.sleep(0.001)

            reader = asyncio.create_task(read_b())
            seen, writes = b.stats.invalidations, 0
            large = {key: f"{100 + i:08d}" + "x" * 100_000 for i, key in enumerate(keys[:8])}
            try:
                for round_ in range(10):
                    for key in keys:
                        await a.set(key, round_)
                        writes += 1
                for key, value in large.items():
                    await a.set(key, value)
                    writes += 1
                await applied(b, seen + writes, within=10)
            finally:
                stop.set()
                await asyncio.wait_for(reader, 5)
            assert not problems, problems[:5]
            assert reads[0] > 0
            expected = dict.fromkeys(keys, 9) | large
            assert {key: await a.get(key, fresh=True) for key in keys} == expected
            assert {key: await b.get(key) for key in keys} == expected
            assert b.stats.resyncs == 0 and b.stats.invalidations == seen + writes

    on_uvloop(scenario)


def test_a_drain_cut_short_drops_nothing(server, ns, monkeypatch):
    """A drain stops after DRAIN_LIMIT events (1 here) while more wait in redis-py's buffer:
    each must still be applied, promptly, with no further traffic. (A listener that reads
    one event past the limit and drops it loses every other change message, a gap and a
    resync; or a PONG.) The messages pile up while b's listener is stalled."""
    monkeypatch.setattr(_listener, "DRAIN_LIMIT", 1)
    burst = 100

    async def scenario() -> None:
        async with two_maps(server.url, ns) as (a, b):
            await a.set("k", 0)
            await served(b, "k", 0)
            seen = b.stats.invalidations
            await stall(b)
            for value in range(1, burst + 1):
                await a.set("k", value)
            await until(server.pubsub_output_flushed, 5, "messages sent")
            assert b.stats.invalidations == seen
            b._listener.hooks.running.set()
            await applied(b, seen + burst)
            await served(b, "k", burst)
            assert b.stats.resyncs == 0 and b.stats.invalidations == seen + burst

    on_uvloop(scenario)


def test_a_killed_subscriber_connection_then_no_stale_read(fresh_server, ns):
    """test_async_listener's scenario on uvloop: no stale read after the server kills the
    subscriber connections, a resync, then propagation again."""

    async def scenario() -> None:
        async with two_maps(fresh_server.url, ns) as (a, b):
            await survives_a_killed_subscriber(fresh_server, a, b, READER)

    on_uvloop(scenario)


def test_a_read_after_a_block_applies_the_waiting_changes_while_the_listener_is_elsewhere(
    server, ns
):
    """test_async_listener's scenario on uvloop (the raw reader's: redis-py's can apply
    messages only in the listener's own task)."""
    if READER != "raw":
        pytest.skip("only the raw reader can apply messages outside the listener's task")
    on_uvloop(a_read_after_a_block_while_the_listener_is_elsewhere, server.url, ns)


def test_a_write_on_a_connection_being_closed_is_not_unknown(server, ns):
    """A kept command connection whose transport is closing is not used: the write goes out
    on a new connection, once. (Written there, it would be dropped by the transport, and
    the failed send reported as maybe applied: ``OutcomeUnknown``, or on uvloop a bare
    ``RuntimeError``, for a write never sent.) A transport is left closing by a reset the
    loop read (until the next write, as redis-py's ``can_read`` sees no EOF), or, on
    uvloop over TLS, by the server's close until ``connection_lost`` is delivered; here
    ``abort()`` puts it there, as the loop does on a reset."""

    async def scenario() -> None:
        async with two_maps(server.url, ns) as (a, b):
            kept = _driver._connections(a._driver.client).idle
            for round_ in range(1, 4):
                await a.set("k", round_)
                await a.incr("n")
                assert kept, "no connection kept"
                for conn in kept:
                    conn._writer.transport.abort()
                    assert not await conn.can_read()  # (redis-py sees nothing wrong)
                await a.set("k", -round_)  # no OutcomeUnknown: nothing was sent
                await a.incr("n")  # (not idempotent either: must land exactly once)
            assert await a.get("k", fresh=True) == -3 and await a.get("n", fresh=True) == 6
            await served(b, "k", -3)

    on_uvloop(scenario)


# ---- locks --------------------------------------------------------------------------------


def open_sockets() -> set[str]:
    """This process's open sockets. (Only sockets: libuv opens a /dev/null of its own at a
    loop's first connection, closed with the loop.)"""
    sockets = set()
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # (the listing's own descriptor, closed since)
            target = os.readlink(f"/proc/self/fd/{name}")
            if target.startswith("socket:"):
                sockets.add(f"{name}: {target}")
    return sockets


def lock_keys(client: Any, ns: str) -> list[str]:
    return sorted(key.decode() for key in client.scan_iter(match=f"*{ns}*"))


async def queued(client: Any, ns: str, count: int) -> None:
    """Wait until lock ``ns`` has ``count`` registered waiters."""
    queue = f"syncmap:lockq:{{{ns}}}:{ns}"
    await until(lambda: client.zcard(queue) == count, 5, f"{count} waiter(s) queued")


async def hand_off(holder: Any, pending: asyncio.Task[bool]) -> None:
    """Release ``holder``; the queued acquire ``pending`` is woken at once (BLPOP), not at its
    10 s poll."""
    await holder.release()
    released = time.monotonic()
    assert await asyncio.wait_for(pending, 5) is True
    assert time.monotonic() - released < PROMPT  # woken, not polled (10 s)


@contextlib.asynccontextmanager
async def two_nodes(url: str) -> AsyncIterator[tuple[Any, Any]]:
    async with (
        await syncmap.connect_async(url) as na,
        await syncmap.connect_async(url) as nb,
    ):
        yield na, nb


def test_lock_hand_off_on_uvloop(server, client, ns):
    """Acquire, release; a second node's queued acquire (BLPOP) is woken by the release long
    before its 10 s poll; fences grow."""

    async def scenario() -> None:
        async with two_nodes(server.url) as (na, nb):
            first = na.lock(ns, ttl=5)
            assert await first.acquire() is True
            fence = first.fence
            assert isinstance(fence, int) and client.get(ns) == first.token.encode()
            await first.release()
            assert client.get(ns) is None
            holder = na.lock(ns, ttl=30)
            assert await holder.acquire() is True and holder.fence > fence
            assert await nb.lock(ns, ttl=5).acquire(blocking=False) is False
            waiter = nb.lock(ns, ttl=5, poll_interval=10.0)
            pending = asyncio.create_task(waiter.acquire())
            await queued(client, ns, 1)
            fence = holder.fence
            await hand_off(holder, pending)
            assert waiter.fence > fence and client.get(ns) == waiter.token.encode()
            await waiter.release()
            assert lock_keys(client, ns) == [f"syncmap:fence:{{{ns}}}:{ns}"]

    on_uvloop(scenario)


def test_a_cancelled_acquire_leaves_no_registration(server, client, ns):
    """A queued acquire cancelled while it waits (its BLPOP) leaves the queue and its
    registration at once: the release skips it, and the waiter queued behind it gets the lock
    promptly (not after the dead one's registration runs out, nor at its 10 s poll)."""

    async def scenario() -> None:
        async with two_nodes(server.url) as (na, nb):
            holder = await na.obtain(ns, 30)
            before = lock_keys(client, ns)
            gone = nb.lock(ns, ttl=30, poll_interval=10.0)
            cancelled = asyncio.create_task(gone.acquire())
            await queued(client, ns, 1)
            nxt = nb.lock(ns, ttl=30, poll_interval=10.0)
            pending = asyncio.create_task(nxt.acquire())
            await queued(client, ns, 2)
            assert len(lock_keys(client, ns)) > len(before)  # registrations of the waiters
            cancelled.cancel()
            with pytest.raises(asyncio.CancelledError):
                await cancelled
            await queued(client, ns, 1)
            fence = holder.fence
            await hand_off(holder, pending)
            assert gone.token is None and nxt.fence > fence
            assert client.get(ns) == nxt.token.encode()
            await nxt.release()
            assert lock_keys(client, ns) == [f"syncmap:fence:{{{ns}}}:{ns}"]  # nothing left

    on_uvloop(scenario)


# ---- nothing left open --------------------------------------------------------------------


def test_closing_maps_and_nodes_leaves_no_connection(fresh_server, ns):
    """Maps, a lock and nodes opened and closed on uvloop: the server's client count is back
    where it started, the listener tasks are done, and no socket is left open."""
    with fresh_server.client() as watcher:

        def clients() -> int:
            return len(watcher.client_list())  # (the watcher itself included)

        async def scenario() -> None:
            baseline, sockets = clients(), open_sockets()
            nodes = [await syncmap.connect_async(fresh_server.url) for _ in range(2)]
            maps = [
                await node.map(f"{ns}-{i}", max_staleness=LONG) for node in nodes for i in (0, 1)
            ]
            lock = nodes[0].lock(ns, ttl=5)
            assert await lock.acquire()
            await maps[0].set("k", 1)
            await served(maps[2], "k", 1)
            await lock.release()
            # (a subscriber connection per node: its maps share it, ...)
            assert clients() > baseline + len(nodes)
            listeners = [m._listener for m in maps]
            assert len(set(listeners)) == len(nodes)
            for m in maps:
                await m.close()
            for listener in listeners:
                assert not listener.hub.members  # every map left its node's listener
            for node in nodes:
                await node.close()  # closing a node closes its listener
            for listener in listeners:
                assert listener.reader == "none"
                assert listener.task is not None and listener.task.done()
            await until(
                lambda: not watcher.client_list(_type="pubsub"), 5, "subscriber connections closed"
            )
            await until(lambda: clients() == baseline, 5, f"{baseline} clients again")
            assert asyncio.all_tasks() == {asyncio.current_task()}
            assert open_sockets() == sockets  # none left open

        on_uvloop(scenario)
