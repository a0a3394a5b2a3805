import pytest

import syncmap
from syncmap._codec import get_codec


@pytest.mark.parametrize("name", ["json", "msgpack", "pickle"])
def test_round_trip(name):
    codec = get_codec(name)
    value = {"a": [1, 2.5, "x", None, True], "b": {"c": "é"}}
    assert codec.decode(codec.encode(value)) == value


def test_default_is_json():
    assert get_codec(None).name == "json"


def test_bytes_codec():
    codec = get_codec("bytes")
    assert codec.decode(codec.encode(b"\x00\xff")) == b"\x00\xff"
    assert codec.encode("é") == "é".encode()
    with pytest.raises(syncmap.SerializationError):
        codec.encode(3)


@pytest.mark.parametrize("name", ["json", "msgpack"])
def test_unserializable_is_typed(name):
    with pytest.raises(syncmap.SerializationError) as info:
        get_codec(name).encode({"x": object()})
    assert isinstance(info.value, TypeError)
    assert isinstance(info.value, syncmap.SyncMapError)


def test_json_rejects_nan():
    with pytest.raises(syncmap.SerializationError):
        get_codec("json").encode(float("nan"))


@pytest.mark.parametrize("name", ["json", "msgpack", "pickle"])
def test_garbage_decodes_to_corrupt_data(name):
    with pytest.raises(syncmap.CorruptData):
        get_codec(name).decode(b"\xc1\xff not a value")


def test_unknown_codec_name():
    with pytest.raises(syncmap.InvalidArgument, match="unknown codec"):
        get_codec("yaml")
    with pytest.raises(syncmap.InvalidArgument):
        get_codec(42)  # type: ignore[arg-type]


def test_error_tree_does_not_shadow_builtins():
    names = set(syncmap.__all__)
    assert not names & {"TimeoutError", "ConnectionError", "KeyError", "ValueError"}
    for name in names:
        obj = getattr(syncmap, name)
        if isinstance(obj, type) and issubclass(obj, Exception):
            assert issubclass(obj, syncmap.SyncMapError)


def test_all_is_sorted():
    assert list(syncmap.__all__) == sorted(syncmap.__all__)


@pytest.mark.parametrize("value", [0, -1, 7, 10**30, -(10**30), True, False, 1.5, "12"])
def test_json_encodes_numbers_exactly_as_json_does(value):
    import json

    codec = get_codec("json")
    assert codec.encode(value) == json.dumps(value).encode()
    assert codec.decode(codec.encode(value)) == value
    assert type(codec.decode(codec.encode(value))) is type(value)


JSON_CORPUS = [
    b"12345", b"-7", b"1.5e3", b'"h\\u00e9"', "\"é\"".encode(), b"[1,[2,{}]]", b'{"a":null}',
    b"true", b"null", b" 5", b"5 ", b"\n[1]\t", "\ufeff[1]".encode(), "[1]".encode("utf-16"),
    "\"x\"".encode("utf-32"), b"0123", b"1 2", b"[1]]", b"{}x", b"", b" ", b"NaN", b"Infinity",
    b"[1,]", b"'a'", b"\xff", b'"\xc3"', b"01", b"-", b"1.", b'{"a":1,"a":2}',
]  # fmt: skip


@pytest.mark.parametrize("data", JSON_CORPUS)
def test_json_decode_gives_json_loads_verdict(data):
    """The fast path (one UTF-8 document, scanned directly) must agree with json.loads on
    every input: the same value, or CorruptData where json.loads raises."""
    import json

    codec = get_codec("json")
    try:
        expected = json.loads(data)
    except ValueError:
        with pytest.raises(syncmap.CorruptData):
            codec.decode(data)
    else:
        got = codec.decode(data)
        assert got == expected or (got != got and expected != expected)  # (NaN)
        assert type(got) is type(expected)
