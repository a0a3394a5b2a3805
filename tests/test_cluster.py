"""syncmap through a Cluster client: ``redis+cluster://`` URLs and ready ``RedisCluster``
clients, on a real 3-master Cluster on loopback (started once per module, plus one of its own
for the resharding test, which moves slots).

What is checked: each map and lock runs on the master owning its slot (its keys land there,
its listener is a sharded subscriber there and nowhere else); two nodes connected through
different seeds see each other's writes and exclude each other's locks; after a resharding
(MIGRATE + ``CLUSTER SETSLOT``), ASK and MOVED answers are followed (the command is resent
where the server says), the slot table learns the new owner, and a map's listener
re-subscribes on the new owner.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
from collections.abc import Iterator

import pytest
import redis
import redis.asyncio.cluster
import redis.cluster

import syncmap
from servers import ServerProcess, wait_until
from syncmap import _cluster
from syncmap._cluster import key_slot as our_key_slot
from syncmap._core.keys import MapKeys
from test_cluster_slots import _names_on_distinct_masters, _owner, _start_cluster, key_slot

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster() -> Iterator[list[ServerProcess]]:
    servers = _start_cluster()
    try:
        yield servers
    finally:
        for srv in servers:
            srv.stop()


def cluster_url(srv: ServerProcess) -> str:
    return f"redis+cluster://127.0.0.1:{srv.port}"


def shard_subscribers(srv: ServerProcess, channel: str) -> int:
    with srv.client() as c:
        reply = c.execute_command("PUBSUB", "SHARDNUMSUB", channel)
    return int(reply[1]) if isinstance(reply, list) else int(reply[channel.encode()])


def test_slot_function_matches_the_spec_copy():
    rnd = random.Random(3)
    keys = ["", "{", "}", "{}", "a{b}c", "{{x}}", "ünï{ö}"]
    keys += [str(rnd.random()) for _ in range(300)]
    assert [our_key_slot(k) for k in keys] == [key_slot(k) for k in keys]


@pytest.mark.parametrize(
    "url",
    ["redis+cluster://127.0.0.1:1/2", "redis+clusterx://127.0.0.1:1", "redis+cluster://:5"],
)
def test_bad_cluster_urls(url):
    with pytest.raises(syncmap.InvalidURL):
        syncmap.connect(url)


def test_cluster_url_with_no_server_is_unavailable():
    from servers import free_port

    with pytest.raises(syncmap.ServerUnavailable):
        syncmap.connect(f"redis+cluster://127.0.0.1:{free_port()}", socket_connect_timeout=1)


def test_maps_and_locks_on_every_master(cluster, ns):
    """A URL node and a node made from a ready RedisCluster (another seed), on names whose
    slots live on the three masters."""
    a = syncmap.connect(cluster_url(cluster[0]))
    rc = redis.cluster.RedisCluster(host="127.0.0.1", port=cluster[2].port)
    b = syncmap.connect(rc)
    try:
        names = _names_on_distinct_masters(cluster, ns.replace("_", "-")[:40])
        assert len({_owner(cluster, key_slot(n)).port for n in names}) == 3
        for name in names:
            owner = _owner(cluster, key_slot(name))
            ma, mb = a.map(name, max_staleness=0.5), b.map(name, max_staleness=0.5)
            try:
                _two_maps(cluster, owner, name, ma, mb)
            finally:
                ma.close()
                mb.close()
            lock_name = f"{{{name}}}:writer"
            with a.lock(lock_name, ttl=5.0) as held:
                with pytest.raises(syncmap.NotObtained):
                    b.obtain(lock_name, 5.0)
                with owner.client() as c:
                    assert c.exists(lock_name) == 1
                held.refresh(5.0)
            lock = b.obtain(lock_name, 5.0)  # released: free again
            lock.release()
            multi = a.obtain_multi([f"{{{name}}}:x", f"{{{name}}}:y"], 5.0)
            with pytest.raises(syncmap.NotObtained):
                b.obtain(f"{{{name}}}:y", 5.0)
            multi.release()
    finally:
        a.close()
        b.close()
        rc.close()


def _two_maps(cluster, owner, name, ma, mb) -> None:
    assert f":{owner.port} " in repr(ma)
    ma.set("k", 1)
    wait_until(lambda: mb.get("k") == 1 and mb.stats.hits > 0, 5, what="b caches")
    mb.incr("n", 5)
    wait_until(lambda: ma.get("n") == 5 and ma.stats.hits > 0, 5, what="a caches")
    ma["k"] = 2
    wait_until(lambda: mb.get("k") == 2, 5, what="b sees the change")
    with owner.client() as c:  # the keys are on the slot's owner
        assert c.exists(MapKeys(name).meta) == 1
    channel = MapKeys(name).channel
    assert shard_subscribers(owner, channel) == 2  # sharded, on the owner only
    for srv in cluster:
        if srv is not owner:
            assert shard_subscribers(srv, channel) == 0
    # bulk operations: one round trip to the owner for the whole batch (several scripts)
    keys = [f"b{i}" for i in range(1_200)]
    trips = [0]
    real = ma._driver._call

    def counted(*args, **kwargs):
        trips[0] += 1
        return real(*args, **kwargs)

    ma.update({k: 0 for k in keys})  # (the owner learns the scripts)
    assert ma.delete_many(["none"]) == 0
    ma._driver._call = counted
    ma.update({k: i for i, k in enumerate(keys)})
    assert ma.get_many(keys) == {k: i for i, k in enumerate(keys)}  # local: own writes
    assert ma.delete_many(keys[::2]) == 600 and trips == [2]
    wait_until(lambda: mb.get_many(keys) == {k: i for i, k in enumerate(keys) if i % 2}, 5)
    ma._driver._call = real
    ma.clear()
    wait_until(lambda: len(mb) == 0 and mb.get("k") is None, 5, what="clear seen")


async def test_async_maps_and_locks_on_every_master(cluster, ns):
    a = await syncmap.connect_async(cluster_url(cluster[1]))
    rc = redis.asyncio.cluster.RedisCluster(host="127.0.0.1", port=cluster[0].port)
    b = await syncmap.connect_async(rc)
    try:
        for name in _names_on_distinct_masters(cluster, "as-" + ns.replace("_", "-")[:40]):
            owner = _owner(cluster, key_slot(name))
            ma = await a.map(name, max_staleness=0.5)
            mb = await b.map(name, max_staleness=0.5)
            try:
                await ma.set("k", "v")
                deadline = time.monotonic() + 5
                while await mb.get("k") != "v" or mb.stats.hits == 0:
                    assert time.monotonic() < deadline, "b never cached k"
                    await asyncio.sleep(0.01)
                with owner.client() as c:
                    assert c.exists(MapKeys(name).meta) == 1
                assert shard_subscribers(owner, MapKeys(name).channel) == 2
            finally:
                await ma.close()
                await mb.close()
            lock = await a.obtain(f"{{{name}}}:w", 5.0)
            with pytest.raises(syncmap.NotObtained):
                await b.obtain(f"{{{name}}}:w", 5.0)
            await lock.release()
    finally:
        await a.close()
        await b.close()
        await rc.aclose()


# ---- resharding: a slot moves to another master while maps and a lock use it ----------------


def _ids(servers: list[ServerProcess]) -> list[str]:
    out = []
    for srv in servers:
        with srv.client() as c:
            raw = c.execute_command("CLUSTER", "MYID")
        out.append(raw.decode() if isinstance(raw, bytes) else str(raw))
    return out


def _move_keys(src: ServerProcess, dst: ServerProcess, slot: int) -> int:
    moved = 0
    with src.client() as c:
        while True:
            keys = c.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 100)
            if not keys:
                return moved
            c.execute_command("MIGRATE", "127.0.0.1", dst.port, "", 0, 5000, "KEYS", *keys)
            moved += len(keys)


def _assign(servers: list[ServerProcess], slot: int, owner_id: str) -> None:
    """CLUSTER SETSLOT NODE on every master, the new owner first: until it is told, the new
    owner, still importing, answers MOVED back to the old owner, which may already answer MOVED
    to it, and a client bounces between the two."""
    ids = _ids(servers)
    for srv in sorted(servers, key=lambda s: ids[servers.index(s)] != owner_id):
        with srv.client() as c:
            c.execute_command("CLUSTER", "SETSLOT", slot, "NODE", owner_id)


def test_resharding_ask_tryagain_then_moved(ns, monkeypatch):
    servers = _start_cluster()
    a = b = None
    try:
        ids = _ids(servers)
        name = ns.replace("_", "-")[:40]
        slot = key_slot(name)
        src = _owner(servers, slot)
        dst = next(s for s in servers if s is not src)
        dst_id = ids[servers.index(dst)]
        src_id = ids[servers.index(src)]
        a = syncmap.connect(cluster_url(servers[0]))
        b = syncmap.connect(cluster_url(servers[1]))
        ma, mb = a.map(name, max_staleness=0.5), b.map(name, max_staleness=0.5)
        old_lock = a.obtain(f"{{{name}}}:held", 30.0)  # made before: bound to the old master
        ma.set("k", 1)
        ma.incr("n", 1)
        wait_until(lambda: mb.get("k") == 1 and mb.stats.hits > 0, 5, what="b caches k")

        # 1. migrating, every key already at dst: reads and writes of existing entries follow
        # ASK; a write naming a missing key (a new entry) gets TRYAGAIN until the move
        # completes: it waits, and is applied once
        with dst.client() as c:
            c.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", src_id)
        with src.client() as c:
            c.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", dst_id)
        assert _move_keys(src, dst, slot) >= 4
        with src.client() as c, pytest.raises(redis.exceptions.AskError) as asked:
            c.get(MapKeys(name).meta)  # (what a plain client sees)
        assert not isinstance(asked.value, redis.exceptions.MovedError)
        assert ma.get("k", fresh=True) == 1  # followed ASK
        ma._store.clear()
        assert ma.get_many(["k", "n"]) == {"k": 1, "n": 1}  # a batch: ASK too
        assert ma.incr("n", 1) == 2  # every key the write names is at dst: ASK
        assert a.router is not None and a.router.table.owner(slot)[1] == src.port  # ASK: no
        # change; a migration stuck beyond TRYAGAIN_WAIT: a clear error, nothing written
        monkeypatch.setattr(_cluster, "TRYAGAIN_WAIT", 0.2)
        with pytest.raises(syncmap.ServerError, match=r"being migrated.*TRYAGAIN"):
            ma.incr("new", 1)
        monkeypatch.setattr(_cluster, "TRYAGAIN_WAIT", 5.0)
        done: list[object] = []
        writer = threading.Thread(target=lambda: done.append(ma.incr("new", 1)))
        writer.start()
        time.sleep(0.2)  # (the writer is held off by TRYAGAIN meanwhile: not a wait-and-hope)
        assert not done

        # 2. the slot belongs to dst: MOVED; the table learns; listeners re-subscribe at dst
        _assign(servers, slot, dst_id)
        writer.join(10)
        assert done == [1]  # TRYAGAIN, then MOVED: applied once (and the refused one never)
        assert ma.incr("n", 1) == 3
        assert a.router.table.owner(slot)[1] == dst.port
        ma.set("after", "moved")
        wait_until(lambda: mb.get("after") == "moved", 5, what="b sees a write after the move")
        mb.update({"bulk1": 1, "bulk2": 2})  # b's kept connections: MOVED, if not yet moved
        assert ma.get_many(["bulk1", "bulk2", "k"]) == {"bulk1": 1, "bulk2": 2, "k": 1}
        assert mb.delete_many(["bulk1", "bulk2"]) == 2
        channel = MapKeys(name).channel
        wait_until(lambda: shard_subscribers(dst, channel) == 2, 10, what="re-subscribed at dst")
        assert shard_subscribers(src, channel) == 0
        ma.set("k", 2)
        wait_until(lambda: mb.get("k") == 2 and mb.stats.hits > 0, 5, what="b caches k=2")
        with dst.client() as c:
            assert c.hget(MapKeys(name).meta, "seq") is not None
        with src.client() as c:
            assert c.execute_command("CLUSTER", "COUNTKEYSINSLOT", slot) == 0

        # a lock made before the move still works (redirected), and still excludes others
        old_lock.refresh(30.0)
        with pytest.raises(syncmap.NotObtained):
            b.obtain(f"{{{name}}}:held", 5.0)
        old_lock.release()
        fresh = b.obtain(f"{{{name}}}:held", 5.0)  # made after: straight to dst
        fresh.release()
        assert mb.get("n", fresh=True) == 3
        ma.close()
        mb.close()
    finally:
        for node in (a, b):
            if node is not None:
                node.close()
        for srv in servers:
            srv.stop()


def _moved_answers(srv: ServerProcess) -> int:
    with srv.client() as c:
        return int(c.info("errorstats").get("errorstat_MOVED", {}).get("count", 0))


def _half_moved(servers: list[ServerProcess], slot: int) -> tuple[ServerProcess, ServerProcess]:
    """Move ``slot`` to another master and tell only the old owner: until the new owner learns
    it from the old one (over the cluster bus, within a fraction of a second), the old owner
    answers MOVED to the new one and the new one, still importing, MOVED back."""
    ids = _ids(servers)
    src = _owner(servers, slot)
    dst = next(s for s in servers if s is not src)
    with dst.client() as c:
        c.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", ids[servers.index(src)])
    with src.client() as c:
        c.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", ids[servers.index(dst)])
    assert _move_keys(src, dst, slot) >= 1
    with src.client() as c:
        c.execute_command("CLUSTER", "SETSLOT", slot, "NODE", ids[servers.index(dst)])
    return src, dst


def _settles_by_itself(srv: ServerProcess) -> bool:
    """Whether a slot half moved by :func:`_half_moved` settles without another word: Valkey
    (8 and later) carries the old owner's ``SETSLOT ... NODE`` to the new one; Redis 7.0 does
    not (the new owner keeps importing until it is told), so the masters never agree there."""
    with srv.client(protocol=3) as c:
        return bool(c.execute_command("HELLO", 3)[b"server"] == b"valkey")


@pytest.fixture
def settling_cluster() -> Iterator[list[ServerProcess]]:
    """A cluster of its own (the streak tests move slots), where a half-moved slot settles."""
    servers = _start_cluster()
    try:
        if not _settles_by_itself(servers[0]):
            pytest.skip("a half-moved slot settles by itself only on Valkey: _settles_by_itself")
        yield servers
    finally:
        for srv in servers:
            srv.stop()


def test_a_redirect_streak_waits_for_the_cluster_to_settle(ns, monkeypatch, settling_cluster):
    """A write sent while two masters disagree about its slot bounces between them for more
    than MAX_REDIRECTS hops: it pauses, follows, and is applied once, when they agree. With no
    time to wait (REDIRECT_WAIT 0) such a write gets a clear error and is not applied."""
    servers = settling_cluster
    a = None
    try:
        names = [f"{ns.replace('_', '-')[:36]}-{i}" for i in range(6)]
        a = syncmap.connect(cluster_url(servers[0]))
        maps = [a.map(name) for name in names]
        for m in maps:
            m.set("n", 1)

        # the masters may agree within MAX_REDIRECTS hops: then the write is simply applied
        refused = None
        for m, name in zip(maps[:-1], names, strict=False):
            monkeypatch.setattr(_cluster, "REDIRECT_WAIT", 0.0)
            _half_moved(servers, key_slot(name))
            try:
                m.incr("n", 1)
            except syncmap.ServerError as exc:
                assert "kept moving" in str(exc)
                refused = m
            monkeypatch.setattr(_cluster, "REDIRECT_WAIT", 30.0)
            expected = 1 if m is refused else 2
            wait_until(lambda m=m, e=expected: m.get("n", fresh=True) == e, 10, what="n")
            if refused is not None:
                break
        assert refused is not None, "the masters agreed each time before the write bounced"

        slot = key_slot(names[-1])
        _, dst = _half_moved(servers, slot)
        before = _moved_answers(dst)
        assert maps[-1].incr("n", 1) == 2  # applied once
        assert _moved_answers(dst) - before > _cluster.MAX_REDIRECTS // 2  # it did bounce
        assert a.router is not None and a.router.table.owner(slot)[1] == dst.port
        assert maps[-1].get("n", fresh=True) == 2
    finally:
        if a is not None:
            a.close()


async def test_an_asyncio_redirect_streak_waits_for_the_cluster_to_settle(ns, settling_cluster):
    """As above, on an asyncio node (its connections re-read the slot table in a thread): a
    map write and a lock acquire, each sent while the two masters disagree about its slot,
    are applied once."""
    servers = settling_cluster
    a = None
    try:
        names = [f"{ns.replace('_', '-')[:36]}-{i}" for i in range(2)]
        a = await syncmap.connect_async(cluster_url(servers[0]))
        m = await a.map(names[0])
        await m.set("n", 1)
        _, dst = _half_moved(servers, key_slot(names[0]))
        assert await m.incr("n", 1) == 2
        assert await m.get("n", fresh=True) == 2

        lock = a.lock(f"{{{names[1]}}}:held", ttl=10)
        with _owner(servers, key_slot(names[1])).client() as c:  # (a key for the move)
            c.set(f"{{{names[1]}}}:other", 1)
        _, dst = _half_moved(servers, key_slot(names[1]))
        assert await lock.acquire()
        with dst.client() as c:
            assert c.get(f"{{{names[1]}}}:held") is not None  # taken on the new owner
        await lock.release()
        with dst.client() as c:
            assert c.get(f"{{{names[1]}}}:held") is None
    finally:
        if a is not None:
            await a.close()


def test_list_locks_sees_locks_on_every_master(cluster, ns):
    """``syncmap locks`` (list_locks) on a cluster node lists the locks held on all masters."""
    from syncmap._lock import list_locks

    node = syncmap.connect(cluster_url(cluster[1]))
    try:
        names = _names_on_distinct_masters(cluster, ns.replace("_", "-")[:40])
        held = [node.obtain(name, 30.0, metadata=f"m{i}") for i, name in enumerate(names)]
        rows = {row["name"]: row for row in list_locks(node, f"{ns.replace('_', '-')[:40]}*")}
        assert sorted(rows) == sorted(names)
        for i, (name, lock) in enumerate(zip(names, held, strict=True)):
            assert rows[name]["token"] == lock.token and rows[name]["metadata"] == f"m{i}"
            assert rows[name]["fence"] == lock.fence and 0 < rows[name]["ttl"] <= 30
            lock.release()
        assert list_locks(node, f"{ns.replace('_', '-')[:40]}*") == []
    finally:
        node.close()
