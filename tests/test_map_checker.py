"""The staleness checker (tests/checker.py): first on synthetic histories, then on real nodes.

Synthetic histories need no server and pin the rule down. The multi-process runs put several
OS processes, each with its own SyncMap, on one real Valkey and check every read against every
acknowledged write (DESIGN.md §3.1-3.2, 3.4-3.5).
"""

from __future__ import annotations

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
