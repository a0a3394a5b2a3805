"""The test Django project (tests/djproject) served by a real gunicorn with ``--preload`` and 3
sync workers, its cache ``syncmap.django.SyncMapCache`` on this test's Valkey. The app reads
the cache while it loads (djproject.wsgi), so the master has a node and a map before it forks.

Every worker serves ``cache.get`` from its local copy (hit ratio >= 90% after warm-up), never
the value the master cached before the fork, and sees a ``cache.set`` made by another process
(this one, through its own SyncMapCache) within ``max_staleness``; ``get_or_set`` asked by
every worker at once runs its callable once.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "djproject.settings")

import django

django.setup()

import syncmap.django  # noqa: E402
from gunicorn_harness import Gunicorn, Traffic, check_single_flight  # noqa: E402
from syncmap.django import SyncMapCache  # noqa: E402

pytestmark = pytest.mark.slow

STALENESS = 2.0  # the project's max_staleness, s
KEY = "greeting"


@pytest.fixture
def gunicorn(server, ns, tmp_path) -> Iterator[Gunicorn]:
    """gunicorn ``--preload`` serving djproject.wsgi (not started yet)."""
    env = {
        "DJANGO_SETTINGS_MODULE": "djproject.settings",
        "DJPROJECT_CACHE_URL": server.url,
        "DJPROJECT_CACHE_MAP": ns,
        "DJPROJECT_MAX_STALENESS": str(STALENESS),
        "DJPROJECT_PRELOAD_KEY": KEY,
    }
    g = Gunicorn(
        "djproject.wsgi:application", env, tmp_path, preload=True, health="/worker/health/"
    )
    try:
        yield g
    finally:
        g.stop()


@pytest.fixture
def writer(server, ns) -> Iterator[SyncMapCache]:
    """The same cache in this process (another Django process of the same site)."""
    cache = SyncMapCache(server.url, {"OPTIONS": {"name": ns, "max_staleness": STALENESS}})
    try:
        yield cache
    finally:
        syncmap.django.close_all()


def test_every_gunicorn_worker_is_a_near_cache_of_the_django_cache(gunicorn, writer, client, ns):
    writer.set(KEY, "v0")  # what the master reads while it loads the app, before the fork
    gunicorn.start()
    gunicorn.wait_ready()
    writer.set(KEY, "v1")  # after the fork: what every worker must serve from now on
    traffic = Traffic(gunicorn, f"/worker/{KEY}/?hold=0.002")  # (holds its worker 2 ms)
    try:
        base = traffic.warm_up()
        stale = [a for _, a in traffic.answers if a["value"] != "v1"]
        assert not stale, f"a worker served the value cached before the fork: {stale[:3]}"
        assert gunicorn.proc is not None
        assert {a["loaded_by"] for a in base.values()} == {gunicorn.proc.pid}  # (--preload)

        # hit ratio per worker after warm-up: >= 90%, over >= 50 reads each
        traffic.check_hit_ratios(base)

        # another process's cache.set: every worker serves it within max_staleness
        traffic.check_writes_seen(
            lambda value: writer.set(KEY, value), ["v2", {"price": 3}, "v4"], STALENESS, base
        )
    finally:
        traffic.close()

    # get_or_set asked by every worker at once (the loader sleeps 0.5 s, holding the first
    # worker; 6 requests): the loader runs once (it counts its runs on the server)
    hot = f"{ns}-hot"
    answers = check_single_flight(gunicorn, f"/load/{hot}/?sleep=0.5", client, f"{hot}:loads")
    assert {a["pid"] for a in answers} == set(base)
    assert answers[0]["value"].startswith("loaded-")

    code = gunicorn.stop()
    assert code == 0, f"gunicorn exited with {code}:\n{gunicorn.log_tail()}"
