"""The distributed lock's decisions, without I/O: key layout, argument checks, and flows.

Wire format (compatible with Go's bsm/redislock on the same key):

* the lock key is the user's name as given; its value is ``token + metadata``, where the token
  is 22 characters of base64url (16 random bytes, unpadded), set with ``PX <ttl>``;
* release/refresh/TTL compare the *whole* value, as redislock's scripts do, so either side can
  see, respect and (knowing the value) release the other's locks. A key set by redislock blocks
  a syncmap waiter, and a syncmap lock is released by redislock's ``release.lua`` run verbatim.

Companion keys, all in the lock key's hash slot (``{tag}`` = the key's hash tag):

* ``syncmap:fence:{tag}:<name>`` HASH: ``n`` = fencing counter, bumped by every syncmap
  acquisition (so every holder's :attr:`fence` is larger than all earlier ones; the key has no
  TTL, because a counter that expired would restart), ``released`` = the last release's
  acquisition, as ``"<token> <fence>"`` (makes a retried release idempotent when its first
  answer was lost);
* ``syncmap:lockq:{tag}:<name>`` ZSET: the waiter queue (token -> arrival order);
* ``syncmap:lockw:{tag}:<name>:<token>`` string: one waiter's registration (``ttl value``),
  expiring with the waiter's lifetime (``PX``): a queued token without one is a dead waiter;
* ``syncmap:lockwake:{tag}:<name>:<token>`` LIST: one waiter's wake-up list.

Fairness and wake-up: a waiter registers in the queue (with a short lifetime it renews every
poll) and blocks on its own wake list. A release hands the lock *directly* to the first live
waiter (sets its value and TTL, bumps the fence) and pushes the fence onto that waiter's list,
so the hand-off needs no further round trip and newcomers cannot barge past queued waiters.
A waiter whose wake-up went missing finds the lock handed to it (or free) at its next poll, so
a missed wake-up costs at most one poll interval. A waiter that died stays registered for at
most ``poll interval + REGISTRATION_SLACK``; a lock handed to it in that window is held until
its TTL, like a lock whose holder died.

Flows (generators of :mod:`~syncmap._core.ops`) are run by the sync and asyncio shells in
``syncmap._lock``; the clock is injected.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from .._errors import InvalidArgument, LockNotHeld, ServerError, ServerUnavailable, TooLarge
from .keys import PREFIX, hash_tag, validate_name
from .ops import Command, Flow, Script, Sleep
from .replies import PTTL_NOT_HELD, AcquireReply, ReleaseStatus
from .validate import check_seconds

__all__ = [
    "MAX_METADATA_BYTES",
    "TOKEN_LENGTH",
    "LockKeys",
    "LockState",
    "acquire_flow",
    "check_metadata",
    "check_names",
    "check_token",
    "check_timeout",
    "check_ttl",
    "leave_flow",
    "locked_flow",
    "new_token",
    "owned_flow",
    "pttl_flow",
    "refresh_flow",
    "release_flow",
    "watchdog_flow",
]

MAX_METADATA_BYTES = 64 * 1024
TOKEN_LENGTH = 22
MAX_TTL_MS = 10 * 365 * 24 * 3600 * 1000
REGISTRATION_SLACK_MS = 500
"""How long past its planned poll a waiter stays registered (then it is taken for gone)."""

Clock = Callable[[], float]


def new_token() -> str:
    """redislock's token: 16 random bytes, base64url without padding (22 characters)."""
    return secrets.token_urlsafe(16)


# -- argument checks (all before anything is sent) --------------------------------------------


def check_ttl(ttl: object, what: str = "ttl") -> int:
    """A TTL in seconds (> 0, at most :data:`MAX_TTL_MS`) as whole milliseconds."""
    return math.ceil(check_seconds(ttl, what, high=MAX_TTL_MS / 1000) * 1000)


MIN_TOKEN_CHARS = 8
MAX_TOKEN_BYTES = 256


