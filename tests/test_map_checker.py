"""The staleness checker (tests/checker.py): first on synthetic histories, then on real nodes.

Synthetic histories need no server and pin the rule down. The multi-process runs put several
OS processes, each with its own SyncMap, on one real Valkey and check every read against every
acknowledged write (docs/contract.md §1-§2, §4-§5).
"""

from __future__ import annotations

import time
from dataclasses import replace

import pytest

from checker import SERVER, Read, Reset, Write, check, with_resets

MS = 1_000_000
WINDOW = 50 * MS


def w(node: str, key: str, value: object, n: int, t0_ms: float, t1_ms: float, **kw) -> Write:
    return Write(node, key, value, (n,), int(t0_ms * MS), int(t1_ms * MS), **kw)  # type: ignore[arg-type]


def r(node: str, key: str, value: object, t0_ms: float, t1_ms: float) -> Read:
    return Read(node, key, value, int(t0_ms * MS), int(t1_ms * MS))  # type: ignore[arg-type]


# ---------------------------------------------------------------- synthetic histories


def test_fresh_and_in_window_reads_pass():
    writes = [w("a", "k", "a:1", 1, 0, 1), w("a", "k", "a:2", 2, 10, 11)]
    reads = [
        r("a", "k", "a:2", 12, 13),  # own node after its ack: newest
        r("b", "k", "a:1", 30, 31),  # other node, 19 ms after the ack: inside the window
        r("b", "k", "a:2", 70, 71),
        r("b", "k", None, -5, -4),  # before any write: absent
        r("b", "k", "a:1", 5, 12),  # concurrent with write 2
    ]
    report = check(writes, reads, WINDOW)
    assert report.ok, report.summary()
    assert report.reads == 5 and report.writes == 2


def test_other_node_stale_past_window_is_caught_with_its_lag():
    writes = [w("a", "k", "a:1", 1, 0, 1), w("a", "k", "a:2", 2, 10, 11)]
    report = check(writes, [r("b", "k", "a:1", 11 + 50 + 7, 70)], WINDOW)
    assert report.kinds() == {"stale": 1}
    v = report.violations[0]
    assert v.write is not None and v.write.value == "a:2"
    assert v.lag_ns == 7 * MS
    assert "stale" in report.summary()


def test_read_your_writes_has_zero_window():
    writes = [w("a", "k", "a:1", 1, 0, 1), w("a", "k", "a:2", 2, 10, 11)]
    bad = check(writes, [r("a", "k", "a:1", 11.001, 12)], WINDOW)
    assert bad.kinds() == {"stale": 1}
    # the same read on another node is fine (inside its propagation window)
    assert check(writes, [r("b", "k", "a:1", 11.001, 12)], WINDOW).ok
    # a read invoked before the ack may see either value
    assert check(writes, [r("a", "k", "a:1", 10.5, 12)], WINDOW).ok


def test_absent_after_a_write_is_stale_but_absent_after_a_delete_is_not():
    writes = [w("a", "k", "a:1", 1, 0, 1)]
    assert check(writes, [r("b", "k", None, 100, 101)], WINDOW).kinds() == {"stale": 1}
    writes.append(w("a", "k", None, 2, 20, 21))  # a delete
    assert check(writes, [r("b", "k", None, 100, 101)], WINDOW).ok
    # ... unless a later write was acked long before
    writes.append(w("c", "k", "c:1", 3, 30, 31))
    assert check(writes, [r("b", "k", None, 100, 101)], WINDOW).kinds() == {"stale": 1}


def test_phantom_and_future_values():
    writes = [w("a", "k", "a:1", 1, 10, 11)]
    report = check(writes, [r("b", "k", "zz:9", 20, 21), r("b", "k", "a:1", 1, 2)], WINDOW)
    assert report.kinds() == {"phantom": 1, "future": 1}
    # a value of another key is a phantom too
    assert check(writes, [r("b", "j", "a:1", 20, 21)], WINDOW).kinds() == {"phantom": 1}


