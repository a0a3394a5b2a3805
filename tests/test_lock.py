"""The distributed lock against a real server; every test runs on Lock and on AsyncLock."""

from __future__ import annotations

import asyncio
import base64
import inspect
import math
import threading
import time

import pytest

import syncmap
from servers import wait_until
from syncmap import InvalidArgument, LockLost, LockNotHeld, NotObtained, TooLarge


class Api:
    """One test body for both flavours: ``await api.do(lock.acquire())`` works for either."""

    def __init__(self, node, is_async: bool) -> None:
        self.node = node
        self.is_async = is_async

    @staticmethod
    async def do(result):
        return await result if inspect.isawaitable(result) else result

    def lock(self, name, **options):
        return self.node.lock(name, **options)

    async def obtain(self, name, ttl, **options):
        return await self.do(self.node.obtain(name, ttl, **options))

    async def obtain_multi(self, names, ttl, **options):
        return await self.do(self.node.obtain_multi(names, ttl, **options))


@pytest.fixture(params=["sync", "async"])
async def api(request, server):
    if request.param == "sync":
        node = syncmap.connect(server.url)
        yield Api(node, False)
        node.close()
    else:
        node = await syncmap.connect_async(server.url)
        yield Api(node, True)
        await node.close()


def lock_keys(client, ns):
    return sorted(k.decode() for k in client.scan_iter(match=f"*{ns}*"))


async def test_acquire_release_roundtrip(api, client, ns):
    lock = api.lock(ns, ttl=5, metadata="who=me")
    assert lock.token is None and lock.fence is None
    assert await api.do(lock.acquire()) is True
    assert len(lock.token) == 22 and lock.key == ns and isinstance(lock.fence, int)
    assert base64.urlsafe_b64decode(lock.token + "==")  # redislock's token alphabet
    assert client.get(ns) == (lock.token + "who=me").encode()
    assert 4.0 < await api.do(lock.ttl()) <= 5.0
    assert await api.do(lock.owned()) and await api.do(lock.locked())
    await api.do(lock.release())
    assert client.get(ns) is None and lock.token is None
    assert not await api.do(lock.owned()) and not await api.do(lock.locked())
    with pytest.raises(LockNotHeld):
        await api.do(lock.release())
    with pytest.raises(LockNotHeld):
        await api.do(lock.refresh())


async def test_fences_grow_with_every_acquisition(api, ns):
    lock = api.lock(ns, ttl=5)
    fences = []
    for _ in range(5):
        await api.do(lock.acquire())
        fences.append(lock.fence)
        await api.do(lock.release())
    other = await api.obtain(ns, 5)
    assert fences == sorted(set(fences)) and other.fence > fences[-1]
    await api.do(other.release())


async def test_a_held_lock_excludes_others_and_waiters_leave_no_trace(api, client, ns):
    holder = await api.obtain(ns, 5)
    other = api.lock(ns, ttl=5)
    assert await api.do(other.acquire(blocking=False)) is False
    started = time.monotonic()
    assert await api.do(other.acquire(timeout=0.2)) is False
    assert 0.2 <= time.monotonic() - started < 2.0
    with pytest.raises(NotObtained):
        await api.obtain(ns, 5)
    with pytest.raises(NotObtained):
        await api.obtain(ns, 5, retry=syncmap.LinearBackoff(0.02), timeout=0.1)
    assert lock_keys(client, ns) == sorted([ns, f"syncmap:fence:{{{ns}}}:{ns}"])
    await api.do(holder.release())


async def test_refresh_extends_and_ttl_reports(api, ns):
    lock = await api.obtain(ns, 0.5)
    await api.do(lock.refresh(10))
    assert 9.0 < await api.do(lock.ttl()) <= 10.0
    await api.do(lock.release())
    assert await api.do(lock.ttl()) == 0.0


async def test_release_of_an_expired_lock_raises_and_forgets(api, client, ns):
    lock = await api.obtain(ns, 0.05)
    wait_until(lambda: client.get(ns) is None, what="the lock to expire")
    assert await api.do(lock.owned()) is False and await api.do(lock.ttl()) == 0.0
    with pytest.raises(LockNotHeld):
        await api.do(lock.refresh())
    with pytest.raises(LockNotHeld):
        await api.do(lock.release())
    assert lock.token is None


