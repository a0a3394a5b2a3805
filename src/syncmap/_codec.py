"""Value codecs: JSON (default), msgpack, raw bytes; pickle only when asked for by name.

A codec turns a Python value into bytes for the server and back. Encoding failures become
:class:`~syncmap.SerializationError` *before* anything is sent; decoding failures become
:class:`~syncmap.CorruptData`.
"""

from __future__ import annotations

import json
import pickle
from typing import Any, Protocol, runtime_checkable

import msgpack

from ._errors import CorruptData, InvalidArgument, SerializationError

__all__ = ["BytesCodec", "Codec", "JSONCodec", "MsgpackCodec", "PickleCodec", "get_codec"]


@runtime_checkable
class Codec(Protocol):
    """What a map needs from a codec. Write your own by implementing these three members.
    Optionally, ``counters = "json"`` (or ``"msgpack"``) says the codec stores ints as that
    format does, so ``incr`` runs on the server (else it is a compare-and-set loop)."""

    name: str

    def encode(self, value: Any) -> bytes: ...

    def decode(self, data: bytes) -> Any: ...


class JSONCodec:
    """UTF-8 JSON: strings, numbers, bools, None, lists and str-keyed dicts. The default."""

    name = "json"

    def __init__(self) -> None:
        self._encoder = json.JSONEncoder(
            ensure_ascii=False, allow_nan=False, separators=(",", ":"), check_circular=True
        )
        self._scan = json.JSONDecoder().raw_decode  # what json.loads uses, minus its checks

    def encode(self, value: Any) -> bytes:
        if value.__class__ is int:  # (the common counter: what json writes, ~10x cheaper)
            return b"%d" % value
        try:
            return self._encoder.encode(value).encode("utf-8")
        except (TypeError, ValueError, RecursionError) as exc:
            raise SerializationError(
                f"cannot encode {type(value).__name__} as JSON: {exc}"
            ) from None

    def decode(self, data: bytes) -> Any:
        # The fast path: UTF-8 text holding one JSON document and nothing else (all this codec
        # writes), scanned directly; several times cheaper than json.loads(bytes), which
        # sniffs the encoding and checks for whitespace around the document. Anything else
        # (whitespace around it, a BOM, UTF-16, invalid JSON) gets json.loads' own verdict.
        try:
            text = data.decode("utf-8")
            value, end = self._scan(text)
            if end == len(text):
                return value
        except ValueError:  # (UnicodeDecodeError and JSONDecodeError are ValueErrors)
            pass
        try:
            return json.loads(data)
        except ValueError as exc:
            raise CorruptData(f"stored value is not valid JSON: {exc}") from None


class MsgpackCodec:
    """msgpack: compact and fast; also carries bytes. Tuples come back as lists."""

    name = "msgpack"

    def encode(self, value: Any) -> bytes:
        try:
            data: bytes = msgpack.packb(value, use_bin_type=True)
        except (TypeError, ValueError, OverflowError) as exc:
            raise SerializationError(
                f"cannot encode {type(value).__name__} as msgpack: {exc}"
            ) from None
        return data

    def decode(self, data: bytes) -> Any:
        try:
            return msgpack.unpackb(data, raw=False, strict_map_key=False)
        except Exception as exc:
            raise CorruptData(f"stored value is not valid msgpack: {exc}") from None


class BytesCodec:
    """Raw bytes in, raw bytes out (``str`` is encoded as UTF-8)."""

    name = "bytes"

    def encode(self, value: Any) -> bytes:
        if isinstance(value, bytes | bytearray | memoryview):
            return bytes(value)
        if isinstance(value, str):
            return value.encode("utf-8")
        raise SerializationError(f"the bytes codec takes bytes or str, not {type(value).__name__}")

    def decode(self, data: bytes) -> Any:
        return bytes(data)


class PickleCodec:
    """pickle. Unsafe with untrusted servers: anyone who can write to the server can run code
    in every node. Only used when asked for by name (``codec="pickle"``)."""

    name = "pickle"

    def encode(self, value: Any) -> bytes:
        try:
            return pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as exc:
            raise SerializationError(f"cannot pickle {type(value).__name__}: {exc}") from None

    def decode(self, data: bytes) -> Any:
        try:
            return pickle.loads(data)
        except Exception as exc:
            raise CorruptData(f"stored value is not a valid pickle: {exc}") from None


_BY_NAME: dict[str, type[Codec]] = {
    "json": JSONCodec,
    "msgpack": MsgpackCodec,
    "bytes": BytesCodec,
    "pickle": PickleCodec,
}


def get_codec(codec: str | Codec | None) -> Codec:
    """Resolve ``None`` (JSON), a codec name, or a codec object."""
    if codec is None:
        return JSONCodec()
    if isinstance(codec, str):
        try:
            return _BY_NAME[codec]()
        except KeyError:
            raise InvalidArgument(
                f"unknown codec {codec!r}; choose one of {sorted(_BY_NAME)} or pass a Codec"
            ) from None
    if isinstance(codec, Codec):
        return codec
    raise InvalidArgument(f"codec must be a name or a Codec object, not {type(codec).__name__}")
