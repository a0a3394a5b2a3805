"""SafeHashMap under many threads: bound, no lost writes, atomic helpers, no exceptions.

The GIL switch interval is shortened so threads interleave inside the map's methods.
"""

from __future__ import annotations

import random
import sys
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from servers import wait_until
from syncmap import SafeHashMap

THREADS = 8


@pytest.fixture(autouse=True)
def fast_switching() -> Iterator[None]:
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        yield
    finally:
        sys.setswitchinterval(old)


def run_threads(target: Callable[[int], None], n: int = THREADS) -> None:
    """Run ``target(i)`` in ``n`` threads started together; re-raise the first failure."""
    barrier = threading.Barrier(n)
    errors: list[BaseException] = []

    def body(i: int) -> None:
        try:
            barrier.wait()
            target(i)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=body, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads), "a worker thread hung"
    if errors:
        raise errors[0]


def test_mixed_ops_keep_the_bound_and_never_raise():
    maxsize = 32
    m: SafeHashMap[int, tuple[int, int]] = SafeHashMap(maxsize=maxsize)
    stop = threading.Event()
    watcher_seen: list[int] = []
    watcher_errors: list[BaseException] = []

    def watch() -> None:
        try:
            for _ in range(200_000):  # bounded
                if stop.is_set():
                    return
                n = len(m)
                watcher_seen.append(n)
                assert n <= maxsize, f"len {n} over maxsize"
                assert len(m._data) <= maxsize
                keys = list(m)
                assert len(keys) <= maxsize
                for key, value in m.items():
                    assert value[0] == key  # never a torn or misplaced entry
        except BaseException as exc:
            watcher_errors.append(exc)

    def work(tid: int) -> None:
        rng = random.Random(tid)
        for i in range(4000):
            key = rng.randrange(100)
            op = rng.randrange(12)
            if op < 3:
                value = m.get(key)
                assert value is None or value[0] == key
            elif op < 5:
                m[key] = (key, tid)
            elif op == 5:
                m.set(key, (key, tid), ttl=rng.choice([0.0005, 0.01, 5]))
            elif op == 6:
                m.delete(key)
            elif op == 7:
                m.pop(key, None)
            elif op == 8:
                assert m.setdefault(key, (key, tid))[0] == key
            elif op == 9:
                current = m.get(key)
                if current is not None:
                    m.replace(key, current, (key, -tid))
            elif op == 10:
                m.delete_if(key, lambda v: v[1] % 2 == 0)
            else:
                assert len(list(m)) <= maxsize
                if i % 500 == 0:
                    m.add(key, (key, tid))
                    try:
                        k, v = m.popitem()
                        assert v[0] == k
                    except KeyError:
                        pass

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        run_threads(work)
    finally:
        stop.set()
        watcher.join(60)
    assert not watcher_errors, watcher_errors[0]
    assert watcher_seen and max(watcher_seen) <= maxsize
    assert len(m) <= maxsize

    def nothing_expiring() -> bool:  # (an entry expiring between two reads would tell them apart)
        now = time.monotonic()
        return not any(now < entry[1] < now + 1 for entry in list(m._data.values()))

    wait_until(nothing_expiring, 5, what="the short-TTL entries to expire")
    assert m.stats.size == len(list(m))
    s = m.stats
    assert s.hits + s.misses > 0 and s.evictions > 0


def test_no_lost_writes_to_distinct_keys():
    m: SafeHashMap[tuple[int, int], object] = SafeHashMap()
    per_thread = 3000

    def work(tid: int) -> None:
        rng = random.Random(tid)
        for i in range(per_thread):
            key = (tid, i)
            if i % 3 == 0:  # placeholder, then install the "fetched" value
                placeholder = object()
                m[key] = placeholder
                assert m.replace(key, placeholder, i)
            elif i % 3 == 1:
                assert m.add(key, i)
            else:
                m.set(key, i)
            if i % 10 == 9:  # delete one of our own earlier keys
                assert m.pop((tid, i - 5)) == i - 5
            other = (rng.randrange(THREADS), rng.randrange(per_thread))
            m.get(other)  # reads of other threads' keys interleave
            if i % 500 == 0:
                view = m.keys()  # iterate under writes
                assert all(isinstance(k, tuple) for k in view)

    run_threads(work)
    expected = {(tid, i): i for tid in range(THREADS) for i in range(per_thread) if i % 10 != 4}
    assert len(m) == len(expected)
    assert dict(m.items()) == expected