async def test_leaving_a_with_block_whose_lock_expired_raises_lock_lost(api, client, ns):
    lock = api.lock(ns, ttl=0.05)
    with pytest.raises(LockLost):
        if api.is_async:
            async with lock:
                wait_until(lambda: client.get(ns) is None, what="expiry")
        else:
            with lock:
                wait_until(lambda: client.get(ns) is None, what="expiry")


async def test_another_holder_after_expiry_has_a_higher_fence(api, client, ns):
    first = await api.obtain(ns, 0.05)
    wait_until(lambda: client.get(ns) is None, what="expiry")
    second = await api.obtain(ns, 5)
    assert second.fence > first.fence
    with pytest.raises(LockNotHeld):
        await api.do(first.release())
    assert client.get(ns) == second.token.encode()  # the late release did not touch it
    await api.do(second.release())


@pytest.mark.parametrize(
    ("args", "options", "error"),
    [
        ((0,), {}, InvalidArgument),
        ((-1,), {}, InvalidArgument),
        ((math.nan,), {}, InvalidArgument),
        ((math.inf,), {}, InvalidArgument),
        ((True,), {}, InvalidArgument),
        (("10",), {}, InvalidArgument),
        ((10,), {"metadata": 5}, InvalidArgument),
        ((10,), {"metadata": "x" * (64 * 1024 + 1)}, TooLarge),
        ((10,), {"poll_interval": 0}, InvalidArgument),
        ((10,), {"auto_renew": "yes"}, InvalidArgument),
        ((10,), {"max_hold": -1}, InvalidArgument),
        ((10,), {"on_lost": 3}, InvalidArgument),
        ((10,), {"retry": 0.5}, InvalidArgument),
        ((10,), {"retry": [-1.0]}, InvalidArgument),
        ((10,), {"timeout": -2}, InvalidArgument),
        ((10,), {"token": ""}, InvalidArgument),
        ((10,), {"token": "short"}, InvalidArgument),
        ((10,), {"token": 5}, InvalidArgument),
        ((10,), {"token": "t" * 257}, InvalidArgument),
    ],
)
async def test_bad_obtain_arguments_write_nothing(api, client, ns, args, options, error):
    with pytest.raises(error):
        await api.obtain(ns, *args, **options)
    assert lock_keys(client, ns) == []


async def test_obtain_with_a_custom_token(api, client, ns):
    """redislock's Token option: the value is that token + metadata; its holder may obtain
    the lock again (the value is rewritten, the TTL renewed, the fence kept); anyone else is
    refused. A later acquisition under the same token is its own: when it expires, its
    release raises LockNotHeld (it is not mistaken for the earlier, released one)."""
    first = await api.obtain(ns, 5, token="pod-0007", metadata="m1")
    assert client.get(ns) == b"pod-0007m1" and first.token == "pod-0007"
    client.pexpire(ns, 1000)
    again = await api.obtain(ns, 5, token="pod-0007", metadata="m2")
    assert client.get(ns) == b"pod-0007m2" and client.pttl(ns) > 4000
    assert again.fence == first.fence
    for other in ({"token": "pod-0008"}, {}):
        with pytest.raises(NotObtained):
            await api.obtain(ns, 5, **other)
    await api.do(again.release())
    assert client.get(ns) is None
    third = await api.obtain(ns, 0.3, token="pod-0007")
    assert third.fence > first.fence
    wait_until(lambda: client.get(ns) is None, 5, what="the lock to expire")
    with pytest.raises(LockNotHeld):
        await api.do(third.release())


async def test_obtain_multi_with_a_custom_token(api, client, ns):
    keys = [f"{{{ns}}}:a", f"{{{ns}}}:b"]
    first = await api.obtain_multi(keys, 5, token="job-0001")
    again = await api.obtain_multi(keys, 5, token="job-0001", metadata="x")
    assert again.fences == first.fences and client.get(keys[1]) == b"job-0001x"
    with pytest.raises(NotObtained):
        await api.obtain_multi(keys, 5, token="job-0002")
    await api.do(again.release())
    client.set(keys[1], "someone else")
    mine = await api.obtain(keys[0], 5, token="job-0001")
    with pytest.raises(NotObtained):  # all or none: one of them is another holder's
        await api.obtain_multi(keys, 5, token="job-0001")
    assert client.get(keys[0]) == b"job-0001" and client.get(keys[1]) == b"someone else"
    await api.do(mine.release())


