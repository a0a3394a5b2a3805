"""The coherence state machine (``syncmap._core.coherence``) driven by scripted events: no
server, an injected clock. Each test names the contract rule it pins down."""

from __future__ import annotations

import contextlib
import threading

import pytest

from syncmap._core.coherence import ABSENT, Coherence, Entry, Placeholder, parse_change
from syncmap._core.hooks import new_hooks
from syncmap._local import SafeHashMap


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class CountingStore(SafeHashMap):
    """A SafeHashMap that counts every call the coherence state makes of it."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def get(self, *a):
        self.calls += 1
        return super().get(*a)

    def delete_if(self, *a):
        self.calls += 1
        return super().delete_if(*a)

    def clear(self):
        self.calls += 1
        return super().clear()


def msg(epoch: str, seq: int, key: str = "k", op: str = "S") -> bytes:
    return f"SM1 {epoch} {seq} {op} {key}".encode()


def synced(store=None, epoch="E", seq=10) -> tuple[Coherence, Clock]:
    clock = Clock()
    hooks = new_hooks(threading.Event, threading.Event)
    st = Coherence(
        store or SafeHashMap(), clock, contextlib.nullcontext(), 1.0, probe_timeout=3, hooks=hooks
    )
    st.on_subscribed()
    token = st.start_probe()
    st.probe_read(token, epoch, seq)
    st.on_pong(token)
    assert st.synced and st.applied == seq and st.is_fresh()
    return st, clock


def fill(st: Coherence, key: str, value, version: int) -> bool:
    ph = st.begin_fill(key)
    return st.finish_fill(key, ph, value, version, st.epoch)


def test_parse_change():
    c = parse_change(b"SM1 abc 12 S some key with spaces")
    assert (c.epoch, c.seq, c.op, c.key) == ("abc", 12, "S", "some key with spaces")
    assert parse_change(b"hello") is None
    for bad in (b"SM1 e x S k", b"SM1 e 1 Q k", b"SM1 e 1", b"SM1  1 S k", b"SM1 e 1 S \xff"):
        with pytest.raises(ValueError):
            parse_change(bad)


def test_invalidation_drops_only_older_entries():
    st, _ = synced()
    assert fill(st, "k", "v", 10)
    st.on_message(msg("E", 11, "other"))
    assert st.store.get("k").value == "v"
    st.on_message(msg("E", 12, "k"))
    assert st.store.get("k") is None
    assert fill(st, "k", "v2", 12)
    st.on_message(msg("E", 13, "k"))
    assert st.store.get("k") is None


def test_own_write_newer_than_message_survives():
    """Read-your-writes: an entry installed at the write's seq is not dropped by messages
    for older seqs still in flight."""
    st, _ = synced()
    assert fill(st, "k", "mine", 12)  # our write got seq 12; messages 11 and 12 still coming
    st.on_message(msg("E", 11, "k"))
    st.on_message(msg("E", 12, "k"))
    assert st.store.get("k").value == "mine"


def test_placeholder_blocks_a_fill_older_than_a_seen_change():
    """No fill race: the fetch read at seq 10; a change of k at seq 11 arrives before the
    install: the value is not installed."""
    st, _ = synced()
    ph = st.begin_fill("k")
    st.on_message(msg("E", 11, "k"))
    assert not st.finish_fill("k", ph, "old", 10, "E")
    assert st.store.get("k") is None
    ph = st.begin_fill("k")
    st.on_message(msg("E", 12, "k"))
    assert st.finish_fill("k", ph, "newer", 12, "E")  # read after that change: fine
    assert st.store.get("k").value == "newer"


def test_a_write_installs_over_an_older_read_that_shared_its_placeholder():
    """Read-your-writes with two threads of one node on one key (e.g. ``watch()`` reading
    while the main thread writes): both reserve the key with the same placeholder; the read
    (seq 10) installs before the write's reply (seq 11) is handled and before the write's own
    change message arrived. The write's value still replaces the read's older one. The
    other order: the older read does not replace the write's value."""
    st, _ = synced()
    read_ph = st.begin_fill("k")
    write_ph = st.begin_fill("k")
    assert st.finish_fill("k", read_ph, "old", 10, "E")
    assert st.finish_fill("k", write_ph, "mine", 11, "E")
    assert st.store.get("k").value == "mine" and st.store.get("k").version == 11
    st.on_message(msg("E", 11, "k"))  # the write's own message: nothing newer
    read_ph = st.begin_fill("k")
    write_ph = st.begin_fill("k")
    assert st.finish_fill("k", write_ph, "mine2", 13, "E")
    assert not st.finish_fill("k", read_ph, "old2", 12, "E")
    assert st.store.get("k").value == "mine2"