def test_order_not_time_decides_staleness():
    # Two writers race on one key: the server ordered b's write after a's although a's ack came
    # last. Reading b's value later is correct; reading a's value is stale.
    writes = [w("a", "k", "a:1", 2, 0, 5), w("b", "k", "b:1", 1, 0, 4)]
    assert check(writes, [r("c", "k", "a:1", 200, 201)], WINDOW).ok
    assert check(writes, [r("c", "k", "b:1", 200, 201)], WINDOW).kinds() == {"stale": 1}


def test_duplicate_orders_and_tokens_are_reported():
    writes = [w("a", "k", "a:1", 1, 0, 1), w("b", "k", "b:1", 1, 0, 1)]  # lost update
    assert check(writes, [], WINDOW).kinds() == {"duplicate-order": 1}
    writes = [w("a", "k", "a:1", 1, 0, 1), w("a", "k", "a:1", 2, 2, 3)]
    assert "duplicate-token" in check(writes, [], WINDOW).kinds()


def test_unacked_writes_may_be_read_but_oblige_nothing():
    writes = [w("a", "k", "a:1", 1, 0, 1), w("a", "k", "a:2", 2, 10, 11, acked=False)]
    assert check(writes, [r("b", "k", "a:1", 500, 501), r("b", "k", "a:2", 12, 13)], WINDOW).ok
    unknown = Write("a", "k", "a:3", None, 20 * MS, 21 * MS, acked=False)
    report = check([*writes, unknown], [r("b", "k", "a:3", 30, 31)], WINDOW)
    assert report.ok and report.unjudged == 1


def test_per_write_window_override():
    writes = [w("a", "k", "a:1", 1, 0, 1), w("a", "k", "a:2", 2, 10, 11, window_ns=500 * MS)]
    assert check(writes, [r("b", "k", "a:1", 300, 301)], WINDOW).ok
    assert check(writes, [r("b", "k", "a:1", 600, 601)], WINDOW).kinds() == {"stale": 1}


def test_resets_forgive_lost_writes_but_not_old_epoch_values():
    writes = [w("a", "k", "a:1", 1, 0, 1), w("a", "k", "a:2", 2, 300, 301)]
    resets = [Reset(down_ns=100 * MS, up_ns=200 * MS, window_ns=WINDOW)]
    merged = with_resets(writes, resets, ["k", "j"])
    assert {x.node for x in merged} == {"a", SERVER}
    assert [x.order for x in merged if x.key == "k"] == [(0, 1), (1, 2), (1,)]
    ok = [
        r("b", "k", None, 210, 211),  # data lost: absent is right
        r("b", "k", "a:1", 220, 221),  # pre-reset value, inside the reset's window
        r("b", "j", None, 400, 401),
        r("b", "k", "a:2", 400, 401),
    ]
    assert check(merged, ok, WINDOW).ok
    late = check(merged, [r("b", "k", "a:1", 280, 281)], WINDOW)  # old epoch, past window
    assert late.kinds() == {"stale": 1}
    assert late.violations[0].write is not None and late.violations[0].write.node == SERVER


def test_write_overlapping_a_reset_becomes_unacked():
    writes = [w("a", "k", "a:1", 1, 90, 150)]
    merged = with_resets(writes, [Reset(100 * MS, 200 * MS, WINDOW)], ["k"])
    mine = next(x for x in merged if x.node == "a")
    assert not mine.acked and mine.order == (1, 1)
    assert check(merged, [r("b", "k", "a:1", 500, 501), r("b", "k", None, 500, 501)], WINDOW).ok


