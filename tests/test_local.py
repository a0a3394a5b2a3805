"""SafeHashMap: mapping protocol, TTL on a fake clock, LRU bound, stats, atomic helpers."""

from __future__ import annotations

import math
from collections.abc import MutableMapping
from fractions import Fraction

import pytest

import syncmap
from syncmap import InvalidArgument, LocalStats, SafeHashMap


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


# ---- mapping protocol ------------------------------------------------------------------


@pytest.mark.parametrize("maxsize", [None, 100])
def test_mutable_mapping_protocol(maxsize):
    m: SafeHashMap[str, int] = SafeHashMap(maxsize)
    assert isinstance(m, MutableMapping)
    assert len(m) == 0 and not m and list(m) == []
    m["a"] = 1
    m.set("b", 2)
    assert m["a"] == 1 and m.get("b") == 2
    assert m.get("zz") is None and m.get("zz", 7) == 7
    with pytest.raises(KeyError):
        m["zz"]
    assert "a" in m and "zz" not in m
    assert len(m) == 2 and bool(m)
    assert sorted(m) == ["a", "b"]
    assert sorted(m.keys()) == ["a", "b"]
    assert sorted(m.values()) == [1, 2]
    assert sorted(m.items()) == [("a", 1), ("b", 2)]
    assert ("a", 1) in m.items() and ("a", 2) not in m.items() and ("q", 1) not in m.items()
    assert 2 in m.values() and 3 not in m.values()
    assert m == {"a": 1, "b": 2}
    assert dict(m) == {"a": 1, "b": 2}

    assert m.setdefault("a", 9) == 1
    assert m.setdefault("c", 3) == 3 and m["c"] == 3
    assert m.pop("c") == 3 and "c" not in m
    assert m.pop("c", "gone") == "gone"
    with pytest.raises(KeyError):
        m.pop("c")

    del m["b"]
    assert "b" not in m
    with pytest.raises(KeyError):
        del m["b"]
    assert m.delete("a") is True and m.delete("a") is False
    assert len(m) == 0

    m.update({"x": 1}, y=2)
    m.update([("z", 3)])
    assert dict(m) == {"x": 1, "y": 2, "z": 3}

    class KeysOnly:
        def keys(self):
            return ["k"]

        def __getitem__(self, key):
            return 5

    m.update(KeysOnly())
    assert m["k"] == 5

    items = set()
    while m:
        items.add(m.popitem())
    assert items == {("x", 1), ("y", 2), ("z", 3), ("k", 5)}
    with pytest.raises(KeyError):
        m.popitem()

    m.update(a=1, b=2)
    m.clear()
    assert len(m) == 0 and list(m) == [] and m.get("a") is None
    m["a"] = 3  # usable after clear
    assert m["a"] == 3


def test_none_is_a_value_not_absence():
    m: SafeHashMap[str, None] = SafeHashMap()
    m["a"] = None
    assert "a" in m and m["a"] is None and m.get("a", 1) is None
    assert m.pop("a", 1) is None


def test_iteration_is_a_snapshot_that_tolerates_writes():
    m = SafeHashMap()
    m.update({i: i for i in range(100)})
    seen = []
    for key in m:
        seen.append(key)
        m[key + 1000] = 0  # a dict would raise "changed size during iteration"
        m.pop(key + 1, None)
    assert seen == list(range(100))


def test_popitem_takes_oldest_when_unbounded():
    m = SafeHashMap()
    m.update(a=1, b=2)
    m["a"] = 3  # overwrite keeps its place, like dict
    assert m.popitem() == ("a", 3)


def test_repr_and_properties():
    m = SafeHashMap(maxsize=5, ttl=2)
    assert m.maxsize == 5 and m.ttl == 2.0
    assert "size=0" in repr(m) and "maxsize=5" in repr(m)


def test_exported():
    assert "SafeHashMap" in syncmap.__all__ and "LocalStats" in syncmap.__all__


# ---- TTL on a fake clock -----------------------------------------------------------------


def test_default_ttl_expires(clock):
    m = SafeHashMap(ttl=10, timer=clock)
    m["a"] = 1
    clock.advance(9.999)
    assert m["a"] == 1 and len(m) == 1
    clock.advance(0.001)  # deadline reached: expired
    assert m.get("a") is None
    assert "a" not in m
    with pytest.raises(KeyError):
        m["a"]
    assert len(m) == 0 and list(m) == []


