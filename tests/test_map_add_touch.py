# ruff: noqa: F811  (the ``maps`` fixture is imported)
"""SyncMap's add, touch and incr(create=False) against a real Valkey: atomic on the server,
seen by every node (each is a write with its own change message), on both maps."""

from __future__ import annotations

import pytest

import syncmap
from servers import wait_until
from test_map_support import maps  # noqa: F401 (fixture)

LONG = 60.0  # only change messages can make the other node's copy change


def record_key(name: str, key: str) -> str:
    return f"syncmap:{{{name}}}:v:{key}"


def test_add_writes_only_if_absent(maps, server, ns, client):
    m = maps(server.url, ns)
    assert m.add("k", {"v": 1}) is True
    assert m.add("k", {"v": 2}) is False
    assert m.get("k") == {"v": 1} and m.get("k", fresh=True) == {"v": 1}
    assert m.add("t", 1, ttl=30) is True
    assert 0 < client.pttl(record_key(ns, "t")) <= 30_000
    assert client.pttl(record_key(ns, "k")) == -1
    with pytest.raises(syncmap.InvalidArgument):
        m.add("bad", 1, ttl=-1)
    assert m.get("bad", "absent", fresh=True) == "absent"


def test_touch_sets_the_expiry_and_tells_every_node(maps, server, ns, client):
    a = maps(server.url, ns, max_staleness=LONG)
    b = maps(server.url, ns, max_staleness=LONG)
    assert a.touch("missing", 10) is False
    a.set("k", [1, 2])
    assert b.get("k") == [1, 2]  # cached in b
    before = b.stats.invalidations
    assert a.touch("k", 30) is True
    assert 0 < client.pttl(record_key(ns, "k")) <= 30_000
    wait_until(lambda: b.stats.invalidations > before, 5, what="b saw the touch")
    assert b.get("k") == [1, 2] and a.get("k") == [1, 2]
    assert a.touch("k", None) is True  # no default TTL on this map: no expiry
    assert client.pttl(record_key(ns, "k")) == -1
    assert a.touch("k", 0.2) is True
    wait_until(lambda: b.get("k", "gone") == "gone", 5, what="the shortened TTL to expire in b")
    assert a.get("k", "gone") == "gone"


def test_incr_without_create(maps, server, ns):
    m = maps(server.url, ns)
    with pytest.raises(KeyError):
        m.incr("n", 1, create=False)
    assert m.get("n", "absent", fresh=True) == "absent"
    m.set("n", 5)
    assert m.incr("n", 2, create=False) == 7 and m.incr("n", -10, create=False) == -3


def test_incr_without_create_generic_codec(server, ns):
    with syncmap.connect(server.url) as node, node.map(ns, codec="pickle") as m:
        with pytest.raises(KeyError):
            m.incr("n", create=False)
        m.set("n", 1)
        assert m.incr("n", 2, create=False) == 3 and m.get("n") == 3