@pytest.mark.parametrize("n_reads", [2000])
def test_checker_is_linear_enough(n_reads):
    writes = [w("a", f"k{i % 10}", f"a:{i}", i // 10 + 1, i, i + 0.5) for i in range(2000)]
    reads = [r("b", f"k{i % 10}", f"a:{i}", i + 0.6, i + 0.7) for i in range(n_reads)]
    report = check(writes, reads, WINDOW)
    assert report.ok, report.summary()


# ---------------------------------------------------------------- real nodes on a real server

KEYS = ("k0", "k1", "k2", "k3")
# Propagation allowed to other nodes (the writer's own node gets zero: read-your-writes). Also
# used through faults: a lost connection, a resubscribe or a new epoch must drop the local copy
# at once (docs/contract.md §4), so the probe's bound (max_staleness, §5) is never needed.
WINDOW_REAL = 100 * MS
MAX_STALENESS = 0.5


def _require_syncmap() -> None:
    pytest.importorskip("syncmap._map", reason="SyncMap has not landed yet")


def _coherence_of(m):
    """The map's coherence state machine (found by type, whatever the attribute is called)."""
    from syncmap._core.coherence import Coherence

    seen = set()
    todo = [m]
    while todo:
        obj = todo.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, Coherence):
            return obj
        todo.extend(v for v in getattr(obj, "__dict__", {}).values() if hasattr(v, "__dict__"))
    raise AssertionError(f"no Coherence inside {m!r}")


# Sabotages: run in the child process, on that node's map only.


def no_fill_guard(m) -> None:
    """Disable the fill-race placeholder (``node._hooks.fill_guard = False``).

    Two things of the real map hide the race from this small workload, so they are turned off
    here to keep it reachable: carried values (``push_values``) update cached entries in place,
    so reads after a write need no fetch, and fetches are where the race lives (large values
    and TTL writes still only invalidate); and a reading thread applies waiting change
    messages itself (``SyncMap.get`` -> ``listener.poll``) between its own fetches, so with one
    reading thread per node a fill and an invalidation rarely overlap (messages go through the
    listener thread here, as they do while another thread of the node is reading; and that
    thread does not step aside for busy map threads, which it does when they apply messages
    themselves)."""
    coherence = _coherence_of(m)
    assert coherence.hooks.fill_guard is True
    coherence.hooks.fill_guard = False
    fills_race_listener(m)


def fills_race_listener(m) -> None:
    """``no_fill_guard`` without its sabotage: the same workload with the guard kept (the
    control: it must show no violation)."""
    import syncmap._listener

    m._core.push_values = 0
    m._listener.poll = lambda *now: False  # (blocking map: poll(now); asyncio: poll())
    syncmap._listener.READERS_ACTIVE = 0.0  # (this node's process only)
    # and a fetch's answer waits 1 ms before it is installed (a slow client, a GIL hand-off):
    # the window in which the listener thread applies a write's invalidation to the key
    _coherence_of(m).hooks.fill_hook = lambda key: time.sleep(0.001)


def deaf_listener(m) -> None:
    """The listener drops every change message (only the periodic probe still notices)."""
    _coherence_of(m).on_message = lambda data: None


def lossy_listener(m) -> None:
    """The listener silently loses a third of the messages and hides the gap (no seq check)."""
    import random

    from syncmap._core.coherence import parse_change

    coherence = _coherence_of(m)
    real = coherence.on_message
    rng = random.Random(5)

    def on_message(data: bytes) -> None:
        change = parse_change(data)
        if change is not None and rng.random() < 0.33 and coherence.applied == change.seq - 1:
            coherence.applied = change.seq  # "applied" without invalidating anything
            return
        real(data)

    coherence.on_message = on_message


def _specs(url: str, ns: str, *, mode: str = "owned", setup=None, **kw) -> list:
    from checker import NodeSpec

    options = {"max_staleness": MAX_STALENESS, **kw.pop("map_options", {})}
    kw.setdefault("duration_s", 1.5)
    common = dict(url=url, map_name=f"{ns}-m", keys=KEYS, mode=mode, setup=setup, read_rate=5000)
    common.update(map_options=options, **kw)
    writer = dict(write_interval_s=0.04, burst=3)
    if mode == "owned":
        return [
            NodeSpec(node="a", index=0, owned=KEYS[:2], **writer, **common),
            NodeSpec(node="b", index=1, owned=KEYS[2:], **writer, **common),
            NodeSpec(node="c", index=2, **common),
        ]
    return [
        NodeSpec(node="a", index=0, owned=KEYS, **writer, **common),
        NodeSpec(node="b", index=1, owned=KEYS, **writer, **common),
        NodeSpec(node="c", index=2, owned=KEYS, **writer, **common),
    ]


def _run(specs, window_ns: int, **kw):
    from checker import check, run_nodes

    history = run_nodes(specs, **kw)
    report = check(history.writes, history.reads, window_ns)
    return history, report


def _assert_busy(history, min_reads: int = 5_000, min_writes: int = 50, mixed: bool = True) -> None:
    """The workload happened: enough reads and acked writes, and (``mixed``) nodes read each
    other's writes often."""
    acked = [x for x in history.writes if x.acked]
    assert len(history.reads) >= min_reads, (len(history.reads), history.errors)
    assert len(acked) >= min_writes, (len(acked), history.errors)
    if mixed:
        others = sum(1 for r in history.reads if isinstance(r.value, str) and r.value[0] != r.node)
        assert others > min_reads // 10, "nodes hardly ever read each other's writes"


@pytest.mark.slow
def test_real_syncmap_owned_keys_no_violations(server, ns):
    _require_syncmap()
    history, report = _run(_specs(server.url, ns), WINDOW_REAL)
    print(report.summary())
    _assert_busy(history)
    assert report.ok, report.summary() + f"\nerrors {history.errors}\nstats {history.stats}"


@pytest.mark.slow
def test_real_syncmap_read_modify_write_no_violations(server, ns):
    """Three writers race on the same keys through update_item: the chain of n stays unbroken
    (no lost update: no two acked writes claim the same n) and nobody reads stale."""
    _require_syncmap()
    history, report = _run(_specs(server.url, ns, mode="rmw"), WINDOW_REAL)
    _assert_busy(history, min_writes=50)
    assert report.ok, report.summary() + f"\nerrors {history.errors}\nstats {history.stats}"
    assert not history.errors, history.errors
    by_key: dict[str, list[int]] = {}
    for x in history.writes:
        by_key.setdefault(x.key, []).append(x.order[0])
    for key, chain in by_key.items():  # every update built on the one before: 1, 2, ..., n
        assert sorted(chain) == list(range(1, len(chain) + 1)), key


@pytest.mark.slow
@pytest.mark.parametrize("workload", ["rmw", "owned-with-deletes"])
@pytest.mark.parametrize("kind", ["sync", "asyncio"])
def test_threads_of_a_node_read_its_own_writes(server, ns, kind, workload):
    """Each node has two more threads (tasks, under asyncio) that only read, while its main
    one races the other nodes on the same keys (update_item) and reads too. Every thread of
    a node must see the node's acknowledged writes (window 0). As in ``fills_race_listener``,
    change messages only invalidate (reads fetch often) and only the listener thread applies
    them, so fills overlap the node's own writes of the same key: a read that installs first
    must not hide the write from its own node (docs/contract.md §1). The second workload has
    each key written by one node, a third of its writes deletes (a delete installs "absent"
    the way a write installs its value); it catches that fault less often than the first: a
    node's own keys are fetched less."""
    _require_syncmap()
    mode, deletes = ("rmw", 0.0) if workload == "rmw" else ("owned", 0.3)
    specs = [
        replace(
            s,
            readers=2,
            write_interval_s=0.01,
            burst=4,
            asyncio=kind == "asyncio",
            delete_ratio=deletes,
        )
        for s in _specs(server.url, ns, mode=mode, setup=fills_race_listener)
    ]
    # The others' writes get a long window: with only the listener thread applying messages,
    # it lagged 100 ms behind four busy threads in 1 run of 8. Own writes still get none.
    history, report = _run(specs, 1000 * MS)
    _assert_busy(history, min_writes=50)
    assert report.ok, report.summary() + f"\nerrors {history.errors}\nstats {history.stats}"


@pytest.mark.slow
def test_fill_race_workload_with_the_guard_has_no_violations(server, ns):
    """The control of ``no_fill_guard``: what it catches is the missing guard."""
    _require_syncmap()
    history, report = _run(_specs(server.url, ns, setup=fills_race_listener), WINDOW_REAL)
    _assert_busy(history)
    assert report.ok, report.summary() + f"\nerrors {history.errors}\nstats {history.stats}"


@pytest.mark.slow
@pytest.mark.parametrize("sabotage", [no_fill_guard, deaf_listener, lossy_listener])
def test_broken_syncmap_is_caught(server, ns, sabotage):
    """A race shows in most runs, not in every one (a fill must overlap an invalidation, and
    in some runs none does): up to three runs, and the checker must catch the broken map
    in one of them."""
    _require_syncmap()
    for attempt in range(3):
        history, report = _run(_specs(server.url, f"{ns}-{attempt}", setup=sabotage), WINDOW_REAL)
        print(report.summary(limit=2))
        _assert_busy(history)
        if report.kinds().get("stale", 0) > 0:
            break
    assert report.kinds().get("stale", 0) > 0, report.summary()


@pytest.mark.slow
def test_pubsub_connections_killed_mid_run(fresh_server, ns):
    from checker import sleep_until

    _require_syncmap()
    killed = []

    def during(t0: float) -> None:
        for at in (0.5, 1.0, 1.5):
            sleep_until(t0 + at)
            killed.append(fresh_server.drop_clients("pubsub"))

    history, report = _run(_specs(fresh_server.url, ns), WINDOW_REAL, during=during)
    print(report.summary(), history.errors, history.stats, sep="\n")
    assert sum(killed) >= 3, killed
    _assert_busy(history)
    assert report.ok, report.summary() + f"\nerrors {history.errors}\nstats {history.stats}"


@pytest.mark.slow
def test_server_restart_mid_run(fresh_server, ns):
    from checker import Reset, check, run_nodes, sleep_until, with_resets

    _require_syncmap()
    resets = []

    def during(t0: float) -> None:
        sleep_until(t0 + 0.8)
        down = _now_ns()
        fresh_server.restart()
        resets.append(Reset(down, _now_ns(), WINDOW_REAL))

    history = run_nodes(_specs(fresh_server.url, ns, duration_s=2.0), during=during)
    writes = with_resets(history.writes, resets, KEYS)
    report = check(writes, history.reads, WINDOW_REAL)
    print(report.summary(), history.errors, history.stats, sep="\n")
    up = resets[0].up_ns
    after_w = [x for x in history.writes if x.acked and x.invoke_ns > up]
    after_r = [x for x in history.reads if x.invoke_ns > up + WINDOW_REAL]
    assert after_w and after_r, f"nodes did not recover: {history.errors}"
    assert report.ok, report.summary() + f"\nerrors {history.errors}\nstats {history.stats}"


def _asyncio(specs, nodes: str, **changes) -> list:
    """The same specs, with the named nodes on an AsyncSyncMap (and ``changes`` to them)."""
    from dataclasses import replace

    return [replace(s, asyncio=True, **changes) if s.node in nodes else s for s in specs]


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["owned", "rmw"])
def test_asyncio_nodes_no_violations(server, ns, mode):
    """AsyncSyncMap nodes (two of three; the third a blocking SyncMap) under the same checker."""
    _require_syncmap()
    specs = _asyncio(_specs(server.url, ns, mode=mode), "bc")
    history, report = _run(specs, WINDOW_REAL)
    _assert_busy(history)
    assert report.ok, report.summary() + f"\nerrors {history.errors}\nstats {history.stats}"
    assert not history.errors, history.errors