@pytest.mark.parametrize("name", ["", 5, None, b"bytes", "bad}brace", "nul\x00"])
async def test_bad_lock_names_are_typed_errors(api, client, name):
    with pytest.raises(InvalidArgument):
        api.lock(name)
    with pytest.raises(InvalidArgument):
        await api.obtain(name, 5)


async def test_bad_acquire_arguments_write_nothing(api, client, ns):
    lock = api.lock(ns)
    for kwargs in ({"blocking": False, "timeout": 1}, {"timeout": -5}, {"timeout": "1"}):
        with pytest.raises(InvalidArgument):
            await api.do(lock.acquire(**kwargs))
    with pytest.raises(InvalidArgument):
        await api.do((await api.obtain(ns, 5)).refresh(0))
    assert lock_keys(client, ns) == sorted([ns, f"syncmap:fence:{{{ns}}}:{ns}"])


async def test_obtain_multi_is_all_or_none(api, client, ns):
    a, b = f"{{{ns}}}:a", f"{{{ns}}}:b"
    client.set(b, "someone-else", px=10_000)
    with pytest.raises(NotObtained):
        await api.obtain_multi([a, b], 5)
    assert client.get(a) is None
    client.delete(b)
    lock = await api.obtain_multi([a, b], 5, metadata="m")
    assert client.mget(a, b) == [(lock.token + "m").encode()] * 2
    assert lock.key == a and lock.keys == (a, b) and len(lock.fences) == 2
    assert 4.0 < await api.do(lock.ttl()) <= 5.0
    await api.do(lock.refresh(8))
    await api.do(lock.release())
    assert client.mget(a, b) == [None, None]


@pytest.mark.parametrize("keys", [[], ["x", "x"], ["a", "b"], "ab", [1]])
async def test_obtain_multi_bad_keys(api, client, ns, keys):
    keys = (
        [k if not isinstance(k, str) or k == "" else f"{ns}{k}" for k in keys]
        if isinstance(keys, list)
        else keys
    )
    with pytest.raises(InvalidArgument):
        await api.obtain_multi(keys, 5)
    assert lock_keys(client, ns) == []


async def test_obtain_waits_for_a_release_with_its_retry_strategy(api, client, ns):
    holder = await api.obtain(ns, 5)
    releaser = threading.Timer(0.2, lambda: client.delete(ns))  # like a redislock peer
    releaser.start()
    lock = await api.obtain(ns, 5, retry=syncmap.LinearBackoff(0.02), timeout=3)
    assert lock.fence > holder.fence
    await api.do(lock.release())


# -- wire compatibility with Go's bsm/redislock ---------------------------------------------------
# The scripts below restate redislock's (v0.9) semantics for the test: release and TTL compare
# the whole stored value (token + metadata) of every key.

REDISLOCK_RELEASE = """
local values = redis.call("mget", unpack(KEYS))
for i, _ in ipairs(KEYS) do
  if values[i] ~= ARGV[1] then return false end
end
redis.call("del", unpack(KEYS))
return redis.status_reply("OK")
"""
REDISLOCK_PTTL = """
local values = redis.call("mget", unpack(KEYS))
for i, _ in ipairs(KEYS) do
  if values[i] ~= ARGV[1] then return false end
end
return redis.call("pttl", KEYS[1])
"""


def redislock_obtain(client, key, ttl_ms, metadata=""):
    """What redislock's Obtain writes: 16 random bytes base64url + metadata, NX, PX."""
    import os

    token = base64.urlsafe_b64encode(os.urandom(16)).rstrip(b"=").decode()
    assert client.set(key, token + metadata, nx=True, px=ttl_ms)
    return token + metadata


async def test_a_redislock_holder_blocks_syncmap_until_it_releases(api, client, ns):
    value = redislock_obtain(client, ns, 10_000, "go-service")
    lock = api.lock(ns, ttl=5, poll_interval=0.05)
    assert await api.do(lock.acquire(blocking=False)) is False
    with pytest.raises(NotObtained):
        await api.obtain(ns, 5)
    assert client.eval(REDISLOCK_RELEASE, 1, ns, value) == b"OK"
    assert await api.do(lock.acquire(timeout=5)) is True
    await api.do(lock.release())


