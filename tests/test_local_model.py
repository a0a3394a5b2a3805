"""SafeHashMap against a plain model (ordered dict of live entries) on a fake clock.

The model drops expired entries at the start of every step; the map drops them lazily. The
two must agree on everything observable, stats included (``len`` forces the map's purge
before the counters are compared).
"""

from __future__ import annotations

import hypothesis.strategies as st
import pytest
from hypothesis import settings
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from syncmap import SafeHashMap

KEYS = st.sampled_from(["a", "b", "c", "d", "e"])
TTLS = st.sampled_from([None, 0.5, 1.0, 2.5, 5.0])
NUMS = st.integers(0, 9)
# Each step first moves the clock, so the map meets entries that expired but were not yet
# dropped (the invariant's len() drops them after every step).
DT = st.sampled_from([0.0, 0.0, 0.0, 0.5, 1.0, 2.5])


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Model:
    def __init__(self, maxsize: int | None, ttl: float | None) -> None:
        self.maxsize = maxsize
        self.ttl = ttl
        self.entries: dict[str, tuple[list[int], float]] = {}  # insertion order = map order
        self.hits = self.misses = self.evictions = self.expirations = 0

    def expire(self, now: float) -> None:
        for key, (_, deadline) in list(self.entries.items()):
            if deadline <= now:
                del self.entries[key]
                self.expirations += 1

    def touch(self, key: str) -> None:
        if self.maxsize is not None:
            self.entries[key] = self.entries.pop(key)

    def lookup(self, key: str) -> list[int] | None:
        """A counted, recency-refreshing read (get, setdefault)."""
        if key not in self.entries:
            self.misses += 1
            return None
        self.hits += 1
        self.touch(key)
        return self.entries[key][0]

    def store(self, key: str, value: list[int], ttl: float | None, now: float) -> None:
        ttl = self.ttl if ttl is None else ttl
        deadline = float("inf") if ttl is None else now + ttl
        if key in self.entries:
            self.entries[key] = (value, deadline)
            self.touch(key)
            return
        if self.maxsize is not None and len(self.entries) >= self.maxsize:
            del self.entries[next(iter(self.entries))]
            self.evictions += 1
        self.entries[key] = (value, deadline)


class SafeHashMapMachine(RuleBasedStateMachine):
    maxsize: int | None = 3

    @initialize(ttl=st.sampled_from([None, 3.0]))
    def start(self, ttl):
        self.clock = Clock()
        self.map = SafeHashMap(self.maxsize, ttl, timer=self.clock)
        self.model = Model(self.maxsize, ttl)

    def step(self, dt: float) -> Model:
        self.clock.now += dt
        self.model.expire(self.clock.now)
        return self.model

    @rule(key=KEYS, n=NUMS, ttl=TTLS, dt=DT)
    def set(self, key, n, ttl, dt):
        value = [n]
        self.step(dt).store(key, value, ttl, self.clock.now)
        self.map.set(key, value, ttl)

    @rule(key=KEYS, n=NUMS, dt=DT)
    def setitem(self, key, n, dt):
        value = [n]
        self.step(dt).store(key, value, None, self.clock.now)
        self.map[key] = value

    @rule(pairs=st.lists(st.tuples(KEYS, NUMS), max_size=4), dt=DT)
    def update(self, pairs, dt):
        model = self.step(dt)
        values = [(key, [n]) for key, n in pairs]
        for key, value in values:
            model.store(key, value, None, self.clock.now)
        self.map.update(values)

    @rule(key=KEYS, dt=DT)
    def get(self, key, dt):
        expected = self.step(dt).lookup(key)
        assert self.map.get(key) is expected

    @rule(key=KEYS, dt=DT)
    def contains(self, key, dt):
        model = self.step(dt)
        assert (key in self.map) == (key in model.entries)

    @rule(key=KEYS, n=NUMS, dt=DT)
    def setdefault(self, key, n, dt):
        model = self.step(dt)
        default = [n]
        expected = model.lookup(key)
        if expected is None:
            expected = default
            model.store(key, default, None, self.clock.now)
        assert self.map.setdefault(key, default) is expected

    @rule(key=KEYS, n=NUMS, ttl=TTLS, dt=DT)
    def add(self, key, n, ttl, dt):
        model = self.step(dt)
        absent = key not in model.entries
        value = [n]
        if absent:
            model.store(key, value, ttl, self.clock.now)
        assert self.map.add(key, value, ttl) is absent

    @rule(key=KEYS, n=NUMS, ttl=TTLS, same=st.booleans(), dt=DT)
    def replace(self, key, n, ttl, same, dt):
        model = self.step(dt)
        current = model.entries.get(key, (None, 0.0))[0]
        expected = current if same else [n]
        ok = current is not None and same
        value = [n]
        if ok:
            model.store(key, value, ttl, self.clock.now)
        assert self.map.replace(key, expected, value, ttl) is ok

    @rule(key=KEYS, threshold=NUMS, dt=DT)
    def delete_if(self, key, threshold, dt):
        model = self.step(dt)
        ok = key in model.entries and model.entries[key][0][0] >= threshold
        if ok:
            del model.entries[key]
        assert self.map.delete_if(key, lambda v: v[0] >= threshold) is ok

    @rule(key=KEYS, dt=DT)
    def delete(self, key, dt):
        present = self.step(dt).entries.pop(key, None) is not None
        assert self.map.delete(key) is present

    @rule(key=KEYS, dt=DT)
    def pop(self, key, dt):
        entry = self.step(dt).entries.pop(key, None)
        assert self.map.pop(key, None) is (entry[0] if entry else None)

    @rule(dt=DT)
    def popitem(self, dt):
        model = self.step(dt)
        if model.entries:
            key = next(iter(model.entries))
            assert self.map.popitem() == (key, model.entries.pop(key)[0])
        else:
            assert len(self.map) == 0

    @rule(dt=DT)
    def clear(self, dt):
        self.clock.now += dt  # clear() drops expired entries without counting them
        self.model.entries.clear()
        self.map.clear()

    @invariant()
    def agrees(self):
        if not hasattr(self, "map"):
            return
        model = self.step(0.0)
        assert len(self.map) == len(model.entries)
        assert list(self.map) == list(model.entries)
        assert [v for _, v in self.map.items()] == [v for v, _ in model.entries.values()]
        s = self.map.stats
        assert (s.hits, s.misses, s.evictions, s.expirations, s.size) == (
            model.hits,
            model.misses,
            model.evictions,
            model.expirations,
            len(model.entries),
        )


class UnboundedMachine(SafeHashMapMachine):
    maxsize = None


_settings = settings(max_examples=120, stateful_step_count=30, deadline=None)
TestBounded = SafeHashMapMachine.TestCase
TestUnbounded = UnboundedMachine.TestCase
for _case in (TestBounded, TestUnbounded):
    _case.settings = _settings
    _case.pytestmark = [pytest.mark.slow]  # a few seconds each
del _case  # else pytest collects it a third time