def lossy_batches(m) -> None:
    """The listener takes a batch message of several changes as applied without applying
    any of them (the seq check passes: the gap is hidden)."""
    from syncmap._core.coherence import parse_changes

    coherence = _coherence_of(m)
    real = coherence.on_message

    def on_message(data: bytes) -> None:
        changes = parse_changes(data)
        if changes and len(changes) > 1 and coherence.applied == changes[0].seq - 1:
            coherence.applied = changes[-1].seq
            return
        real(data)

    coherence.on_message = on_message


@pytest.mark.slow
def test_lost_batch_changes_are_caught(server, ns):
    """The control of the bulk workload: a listener that skips batch messages is caught."""
    _require_syncmap()
    history, report = _run(
        _specs(server.url, ns, bulk=True, delete_ratio=0.2, setup=lossy_batches), WINDOW_REAL
    )
    # (not ``mixed``: the sabotage itself keeps nodes from seeing each other's batches; the
    # stale reads below show the workload reached it)
    _assert_busy(history, mixed=False)
    assert report.kinds().get("stale", 0) > 0, report.summary()


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["sync", "asyncio"])
def test_bulk_writes_no_violations(server, ns, kind):
    """Bursts written as one update() (keys drawn with repeats: a batch message holding
    several changes of one key) and, a fifth of them, one delete_many(): every change keeps
    its own seq, and no node reads stale."""
    _require_syncmap()
    specs = _specs(server.url, ns, bulk=True, delete_ratio=0.2)
    if kind == "asyncio":
        specs = _asyncio(specs, "bc")
    history, report = _run(specs, WINDOW_REAL)
    _assert_busy(history)
    assert report.ok, report.summary() + f"\nerrors {history.errors}\nstats {history.stats}"
    assert not history.errors, history.errors
    assert any(w.value is None for w in history.writes)  # delete_many ran too


