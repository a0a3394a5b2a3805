"""``@m.cached``: stable keys, single flight across processes, cached None, invalidate and
refresh on every node, local hits; blocking and asyncio maps, against a real Valkey."""

from __future__ import annotations

import asyncio
import datetime
import decimal
import enum
import json
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

import syncmap
from servers import wait_until

HERE = Path(__file__).resolve().parent


class Color(enum.Enum):
    RED = "r"


def test_keys_are_canonical_and_stable(server, ns):
    with syncmap.connect(server.url) as node, node.map(ns) as m:

        @m.cached()
        def f(a, b=2, *rest, **named):
            return None

        # literal: the same in every process and after every restart (no repr(), no hash())
        assert (
            f.key(1)
            == "test_cached.test_keys_are_canonical_and_stable.<locals>.f(a=1,b=2,rest=(),named={})"
        )
        assert f.key(1) == f.key(a=1) == f.key(1, 2) == f.key(a=1, b=2)
        assert f.key(1) != f.key(1.0) != f.key(True) != f.key("1")
        assert f.key((1, 2)) != f.key([1, 2])
        assert f.key({"y": 1, "x": [2]}) == f.key({"x": [2], "y": 1})
        assert f.key({3, 1, 2}) == f.key({2, 3, 1}) != f.key(frozenset({1, 2, 3}))
        assert f.key(1, 2, 3, z=4) == f.key(1, 2, 3, **{"z": 4})
        for value in (None, b"\x00\xff", Color.RED, datetime.date(2024, 1, 2),
                      datetime.datetime(2024, 1, 2, 3, 4, 5), decimal.Decimal("1.10"),
                      uuid.UUID(int=7), float("nan"), "é"):  # fmt: skip
            assert f.key(value) == f.key(value)
        assert "Color.RED" in f.key(Color.RED) and "Decimal(1.10)" in f.key(decimal.Decimal("1.10"))
        long = f.key("x" * 500)
        assert long.startswith("test_cached.") and "#" in long and len(long) < 200


def test_unstable_arguments_are_a_typed_error(server, ns):
    calls = []
    with syncmap.connect(server.url) as node, node.map(ns) as m:

        @m.cached()
        def f(obj):
            calls.append(obj)
            return 1

        for bad in (object(), lambda: 1, [1, object()], {"k": {1, 2, object()}}):
            with pytest.raises(syncmap.InvalidArgument, match="stable"):
                f(bad)
        with pytest.raises(syncmap.InvalidArgument):
            f(1, 2)  # does not fit the signature
        assert calls == [] and len(m) == 0
        with pytest.raises(syncmap.InvalidArgument):
            m.cached(ttl=0)
        with pytest.raises(syncmap.InvalidArgument):
            m.cached(key=5)

        async def coro():
            return 1

        with pytest.raises(syncmap.InvalidArgument):
            m.cached()(coro)


def test_cached_none_is_a_hit_and_hits_are_local(server, ns):
    calls = []
    with syncmap.connect(server.url) as node, node.map(ns) as m:

        @m.cached(ttl=60)
        def lookup(name: str) -> str | None:
            calls.append(name)
            return None if name == "nobody" else name.upper()

        assert lookup("nobody") is None and lookup("nobody") is None
        assert lookup("ann") == "ANN" and lookup(name="ann") == "ANN"
        assert calls == ["nobody", "ann"]
        hits, misses = m.stats.hits, m.stats.misses
        for _ in range(10):
            assert lookup("ann") == "ANN" and lookup("nobody") is None
        assert m.stats.hits == hits + 20 and m.stats.misses == misses
        assert lookup.__name__ == "lookup" and lookup.__wrapped__ is not None


def test_key_template_and_callable_refresh_and_invalidate(server, ns):
    state = {"n": 0}
    with syncmap.connect(server.url) as node, node.map(ns) as m:

        @m.cached(key="user:{user_id}")
        def user(user_id: int, verbose: bool = False) -> dict:
            state["n"] += 1
            return {"id": user_id, "n": state["n"]}

        @m.cached(key=lambda a, b: f"sum:{a}+{b}")
        def add(a: int, b: int) -> int:
            return a + b

        assert user(7) == {"id": 7, "n": 1} and m["user:7"] == {"id": 7, "n": 1}
        assert user(7, verbose=True) == {"id": 7, "n": 1}  # the template ignores verbose
        assert user.refresh(7) == {"id": 7, "n": 2} and user(7) == {"id": 7, "n": 2}
        assert user.invalidate(7) is True and user.invalidate(7) is False
        assert "user:7" not in m and user(7) == {"id": 7, "n": 3}
        assert add(1, 2) == 3 and m["sum:1+2"] == 3 and add.key(1, 2) == "sum:1+2"

        @m.cached(key="{missing}")
        def broken(x: int) -> int:
            return x

        with pytest.raises(syncmap.InvalidArgument, match="template"):
            broken(1)

        @m.cached(key=lambda x: x)
        def not_str(x: int) -> int:
            return x

        with pytest.raises(syncmap.InvalidArgument, match="not str"):
            not_str(1)


