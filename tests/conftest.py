from __future__ import annotations

import itertools
import os
import re
import uuid

import pytest

from servers import ServerProcess

_counter = itertools.count()


@pytest.fixture(scope="session")
def server():
    """One real server shared by the session; tests separate themselves by key namespace."""
    srv = ServerProcess().start()
    yield srv
    srv.stop()


@pytest.fixture
def fresh_server():
    """A server of this test's own, for tests that kill, pause or restart it."""
    srv = ServerProcess().start()
    yield srv
    srv.stop()


@pytest.fixture
def ns(request) -> str:
    """A key namespace unique to this test (use it as a prefix of every name). Characters
    other than letters, digits and ``_.:-`` in the test's name (a parametrized test's
    ``[...]``: glob patterns in KEYS/SCAN) become ``_``."""
    name = re.sub(r"[^A-Za-z0-9_.:-]", "_", request.node.name[:40])
    return f"t{next(_counter)}-{uuid.uuid4().hex[:8]}-{name}"


@pytest.fixture
def client(server):
    c = server.client()
    yield c
    c.close()


@pytest.fixture
def embedded_dir(tmp_path, monkeypatch):
    """Point the embedded-server state folder at a private temp dir; stop it afterwards."""
    folder = tmp_path / "embedded"
    folder.mkdir()
    monkeypatch.setenv("SYNCMAP_EMBEDDED_DIR", str(folder))
    monkeypatch.delenv("SYNCMAP_URL", raising=False)
    yield folder
    from syncmap._embedded import stop_embedded

    stop_embedded()


def pytest_configure(config):
    os.environ.setdefault("PYTHONHASHSEED", "0")
