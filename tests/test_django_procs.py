"""The test Django project (tests/djproject) served by two ``manage.py runserver`` processes
on one Valkey: a write through one is seen by the other within ``max_staleness`` and then
served from its local copy; ``get_or_set`` runs its callable once across both."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from servers import free_port, wait_until

HERE = Path(__file__).resolve().parent
MAX_STALENESS = 2.0


class Site:
    """One ``runserver`` process of the test project."""

    def __init__(self, url: str, map_name: str) -> None:
        self.port = free_port()
        env = dict(
            os.environ,
            DJANGO_SETTINGS_MODULE="djproject.settings",
            DJPROJECT_CACHE_URL=url,
            DJPROJECT_CACHE_MAP=map_name,
            DJPROJECT_MAX_STALENESS=str(MAX_STALENESS),
            PYTHONPATH=os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]),
        )
        self.proc = subprocess.Popen(
            [sys.executable, str(HERE / "djmanage.py"), "runserver", "--noreload",
             f"127.0.0.1:{self.port}"],
            env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )  # fmt: skip
        wait_until(self._up, 30, 0.05, what=f"runserver on port {self.port}")

    def _up(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"runserver exited: {self.proc.stderr.read().decode()[-2000:]}")
        try:
            self.get("/get/ping/")
        except OSError:
            return False
        return True

    def get(self, path: str) -> dict:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=30) as r:
            return json.loads(r.read())

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        self.proc.stderr.close()


@pytest.fixture
def sites(server, ns):
    started: list[Site] = []
    try:
        started.extend([Site(server.url, ns), Site(server.url, ns)])
        yield started
    finally:
        for site in started:
            site.stop()


@pytest.mark.parametrize("style", ["sync", "async"])
def test_a_write_in_one_process_is_seen_by_the_other_then_served_locally(sites, style):
    a, b = sites
    set_, get = ("/set", "/get") if style == "sync" else ("/aset", "/aget")
    a.get(f"{set_}/k/?v=one")
    assert b.get(f"{get}/k/")["value"] == "one"  # fetched from the server, now cached in b
    before = b.get(f"{get}/k/")
    assert before["value"] == "one"
    after = b.get(f"{get}/k/")
    assert (after["hits"], after["misses"]) == (before["hits"] + 1, before["misses"])

    a.get(f"{set_}/k/?v=two")
    wait_until(
        lambda: b.get(f"{get}/k/")["value"] == "two",
        MAX_STALENESS,
        0.01,
        what="b to see a's write within max_staleness",
    )
    before = b.get(f"{get}/k/")
    after = b.get(f"{get}/k/")
    assert after["value"] == "two" and before["value"] == "two"
    assert (after["hits"], after["misses"]) == (before["hits"] + 1, before["misses"])
    assert before["map"] == after["map"]  # (runserver: a thread, a backend instance per request)


def test_get_or_set_runs_its_callable_once_across_processes(sites, client, ns):
    a, b = sites
    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(lambda site: site.get("/load/hot/?sleep=0.5"), [a, b] * 3))
    assert len({answer["value"] for answer in answers}) == 1
    assert answers[0]["value"].startswith("loaded-")
    assert int(client.get("hot:loads")) == 1
    client.delete("hot:loads")
