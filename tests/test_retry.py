"""Retry strategies (values, fresh state per use) and the lock core's retry pacing, no server."""

from __future__ import annotations

import math
from itertools import islice

import pytest

from syncmap import (
    ExponentialBackoff,
    InvalidArgument,
    LimitRetry,
    LinearBackoff,
    NoRetry,
)
from syncmap._core.lock import LockKeys, LockState, acquire_flow
from syncmap._core.ops import Command, Script, Sleep


def test_no_retry_is_empty():
    assert list(NoRetry()) == []


def test_linear_backoff_repeats_its_interval():
    assert list(islice(LinearBackoff(0.05), 4)) == [0.05] * 4


def test_exponential_backoff_doubles_from_4ms_within_bounds():
    assert list(islice(ExponentialBackoff(0, 10), 5)) == [0.004, 0.008, 0.016, 0.032, 0.064]
    assert list(islice(ExponentialBackoff(0.01, 0.05), 6)) == [0.01, 0.01, 0.016, 0.032, 0.05, 0.05]


def test_limit_retry_caps_the_count_and_each_use_starts_fresh():
    strategy = LimitRetry(ExponentialBackoff(0, 1), 3)
    assert list(strategy) == [0.004, 0.008, 0.016]
    assert list(strategy) == [0.004, 0.008, 0.016]  # fresh state per attempt sequence


def test_a_plain_list_is_a_strategy():
    assert list(LimitRetry([0.1, 0.2, 0.3], 2)) == [0.1, 0.2]


@pytest.mark.parametrize(
    "make",
    [
        lambda: LinearBackoff(-1),
        lambda: LinearBackoff(math.nan),
        lambda: LinearBackoff("1"),  # type: ignore[arg-type]
        lambda: LinearBackoff(True),  # type: ignore[arg-type]
        lambda: ExponentialBackoff(0.5, 0.1),
        lambda: ExponentialBackoff(0, math.inf),
        lambda: LimitRetry(NoRetry(), -1),
        lambda: LimitRetry(NoRetry(), 1.5),  # type: ignore[arg-type]
        lambda: LimitRetry("abc", 2),  # type: ignore[arg-type]
    ],
)
def test_bad_strategy_arguments_are_typed_errors(make):
    with pytest.raises(InvalidArgument):
        make()


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def run_scripted(flow, answer):
    """Drive a flow by hand: ``answer(op)`` returns the server's reply; returns (ops, result)."""
    ops = []
    try:
        op = next(flow)
        while True:
            ops.append(op)
            op = flow.send(answer(op))
    except StopIteration as stop:
        return ops, stop.value


def busy(op):
    """The lock stays taken: scripts answer "not yours" (nil), waits time out."""
    if isinstance(op, Script):
        return (None, None) if op.then else None
    return None


def waits_of(ops):
    """The BLPOPs sent, alone or behind a script."""
    return [
        op.args if isinstance(op, Command) else op.then
        for op in ops
        if isinstance(op, Command) or op.then
    ]


def test_acquire_makes_one_attempt_per_backoff_then_a_last_try():
    state = LockState(LockKeys(("job",)), 1000, "")
    flow = acquire_flow(state, "tok", iter(LimitRetry(LinearBackoff(0.01), 3)), None, FakeClock())
    ops, got = run_scripted(flow, busy)
    assert got is False and state.token is None
    scripts = [op for op in ops if isinstance(op, Script)]
    # the first wait found the lock taken: later attempts queue and wait in one write
    assert [s.args[3] for s in scripts] == ["wait", "queue", "queue", "try"]
    assert [s.then is not None for s in scripts] == [False, True, True, False]
    waits = waits_of(ops)
    assert [w[0] for w in waits] == ["BLPOP"] * 3
    assert all(w[2] == "0.010" for w in waits)
    assert not any(s.idempotent for s in scripts if s.then)  # (its retry could push twice)


def test_a_contended_lock_queues_and_waits_in_one_write_until_it_finds_the_lock_free():
    state = LockState(LockKeys(("job",)), 1000, "")
    ops, got = run_scripted(
        acquire_flow(state, "t1", iter(LinearBackoff(1.0)), None, FakeClock()),
        lambda op: None if isinstance(op, Script) else [b"w", b"4"],
    )
    assert got is True and state.fence == 4 and state.contended
    state.forget("t1")
    # contended: one op, the script with BLPOP behind it; handed over while queued
    ops, got = run_scripted(
        acquire_flow(state, "t2", iter(LinearBackoff(1.0)), None, FakeClock()),
        lambda op: (None, [b"w", b"5"]),
    )
    assert got is True and state.fence == 5 and state.contended
    assert len(ops) == 1 and ops[0].args[3] == "queue" and ops[0].then[0] == "BLPOP"
    state.forget("t2")
    # the lock was free: taken at once (the script pushed the fence the BLPOP returns), and
    # the next acquire starts plainly again
    ops, got = run_scripted(
        acquire_flow(state, "t3", iter(LinearBackoff(1.0)), None, FakeClock()),
        lambda op: (6, [b"w", b"6"]),
    )
    assert got is True and state.fence == 6 and not state.contended
    state.forget("t3")
    ops, _ = run_scripted(
        acquire_flow(state, "t4", iter(LinearBackoff(1.0)), None, FakeClock()), lambda op: 7
    )
    assert len(ops) == 1 and ops[0].args[3] == "wait" and ops[0].then is None


def test_acquire_waits_no_longer_than_the_deadline():
    clock = FakeClock()
    state = LockState(LockKeys(("job",)), 1000, "")
    flow = acquire_flow(state, "tok", iter(LinearBackoff(5.0)), clock.now + 0.3, clock)

    def answer(op):
        if isinstance(op, Command):
            clock.now += float(op.args[2])
        return busy(op)

    ops, got = run_scripted(flow, answer)
    assert got is False
    assert [op.args[2] for op in ops if isinstance(op, Command)] == ["0.300"]
    assert ops[-1].args[3] == "try"  # a last attempt at the deadline, not registered


def test_a_wake_up_carries_the_fence_and_ends_the_wait():
    state = LockState(LockKeys(("job",)), 1000, "meta")
    flow = acquire_flow(state, "tok", iter(LinearBackoff(1.0)), None, FakeClock())
    ops, got = run_scripted(flow, lambda op: None if isinstance(op, Script) else [b"k", b"7"])
    assert got is True and state.fence == 7 and state.value == "tokmeta"
    assert len(ops) == 2


def test_zero_backoff_ends_retries_like_redislock():
    state = LockState(LockKeys(("{o}a", "{o}b")), 1000, "")
    flow = acquire_flow(state, "tok", iter([0.02, 0.0, 0.5]), None, FakeClock())
    ops, got = run_scripted(flow, lambda op: [] if isinstance(op, Script) else None)
    assert got is False
    assert [type(op) for op in ops] == [Script, Sleep, Script]
