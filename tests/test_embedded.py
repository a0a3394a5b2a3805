"""The embedded Valkey: found and shared by processes that start together."""

import subprocess
import sys

import pytest

import syncmap
from syncmap._embedded import find_embedded, stop_embedded

_CHILD = """
import syncmap, sys
node = syncmap.connect()
node.client.incr("starters")
print(node.address)
"""


@pytest.mark.slow
def test_processes_starting_together_share_one_server(embedded_dir):
    assert find_embedded() is None
    procs = [
        subprocess.Popen([sys.executable, "-c", _CHILD], stdout=subprocess.PIPE, text=True)
        for _ in range(6)
    ]
    outs = [p.communicate(timeout=60)[0].strip() for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert len(set(outs)) == 1, outs
    info = find_embedded()
    assert info is not None and str(info.port) in outs[0]
    with syncmap.connect() as node:
        assert int(node.client.get("starters")) == 6
        assert node.client.config_get("save")["save"] == ""
        assert node.client.config_get("appendonly")["appendonly"] == "no"
    supervisors = list(embedded_dir.glob("server.json"))
    assert len(supervisors) == 1


def test_stop_embedded(embedded_dir):
    with syncmap.connect() as node:
        assert node.ping()
    assert find_embedded() is not None
    assert stop_embedded() is True
    assert find_embedded() is None
    assert stop_embedded() is False


@pytest.mark.slow
def test_idle_server_stops_itself(embedded_dir, monkeypatch):
    from servers import wait_until

    monkeypatch.setenv("SYNCMAP_EMBEDDED_IDLE", "0.5")
    node = syncmap.connect()
    node.ping()
    info = find_embedded()
    assert info is not None
    node.close()
    wait_until(lambda: find_embedded() is None, timeout=15, what="idle shutdown")
