"""The lock under faults, with real OS processes: killed and stopped holders, a paused server,
dropped connections, cancelled releases, and exact mutual exclusion across processes."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

import syncmap
from servers import wait_until
from syncmap import LockNotHeld, ServerUnavailable
from syncmap._core.lock import REGISTRATION_SLACK_MS

CHILD = textwrap.dedent(
    """
    import sys, syncmap
    url, mode, name = sys.argv[1:4]
    node = syncmap.connect(url)
    if mode == "count":
        loops, counter = int(sys.argv[4]), sys.argv[5]
        lock = node.lock(name, ttl=10)
        for _ in range(loops):
            with lock:
                value = int(node.client.get(counter) or 0)
                node.client.set(counter, value + 1)
        print("done", flush=True)
    elif mode == "hold":
        lock = node.obtain(name, float(sys.argv[4]))
        print(lock.fence, flush=True)
        sys.stdin.readline()
        try:
            lock.release()
            print("released", flush=True)
        except syncmap.LockNotHeld:
            print("not-held", flush=True)
    """
)


def spawn(server, *args: object) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", CHILD, server.url, *map(str, args)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )


@pytest.mark.slow
def test_four_processes_count_exactly_under_the_lock(server, client, ns):
    loops = 150
    children = [spawn(server, "count", ns, loops, f"{ns}:counter") for _ in range(4)]
    for child in children:
        out, _ = child.communicate(timeout=60)
        assert child.returncode == 0 and out.strip() == "done"
    assert int(client.get(f"{ns}:counter")) == 4 * loops


@pytest.mark.slow
def test_a_killed_holder_blocks_until_its_ttl_then_the_waiter_gets_it(server, client, ns):
    holder = spawn(server, "hold", ns, 1.0)
    fence = int(holder.stdout.readline())
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    with syncmap.connect(server.url) as node:
        lock = node.lock(ns, ttl=5, poll_interval=0.05)
        started = time.monotonic()
        assert lock.acquire(timeout=5)
        assert 0.3 < time.monotonic() - started < 2.5  # waited for the rest of the TTL
        assert lock.fence > fence
        lock.release()


def test_a_waiter_with_a_timeout_gives_up_on_time_behind_a_long_ttl(server, ns):
    holder = spawn(server, "hold", ns, 60)
    holder.stdout.readline()
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    with syncmap.connect(server.url) as node:
        started = time.monotonic()
        assert node.lock(ns).acquire(timeout=0.5) is False
        assert 0.5 <= time.monotonic() - started < 1.5


def test_a_holder_stopped_past_its_ttl_is_fenced_off_and_cannot_release(server, client, ns):
    holder = spawn(server, "hold", ns, 0.3)
    old_fence = int(holder.stdout.readline())
    holder.send_signal(signal.SIGSTOP)
    try:
        with syncmap.connect(server.url) as node:
            lock = node.lock(ns, ttl=10, poll_interval=0.05)
            assert lock.acquire(timeout=5)
            assert lock.fence > old_fence
            holder.send_signal(signal.SIGCONT)
            out, _ = holder.communicate("go\n", timeout=20)
            assert out.strip() == "not-held"
            assert client.get(ns) == lock.token.encode()  # the late release changed nothing
            lock.release()
    finally:
        holder.send_signal(signal.SIGCONT)
        holder.kill()


async def test_a_release_cancelled_mid_flight_keeps_the_token_and_can_be_retried(fresh_server):
    node = await syncmap.connect_async(fresh_server.url)
    lock = await node.obtain("job", 30)
    token = lock.token
    fresh_server.pause()
    try:
        task = asyncio.create_task(lock.release())
        done, _ = await asyncio.wait({task}, timeout=0.3)
        assert not done  # the server cannot answer: the release is in flight
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert lock.token == token  # not forgotten (redis-py #3847 forgets it here)
    finally:
        fresh_server.resume()
    await lock.release()  # whether or not the first attempt reached the server
    assert lock.token is None
    with fresh_server.client() as c:
        assert c.get("job") is None
    await node.close()


def test_a_release_that_timed_out_keeps_the_token_and_can_be_retried(fresh_server):
    node = syncmap.connect(fresh_server.url, socket_timeout=0.3)
    lock = node.obtain("job", 30)
    fresh_server.pause()
    try:
        with pytest.raises(ServerUnavailable):
            lock.release()
        assert lock.token is not None
    finally:
        fresh_server.resume()
    lock.release()
    with fresh_server.client() as c:
        assert c.get("job") is None
    node.close()


async def test_an_async_release_that_timed_out_keeps_the_token_and_can_be_retried(fresh_server):
    """The asyncio read's own timer (socket_timeout): a silent server is a ServerUnavailable
    after it, not a hang and not a CancelledError; the task is not left cancelled."""
    node = await syncmap.connect_async(fresh_server.url, socket_timeout=0.3)
    lock = await node.obtain("job", 30)
    fresh_server.pause()
    try:
        started = time.monotonic()
        with pytest.raises(ServerUnavailable):
            await lock.release()
        assert time.monotonic() - started < 5
        assert lock.token is not None
        task = asyncio.current_task()
        assert task is not None and task.cancelling() == 0
    finally:
        fresh_server.resume()
    await lock.release()
    with fresh_server.client() as c:
        assert c.get("job") is None
    await node.close()


async def test_an_async_read_timer_moved_by_earlier_reads_still_times_out(fresh_server):
    """The asyncio read timer is one per connection, moved forward by each read: after reads
    spanning several socket_timeouts, and an idle spell past the timer's deadline (nothing is
    cancelled then), a silent server still ends the next read with ServerUnavailable."""
    node = await syncmap.connect_async(fresh_server.url, socket_timeout=0.3)
    lock = await node.obtain("job", 30)
    until = time.monotonic() + 1.0
    reads = 0
    while time.monotonic() < until:  # (one kept connection: each read moves its deadline)
        assert await lock.owned()
        reads += 1
    await asyncio.sleep(0.5)  # the timer comes due with no read in flight
    assert await lock.owned()  # arms it again, for this read's deadline
    task = asyncio.current_task()
    assert task is not None and task.cancelling() == 0
    await asyncio.sleep(0.15)  # the next read's deadline is well past the armed one
    fresh_server.pause()
    try:
        started = time.monotonic()
        with pytest.raises(ServerUnavailable):
            async with asyncio.timeout(10):  # (a timer that never fires fails here)
                await lock.release()
        assert time.monotonic() - started < 5, reads
        assert task.cancelling() == 0
        assert lock.token is not None
    finally:
        fresh_server.resume()
    await lock.release()
    await node.close()


def test_lock_commands_survive_killed_connections(fresh_server):
    node = syncmap.connect(fresh_server.url)
    lock = node.obtain("job", 30)
    assert fresh_server.drop_clients() >= 1
    lock.refresh()
    assert fresh_server.drop_clients() >= 1
    lock.release()
    with fresh_server.client() as c:
        assert c.get("job") is None
    node.close()


@pytest.mark.parametrize("is_async", [False, True], ids=["sync", "async"])
async def test_a_queued_wait_survives_its_killed_connection(fresh_server, is_async):
    """A lock that had to wait before sends its script and BLPOP in one write. Killing the
    connection during that wait must not fail the acquire: the script's effect is known, the
    next attempt queues again (or finds the lock handed over) and the waiter gets the lock."""
    from test_lock import Api, contended, in_background, queued

    url = fresh_server.url
    api = Api(await syncmap.connect_async(url) if is_async else syncmap.connect(url), is_async)

    def blocked(c):  # connections blocked in a command (the waiter's BLPOP)
        return sum(1 for info in c.client_list() if "b" in info["flags"])

    with fresh_server.client() as c:
        lock, _ = await contended(api, c, "job", poll_interval=10.0)
        holder = await api.obtain("job", 30)
        pending = in_background(api, lock.acquire)
        await asyncio.to_thread(wait_until, lambda: queued(c, "job") == 1 and blocked(c) == 1)
        assert fresh_server.drop_clients("normal") >= 1
        await api.do(holder.release())  # (its connection is replaced and the release resent)
        assert await asyncio.wait_for(pending, 5) is True  # the poll is 10 s
        await api.do(lock.release())
        assert sorted(c.keys()) == [b"syncmap:fence:{job}:job"]
    await api.do(api.node.close())


def test_a_restart_that_lost_the_lock_makes_release_raise(fresh_server):
    node = syncmap.connect(fresh_server.url)
    lock = node.obtain("job", 30)
    fresh_server.restart()
    with pytest.raises(LockNotHeld):
        lock.release()
    assert node.obtain("job", 5).fence == 1  # a restart without persistence resets fences
    node.close()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_does_not_share_the_parents_lock_connections(server, client, ns):
    node = syncmap.connect(server.url)
    lock = node.obtain(ns, 5)
    lock.refresh()  # leaves a kept connection behind
    pid = os.fork()
    if pid == 0:  # child: its own connections, or the parent's replies would be mixed up
        code = 0
        try:
            other = node.lock(f"{ns}:child", ttl=5)
            for _ in range(50):
                other.acquire()
                other.release()
        except BaseException:
            code = 1
        os._exit(code)
    for _ in range(50):
        lock.refresh()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    lock.release()
    node.close()


def waiter_token(client, ns) -> str:
    return client.zrange(f"syncmap:lockq:{{{ns}}}:{ns}", 0, 0)[0].decode()


@pytest.mark.slow
def test_killed_waiter_costs_no_more_than_its_registration(server, client, ns):
    """A waiter killed while queued stays registered for one poll + slack at most."""
    node = syncmap.connect(server.url)
    holder = node.obtain(ns, 30)
    waiter = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, syncmap; syncmap.connect(sys.argv[1]).lock(sys.argv[2], "
            "poll_interval=0.2).acquire()",
            server.url,
            ns,
        ]
    )
    wait_until(lambda: client.zcard(f"syncmap:lockq:{{{ns}}}:{ns}") == 1, what="queued")
    waiter.kill()
    waiter.wait()
    registration = f"syncmap:lockw:{{{ns}}}:{ns}:{waiter_token(client, ns)}"
    assert 0 < client.pttl(registration) <= 200 + REGISTRATION_SLACK_MS
    wait_until(lambda: not client.exists(registration), what="the registration to run out")
    holder.release()
    assert client.get(ns) is None  # not handed to the dead waiter
    node.close()


@pytest.mark.parametrize("answer", ["error", "ok"])
async def test_async_driver_keeps_connections_only_in_their_process(server, client, ns, answer):
    """A connection given back after an error answer follows the same rule as after any
    answer (shared with the blocking driver): kept aside in the process's own connections. A
    driver holding another process's (a forked child's, its parent's) neither borrows from
    them nor gives back to them."""
    from syncmap._core.ops import Command
    from syncmap._driver import AsyncDriver

    client.set(f"{ns}:text", "not a number")
    node = await syncmap.connect_async(server.url)
    try:
        driver = AsyncDriver(node.client, node.address)
        command = ("INCR", f"{ns}:text") if answer == "error" else ("GET", f"{ns}:text")
        with contextlib.suppress(syncmap.ServerError):
            await driver.perform(Command(command))
        parents = driver.conns
        assert len(parents.idle) == 1  # in its own process: kept
        kept = list(parents.idle)
        parents.pid = -1  # as seen from a forked child
        if answer == "error":
            with pytest.raises(syncmap.ServerError):
                await driver.perform(Command(command))
        else:
            assert await driver.perform(Command(command)) == b"not a number"
        assert parents.idle == kept  # neither borrowed nor given back
        own = driver.conns
        assert own is not parents and own.pid == os.getpid()
        assert len(own.idle) == 1 and own.idle[0] not in kept
    finally:
        await node.close()