def test_a_fill_does_not_install_into_another_fills_placeholder():
    """A placeholder put there after this fill's own was dropped has not seen the changes
    made in between (the key was not in the copy): only its own fill may install into it."""
    st, _ = synced()
    first = st.begin_fill("k")
    st.on_message(msg("E", 11, "k"))  # marks first: its fill (seq 10) will not install
    assert not st.finish_fill("k", first, "old", 10, "E")
    assert st.store.get("k") is None
    slow = st.begin_fill("k")  # a fill that began with no placeholder there
    st.store.delete_if("k", lambda e: e is slow)  # e.g. evicted (LRU) while in flight
    st.on_message(msg("E", 12, "k"))  # not in the copy: not recorded anywhere
    later = st.begin_fill("k")
    assert later is not slow
    assert not st.finish_fill("k", slow, "stale", 11, "E")
    assert st.store.get("k") is later
    assert st.finish_fill("k", later, "new", 12, "E")
    assert st.store.get("k").value == "new"


def test_fill_guard_off_installs_phantoms():
    st, _ = synced()
    st.hooks.fill_guard = False
    ph = st.begin_fill("k")
    st.on_message(msg("E", 11, "k"))
    assert st.finish_fill("k", ph, "old", 10, "E")  # the race the placeholder prevents


@pytest.mark.parametrize(
    ("event", "cause"),
    [
        (msg("E", 12), "gap"),
        (msg("E", 10), "seq_regress"),
        (msg("F", 11), "epoch"),
        (b"SM1 E eleven S k", "malformed"),
    ],
)
def test_lost_or_odd_messages_drop_the_copy_before_the_next_read(event, cause):
    st, _ = synced()
    assert fill(st, "k", "v", 10)
    st.on_message(event)
    assert not st.is_fresh() and not st.synced  # no local read is served from here on
    assert st.store.get("k") is None and st.resync_causes == {cause: 1}
    assert st.begin_fill("k") is None  # and nothing is installed until a new base


def test_garbage_is_skipped():
    st, _ = synced()
    assert fill(st, "k", "v", 10)
    st.on_message(b"not ours")
    assert st.synced and st.skipped == 1 and st.store.get("k").value == "v"


def test_resubscribe_and_disconnect_drop_the_copy():
    st, _ = synced()
    fill(st, "k", "v", 10)
    st.on_subscribed()
    assert st.resync_causes == {"resubscribe": 1} and len(st.store) == 0
    st, _ = synced()
    fill(st, "k", "v", 10)
    st.on_disconnect()
    assert st.resync_causes == {"disconnect": 1} and len(st.store) == 0


def test_probe_proves_freshness_and_catches_silent_loss():
    st, clock = synced()
    clock.now += 0.9
    assert st.is_fresh()
    clock.now += 0.2
    assert not st.is_fresh()  # bounded staleness: no proof for > max_staleness
    t0 = clock.now
    token = st.start_probe()
    st.probe_read(token, "E", 10)
    clock.now += 0.05
    st.on_pong(token)
    assert st.verified_at == t0 and st.is_fresh()
    # a change was made (seq 11) but its message never came: the probe's PONG shows it
    token = st.start_probe()
    st.probe_read(token, "E", 11)
    st.on_pong(token)
    assert st.resync_causes == {"gap": 1} and not st.is_fresh()


def test_probe_sees_lost_data():
    st, _ = synced()
    token = st.start_probe()
    st.probe_read(token, None, 0)  # meta gone: FLUSHALL or a restart without persistence
    st.on_pong(token)
    assert st.resync_causes == {"epoch": 1}


def test_resync_base_accounts_for_changes_during_the_probe():
    st, _ = synced()
    st.on_subscribed()
    token = st.start_probe()
    st.on_message(msg("E", 5))  # before the read: ignored
    st.probe_read(token, "E", 20)
    st.on_message(msg("E", 19))  # published before the read, delivered after it
    st.on_message(msg("E", 21))
    st.on_message(msg("E", 22))
    st.on_pong(token)
    assert st.synced and st.applied == 22
    st.on_message(msg("E", 23))
    assert st.synced and st.applied == 23