async def test_redislock_reads_and_releases_a_syncmap_lock(api, client, ns):
    lock = await api.obtain(ns, 5, metadata='{"pid": 1}')
    value = client.get(ns).decode()
    token, metadata = value[:22], value[22:]
    assert token == lock.token and metadata == '{"pid": 1}'
    assert 4000 < client.eval(REDISLOCK_PTTL, 1, ns, value) <= 5000
    assert client.eval(REDISLOCK_RELEASE, 1, ns, value) == b"OK"
    with pytest.raises(LockNotHeld):
        await api.do(lock.release())


# -- waiters: wake-up, order, cancellation ----------------------------------------------------


def queued(client, ns):
    return client.zcard(f"syncmap:lockq:{{{ns}}}:{ns}")


def in_background(api, acquire):
    """Start ``acquire()`` (in a thread for a blocking lock); a task to await."""
    if api.is_async:
        return asyncio.create_task(acquire())
    return asyncio.create_task(asyncio.to_thread(acquire))


async def contended(api, client, ns, **options):
    """A lock that has had to wait once (its next acquire queues and waits in one write), and
    the fence it was handed."""
    holder = await api.obtain(ns, 30)
    lock = api.lock(ns, ttl=30, **options)
    pending = in_background(api, lock.acquire)
    await asyncio.to_thread(wait_until, lambda: queued(client, ns) == 1, 5, 0.005, "queue")
    await api.do(holder.release())
    assert await asyncio.wait_for(pending, 5) is True
    fence = lock.fence
    await api.do(lock.release())
    return lock, fence


async def test_a_waiter_is_woken_by_release_long_before_its_poll(api, client, ns):
    holder = await api.obtain(ns, 30)
    waiter = api.lock(ns, ttl=5, poll_interval=10.0)
    pending = in_background(api, waiter.acquire)
    await asyncio.to_thread(wait_until, lambda: queued(client, ns) == 1, 5, 0.005, "queue")
    fence = holder.fence
    await api.do(holder.release())
    released = time.monotonic()
    assert await asyncio.wait_for(pending, 5) is True
    assert time.monotonic() - released < 2.0  # the poll interval is 10 s
    assert waiter.fence > fence and client.get(ns) == waiter.token.encode()
    await api.do(waiter.release())


async def test_a_lock_that_waited_queues_and_waits_in_one_write(api, client, ns):
    lock, _ = await contended(api, client, ns, poll_interval=10.0)
    holder = await api.obtain(ns, 30)
    client.slowlog_reset()
    client.config_set("slowlog-log-slower-than", 0)  # the server logs every command
    try:
        pending = in_background(api, lock.acquire)
        await asyncio.to_thread(wait_until, lambda: queued(client, ns) == 1, 5, 0.005, "queue")
        fence, released = holder.fence, time.monotonic()
        await api.do(holder.release())
        assert await asyncio.wait_for(pending, 5) is True
        assert time.monotonic() - released < 2.0  # handed over and woken (the poll is 10 s)
        log = [e for e in reversed(client.slowlog_get(128)) if b"lockw" in e["command"]]
    finally:
        client.config_set("slowlog-log-slower-than", 10_000)
    # The waiter's connection is the one that ran BLPOP. The commands a script runs are logged
    # too: Valkey with the caller's address, Redis 7.0 with the scripting client's ("?:0"), so
    # the waiter's own commands are its scripts and its BLPOP (scripts cannot call either):
    # the script in "queue" mode, then BLPOP (logged once it returned), and no other script.
    (address,) = {e["client_address"] for e in log if e["command"].startswith(b"BLPOP ")}
    waiter = [
        e
        for e in log
        if e["client_address"] == address
        and e["command"].split()[0] in (b"EVAL", b"EVALSHA", b"BLPOP")
    ]
    assert [e["command"].split()[0] for e in waiter] == [b"EVALSHA", b"BLPOP"]
    assert b" queue " in waiter[0]["command"]
    assert lock.fence == fence + 1 and client.get(ns) == lock.token.encode()
    await api.do(lock.release())
    assert lock_keys(client, ns) == [f"syncmap:fence:{{{ns}}}:{ns}"]