def test_expired_entries_invisible_everywhere(clock):
    m = SafeHashMap(timer=clock)
    m.set("short", 1, ttl=1)
    m.set("long", 2, ttl=100)
    m["forever"] = 3
    clock.advance(1)
    assert "short" not in m
    assert len(m) == 2
    assert sorted(m) == ["forever", "long"]
    assert sorted(m.keys()) == ["forever", "long"]
    assert sorted(m.values()) == [2, 3]
    assert sorted(m.items()) == [("forever", 3), ("long", 2)]
    assert ("short", 1) not in m.items()
    assert m.pop("short", "x") == "x"
    assert m.delete("short") is False
    assert m == {"long": 2, "forever": 3}
    clock.advance(1000)
    assert dict(m) == {"forever": 3}


def test_expired_entry_is_treated_as_absent_by_writes(clock):
    m = SafeHashMap(ttl=5, timer=clock)
    m["a"] = 1
    m["b"] = 2
    m["c"] = 3
    clock.advance(5)
    assert m.setdefault("a", 10) == 10
    assert m.add("b", 20) is True and m["b"] == 20
    assert m.replace("c", 3, 30) is False and "c" not in m
    assert sorted(m.items()) == [("a", 10), ("b", 20)]
    assert m.stats.expirations == 3


def test_per_entry_ttl_overrides_default(clock):
    m = SafeHashMap(ttl=10, timer=clock)
    m.set("a", 1, ttl=1)
    m.set("b", 2)  # default 10
    m.set("c", 3, ttl=20)
    clock.advance(1)
    assert sorted(m) == ["b", "c"]
    clock.advance(9)
    assert list(m) == ["c"]
    clock.advance(10)
    assert list(m) == []


def test_overwrite_resets_deadline(clock):
    m = SafeHashMap(timer=clock)
    m.set("a", 1, ttl=2)
    clock.advance(1.5)
    m.set("a", 2, ttl=2)
    clock.advance(1.5)  # the first deadline has passed; the second has not
    assert m["a"] == 2 and len(m) == 1
    clock.advance(0.5)  # the second has passed too
    assert len(m) == 0 and list(m) == [] and m.stats.expirations == 1
    m.set("a", 1, ttl=5)
    m.set("a", 2, ttl=1)  # a shorter deadline than before is honoured
    clock.advance(1)
    assert len(m) == 0
    m["a"] = 3  # no TTL: never expires
    clock.advance(1e9)
    assert m["a"] == 3 and len(m) == 1


def test_ttl_accepts_ints_floats_and_reals(clock):
    m = SafeHashMap(ttl=Fraction(1, 2), timer=clock)
    assert m.ttl == 0.5
    m.set("a", 1, ttl=3)
    m.set("b", 1, ttl=0.25)
    clock.advance(0.25)
    assert list(m) == ["a"]


def test_expiry_heap_stays_bounded(clock):
    m = SafeHashMap(timer=clock)
    for i in range(10_000):
        m.set(i % 10, i, ttl=100)
    assert len(m._expiry) <= 2 * 10 + 32 + 1
    clock.advance(100)
    assert len(m) == 0 and m._expiry == []


def test_settle_gives_a_time_before_which_no_entry_expires(clock):
    """A reader that serves entries without reading their deadlines (SyncMap's hit path) is
    told the earliest one (settle), and reset before an entry is written that expires sooner;
    a later deadline, or none, needs no reset."""
    m = SafeHashMap(timer=clock)
    kept: list[float] = []
    resets: list[int] = []
    m.follow_deadlines(lambda: resets.append(len(m._data)))  # (lock held: no len(m))
    m.settle(2000.0, kept.append)
    assert kept == [2000.0]  # no entry has a deadline: the reader's own time
    m.set("a", 1, ttl=10)
    assert resets == [0]  # before the entry was written
    m.settle(2000.0, kept.append)
    assert kept[-1] == 1010.0
    m.set("b", 2, ttl=20)  # expires later than a: no reset
    m.set("a", 3, ttl=30)  # a refresh to a later deadline: no reset
    m["c"] = 4  # no deadline
    assert resets == [0]
    m.set("d", 5, ttl=5)  # sooner than every other
    assert resets == [0, 3]
    m.settle(2000.0, kept.append)
    assert kept[-1] == 1005.0
    m.settle(1001.0, kept.append)
    assert kept[-1] == 1001.0  # the reader's own time is earlier
    clock.advance(15)  # d expired; a's first record came due, refiled at its new deadline
    m.settle(2000.0, kept.append)
    assert kept[-1] == 1020.0 and "d" not in m and len(m) == 3
    m.clear()
    m.settle(2000.0, kept.append)
    assert kept[-1] == 2000.0
    m.set("e", 6, ttl=100)  # the first deadline of a new store
    assert resets == [0, 3, 0]


def test_expirations_counted(clock):
    m = SafeHashMap(timer=clock)
    for i in range(5):
        m.set(i, i, ttl=1 + i)
    clock.advance(3)  # 0, 1, 2 expired
    assert m.get(0) is None  # dropped by the read
    m.set(1, "new")  # overwrites an expired entry
    assert len(m) == 3  # 2 dropped by the purge
    s = m.stats
    assert s.expirations == 3 and s.size == 3 and s.misses == 1