def test_resync_probe_with_a_hole_tries_again():
    st, _ = synced()
    st.on_subscribed()
    token = st.start_probe()
    st.probe_read(token, "E", 20)
    st.on_message(msg("E", 22))  # 21 missing
    st.on_pong(token)
    assert not st.synced and st.probe_token is None


def test_first_change_of_an_empty_map_is_adopted():
    st, _ = synced(epoch=None, seq=0)
    assert fill(st, "k", ABSENT, 0)
    st.on_message(msg("NEW", 1))
    assert st.synced and st.epoch == "NEW" and st.store.get("k") is None


def test_epoch_in_a_reply_drops_the_copy():
    st, _ = synced()
    ph = st.begin_fill("k")
    assert not st.finish_fill("k", ph, "v", 3, "OTHER")
    assert st.resync_causes == {"epoch": 1}


def test_invalidation_cost_does_not_depend_on_local_size():
    small, large = CountingStore(), CountingStore()
    for store, n in ((small, 10), (large, 50_000)):
        st, _ = synced(store)
        for i in range(n):
            fill(st, f"k{i}", i, 10)
        store.calls = 0
        for seq in range(11, 111):
            st.on_message(msg("E", seq, f"k{seq}"))
        store.per_message = store.calls / 100
    assert small.per_message == large.per_message <= 2


def test_clear_message_empties_and_fails_fills_in_flight():
    st, _ = synced()
    fill(st, "a", 1, 10)
    ph = st.begin_fill("b")
    st.on_message(msg("E", 11, "", "C"))
    assert len(st.store) == 0
    assert not st.finish_fill("b", ph, 2, 11, "E")
    assert isinstance(Placeholder(0), Placeholder) and Entry(1, 1).version == 1


def vmsg(epoch: str, seq: int, key: str, payload: bytes) -> bytes:
    k = key.encode()
    return f"SM1 {epoch} {seq} V {len(k)} ".encode() + k + payload


def test_parse_change_with_a_value():
    c = parse_change(vmsg("e", 7, "a key", b'{"x": 1} tail'))
    assert (c.epoch, c.seq, c.op, c.key, c.value) == ("e", 7, "S", "a key", b'{"x": 1} tail')
    assert parse_change(vmsg("e", 7, "k", b"")).value == b""
    assert parse_change(msg("e", 7)).value is None
    for bad in (b"SM1 e 1 V x k", b"SM1 e 1 V 9 k", b"SM1 e 1 V k"):
        with pytest.raises(ValueError):
            parse_change(bad)


def test_carried_values_update_only_entries_already_there():
    """Push values: an older entry takes the carried value (no fetch on the next read); a key
    that is not cached stays out; own newer entries and placeholders keep their rules."""
    import json

    st, _ = synced()
    st.decode = json.loads
    assert fill(st, "k", "v", 10)
    st.on_message(vmsg("E", 11, "k", b'"v11"'))
    assert st.store.get("k").value == "v11" and st.store.get("k").version == 11
    st.on_message(vmsg("E", 12, "absent", b'"x"'))
    assert st.store.get("absent") is None  # never adds a key
    assert fill(st, "mine", "own", 14)  # own write at seq 14; an older message arrives
    st.on_message(vmsg("E", 13, "mine", b'"older"'))
    st.on_message(vmsg("E", 14, "mine", b'"own"'))
    assert st.store.get("mine").value == "own" and st.store.get("mine").version == 14
    ph = st.begin_fill("p")  # fill race: the carried value only marks the placeholder
    st.on_message(vmsg("E", 15, "p", b'"new"'))
    assert not st.finish_fill("p", ph, "old", 14, "E") and st.store.get("p") is None
    st.on_message(msg("E", 16, "k", "D"))  # a delete: the entry becomes a cached miss
    assert st.store.get("k").value is ABSENT and st.store.get("k").version == 16
    st.on_message(vmsg("E", 17, "k", b"not json"))  # undecodable: dropped, not kept stale
    assert st.store.get("k") is None and st.synced
    st.on_message(vmsg("E", 19, "k", b'"gap"'))  # the gap rule holds for carried values too
    assert not st.synced and st.resync_causes == {"gap": 1} and len(st.store) == 0