def check_token(token: object) -> str | None:
    """A caller's own token (redislock's ``Token`` option), or ``None`` for a random one.

    As in redislock, a lock whose value *starts with* the token counts as its holder's, so a
    token must not be the start of another holder's: at least 8 characters keeps it from
    matching a random token by chance (1 in 64**8), and two callers' own tokens must not be
    prefixes of one another ("worker-1" and "worker-10")."""
    if token is None:
        return None
    if not isinstance(token, str):
        raise InvalidArgument(f"token must be a str or None, not {type(token).__name__}")
    size = len(token.encode("utf-8", "surrogatepass"))
    if len(token) < MIN_TOKEN_CHARS or size > MAX_TOKEN_BYTES:
        raise InvalidArgument(
            f"token must be {MIN_TOKEN_CHARS} characters to {MAX_TOKEN_BYTES} bytes, not {token!r}"
        )
    return token


def check_metadata(metadata: object) -> str:
    if not isinstance(metadata, str):
        raise InvalidArgument(f"metadata must be a str, not {type(metadata).__name__}")
    size = len(metadata.encode("utf-8", "surrogatepass"))
    if size > MAX_METADATA_BYTES:
        raise TooLarge(f"metadata is {size} bytes; the limit is {MAX_METADATA_BYTES}")
    return metadata


def check_timeout(blocking: object, timeout: object) -> float | None:
    """``threading.Lock.acquire``'s rules: seconds to wait, or ``None`` for ever."""
    if not isinstance(blocking, bool):
        raise InvalidArgument(f"blocking must be a bool, not {type(blocking).__name__}")
    seconds = check_seconds(
        timeout, "timeout", low=-1, low_ok=True, expected="-1 or a finite number >= 0"
    )
    if seconds == -1:
        return None if blocking else 0.0
    if not blocking:
        raise InvalidArgument("can't specify a timeout for a non-blocking call")
    if seconds < 0:
        raise InvalidArgument(f"timeout must be -1 or a finite number >= 0, not {timeout!r}")
    return seconds


def check_names(names: object) -> tuple[str, ...]:
    """Lock names for a multi-key lock: unique, at least one, all in one hash slot."""
    if isinstance(names, str | bytes) or not isinstance(names, Sequence):
        raise InvalidArgument(f"keys must be a list of str, not {type(names).__name__}")
    checked = tuple(validate_name(n, "lock name") for n in names)
    if not checked:
        raise InvalidArgument("keys must not be empty")
    if len(set(checked)) != len(checked):
        raise InvalidArgument("keys must not repeat")
    tags = {hash_tag(n) for n in checked}
    if len(tags) > 1:
        raise InvalidArgument(
            "keys of one multi-key lock must share a hash tag (e.g. '{order:42}:a', "
            f"'{{order:42}}:b'), so one atomic script can take them; got tags {sorted(tags)}"
        )
    return checked


# -- key layout --------------------------------------------------------------------------------


class LockKeys:
    """Every server key of one lock (one or several names sharing a hash slot)."""

    __slots__ = (
        "multi_keys",
        "names",
        "registration_prefixes",
        "release_prefixes",
        "script_keys",
        "wake_prefixes",
    )

    def __init__(self, names: tuple[str, ...]) -> None:
        self.names = names
        script: list[str] = []
        multi: list[str] = []
        wakes: list[str] = []
        registrations: list[str] = []
        release: list[str] = []  # lock_release.lua's per-lock ARGV: wake, registration prefix
        for name in names:
            tag = hash_tag(name)
            fence = f"{PREFIX}:fence:{{{tag}}}:{name}"
            script += [name, fence, f"{PREFIX}:lockq:{{{tag}}}:{name}"]
            multi += [name, fence]
            wakes.append(f"{PREFIX}:lockwake:{{{tag}}}:{name}:")
            registrations.append(f"{PREFIX}:lockw:{{{tag}}}:{name}:")
            release += wakes[-1:] + registrations[-1:]
        self.script_keys = tuple(script)
        self.multi_keys = tuple(multi)
        self.wake_prefixes = tuple(wakes)
        self.registration_prefixes = tuple(registrations)
        self.release_prefixes = tuple(release)

    def wake(self, token: str) -> str:
        return self.wake_prefixes[0] + token

    def registration(self, token: str) -> str:
        return self.registration_prefixes[0] + token


# -- state -------------------------------------------------------------------------------------


