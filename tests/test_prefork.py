"""SyncMap in a real prefork server: gunicorn ``--preload`` with 3 sync workers, serving
tests/prefork_app.py, which makes its node and map at import time in the master (and reads
the key there) before gunicorn forks the workers; and the same without ``--preload``, where
each worker imports the app and makes its own node.

Every worker must serve the map from its local copy (hit ratio >= 90% after warm-up), see
another node's writes (this test's), and run a ``get_or_load`` loader asked by all of them at
once only once; with ``--preload``, no worker serves the value the master cached before the
fork once it was overwritten, and the master keeps its own hits and its listener (it reports
from gunicorn's ``on_exit`` hook, after the workers are gone).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import pytest

import syncmap
from gunicorn_harness import TESTS, Gunicorn, Traffic, check_single_flight

pytestmark = pytest.mark.slow

STALENESS = 2.0  # the app's max_staleness, s
KEY = "greeting"
REPORT = "master.json"  # the master's report (see tests/prefork_app.py), in gunicorn.tmp


@pytest.fixture
def gunicorn(server, ns, tmp_path, request) -> Iterator[Gunicorn]:
    """A gunicorn serving tests/prefork_app.py, not started yet; ``request.param``: with
    ``--preload``."""
    env = {
        "PREFORK_URL": server.url,
        "PREFORK_MAP": ns,
        "PREFORK_KEY": KEY,
        "PREFORK_STALENESS": str(STALENESS),
        "PREFORK_REPORT": str(tmp_path / REPORT),
    }
    g = Gunicorn(
        "prefork_app:app",
        env,
        tmp_path,
        preload=request.param,
        config=TESTS / "prefork_gunicorn.py",
    )
    try:
        yield g
    finally:
        g.stop()  # (workers left by a SIGKILLed master exit when they see their parent change)


@pytest.mark.parametrize("gunicorn", [True, False], ids=["preload", "no-preload"], indirect=True)
def test_the_map_is_a_near_cache_in_every_gunicorn_worker(gunicorn, server, ns, client):
    """With ``--preload`` the map is made in the master and inherited by the workers across
    the fork; without, each worker imports the app and makes its own node."""
    with syncmap.connect(server.url) as node, node.map(ns) as writer:
        writer[KEY] = "v0"  # what the master (--preload; else each worker) reads at import
        gunicorn.start()
        gunicorn.wait_ready()
        writer[KEY] = "v1"  # after the fork: the value every worker must serve from now on
        v1_acked = time.monotonic()
        traffic = Traffic(gunicorn, "/read?hold=0.002")  # (holds its worker 2 ms)
        try:
            base = traffic.warm_up()
            if gunicorn.preload:  # nothing inherited across the fork is trusted
                stale = [a for _, a in traffic.answers if a["value"] != "v1"]
                assert not stale, f"a worker served the value cached before the fork: {stale[:3]}"
                assert {a["master"] for a in traffic.latest.values()} == {gunicorn.proc.pid}
            else:  # each worker made its own node (and may serve v0 until v1's message)
                late = [a for t, a in traffic.answers if t > v1_acked + STALENESS]
                assert all(a["value"] == "v1" for a in late), late[:3]
                assert all(a["master"] == a["pid"] for a in traffic.latest.values())

            # hit ratio per worker after warm-up: >= 90%, over >= 50 reads each
            traffic.check_hit_ratios(base)

            # another node's writes: every worker serves each one (by max_staleness at the
            # latest, per the contract), and keeps serving hits
            traffic.check_writes_seen(
                lambda v: writer.__setitem__(KEY, v), ["v2", "v3", "v4"], STALENESS, base
            )
        finally:
            traffic.close()

        # get_or_load asked by every worker at once: the loader runs once
        hot = f"{ns}-hot"
        check_single_flight(gunicorn, f"/load?key={hot}", client, f"{hot}:loads")

        # the master (the process that preloaded the app and forked): still a near cache
        # with its own listener, and it has seen the last write
        code = gunicorn.stop()
        assert code == 0, f"gunicorn exited with {code}:\n{gunicorn.log_tail()}"
        report = gunicorn.tmp / REPORT
        if not gunicorn.preload:
            assert not report.exists()  # (the master never imported the app)
            return
        assert report.exists(), f"no master report:\n{gunicorn.log_tail()}"
        master = json.loads(report.read_text())
        assert master["preloaded"] == "v0"
        assert master["values"] == [json.dumps("v4")], master
        assert master["hits"] >= 0.9 * (master["hits"] + master["misses"]), master
        assert master["invalidations"] >= 4, master  # v1..v4, heard by its own listener