@pytest.mark.slow
def test_broken_asyncio_syncmap_is_caught(server, ns):
    """The control: AsyncSyncMap nodes whose listener drops every message are caught (the
    blocking node, a correct one, is not)."""
    _require_syncmap()
    specs = _asyncio(_specs(server.url, ns), "bc", setup=deaf_listener)
    history, report = _run(specs, WINDOW_REAL)
    _assert_busy(history)
    stale = [v for v in report.violations if v.kind == "stale"]
    assert stale, report.summary()
    assert {v.read.node for v in stale if v.read} <= {"b", "c"}, report.summary()


@pytest.mark.slow
def test_asyncio_nodes_through_killed_subscribers_and_a_restart(fresh_server, ns):
    from checker import Reset, check, run_nodes, sleep_until, with_resets

    _require_syncmap()
    resets: list[Reset] = []
    killed: list[int] = []

    def during(t0: float) -> None:
        for at in (0.4, 0.8):
            sleep_until(t0 + at)
            killed.append(fresh_server.drop_clients("pubsub"))
        sleep_until(t0 + 1.2)
        down = _now_ns()
        fresh_server.restart()
        resets.append(Reset(down, _now_ns(), WINDOW_REAL))

    specs = _asyncio(_specs(fresh_server.url, ns, duration_s=2.2), "bc")
    history = run_nodes(specs, during=during)
    report = check(with_resets(history.writes, resets, KEYS), history.reads, WINDOW_REAL)
    print(report.summary(), history.errors, history.stats, sep="\n")
    assert sum(killed) >= 2, killed
    up = resets[0].up_ns
    # the asyncio nodes came back: b (a writer) wrote, and both read, after the restart
    assert any(x.node == "b" and x.acked and x.invoke_ns > up for x in history.writes)
    for node in "bc":
        assert any(x.node == node and x.invoke_ns > up + WINDOW_REAL for x in history.reads)
    assert report.ok, report.summary() + f"\nerrors {history.errors}\nstats {history.stats}"