# ---- LRU ---------------------------------------------------------------------------------


def test_lru_eviction_order_and_count():
    m = SafeHashMap(maxsize=3)
    m.update(a=1, b=2, c=3)
    assert list(m) == ["a", "b", "c"]
    m.get("a")  # a is now most recent
    m["d"] = 4  # evicts b
    assert list(m) == ["c", "a", "d"]
    m["c"] = 30  # overwrite refreshes c
    m["e"] = 5  # evicts a
    assert list(m) == ["d", "c", "e"]
    assert "d" in m  # `in` does not refresh
    m["f"] = 6  # evicts d
    assert list(m) == ["c", "e", "f"]
    m["e"]  # [] refreshes
    m.setdefault("c", 0)  # setdefault of a present key refreshes
    assert list(m) == ["f", "e", "c"]
    assert m.stats.evictions == 3
    assert m.popitem() == ("f", 6)  # least recently used
    assert len(m) == 2 and m.stats.evictions == 3


def test_size_bound_never_exceeded():
    m = SafeHashMap(maxsize=10)
    for i in range(1000):
        m[i] = i
        assert len(m) <= 10
    assert sorted(m) == list(range(990, 1000))
    assert m.stats.evictions == 990


def test_expired_entries_make_room_before_evicting(clock):
    m = SafeHashMap(maxsize=3, timer=clock)
    m.set("a", 1, ttl=1)
    m["b"] = 2
    m["c"] = 3
    clock.advance(1)
    m["d"] = 4  # a is expired: it goes, b and c stay
    assert list(m) == ["b", "c", "d"]
    s = m.stats
    assert (s.evictions, s.expirations) == (0, 1)


def test_maxsize_one():
    m = SafeHashMap(maxsize=1)
    m["a"] = 1
    m["b"] = 2
    assert dict(m) == {"b": 2} and m.stats.evictions == 1


# ---- stats -------------------------------------------------------------------------------


def test_stats_snapshot_and_reset():
    m = SafeHashMap(maxsize=2)
    m["a"] = 1
    m.get("a")
    m["a"]
    m.get("b")
    m.setdefault("a", 0)
    m.setdefault("c", 0)  # miss, then stored
    "a" in m  # noqa: B015 (does not count)
    s = m.stats
    assert isinstance(s, LocalStats)
    assert (s.hits, s.misses, s.evictions, s.size, s.maxsize) == (3, 2, 0, 2, 2)
    assert s.hit_ratio == pytest.approx(3 / 5)
    with pytest.raises(AttributeError):
        s.hits = 0  # type: ignore[misc]
    m.reset_stats()
    s2 = m.stats
    assert (s2.hits, s2.misses, s2.evictions, s2.expirations, s2.size) == (0, 0, 0, 0, 2)
    assert s.hits == 3  # the old snapshot did not change
    assert LocalStats(0, 0, 0, 0, 0, None).hit_ratio == 0.0


# ---- atomic helpers for SyncMap ---------------------------------------------------------


def test_replace_by_identity(clock):
    m = SafeHashMap(timer=clock)
    placeholder = object()
    m["k"] = placeholder
    assert m.replace("k", object(), "v") is False  # equal-but-not-identical never matches
    assert m["k"] is placeholder
    assert m.replace("k", placeholder, "v", ttl=5) is True
    assert m["k"] == "v"
    clock.advance(5)
    assert "k" not in m  # the ttl given to replace applies

    m["x"] = [1]
    assert m.replace("x", [1], [2]) is False  # equality is not identity
    assert m.replace("missing", None, 1) is False and "missing" not in m


def test_replace_after_invalidation_does_not_install(clock):
    m = SafeHashMap(timer=clock)
    placeholder = object()
    m["k"] = placeholder
    m.delete("k")  # an invalidation arrived while the fetch was in flight
    assert m.replace("k", placeholder, "stale") is False
    assert "k" not in m
    m["k"] = placeholder
    m["k"] = "newer"  # a newer write took the placeholder's place
    assert m.replace("k", placeholder, "stale") is False
    assert m["k"] == "newer"


def test_replace_refreshes_recency():
    m = SafeHashMap(maxsize=2)
    p = object()
    m["a"] = p
    m["b"] = 1
    assert m.replace("a", p, 2)
    m["c"] = 3  # evicts b, not a
    assert list(m) == ["a", "c"]


