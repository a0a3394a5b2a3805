"""Key layout: the one home of every server key name syncmap uses.

Every Lua script touches only keys that share one hash tag, so everything runs unchanged on
Redis Cluster. Lock keys are the user's names as given (wire compatibility with bsm/redislock);
their companion keys reuse the lock key's own hash slot.
"""

from __future__ import annotations

from .._errors import InvalidArgument

__all__ = ["PREFIX", "MapKeys", "hash_tag", "validate_name"]

PREFIX = "syncmap"


def hash_tag(key: str) -> str:
    """The part of ``key`` Redis Cluster hashes: the first non-empty ``{...}``, else the key.

    Raises :class:`InvalidArgument` for a key whose slot no companion key could share
    (a ``}`` with no tag before it would cut a companion's tag short).
    """
    start = key.find("{")
    if start != -1:
        end = key.find("}", start + 1)
        if end > start + 1:
            return key[start + 1 : end]
    if "{" in key or "}" in key:
        raise InvalidArgument(
            f"name {key!r} has braces that do not form a hash tag; use '{{tag}}' or no braces"
        )
    return key


def validate_name(name: object, what: str = "name", max_len: int = 512) -> str:
    """A non-empty ``str`` up to ``max_len`` characters, without NUL or braces-gone-wrong."""
    if not isinstance(name, str):
        raise InvalidArgument(f"{what} must be a str, not {type(name).__name__}")
    if not name:
        raise InvalidArgument(f"{what} must not be empty")
    if len(name) > max_len:
        raise InvalidArgument(f"{what} is {len(name)} characters; the limit is {max_len}")
    if "\x00" in name:
        raise InvalidArgument(f"{what} must not contain NUL")
    hash_tag(name)
    return name


class MapKeys:
    """The server names of one SyncMap. Every name carries the hash tag ``{<map name>}``.

    ``meta`` hash (epoch, seq) · ``record(k)`` one string per entry · ``idx`` zset of live keys
    (score: expiry in ms, or +inf) · ``fences`` hash (guard lock key -> highest fence seen) ·
    ``load(k)`` get_or_load's single-flight lock of one entry · ``channel`` the change channel.
    """

    __slots__ = ("channel", "fences", "idx", "meta", "name", "record_prefix")

    def __init__(self, name: str) -> None:
        validate_name(name, "map name")
        if "{" in name or "}" in name:
            raise InvalidArgument(f"map name {name!r} must not contain braces (it is the hash tag)")
        base = f"{PREFIX}:{{{name}}}"
        self.name = name
        self.meta = f"{base}:meta"
        self.idx = f"{base}:idx"
        self.fences = f"{base}:fences"
        self.channel = f"{base}:ch"
        self.record_prefix = f"{base}:v:"

    def record(self, key: str) -> str:
        return self.record_prefix + key

    def load(self, key: str) -> str:
        return f"{PREFIX}:{{{self.name}}}:load:{key}"