def _now_ns() -> int:
    import time

    return time.monotonic_ns()


def ignore_reconnects(m) -> None:
    """The listener keeps the local copy across a lost subscriber connection and a resubscribe
    (Redisson's default): only the periodic freshness probe notices the lost messages."""
    coherence = _coherence_of(m)
    first = coherence.on_subscribed
    coherence.on_disconnect = lambda: None
    coherence.on_subscribed = lambda: None if coherence.subscribed_once else first()


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["pubsub_kill", "restart"])
@pytest.mark.parametrize("sabotage", [None, ignore_reconnects])
def test_quiet_map_after_fault_is_not_served_stale(fresh_server, ns, fault, sabotage):
    """docs/contract.md §4 with no traffic to reveal a gap. ``pubsub_kill``: kill every
    subscriber connection and write at once from this process (the readers' listeners are
    reconnecting: the message is lost to them). ``restart``: the server restarts empty (a new
    epoch), nobody writes. Either way a reader must not serve the old value past the
    propagation window: the lost connection / resubscribe alone must drop its copy. Without
    that, only the freshness probe (max_staleness / 3 = 0.5 s later) would notice."""
    import syncmap
    from checker import NodeSpec, Reset, check, run_nodes, sleep_until, with_resets

    _require_syncmap()
    quiet = ("q0", "q1")
    node = syncmap.connect(fresh_server.url)
    m = node.map(f"{ns}-m", max_staleness=1.5)
    writes: list[Write] = []
    resets: list[Reset] = []

    def put(key: str, value: str, n: int) -> None:
        t0 = _now_ns()
        m[key] = value
        writes.append(Write("p", key, value, (n,), t0, _now_ns()))

    for key in quiet:
        put(key, f"p:{key}:0", 1)

    def during(t0: float) -> None:
        if fault == "restart":
            sleep_until(t0 + 0.5)
            down = _now_ns()
            fresh_server.restart()
            resets.append(Reset(down, _now_ns(), WINDOW_REAL))
            return
        for rnd in range(1, 4):
            sleep_until(t0 + 0.35 * rnd)  # readers have cached the current values by now
            fresh_server.drop_clients("pubsub")
            for key in quiet:
                put(key, f"p:{key}:{rnd}", rnd + 1)

    specs = [
        NodeSpec(
            url=fresh_server.url,
            map_name=f"{ns}-m",
            node=name,
            index=i,
            keys=quiet,
            duration_s=1.6,
            read_rate=5000,
            map_options={"max_staleness": 1.5},
            setup=sabotage,
        )
        for i, name in enumerate("cd")
    ]
    history = run_nodes(specs, during=during)
    m.close()
    all_writes = with_resets(writes + history.writes, resets, quiet)
    report = check(all_writes, history.reads, WINDOW_REAL)
    print(report.summary(), history.errors, history.stats, sep="\n")
    if fault == "restart":
        late = [r for r in history.reads if r.invoke_ns > resets[0].up_ns + WINDOW_REAL]
        assert len(late) > 100, "readers did not come back after the restart"
    else:
        assert len(writes) == 8
        assert sum(1 for r in history.reads if r.value == "p:q0:3") > 100  # last round seen
    if sabotage is None:
        assert report.ok, report.summary() + f"\nerrors {history.errors}\nstats {history.stats}"
    else:
        assert report.kinds().get("stale", 0) > 0, report.summary()