class LockState:
    """What one lock object knows: its keys and options, and the current acquisition."""

    __slots__ = ("contended", "fences", "keys", "metadata", "token", "ttl_ms", "value")

    def __init__(self, keys: LockKeys, ttl_ms: int, metadata: str) -> None:
        self.keys = keys
        self.ttl_ms = ttl_ms
        self.metadata = metadata
        self.token: str | None = None
        self.value: str | None = None
        self.fences: tuple[int, ...] = ()
        # the last blocking acquire had to wait: the next one queues and waits in one write
        self.contended = False

    @property
    def fence(self) -> int | None:
        return self.fences[0] if self.fences else None

    def took(self, token: str, fences: Sequence[Any]) -> None:
        self.token = token
        self.value = token + self.metadata
        self.fences = tuple(map(int, fences))

    def forget(self, token: str) -> None:
        """Drop the acquisition ``token`` (and only it: another may have replaced it)."""
        if self.token == token:
            self.token = self.value = None
            self.fences = ()

    def held(self, action: str) -> tuple[str, str]:
        if self.token is None or self.value is None:
            raise LockNotHeld(f"cannot {action} lock {self.keys.names[0]!r}: it is not held")
        return self.token, self.value


# -- flows -------------------------------------------------------------------------------------


def _next_pause(backoffs: Iterator[float], deadline: float | None, clock: Clock) -> float | None:
    """Seconds to wait before the next attempt, or ``None``: make the last attempt now.

    A zero backoff ends the retries, as in redislock (``NoRetry`` is ``LinearBackoff(0)``).
    """
    pause = next(backoffs, None)
    if pause is None:
        return None
    pause = check_seconds(pause, "backoff", low_ok=True)
    if pause <= 0:
        return None
    if deadline is not None:
        remaining = deadline - clock()
        if remaining <= 0:
            return None
        pause = min(pause, remaining)
    return max(pause, 0.001)


def _blpop(wake: str, pause: float) -> tuple[str, str, str]:
    """The wait on a waiter's wake list, for at most ``pause`` seconds."""
    return ("BLPOP", wake, f"{pause:.3f}")


def acquire_flow(
    state: LockState,
    token: str,
    backoffs: Iterator[float],
    deadline: float | None,
    clock: Clock,
) -> Flow[bool]:
    """Take the lock with ``token``; ``True`` once held, ``False`` when the retries ran out.

    A single-name lock queues fairly and sleeps on its wake list between attempts (at most
    each backoff, until ``deadline``). A multi-key lock takes all names or none, polling.
    """
    if len(state.keys.names) > 1:
        return (yield from _obtain_multi(state, token, backoffs, deadline, clock))
    value = token + state.metadata
    keys = state.keys.script_keys
    wake = state.keys.wake(token)
    registrations = state.keys.registration_prefixes[0]
    pause = _next_pause(backoffs, deadline, clock)
    while True:
        if pause is None:
            args: tuple[Any, ...] = (value, token, state.ttl_ms, "try", 0, registrations)
            got, fence = AcquireReply.parse((yield Script("lock_acquire", (*keys, wake), args)))
            if got:
                state.took(token, (fence,))
            return bool(got)
        lifetime = math.ceil(pause * 1000) + REGISTRATION_SLACK_MS
        queued = state.contended
        args = (value, token, state.ttl_ms, "queue" if queued else "wait", lifetime, registrations)
        if queued:
            # queue and wait in one write: one round trip instead of two (no second send,
            # no second command for the server to read, while the holder is at work)
            raw, woken = yield Script(
                "lock_acquire", (*keys, wake), args, idempotent=False, then=_blpop(wake, pause)
            )
        else:
            raw = yield Script("lock_acquire", (*keys, wake), args)
        got, fence = AcquireReply.parse(raw)
        if got:  # taken at once (a wait sent behind the script popped this same fence)
            state.took(token, (fence,))
            state.contended = False
            return True
        state.contended = True
        if not queued:
            woken = yield Command(_blpop(wake, pause))
        if woken is not None:
            state.took(token, (woken[1],))
            return True
        pause = _next_pause(backoffs, deadline, clock)


