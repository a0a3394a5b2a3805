"""A small Celery app for tests/test_celery.py: it makes a syncmap node and a map when it is
imported, and reads the key there. ``celery -A celery_app worker --pool prefork`` imports it
in the worker's main process, which then forks the pool's processes: each inherits the node
and the map, as a user's task module's would be.

Settings come from the environment: ``CELERY_TEST_URL`` (the server: the map's, the broker's
and the result backend's), ``CELERY_TEST_MAP`` (the map's name), ``CELERY_TEST_KEY`` (the key
read), ``CELERY_TEST_STALENESS`` (the map's ``max_staleness``) and ``CELERY_TEST_QUEUE`` (the
queue the worker consumes).

Tasks (run in the pool's processes; each answers a dict with the process's ``pid``):
``celery_app.read`` reads the key once (``hold`` then holds its process that many seconds, so
that concurrent tasks spread over the processes) and answers the value and the map's stats;
``celery_app.write`` writes a key; ``celery_app.load`` is ``get_or_load`` with a loader that
counts its runs on the server (in ``<key>:loads``) and holds its process 0.5 s.

A remote control command, ``syncmap_main``, runs in the worker's main process (the one that
made the node and forked the pool): it reads the key ``reads`` times and answers what that
served, the map's stats and whether the node's listener thread is alive.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

import redis
from celery import Celery
from celery.worker.control import inspect_command

import syncmap
from prefork_harness import map_stats

URL = os.environ["CELERY_TEST_URL"]
KEY = os.environ["CELERY_TEST_KEY"]
MAIN_PID = os.getpid()

app = Celery("celery_app", broker=URL, backend=URL)
app.conf.update(
    task_default_queue=os.environ["CELERY_TEST_QUEUE"],
    broker_connection_retry_on_startup=True,
    worker_prefetch_multiplier=1,
    worker_hijack_root_logger=False,
    result_expires=300,
)

node = syncmap.connect(URL)
shared = node.map(
    os.environ["CELERY_TEST_MAP"], max_staleness=float(os.environ["CELERY_TEST_STALENESS"])
)
PRELOADED = shared.get(KEY)  # the main process reads before forking: its local copy holds it


@app.task(name="celery_app.read")
def read(hold: float = 0.0) -> dict[str, Any]:
    value = shared.get(KEY)
    answer = {"pid": os.getpid(), "main": MAIN_PID, "value": value, **map_stats(shared)}
    if hold:
        time.sleep(min(hold, 0.1))
    return answer


@app.task(name="celery_app.write")
def write(key: str, value: Any) -> dict[str, Any]:
    shared[key] = value
    return {"pid": os.getpid()}


def _load(key: str) -> str:
    with redis.Redis.from_url(URL) as r:
        r.incr(f"{key}:loads")
    time.sleep(0.5)
    return f"loaded-by-{os.getpid()}"


@app.task(name="celery_app.load")
def load(key: str) -> dict[str, Any]:
    return {"pid": os.getpid(), "value": shared.get_or_load(key, lambda: _load(key))}


@inspect_command(args=[("reads", int)])
def syncmap_main(state: Any, reads: int = 200) -> dict[str, Any]:
    """In the worker's main process: ``reads`` reads of the key, and what they served."""
    before = shared.stats
    values = [shared.get(KEY) for _ in range(reads)]
    after = shared.stats
    return {
        "pid": os.getpid(),
        "main": MAIN_PID,
        "preloaded": PRELOADED,
        "values": sorted({repr(v) for v in values}),
        "value": values[-1],
        "hits": after.hits - before.hits,
        "misses": after.misses - before.misses,
        "resync_causes": dict(after.resync_causes),
        "invalidations": after.invalidations,
        "listeners": sorted(
            t.name for t in threading.enumerate() if t.name.startswith("syncmap-listener")
        ),
    }
