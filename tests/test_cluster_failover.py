"""Failover on a real Cluster: 3 masters + 3 replicas on loopback (``cluster-node-timeout``
1 s), maps on two nodes and locks in use; the master owning the map's slot is killed
(SIGKILL) and its replica promoted by the cluster itself.

What is checked, through the *same* syncmap nodes (no reconnect by the user): a write cut off
by the kill raises OutcomeUnknown and is not resent; once the replica is promoted, reads and
writes work again (the router re-reads the slot table when the slot's owner cannot be
reached), the other node sees new writes (its listener re-subscribed on the new master), no
value is served from a local copy made before the kill, and a lock made before the kill
(bound to the dead master) as well as new ones work on the new master.
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

import syncmap
from servers import ServerProcess, free_port, wait_until
from syncmap._core.keys import MapKeys
from test_cluster_slots import _owner, _start_cluster, cluster_node, key_slot

pytestmark = pytest.mark.slow

NODE_TIMEOUT = 1000  # ms: a master silent this long is suspected; failover follows in ~1-2 s


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _slots(srv: ServerProcess) -> list[Any]:
    with srv.client(socket_timeout=2) as c:
        return list(c.execute_command("CLUSTER", "SLOTS"))


def _node_id(srv: ServerProcess) -> str:
    with srv.client() as c:
        return _text(c.execute_command("CLUSTER", "MYID"))


def _start_replicated_cluster() -> tuple[list[ServerProcess], list[ServerProcess]]:
    """3 masters (``_start_cluster``) and one replica of each (``CLUSTER MEET``, then
    ``CLUSTER REPLICATE``): ``replicas[i]`` replicates ``masters[i]``."""
    masters = _start_cluster(3, NODE_TIMEOUT)
    replicas: list[ServerProcess] = []
    try:
        for _ in masters:
            bus = free_port()
            replicas.append(cluster_node(bus, NODE_TIMEOUT).start())
            with masters[0].client() as c:
                c.execute_command("CLUSTER", "MEET", "127.0.0.1", replicas[-1].port, bus)
        everyone = [*masters, *replicas]

        def cluster_info(srv: ServerProcess) -> str:
            with srv.client() as c:
                return _text(c.execute_command("CLUSTER", "INFO"))

        def link_up(srv: ServerProcess) -> bool:
            with srv.client() as c:
                return c.info("replication").get("master_link_status") == "up"

        wait_until(
            lambda: all("cluster_known_nodes:6" in cluster_info(s) for s in everyone),
            20, interval=0.05, what="every node knows the six",
        )  # fmt: skip
        for master, replica in zip(masters, replicas, strict=True):
            with replica.client() as c:
                c.execute_command("CLUSTER", "REPLICATE", _node_id(master))

        def replicated() -> bool:
            for srv in everyone:
                if "cluster_state:ok" not in cluster_info(srv):
                    return False
                if any(len(r) != 4 for r in _slots(srv)):  # [start, end, master, replica]
                    return False
            return all(link_up(r) for r in replicas)

        wait_until(replicated, 20, interval=0.05, what="each master has a synced replica")
        return masters, replicas
    except BaseException:
        for srv in [*masters, *replicas]:
            srv.stop()
        raise


@pytest.fixture
def replicated_cluster() -> Iterator[tuple[list[ServerProcess], list[ServerProcess]]]:
    masters, replicas = _start_replicated_cluster()
    try:
        yield masters, replicas
    finally:
        for srv in [*masters, *replicas]:
            srv.stop()


def _replicate_now(master: ServerProcess) -> None:
    """Everything written so far is on the replica (so the test is about syncmap, not about
    writes an asynchronous replica had not received yet)."""
    with master.client() as c:
        assert c.execute_command("WAIT", 1, 5000) == 1


def _promoted(survivors: list[ServerProcess], replica: ServerProcess, slot: int) -> bool:
    """Every surviving node names ``replica`` as the owner of ``slot``."""
    for srv in survivors:
        for r in _slots(srv):
            if int(r[0]) <= slot <= int(r[1]) and int(r[2][1]) != replica.port:
                return False
    return True


def _shard_subscribers(srv: ServerProcess, channel: str) -> int:
    with srv.client() as c:
        reply = c.execute_command("PUBSUB", "SHARDNUMSUB", channel)
    return int(reply[1])


def test_failover_of_a_maps_master(replicated_cluster, ns):
    masters, replicas = replicated_cluster
    name = ns.replace("_", "-")[:40]
    slot, dead, heir, others = _roles(masters, replicas, name)
    a = syncmap.connect(f"redis+cluster://127.0.0.1:{others[0].port}")
    b = syncmap.connect(f"redis+cluster://127.0.0.1:{others[1].port}")
    try:
        ma, mb = a.map(name, max_staleness=0.5), b.map(name, max_staleness=0.5)
        ma.set("k", 1)
        ma.incr("n", 1)
        wait_until(lambda: mb.get("k") == 1 and mb.stats.hits > 0, 5, what="b caches k=1")
        held = a.obtain(f"{{{name}}}:held", 30.0)  # bound to the master that will die
        _replicate_now(dead)
        resyncs = mb.stats.resyncs

        # a write in flight when the master dies: OutcomeUnknown, never resent
        sent, outcome = threading.Event(), []
        driver = ma._driver  # (its hook between sending a command and reading the answer)
        hook = driver.while_waiting
        driver.while_waiting = lambda answered: (sent.set(), hook(answered) if hook else None)
        dead.pause()  # SIGSTOP: the write is sent, and waits for an answer
        writer = threading.Thread(target=lambda: outcome.append(_attempt(ma.incr, "n", 1)))
        writer.start()
        assert sent.wait(5), "the write was never sent"
        _sigkill(dead)  # the connection breaks under the waiting write
        killed = time.monotonic()
        writer.join(10)
        driver.while_waiting = hook
        assert len(outcome) == 1 and isinstance(outcome[0], syncmap.OutcomeUnknown), outcome

        wait_until(lambda: _promoted([*others, heir], heir, slot), 15, interval=0.05,
                   what="the replica promoted")  # fmt: skip
        promoted = time.monotonic() - killed

        # the same nodes, no reconnect by the user: the first commands after the promotion work
        assert ma.get("n", fresh=True) == 1  # the cut-off increment was not resent
        assert a.router is not None and a.router.table.owner(slot) == ("127.0.0.1", heir.port)
        ma.set("k", 2)
        stats = mb.stats  # b dropped its copy (k=1, from before the kill) when its listener
        assert stats.resyncs > resyncs and stats.local_size == 0, stats  # lost the master
        assert mb.get("k") == 2  # ... so it is not served
        assert ma.incr("n", 1) == 2
        hits = mb.stats.hits
        ma.set("k", 3)  # propagation: b's listener subscribed again, on the new master
        wait_until(lambda: mb.get("k") == 3 and mb.stats.hits > hits, 5, what="b caches k=3")
        channel = MapKeys(name).channel
        wait_until(lambda: _shard_subscribers(heir, channel) == 2, 5, what="both subscribed")
        assert mb.stats.resync_causes.get("resubscribe", 0) >= 1

        # locks: one made before the kill (bound to the dead master), and new ones
        held.refresh(30.0)
        with pytest.raises(syncmap.NotObtained):
            b.obtain(f"{{{name}}}:held", 1.0)
        held.release()
        again = b.obtain(f"{{{name}}}:held", 5.0)
        with pytest.raises(syncmap.NotObtained):
            a.obtain(f"{{{name}}}:held", 1.0)
        again.release()
        with a.lock(f"{{{name}}}:other", ttl=5.0):
            pass
        ma.close()
        mb.close()
        print(f"promoted {promoted:.2f}s after the kill")
    finally:
        a.close()
        b.close()


def _sigkill(srv: ServerProcess) -> None:
    """SIGKILL, even to a stopped server (``ServerProcess.kill`` resumes it first, and it could
    answer what it had received before dying)."""
    assert srv.proc is not None
    os.kill(srv.proc.pid, signal.SIGKILL)
    srv.proc.wait()


def _roles(masters, replicas, name: str):
    """(slot of ``name``, its master, the replica that will take over, the other masters)."""
    slot = key_slot(name)
    owner = _owner(masters, slot)
    return slot, owner, replicas[masters.index(owner)], [m for m in masters if m is not owner]


def _attempt(fn: Any, *args: Any) -> Any:
    try:
        return fn(*args)
    except Exception as exc:
        return exc


async def test_async_failover_of_a_maps_master(replicated_cluster, ns):
    masters, replicas = replicated_cluster
    name = "as-" + ns.replace("_", "-")[:40]
    slot, dead, heir, others = _roles(masters, replicas, name)
    a = await syncmap.connect_async(f"redis+cluster://127.0.0.1:{others[0].port}")
    b = await syncmap.connect_async(f"redis+cluster://127.0.0.1:{others[1].port}")
    try:
        ma = await a.map(name, max_staleness=0.5)
        mb = await b.map(name, max_staleness=0.5)
        await ma.set("k", 1)
        deadline = time.monotonic() + 5
        while await mb.get("k") != 1 or mb.stats.hits == 0:
            assert time.monotonic() < deadline, "b never cached k=1"
            await asyncio.sleep(0.01)
        held = await a.obtain(f"{{{name}}}:held", 30.0)
        _replicate_now(dead)
        resyncs = mb.stats.resyncs
        _sigkill(dead)
        survivors = [*others, heir]
        deadline = time.monotonic() + 15
        while not await asyncio.to_thread(_promoted, survivors, heir, slot):
            assert time.monotonic() < deadline, "the replica was not promoted"
            await asyncio.sleep(0.05)

        assert await ma.get("k", fresh=True) == 1
        await ma.set("k", 2)
        stats = mb.stats
        assert stats.resyncs > resyncs and stats.local_size == 0, stats
        assert await mb.get("k") == 2  # not b's copy from before the kill
        hits = mb.stats.hits
        await ma.set("k", 3)
        deadline = time.monotonic() + 5
        while await mb.get("k") != 3 or mb.stats.hits <= hits:
            assert time.monotonic() < deadline, "b never cached k=3"
            await asyncio.sleep(0.01)
        channel = MapKeys(name).channel
        deadline = time.monotonic() + 5
        while await asyncio.to_thread(_shard_subscribers, heir, channel) != 2:
            assert time.monotonic() < deadline, "the listeners did not subscribe again"
            await asyncio.sleep(0.02)

        await held.refresh(30.0)
        with pytest.raises(syncmap.NotObtained):
            await b.obtain(f"{{{name}}}:held", 1.0)
        await held.release()
        again = await b.obtain(f"{{{name}}}:held", 5.0)
        await again.release()
        await ma.close()
        await mb.close()
    finally:
        await a.close()
        await b.close()


def test_failover_of_a_frozen_master(replicated_cluster, ns):
    """SIGSTOP: the master's connections stay open and silent (as in a partition), so it is
    noticed through timeouts (``socket_timeout=1``): after the promotion a command may still
    time out once (a read raises ServerUnavailable) before the slot table is re-read; then
    the other connections, kept or not, go to the new master before sending."""
    masters, replicas = replicated_cluster
    name = "st-" + ns.replace("_", "-")[:40]
    slot, frozen, heir, others = _roles(masters, replicas, name)
    a = syncmap.connect(f"redis+cluster://127.0.0.1:{others[0].port}", socket_timeout=1.0)
    b = syncmap.connect(f"redis+cluster://127.0.0.1:{others[1].port}", socket_timeout=1.0)
    try:
        ma, mb = a.map(name, max_staleness=0.5), b.map(name, max_staleness=0.5)
        ma.set("k", 1)
        wait_until(lambda: mb.get("k") == 1 and mb.stats.hits > 0, 5, what="b caches k=1")
        held = a.obtain(f"{{{name}}}:held", 30.0)
        _replicate_now(frozen)
        frozen.pause()
        wait_until(lambda: _promoted([*others, heir], heir, slot), 15, interval=0.05,
                   what="the replica promoted")  # fmt: skip
        assert _at_most_one_timeout(lambda: ma.get("k", fresh=True)) == 1
        ma.set("k", 2)
        assert _at_most_one_timeout(lambda: mb.get("k")) == 2  # not b's old copy
        ma.set("k", 3)
        wait_until(lambda: mb.get("k") == 3, 5, what="b reads k=3")
        held.refresh(30.0)
        held.release()
        ma.close()
        mb.close()
    finally:
        frozen.kill()
        a.close()
        b.close()


def _at_most_one_timeout(read: Any) -> Any:
    """``read()``, called again if it raised ServerUnavailable once (a timeout on a connection
    to the frozen master, made before the node re-read the slot table)."""
    try:
        return read()
    except syncmap.ServerUnavailable as exc:
        assert "Timeout" in str(exc), exc
    return read()