@pytest.mark.parametrize("flush_scripts", [False, True], ids=["evalsha", "after-script-flush"])
async def test_a_lock_that_waited_takes_a_free_lock_at_once(api, client, ns, flush_scripts):
    lock, fence = await contended(api, client, ns, poll_interval=10.0)
    if flush_scripts:
        client.script_flush()  # EVALSHA fails with NOSCRIPT: the driver sends EVAL instead
    started = time.monotonic()
    assert await api.do(lock.acquire()) is True
    assert time.monotonic() - started < 2.0  # the wait behind the script returned at once
    assert lock.fence == fence + 1
    # no wake-up left behind for a later wait to take for a hand-over
    assert lock_keys(client, ns) == sorted([ns, f"syncmap:fence:{{{ns}}}:{ns}"])
    await api.do(lock.release())


async def test_without_hiredis_commands_are_packed_by_redis_py(api, client, ns, monkeypatch):
    """hiredis packs commands when it is installed; redis-py's encoder is the fallback, for a
    single command and for the script with BLPOP behind it."""
    from syncmap import _driver

    monkeypatch.setattr(_driver, "_hiredis_pack", None)
    lock, fence = await contended(api, client, ns, poll_interval=10.0)
    holder = await api.obtain(ns, 30)
    pending = in_background(api, lock.acquire)
    await asyncio.to_thread(wait_until, lambda: queued(client, ns) == 1, 5, 0.005, "queue")
    await api.do(holder.release())
    assert await asyncio.wait_for(pending, 5) is True and lock.fence == fence + 2
    await api.do(lock.release())


async def test_a_script_error_while_queueing_raises_at_once_and_spoils_nothing(api, client, ns):
    lock, _ = await contended(api, client, ns, poll_interval=10.0)
    client.hset(ns, "foreign", "data")  # the lock's key holds a hash: its script fails
    started = time.monotonic()
    with pytest.raises(syncmap.SyncMapError):
        await api.do(lock.acquire())
    assert time.monotonic() - started < 2.0  # it did not wait out the BLPOP behind the script
    client.delete(ns)
    assert await api.do(lock.acquire(timeout=2)) is True
    await api.do(lock.release())


def test_one_lock_object_shared_by_threads_excludes_them(server, client, ns):
    """As with ``threading.Lock``, one Lock object may be shared by a process's threads: each
    acquisition is its own (its own token and place in the queue), so the threads exclude each
    other, and a release by one never drops another's hold. A read-modify-write of a plain key
    under it loses no update."""
    node = syncmap.connect(server.url)
    lock = node.lock(ns, ttl=10)
    counter = f"{ns}:n"
    client.set(counter, 0)
    inside, overlaps = [0], [0]

    def body():
        for _ in range(100):
            with lock:
                inside[0] += 1
                overlaps[0] += inside[0] != 1
                client.set(counter, int(client.get(counter)) + 1)
                inside[0] -= 1

    threads = [threading.Thread(target=body, daemon=True) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads)
    assert (int(client.get(counter)), overlaps[0]) == (400, 0)
    assert lock.token is None and client.get(ns) is None
    node.close()


async def test_one_lock_object_shared_by_tasks_excludes_them(server, client, ns):
    """The same for one AsyncLock shared by tasks."""
    node = await syncmap.connect_async(server.url)
    lock = node.lock(ns, ttl=10)
    counter = f"{ns}:n"
    client.set(counter, 0)
    inside, overlaps = [0], [0]

    async def body():
        for _ in range(100):
            async with lock:
                inside[0] += 1
                overlaps[0] += inside[0] != 1
                value = int(await node.client.get(counter))
                await node.client.set(counter, value + 1)
                inside[0] -= 1

    await asyncio.wait_for(asyncio.gather(*(body() for _ in range(4))), 60)
    assert (int(client.get(counter)), overlaps[0]) == (400, 0)
    assert lock.token is None and client.get(ns) is None
    await node.close()