async def test_async_cached(server, ns):
    calls = []
    async with await syncmap.connect_async(server.url) as node, await node.map(ns) as m:

        @m.cached(ttl=60)
        async def fetch(x: int) -> int | None:
            calls.append(x)
            return None if x == 0 else x * 10

        assert await fetch(1) == 10 and await fetch(1) == 10
        assert await fetch(0) is None and await fetch(0) is None
        assert calls == [1, 0]
        assert await fetch.refresh(1) == 10 and calls == [1, 0, 1]
        assert await fetch.invalidate(1) is True and await fetch(1) == 10
        assert calls == [1, 0, 1, 1] and fetch.key(1).endswith("fetch(x=1)")

        def plain(x: int) -> int:
            return x

        with pytest.raises(syncmap.InvalidArgument, match="async def"):
            m.cached()(plain)


class Worker:
    def __init__(self, url: str, name: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(HERE / "cached_worker.py"), url, name],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert self.read() == {"ready": True}

    def send(self, line: str) -> None:
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise AssertionError(f"worker exited with {self.proc.wait(10)}")
        return json.loads(line)

    def ask(self, line: str) -> dict:
        self.send(line)
        return self.read()

    def stop(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(10)
        self.proc.stdout.close()


@pytest.fixture
def workers(server, ns):
    started: list[Worker] = []
    try:
        for _ in range(4):
            started.append(Worker(server.url, ns))
        yield started
    finally:
        for w in started:
            w.stop()


def test_four_processes_load_once_see_invalidation_and_hit_locally(workers, client, ns):
    for w in workers:  # all four ask at once; the loader takes 0.5 s
        w.send("call 7")
    assert [w.read()["out"] for w in workers] == [49] * 4
    assert int(client.get(f"{ns}:loads")) == 1

    before = [w.ask("local 7") for w in workers]
    assert [b["out"] for b in before] == [49] * 4  # in every local copy
    after = [w.ask("call 7") for w in workers]
    assert [a["out"] for a in after] == [49] * 4
    assert [a["misses"] for a in after] == [b["misses"] for b in before]  # local hits
    assert int(client.get(f"{ns}:loads")) == 1

    assert workers[0].ask("invalidate 7")["out"] is True
    for w in workers:
        wait_until(lambda w=w: w.ask("local 7")["out"] == "missing", 5, what="invalidation")
    assert workers[1].ask("call 7")["out"] == 49
    assert int(client.get(f"{ns}:loads")) == 2
    client.delete(f"{ns}:loads")


def test_early_refresh_keeps_a_hot_key_from_expiring(server, ns):
    """With early_refresh, a key read steadily for more than twice its TTL is recomputed in
    the background before it expires: after the first call, no caller runs the function.
    (A read concurrent with a refresh's write may go to the server once: the map reserves a
    key while it is written: docs/contract.md §3.)"""
    calls = []
    with syncmap.connect(server.url) as node, node.map(ns) as m:

        @m.cached(ttl=2.0, early_refresh=4.0)
        def slow(x: int) -> dict:
            calls.append(threading.current_thread().name)
            time.sleep(0.05)  # delta: XFetch refreshes earlier for slower functions
            return {"x": x, "n": len(calls)}

        assert slow(1) == {"x": 1, "n": 1}
        stored = m[slow.key(1)]
        assert stored[0] == {"x": 1, "n": 1} and len(stored) == 3  # [value, expiry, delta]
        misses = m.stats.misses
        end = time.monotonic() + 4.5  # more than twice the TTL
        while time.monotonic() < end:
            assert slow(1)["x"] == 1
            time.sleep(0.005)
        assert len(calls) >= 3  # refreshed at least twice ...
        assert all(name.startswith("syncmap-early-refresh") for name in calls[1:])  # ... there
        assert m.stats.misses - misses <= len(calls) - 1

        with pytest.raises(syncmap.InvalidArgument, match="ttl"):
            m.cached(early_refresh=1.0)
        with pytest.raises(syncmap.InvalidArgument):
            m.cached(ttl=1, early_refresh=0)


async def test_early_refresh_async(server, ns):
    calls = []
    async with await syncmap.connect_async(server.url) as node, await node.map(ns) as m:

        @m.cached(ttl=1.0, early_refresh=4.0)
        async def slow(x: int) -> int:
            calls.append(asyncio.current_task().get_name())
            await asyncio.sleep(0.05)
            return x * 2

        assert await slow(4) == 8
        end = time.monotonic() + 2.5
        while time.monotonic() < end:
            assert await slow(4) == 8
            await asyncio.sleep(0.005)
        assert len(calls) >= 3
        assert all(name.startswith("syncmap-early-refresh") for name in calls[1:])