def test_delete_if(clock):
    m = SafeHashMap(timer=clock)
    m["a"] = 5
    assert m.delete_if("a", lambda v: v < 5) is False and m["a"] == 5
    assert m.delete_if("a", lambda v: v <= 5) is True and "a" not in m
    assert m.delete_if("a", lambda v: True) is False
    m.set("b", 1, ttl=1)
    clock.advance(1)
    calls = []
    assert m.delete_if("b", calls.append) is False
    assert calls == []  # never judged an expired value


def test_delete_if_rejudges_an_entry_replaced_while_judging():
    m = SafeHashMap()
    m["k"] = 1
    judged = []

    def predicate(value):
        judged.append(value)
        if value == 1:
            m["k"] = 2  # a writer replaces the entry while it is being judged
        return True

    assert m.delete_if("k", predicate) is True
    assert judged == [1, 2] and "k" not in m

    m["k"] = 1

    def keep_new(value):
        if value == 1:
            m["k"] = 2
            return True
        return False

    assert m.delete_if("k", keep_new) is False
    assert m["k"] == 2  # the new value was judged and kept


def test_delete_if_predicate_error_changes_nothing():
    m = SafeHashMap()
    m["a"] = 1

    def boom(value):
        raise ZeroDivisionError

    with pytest.raises(ZeroDivisionError):
        m.delete_if("a", boom)
    assert m["a"] == 1


def test_update_from_another_map_reads_a_snapshot():
    source = SafeHashMap()
    source.update(a=1, b=2)
    m = SafeHashMap()
    m.update(source)
    assert dict(m) == {"a": 1, "b": 2}
    assert source.stats.hits == 0  # copying is not a lookup


def test_add(clock):
    m = SafeHashMap(timer=clock)
    assert m.add("a", 1) is True
    assert m.add("a", 2) is False and m["a"] == 1
    m.set("b", 1, ttl=1)
    clock.advance(1)
    assert m.add("b", 2, ttl=3) is True and m["b"] == 2
    clock.advance(3)
    assert "b" not in m


# ---- bad input ---------------------------------------------------------------------------

BAD_TTLS = [0, -1, -0.5, 0.0, math.nan, math.inf, -math.inf, True, False, "5", b"1", [1], 10**400]


@pytest.mark.parametrize("ttl", BAD_TTLS, ids=repr)
def test_bad_ttl_rejected_and_nothing_written(ttl):
    with pytest.raises(InvalidArgument):
        SafeHashMap(ttl=ttl)
    m = SafeHashMap()
    m["k"] = "old"
    p = m["k"]
    with pytest.raises(InvalidArgument):
        m.set("k", "new", ttl=ttl)
    with pytest.raises(InvalidArgument):
        m.set("fresh", "new", ttl=ttl)
    with pytest.raises(InvalidArgument):
        m.add("other", "new", ttl=ttl)
    with pytest.raises(InvalidArgument):
        m.replace("k", p, "new", ttl=ttl)
    assert dict(m) == {"k": "old"}


@pytest.mark.parametrize("maxsize", [0, -1, 1.5, "3", True, math.inf])
def test_bad_maxsize_rejected(maxsize):
    with pytest.raises(InvalidArgument):
        SafeHashMap(maxsize)


def test_bad_timer_rejected():
    with pytest.raises(InvalidArgument):
        SafeHashMap(timer=5)  # type: ignore[arg-type]


def test_bad_view_rejected():
    with pytest.raises(InvalidArgument):
        SafeHashMap(view=5)  # type: ignore[arg-type]


@pytest.mark.parametrize("maxsize", [None, 2])
def test_the_store_keeps_each_values_view_beside_it(maxsize):
    """A reader of the store's dict (follow_store) finds ``(value, deadline, view(value))``;
    without a view, the value itself. The map's own reads are not changed by it."""
    stores: list[dict[str, tuple[object, float, object]]] = []
    m: SafeHashMap[str, list[int]] = SafeHashMap(maxsize, view=len)
    m.follow_store(stores.append)
    m["a"] = [1, 2]
    m.set("b", [3], ttl=10)
    assert m["a"] == [1, 2] and m.get("b") == [3]
    assert stores[-1]["a"][0] == [1, 2] and stores[-1]["a"][2] == 2
    assert stores[-1]["b"][2] == 1 and stores[-1]["b"][1] < math.inf
    assert m.replace("a", m["a"], [4, 5, 6]) and stores[-1]["a"][2] == 3
    m.clear()
    m["c"] = [7]
    assert stores[-1] == {"c": ([7], math.inf, 1)}
    plain: SafeHashMap[str, int] = SafeHashMap(maxsize)
    plain.follow_store(stores.append)
    plain["a"] = 1
    assert stores[-1]["a"] == (1, math.inf, 1)


def test_errors_are_typed():
    with pytest.raises(ValueError):
        SafeHashMap(ttl=-1)
    with pytest.raises(syncmap.SyncMapError):
        SafeHashMap(maxsize=0)
