# ruff: noqa: F811  (the ``maps`` fixture is imported)
"""Bulk operations of SyncMap against a real Valkey: ``update``/``set_many``, ``get_many`` and
``delete_many``, blocking and asyncio (``maps`` fixture).

What is checked: one round trip per call whatever the batch size (batches span several
scripts); every key gets its own version (the seq in its record) and another node applies
each change from the batch messages; the writer reads its own writes locally; bad input
anywhere in a batch sends nothing; a lost or forged batch message is a gap (the other node
drops its copy); foreign data; TTLs; and the batch message's parsing."""

from __future__ import annotations

import pytest
import redis

import syncmap
from servers import wait_until
from syncmap._core import map_flows
from syncmap._core.coherence import MalformedChange, parse_changes
from syncmap._core.map_flows import parse_record
from test_map_support import maps  # noqa: F401 (fixture)

LONG = 60.0  # only change messages (not probes) keep a node's copy current
N = 1_234  # > 2 x BATCH_KEYS: three scripts per call


def record_key(name: str, key: str) -> str:
    return f"syncmap:{{{name}}}:v:{key}"


def server_seq(client: redis.Redis, name: str) -> int:
    return int(client.hget(f"syncmap:{{{name}}}:meta", "seq") or 0)


def count_round_trips(handle) -> list[int]:
    """Counts the map driver's round trips (one per ``_call``) from now on."""
    driver = handle.m._driver
    calls = [0]
    real = driver._call

    def counted(*args, **kwargs):
        calls[0] += 1
        return real(*args, **kwargs)

    driver._call = counted
    return calls


def caught_up(m, client: redis.Redis, name: str) -> bool:
    return m._state.applied == server_seq(client, name)


def test_update_one_round_trip_own_versions_and_propagation(maps, server, client, ns):
    assert N > 2 * map_flows.BATCH_KEYS
    a = maps(server.url, ns, max_staleness=LONG)
    b = maps(server.url, ns, max_staleness=LONG)
    keys = [f"k{i}" for i in range(N)]
    a.update({k: {"v": 0} for k in keys})
    assert b.get_many(keys) == {k: {"v": 0} for k in keys}  # b caches every key
    seq0 = server_seq(client, ns)
    wait_until(lambda: caught_up(b, client, ns), 5, what="b applies the first batch")

    trips = count_round_trips(a)
    a.update({k: {"v": i} for i, k in enumerate(keys)})
    assert trips[0] == 1
    # each key its own version: consecutive seqs, in the order given
    versions = [parse_record(client.get(record_key(ns, k)))[1] for k in keys]
    assert versions == list(range(seq0 + 1, seq0 + N + 1))
    # read-your-writes: a's copy holds each key at its version, served locally
    hits = a.stats.hits
    assert a.get_many(keys) == {k: {"v": i} for i, k in enumerate(keys)}
    assert a.stats.hits - hits == N and trips[0] == 1
    # b applies every change (the values ride in the batch messages), no resync
    wait_until(lambda: caught_up(b, client, ns), 5, what="b applies the second batch")
    hits = b.stats.hits
    assert b.get_many(keys) == {k: {"v": i} for i, k in enumerate(keys)}
    assert b.stats.hits - hits == N
    assert b.stats.resyncs == 0 and a.stats.resyncs == 0
    assert a.length() == N


def test_get_many_mixes_local_hits_and_one_fetch(maps, server, client, ns):
    a = maps(server.url, ns, max_staleness=LONG)
    b = maps(server.url, ns, max_staleness=LONG)
    a.update({f"k{i}": i for i in range(N)})
    wait_until(lambda: caught_up(b, client, ns), 5, what="b applies a's update")
    assert b.get("k0") == 0 and b.get("k1") == 1  # two local entries in b
    assert b.get_many(["never"]) == {}  # (the server learns the script: EVAL, once)
    trips = count_round_trips(b)
    hits = b.stats.hits
    wanted = [f"k{i}" for i in range(N)] + ["absent", "k0"]
    got = b.get_many(wanted)
    assert got == {f"k{i}": i for i in range(N)} and list(got)[:3] == ["k0", "k1", "k2"]
    assert trips[0] == 1 and b.stats.hits - hits == 2, b.stats
    # now every key is local, the absent one as a cached miss: no round trip at all
    assert b.get_many(wanted) == got and trips[0] == 1
    assert b.get_many([]) == {} and trips[0] == 1


