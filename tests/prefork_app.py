"""A small WSGI app for tests/test_prefork.py: it makes a node and a map when it is imported
(gunicorn ``--preload`` imports it in the master, before forking the workers) and reads the
map on every request.

Settings come from the environment: ``PREFORK_URL`` (the server), ``PREFORK_MAP`` (the map's
name), ``PREFORK_KEY`` (the key read), ``PREFORK_STALENESS`` (the map's ``max_staleness``)
and ``PREFORK_REPORT`` (where the master writes its report when gunicorn stops, see
:func:`master_report`; tests/prefork_gunicorn.py calls it from gunicorn's ``on_exit`` hook).

Endpoints (JSON): ``/read`` reads the key once (``?hold=S`` then holds the worker S seconds,
so that concurrent requests spread over the workers) and returns the worker's pid, the value
and the map's stats; ``/load?key=K`` is ``get_or_load(K)`` with a loader that counts its runs
on the server (in ``K:loads``) and holds its worker 0.5 s; ``/health`` answers without
reading.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import parse_qs

import redis

import syncmap
from prefork_harness import map_stats

URL = os.environ["PREFORK_URL"]
KEY = os.environ["PREFORK_KEY"]
MASTER_PID = os.getpid()

node = syncmap.connect(URL)
shared = node.map(os.environ["PREFORK_MAP"], max_staleness=float(os.environ["PREFORK_STALENESS"]))
PRELOADED = shared.get(KEY)  # the master reads before forking: its local copy holds the key

StartResponse = Callable[[str, list[tuple[str, str]]], Any]


def _load(key: str) -> str:
    with redis.Redis.from_url(URL) as r:
        r.incr(f"{key}:loads")
    time.sleep(0.5)
    return f"loaded-by-{os.getpid()}"


def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
    path = environ.get("PATH_INFO", "/")
    if path == "/health":
        body: dict[str, Any] = {"pid": os.getpid(), "master": MASTER_PID}
    elif path == "/read":
        value = shared.get(KEY)
        body = {"pid": os.getpid(), "master": MASTER_PID, "value": value, **map_stats(shared)}
        hold = parse_qs(environ.get("QUERY_STRING", "")).get("hold")
        if hold:
            time.sleep(min(float(hold[0]), 0.1))
    elif path == "/load":
        key = parse_qs(environ.get("QUERY_STRING", ""))["key"][0]
        body = {"pid": os.getpid(), "value": shared.get_or_load(key, lambda: _load(key))}
    else:
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"not found\n"]
    data = json.dumps(body).encode()
    start_response("200 OK", [("Content-Type", "application/json")])
    return [data]


def master_report(reads: int = 200) -> None:
    """In the master, once the workers are gone: ``reads`` reads of the key, and what they
    served (the last value, hits and misses over them, the stats), written to
    ``PREFORK_REPORT`` as JSON."""
    if os.getpid() != MASTER_PID:
        return
    before = shared.stats
    values = [shared.get(KEY) for _ in range(reads)]
    after = shared.stats
    report = {
        "pid": os.getpid(),
        "preloaded": PRELOADED,
        "value": values[-1],
        "values": sorted({json.dumps(v) for v in values}),
        "hits": after.hits - before.hits,
        "misses": after.misses - before.misses,
        "resyncs": after.resyncs,
        "resync_causes": after.resync_causes,
        "invalidations": after.invalidations,
    }
    path = os.environ["PREFORK_REPORT"]
    with open(f"{path}.tmp", "w") as f:
        json.dump(report, f)
    os.replace(f"{path}.tmp", path)