def test_waiters_are_served_in_arrival_order_and_newcomers_cannot_barge(server, client, ns):
    node = syncmap.connect(server.url)
    holder = node.obtain(ns, 30)
    order: list[int] = []
    locks = [node.lock(ns, ttl=30, poll_interval=1.0) for _ in range(3)]
    threads = []
    for i, lock in enumerate(locks):

        def body(i=i, lock=lock):
            assert lock.acquire(timeout=20)
            order.append(i)
            lock.release()

        threads.append(threading.Thread(target=body, daemon=True))
        threads[-1].start()
        wait_until(lambda i=i: queued(client, ns) == i + 1, what=f"waiter {i} to queue")
    # the holder's lock expires instead of being released: a newcomer must not barge in
    client.delete(ns)
    assert node.lock(ns).acquire(blocking=False) is False
    for t in threads:
        t.join(15)
    assert order == [0, 1, 2]
    with pytest.raises(LockNotHeld):
        holder.release()
    # hand-offs leave nothing behind: no queue, registration or wake list, only the fence
    assert lock_keys(client, ns) == [f"syncmap:fence:{{{ns}}}:{ns}"]
    node.close()


def test_a_wait_that_times_out_as_the_lock_is_handed_over_leaves_no_wake_up(server, client, ns):
    """The race: a waiter's BLPOP times out just as a release hands it the lock and pushes its
    wake-up. Its next attempt finds the lock its own, and must not leave the wake list behind.
    The flow is driven by hand to force that order."""
    from syncmap._core.lock import LockKeys, LockState, acquire_flow, new_token
    from syncmap._core.ops import Command
    from syncmap._driver import SyncDriver

    node = syncmap.connect(server.url)
    holder = node.obtain(ns, 30)
    driver = SyncDriver(node.client, node.address)
    state, token = LockState(LockKeys((ns,)), 30_000, ""), new_token()
    flow = acquire_flow(state, token, iter([5.0, 5.0]), None, time.monotonic)
    op = next(flow)  # register as a waiter
    op = flow.send(driver.perform(op))
    assert isinstance(op, Command) and op.args[0] == "BLPOP" and queued(client, ns) == 1
    fence = holder.fence
    holder.release()  # hands the lock over and pushes the wake-up...
    assert client.get(ns) == token.encode() and client.llen(op.args[1]) == 1
    op = flow.send(None)  # ...but the wait had already timed out: try again
    with pytest.raises(StopIteration) as done:
        flow.send(driver.perform(op))
    assert done.value.value is True and state.fence == fence + 1
    assert lock_keys(client, ns) == sorted([ns, f"syncmap:fence:{{{ns}}}:{ns}"])
    node.close()


def test_release_skips_a_queued_waiter_whose_registration_ran_out(server, client, ns):
    node = syncmap.connect(server.url)
    holder = node.obtain(ns, 30)
    queue = f"syncmap:lockq:{{{ns}}}:{ns}"
    client.zadd(queue, {"D" * 22: 1})  # queued first, but no registration: a dead waiter
    waiter = node.lock(ns, ttl=30, poll_interval=10.0)
    got: list[bool] = []
    thread = threading.Thread(target=lambda: got.append(waiter.acquire(timeout=20)), daemon=True)
    thread.start()
    wait_until(lambda: queued(client, ns) == 2, what="the live waiter to queue behind")
    started = time.monotonic()
    holder.release()
    thread.join(15)
    assert got == [True] and time.monotonic() - started < 5.0  # woken, not polled (10 s)
    assert client.get(ns) == waiter.token.encode() and queued(client, ns) == 0
    waiter.release()
    node.close()


def test_a_short_polling_waiter_does_not_shorten_the_queue_a_long_one_relies_on(server, client, ns):
    node = syncmap.connect(server.url)
    holder = node.obtain(ns, 30)
    queue = f"syncmap:lockq:{{{ns}}}:{ns}"
    patient, hasty = node.lock(ns, poll_interval=100.0), node.lock(ns, poll_interval=0.05)
    threads = [threading.Thread(target=lock.acquire, daemon=True) for lock in (patient, hasty)]
    threads[0].start()
    wait_until(lambda: queued(client, ns) == 1, what="the patient waiter to queue")
    threads[1].start()
    wait_until(lambda: queued(client, ns) == 2, what="the hasty waiter to queue")
    assert client.pttl(queue) > 100_000  # outlives the patient waiter's registration
    holder.release()
    for lock, thread in zip((patient, hasty), threads, strict=True):
        thread.join(10)
        assert lock.token is not None
        lock.release()
    node.close()