def test_delete_many_counts_and_propagates(maps, server, client, ns):
    a = maps(server.url, ns, max_staleness=LONG)
    b = maps(server.url, ns, max_staleness=LONG)
    keys = [f"k{i}" for i in range(N)]
    a.update({k: i for i, k in enumerate(keys)})
    assert len(b.get_many(keys)) == N
    assert a.delete_many(["never"]) == 0  # (the server learns the script: EVAL, once)
    seq = server_seq(client, ns)
    trips = count_round_trips(a)
    gone = keys[::2]
    assert a.delete_many([*gone, "never", gone[0]]) == len(gone)
    assert trips[0] == 1 and server_seq(client, ns) == seq + len(gone)
    assert a.delete_many(["never", gone[1]]) == 0  # nothing existed: no change
    assert server_seq(client, ns) == seq + len(gone)
    hits = a.stats.hits
    assert a.get_many(keys) == {k: i for i, k in enumerate(keys) if i % 2}
    assert a.stats.hits - hits == N  # the deletes are local cached misses
    wait_until(lambda: caught_up(b, client, ns), 5, what="b applies the deletes")
    hits = b.stats.hits
    assert b.get_many(keys) == {k: i for i, k in enumerate(keys) if i % 2}
    assert b.stats.hits - hits == N and b.stats.resyncs == 0
    assert a.length() == N - len(gone) and sorted(a.keys()) == sorted(keys[1::2])


def test_bad_input_anywhere_in_a_batch_sends_nothing(maps, server, client, ns):
    a = maps(server.url, ns)
    a.update({"a": 1})
    seq = server_seq(client, ns)
    trips = count_round_trips(a)
    pairs = [(f"k{i}", i) for i in range(N)]
    with pytest.raises(syncmap.SerializationError):
        a.update([*pairs, ("bad", object())])
    with pytest.raises(syncmap.UnsupportedKey):
        a.update([*pairs, (5, 1)])
    with pytest.raises(syncmap.TooLarge):
        a.set_many([*pairs, ("x" * 2000, 1)])
    with pytest.raises(syncmap.InvalidArgument):
        a.set_many(pairs, ttl=-1)
    with pytest.raises(syncmap.UnsupportedKey):
        a.delete_many(["a", b"bytes"])
    with pytest.raises(syncmap.UnsupportedKey):
        a.get_many(["a", 5])
    for not_a_list in ("abc", 5, None):
        with pytest.raises(syncmap.InvalidArgument):
            a.get_many(not_a_list)
        with pytest.raises(syncmap.InvalidArgument):
            a.delete_many(not_a_list)
    assert trips[0] == 0 and server_seq(client, ns) == seq
    assert a.get("a", fresh=True) == 1 and a.length() == 1


def test_set_many_with_a_ttl_expires_everywhere(maps, server, client, ns):
    a = maps(server.url, ns)
    a.set_many({"t1": 1, "t2": 2}, ttl=0.3)
    a.set_many([("keep", 3)])
    assert 0 < client.pttl(record_key(ns, "t1")) <= 300
    assert client.pttl(record_key(ns, "keep")) == -1
    assert a.get_many(["t1", "t2", "keep"]) == {"t1": 1, "t2": 2, "keep": 3}
    wait_until(lambda: a.get_many(["t1", "t2", "keep"]) == {"keep": 3}, 5, what="expiry")
    assert a.length() == 1


def test_get_many_foreign_data(maps, server, client, ns):
    a = maps(server.url, ns)
    a.update({"ok": 1, "ok2": 2})
    client.rpush(record_key(ns, "list"), "x")
    client.set(record_key(ns, "junk"), "not a record")
    with pytest.raises(syncmap.CorruptData):
        a.get_many(["ok", "list"])
    with pytest.raises(syncmap.CorruptData):
        a.get_many(["junk", "ok2"])
    assert a.get_many(["ok", "ok2"]) == {"ok": 1, "ok2": 2}
    assert a.delete_many(["list", "junk"]) == 2  # deleting foreign data is allowed


def test_a_lost_batch_message_is_a_gap(maps, server, client, ns):
    """b's listener stalled while a batch is written, and the batch's message is lost (b
    never sees it); a later single write arrives: a gap, b drops its copy."""
    a = maps(server.url, ns, max_staleness=LONG)
    b = maps(server.url, ns, max_staleness=LONG)
    a.update({"x": 1, "y": 2})
    assert b.get_many(["x", "y"]) == {"x": 1, "y": 2}
    wait_until(lambda: caught_up(b, client, ns), 5, what="b caught up")
    epoch = client.hget(f"syncmap:{{{ns}}}:meta", "epoch").decode()
    seq = server_seq(client, ns)
    channel = f"syncmap:{{{ns}}}:ch"
    # a forged batch that skips one seq: b must drop its copy, not apply it
    client.execute_command("SPUBLISH", channel, f"SM1 {epoch} {seq + 2} B S1 xS1 y".encode())
    wait_until(lambda: b.stats.resync_causes.get("gap", 0) == 1, 5, what="gap detected")
    assert b.get("x", fresh=True) == 1  # served by the server, never the stale copy