def busy_siblings(m) -> None:
    """Eight more maps on the checked map's node (so on its listener: one subscriber
    connection, one probe), written to all along by another node of this process, one with
    a much smaller max_staleness (the listener probes every 20 ms for all of them)."""
    import threading
    import time

    import syncmap

    node = m.node._root
    siblings = [
        node.map(f"{m.name}-sib{i}", max_staleness=0.06 if i == 0 else 2.0) for i in range(8)
    ]
    assert all(s._listener is m._listener for s in siblings)
    writer = syncmap.connect(node.url)
    wmaps = [writer.map(s.name) for s in siblings]

    def write() -> None:
        deadline = time.monotonic() + 6.0  # (bounded: longer than any run)
        n = 0
        while time.monotonic() < deadline:
            wmaps[n % len(wmaps)][f"k{n % 7}"] = n
            siblings[(n + 3) % len(siblings)].get(f"k{n % 7}")
            n += 1
            time.sleep(0.001)

    threading.Thread(target=write, daemon=True).start()


@pytest.mark.slow
def test_a_map_sharing_its_listener_with_busy_siblings_has_no_violations(server, ns):
    """The checked map's change messages share the subscriber connection with eight busy
    maps' (dispatched by channel), and its copy is proven by the probe of all nine."""
    _require_syncmap()
    history, report = _run(_specs(server.url, ns, setup=busy_siblings), WINDOW_REAL)
    print(report.summary())
    _assert_busy(history)
    assert report.ok, report.summary() + f"\nerrors {history.errors}\nstats {history.stats}"