async def test_a_cancelled_waiter_leaves_the_queue_and_is_not_handed_the_lock(server, client, ns):
    node = await syncmap.connect_async(server.url)
    holder = await node.obtain(ns, 30)
    waiter = node.lock(ns, ttl=30, poll_interval=10.0)
    task = asyncio.create_task(waiter.acquire())
    await asyncio.to_thread(wait_until, lambda: queued(client, ns) == 1, 5, 0.005, "queue")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert queued(client, ns) == 0
    await holder.release()
    assert client.get(ns) is None  # not handed to the waiter that gave up
    await node.close()


# -- auto-renew -------------------------------------------------------------------------------


async def test_auto_renew_keeps_a_short_lock_alive(api, client, ns):
    lock = api.lock(ns, ttl=0.6, auto_renew=True)
    await api.do(lock.acquire())
    deadline = time.monotonic() + 1.5
    while time.monotonic() < deadline:  # 2.5 TTLs, checked all along
        assert client.get(ns) == lock.token.encode()
        await asyncio.sleep(0.02)
    assert not lock.lost
    await api.do(lock.release())
    assert client.get(ns) is None


async def test_auto_renew_reports_a_lost_lock(api, client, ns):
    lost: list = []
    lock = api.lock(ns, ttl=0.3, auto_renew=True, on_lost=lost.append)
    with pytest.raises(LockLost):
        if api.is_async:
            async with lock:
                client.set(ns, "stolen")
                while not lock.lost:
                    await asyncio.sleep(0.01)
        else:
            with lock:
                client.set(ns, "stolen")
                wait_until(lambda: lock.lost, what="loss to be noticed")
    assert lost == [lock]
    assert client.get(ns) == b"stolen"


def test_a_lost_hold_is_reported_on_leaving_even_when_another_thread_waits(server, client, ns):
    """Lock objects shared by threads: the watchdog found thread A's hold lost (here: the key
    was taken, then handed back, so A's release itself succeeds); thread B starts waiting on
    the same object; leaving A's ``with`` block must still raise LockLost (B's acquisition,
    not yet made, does not clear A's loss)."""
    node = syncmap.connect(server.url)
    lock = node.lock(ns, ttl=0.6, auto_renew=True, poll_interval=1.0)
    lock.acquire()
    value = client.get(ns)
    client.set(ns, "stolen")
    wait_until(lambda: lock.lost, what="the loss to be noticed")
    client.set(ns, value, px=5000)  # A's value again: its release will find it
    waiter = threading.Thread(target=lambda: lock.acquire(timeout=10), daemon=True)
    waiter.start()
    wait_until(lambda: queued(client, ns) == 1, what="B to queue")
    with pytest.raises(LockLost):
        lock.__exit__(None, None, None)  # leaving A's block
    waiter.join(10)
    assert not lock.lost and lock.token is not None  # B's acquisition is a new one
    lock.release()
    node.close()


async def test_auto_renew_stops_at_max_hold(api, client, ns):
    lock = api.lock(ns, ttl=0.2, auto_renew=True, max_hold=0.5)
    await api.do(lock.acquire())
    started = time.monotonic()
    while not lock.lost:
        await asyncio.sleep(0.01)
        assert time.monotonic() - started < 3
    # lost is reported on the holder's clock, never later than the server lets the key go
    wait_until(lambda: client.get(ns) is None, 1.0, what="the key to expire")
    assert time.monotonic() - started > 0.4
    with pytest.raises(LockNotHeld):
        await api.do(lock.release())


def test_list_locks_shows_held_syncmap_locks(server, ns):
    from syncmap._lock import list_locks

    with syncmap.connect(server.url) as node:
        a = node.obtain(f"{ns}:a", 5, metadata="job-a")
        b = node.obtain(f"{{{ns}}}:b", 5)
        node.obtain(f"{ns}:gone", 5).release()
        rows = list_locks(node, f"*{ns}*")
        assert [r["name"] for r in rows] == sorted([f"{ns}:a", f"{{{ns}}}:b"])
        row = next(r for r in rows if r["name"] == f"{ns}:a")
        assert row["token"] == a.token and row["metadata"] == "job-a" and row["fence"] == a.fence
        assert 4.0 < row["ttl"] <= 5.0
        a.release()
        b.release()
