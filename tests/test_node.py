import pytest
import redis

import syncmap
from servers import free_port


@pytest.mark.parametrize(
    "url",
    [
        "",
        "http://localhost:6379",
        "redis://localhost:notaport",
        "redis://:6379",
        "unix://",
        "redis://localhost:6379/abc",
    ],
)
def test_malformed_url_is_typed(url):
    with pytest.raises(syncmap.InvalidURL):
        syncmap.connect(url)


def test_password_not_echoed_in_errors():
    with pytest.raises(syncmap.InvalidURL) as info:
        syncmap.connect("ftp://user:hunter2@localhost:1/0")
    assert "hunter2" not in str(info.value)


def test_unreachable_server_names_address():
    port = free_port()
    with pytest.raises(syncmap.ServerUnavailable) as info:
        syncmap.connect(f"redis://127.0.0.1:{port}/0")
    assert f"127.0.0.1:{port}" in str(info.value)
    assert info.value.__cause__ is not None  # the redis-py error is kept as the cause


def test_connect_by_url(server):
    with syncmap.connect(server.url) as node:
        assert node.ping()
        assert str(server.port) in node.address


def test_connect_by_env(server, monkeypatch):
    monkeypatch.setenv("SYNCMAP_URL", server.url)
    with syncmap.connect() as node:
        assert str(server.port) in node.address


def test_valkey_scheme(server):
    with syncmap.connect(f"valkey://127.0.0.1:{server.port}") as node:
        assert node.ping()


def test_connect_ready_client(server):
    client = redis.Redis(host="127.0.0.1", port=server.port)
    node = syncmap.connect(client)
    assert node.client is client
    node.close()


def test_acl_user_and_password(fresh_server):
    with fresh_server.client() as c:
        c.execute_command("ACL", "SETUSER", "app", "on", ">s3cret", "~*", "&*", "+@all")
    with syncmap.connect(f"redis://app:s3cret@127.0.0.1:{fresh_server.port}/0") as node:
        assert node.ping()
    with pytest.raises(syncmap.ServerUnavailable) as info:
        syncmap.connect(f"redis://app:wrong@127.0.0.1:{fresh_server.port}/0")
    assert "s3cret" not in str(info.value) and "wrong" not in str(info.value)


async def test_connect_async(server):
    node = await syncmap.connect_async(server.url)
    assert await node.ping()
    await node.close()


async def test_connect_async_unreachable():
    port = free_port()
    with pytest.raises(syncmap.ServerUnavailable, match=str(port)):
        await syncmap.connect_async(f"redis://127.0.0.1:{port}/0")