def _obtain_multi(
    state: LockState, token: str, backoffs: Iterator[float], deadline: float | None, clock: Clock
) -> Flow[bool]:
    value = token + state.metadata
    while True:
        fences = yield Script(
            "lock_obtain_multi", state.keys.multi_keys, (value, state.ttl_ms, token)
        )
        if fences:
            state.took(token, fences)
            return True
        pause = _next_pause(backoffs, deadline, clock)
        if pause is None:
            return False
        yield Sleep(pause)


def leave_flow(state: LockState, token: str) -> Flow[None]:
    """Clean up after an interrupted acquire: leave the queue, and if the lock was handed to
    ``token`` meanwhile (its caller never learnt so), release it to the next waiter."""
    value = token + state.metadata
    args = (value, token, 0, "leave", 0, state.keys.registration_prefixes[0])
    got, fence = AcquireReply.parse(
        (yield Script("lock_acquire", (*state.keys.script_keys, state.keys.wake(token)), args))
    )
    if got:
        yield Script(
            "lock_release", state.keys.script_keys, _release_args(state, token, fence, value)
        )


def _release_args(state: LockState, token: str, fence: Any, value: str) -> tuple[str, ...]:
    """``lock_release.lua``'s arguments: the value, the acquisition's mark (token and first
    fence: a custom token may be used again, a fence never), the per-lock key prefixes."""
    return (value, f"{token} {fence}", *state.keys.release_prefixes)


def release_flow(state: LockState) -> Flow[None]:
    """Release; the token is forgotten only once the server has answered."""
    token, value = state.held("release")
    answer = yield Script(
        "lock_release", state.keys.script_keys, _release_args(state, token, state.fence, value)
    )
    state.forget(token)
    if answer == ReleaseStatus.NOT_HELD:
        raise LockNotHeld(
            f"lock {state.keys.names[0]!r} was no longer held (it expired or was taken) "
            "when it was released"
        )


def refresh_flow(state: LockState, ttl_ms: int | None = None) -> Flow[None]:
    _, value = state.held("refresh")
    ttl_ms = state.ttl_ms if ttl_ms is None else ttl_ms
    ok = yield Script("lock_refresh", state.keys.names, (value, ttl_ms))
    if not ok:
        raise LockNotHeld(f"cannot refresh lock {state.keys.names[0]!r}: it is no longer held")
    state.ttl_ms = ttl_ms


def pttl_flow(state: LockState) -> Flow[int]:
    """Remaining TTL in ms (the shortest of the names); :data:`PTTL_NOT_HELD` when not held."""
    if state.value is None:
        return PTTL_NOT_HELD
    answer = yield Script("lock_pttl", state.keys.names, (state.value,))
    return int(answer)


def owned_flow(state: LockState) -> Flow[bool]:
    return (yield from pttl_flow(state)) != PTTL_NOT_HELD


def locked_flow(state: LockState) -> Flow[bool]:
    """Whether anyone (any process, redislock too) holds the lock."""
    count = yield Command(("EXISTS", *state.keys.names))
    return int(count) > 0


def watchdog_flow(state: LockState, token: str, clock: Clock, max_hold: float | None) -> Flow[bool]:
    """Renew the acquisition ``token`` every TTL/3 while it lasts; ``True`` if it was lost.

    Lost means: a renewal found it gone, renewals failed until the lease ran out, or it
    reached ``max_hold`` (the last renewal is trimmed to expire right then). Returns ``False``
    as soon as the acquisition was released (the caller's wait is woken for that).
    """
    start = clock()
    lease_end = start + state.ttl_ms / 1000
    hold_end = math.inf if max_hold is None else start + max_hold
    while True:
        if lease_end >= hold_end:
            yield Sleep(max(0.0, lease_end - clock()))
            return state.token == token
        yield Sleep(state.ttl_ms / 3000)
        if state.token != token or state.value is None:
            return False
        now = clock()
        ttl_ms = state.ttl_ms
        if hold_end != math.inf:
            ttl_ms = max(1, min(ttl_ms, math.ceil((hold_end - now) * 1000)))
        try:
            ok = yield Script("lock_refresh", state.keys.names, (state.value, ttl_ms))
        except (ServerUnavailable, ServerError):
            ok = None
        if state.token != token:
            return False
        if ok == 0:
            return True
        if ok:
            lease_end = now + ttl_ms / 1000
        elif clock() >= lease_end:
            return True