def test_replace_is_an_atomic_compare_and_set():
    m: SafeHashMap[str, int] = SafeHashMap(maxsize=4)
    m["n"] = 0
    increments = 1500
    attempts = [0]

    def work(tid: int) -> None:
        done = 0
        for _ in range(increments * THREADS * 4):  # bounded: enough for every CAS retry
            current = m["n"]
            attempts[0] += 1
            if m.replace("n", current, current + 1):
                done += 1
                if done == increments:
                    return
        raise AssertionError("could not finish the increments")

    run_threads(work)
    assert m["n"] == increments * THREADS


def test_add_and_delete_if_have_exactly_one_winner():
    m: SafeHashMap[int, int] = SafeHashMap()
    keys = range(2000)
    added = [[] for _ in range(THREADS)]
    deleted = [[] for _ in range(THREADS)]

    def adders(tid: int) -> None:
        for key in keys:
            if m.add(key, tid):
                added[tid].append(key)

    run_threads(adders)
    assert sorted(k for a in added for k in a) == list(keys)
    assert all(m[k] == tid for tid, a in enumerate(added) for k in a)

    def deleters(tid: int) -> None:
        for key in keys:
            if m.delete_if(key, lambda v: v >= 0):
                deleted[tid].append(key)

    run_threads(deleters)
    assert sorted(k for d in deleted for k in d) == list(keys)
    assert len(m) == 0


def test_clear_while_reading_and_writing():
    m: SafeHashMap[int, int] = SafeHashMap(maxsize=50)

    def work(tid: int) -> None:
        rng = random.Random(tid)
        for _ in range(3000):
            key = rng.randrange(80)
            if tid == 0 and rng.random() < 0.01:
                m.clear()
            elif rng.random() < 0.5:
                m[key] = key
            else:
                value = m.get(key)
                assert value is None or value == key
                m.delete_if(key, lambda v: v % 7 == 0)
            assert len(m) <= 50

    run_threads(work)
    assert all(k == v for k, v in m.items())


def test_len_never_exceeds_maxsize_while_inserting():
    """``len`` without TTL entries reads the store lock-free: room must be made first."""
    maxsize = 8
    m: SafeHashMap[int, int] = SafeHashMap(maxsize=maxsize)
    over: list[int] = []
    done = threading.Event()

    def watch() -> None:
        for _ in range(2_000_000):  # bounded
            if done.is_set():
                return
            n = len(m)
            if n > maxsize:
                over.append(n)

    watcher = threading.Thread(target=watch)
    watcher.start()

    def work(tid: int) -> None:
        for i in range(20_000):
            m[tid * 1_000_000 + i] = i

    try:
        run_threads(work, 3)
    finally:
        done.set()
        watcher.join(60)
    assert not over, f"len() saw {max(over)} > maxsize {maxsize}"
    assert m.stats.evictions == 3 * 20_000 - maxsize


class PyKey:
    """A key hashed and compared in Python: the GIL can switch inside a dict lookup."""

    __slots__ = ("n",)

    def __init__(self, n: int) -> None:
        self.n = n

    def __hash__(self) -> int:
        return hash(self.n)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PyKey) and other.n == self.n


@pytest.mark.parametrize("make_key", [str, PyKey], ids=["str", "python-hash"])
def test_iteration_while_readers_refresh_recency(make_key):
    """Lock-free gets reorder a bounded map while other threads copy it."""
    m = SafeHashMap(maxsize=64)
    keys = [make_key(i) for i in range(64)]
    for key in keys:
        m[key] = key

    def work(tid: int) -> None:
        if tid % 2:
            for i in range(20_000):
                assert m.get(keys[i % 64]) is keys[i % 64]
        else:
            for _ in range(300):
                assert len(list(m)) == 64
                assert all(k is v for k, v in m.items())
                assert len(list(m.values())) == 64
                m._rebuild_expiry()

    run_threads(work, 4)


@pytest.mark.skipif(
    sys.implementation.name != "cpython" or sys.version_info[:2] != (3, 11),
    reason="exactness of lock-free counters is a CPython 3.11 property",
)
def test_hit_and_miss_counters_exact_under_threads():
    m: SafeHashMap[str, int] = SafeHashMap(maxsize=10)
    m["a"] = 1

    def work(tid: int) -> None:
        for _ in range(5000):
            m.get("a")
            m.get("b")

    run_threads(work)
    s = m.stats
    assert (s.hits, s.misses) == (5000 * THREADS, 5000 * THREADS)