def test_a_batch_message_advances_by_its_length(maps, server, client, ns):
    """A forged batch continuing b's seq is applied change by change (the seq of each
    counted), so the next real write is no gap."""
    a = maps(server.url, ns, max_staleness=LONG)
    b = maps(server.url, ns, max_staleness=LONG)
    a.update({"x": 1})
    assert b.get("x") == 1
    wait_until(lambda: caught_up(b, client, ns), 5, what="b caught up")
    epoch = client.hget(f"syncmap:{{{ns}}}:meta", "epoch").decode()
    seq = server_seq(client, ns)
    client.hincrby(f"syncmap:{{{ns}}}:meta", "seq", 3)  # the three changes of the batch
    batch = f"SM1 {epoch} {seq + 1} B D1 qV1 x2 77S4 a bc".encode()
    client.execute_command("SPUBLISH", f"syncmap:{{{ns}}}:ch", batch)
    wait_until(lambda: b._state.applied == seq + 3, 5, what="b applies the batch")
    assert b.get_local("x") == 77  # the carried value
    a.set("x", 2)
    wait_until(lambda: b.get_local("x") == 2, 5, what="b applies the next write")
    assert b.stats.resyncs == 0


def test_parse_batch_messages():
    changes = parse_changes(b"SM1 e 7 B S3 a bD1 cV2 k 3 {}xS0 ")
    assert [(c.epoch, c.seq, c.op, c.key, c.value) for c in changes] == [
        ("e", 7, "S", "a b", None),
        ("e", 8, "D", "c", None),
        ("e", 9, "S", "k ", b"{}x"),
        ("e", 10, "S", "", None),
    ]
    assert [c.seq for c in parse_changes(b"SM1 e 3 S k")] == [3]
    assert parse_changes(b"other") is None
    for bad in (
        b"SM1 e 7 B ",
        b"SM1 e x B S1 a",
        b"SM1 e 7 B S5 ab",
        b"SM1 e 7 B Q1 a",
        b"SM1 e 7 B S1 aV1 b9 xx",
        b"SM1 e 7 B Sx a",
        b"SM1 e 7 B S1 \xff",
        b"SM1 e 7 B S-1 a",
    ):
        with pytest.raises(MalformedChange):
            parse_changes(bad)


def test_a_server_that_forgot_the_scripts(maps, fresh_server, ns):
    """After SCRIPT FLUSH (as after a restart) every script of a batch is answered NOSCRIPT
    (none ran): they are sent again together as EVAL, one more round trip, and each runs
    once."""
    a = maps(fresh_server.url, ns, max_staleness=LONG)
    keys = [f"k{i}" for i in range(N)]
    a.update({k: 0 for k in keys})
    with fresh_server.client() as c:
        c.script_flush()
        seq = server_seq(c, ns)
        trips = count_round_trips(a)
        a.update({k: 1 for k in keys})
        assert trips[0] == 2 and server_seq(c, ns) == seq + N
        c.script_flush()
        assert a.delete_many(keys) == N and trips[0] == 4
        c.script_flush()
        assert a.get_many(keys) == {} and trips[0] == 4  # every key a local cached miss
        a.m._store.clear()
        assert a.get_many(keys) == {} and trips[0] == 6


def test_a_big_bulk_write_carries_values_only_up_to_its_budget(maps, server, ns, monkeypatch):
    """Past PUSH_BUDGET bytes of carried values in one call, the chunks' messages only
    invalidate: another node updates the first keys in place and drops the later ones."""
    monkeypatch.setattr(map_flows, "PUSH_BUDGET", 3_000)
    a = maps(server.url, ns, max_staleness=LONG)
    b = maps(server.url, ns, max_staleness=LONG)
    keys = [f"k{i}" for i in range(N)]
    a.update({k: "x" for k in keys})
    assert len(b.get_many(keys)) == N
    a.update({k: "y" * 10 for k in keys})  # 12 bytes encoded: the budget lasts one chunk
    wait_until(lambda: b.get_local(keys[-1]) is None, 5, what="b drops the later keys")
    first = [b.get_local(k) for k in keys[: map_flows.BATCH_KEYS]]
    assert first == ["y" * 10] * map_flows.BATCH_KEYS  # the first chunk: carried values
    assert all(b.get_local(k) is None for k in keys[map_flows.BATCH_KEYS :])
    assert b.get_many(keys) == {k: "y" * 10 for k in keys} and b.stats.resyncs == 0


def test_bulk_read_your_writes_with_the_listener_stalled(maps, server, ns):
    """The writer's own copy takes every key of its bulk writes from the replies, not from
    its change messages: with its listener stalled, it still reads them locally."""
    a = maps(server.url, ns, max_staleness=LONG)
    keys = [f"k{i}" for i in range(N)]
    a.update({k: 0 for k in keys})
    a.stall_listener()
    a.update({k: i for i, k in enumerate(keys)})
    hits = a.stats.hits
    assert a.get_many(keys) == {k: i for i, k in enumerate(keys)}
    assert a.stats.hits - hits == N
    assert a.delete_many(keys[:10]) == 10
    assert a.get_many(keys[:12]) == {"k10": 10, "k11": 11}
    assert a.stats.hits - hits == N + 12
    a.resume_listener()
