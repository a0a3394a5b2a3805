"""What the prefork tests check of every worker's local copy, whatever server forks the
workers (gunicorn in tests/gunicorn_harness.py, a Celery worker's prefork pool in
tests/test_celery.py): concurrent traffic spread over the workers, the latest answer of each
kept; the hit ratio after warm-up; another node's write served by every worker within
``max_staleness``.

An answer (a worker's reply to one read) is a dict with at least the worker's ``pid``, the
``value`` read and the map's stats ``hits``, ``misses`` and ``invalidations``
(:func:`map_stats`).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Collection
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from servers import wait_until

WORKERS = 3

Answer = dict[str, Any]


def map_stats(m: Any) -> Answer:
    """The stats of the map ``m`` that an answer carries."""
    stats = m.stats
    return {
        "hits": stats.hits,
        "misses": stats.misses,
        "resyncs": stats.resyncs,
        "resync_causes": dict(stats.resync_causes),
        "invalidations": stats.invalidations,
    }


def reads(answer: Answer) -> int:
    return int(answer["hits"] + answer["misses"])


class Traffic:
    """Bursts of concurrent reads (``request()`` sends one and returns its answer; 6 client
    threads; a read should hold its worker a few ms, so that the workers share the load),
    the latest answer of each worker kept. ``log_tail()`` tells what the server logged (for
    failure messages)."""

    def __init__(
        self,
        request: Callable[[], Answer],
        log_tail: Callable[[], str] = str,
        burst_size: int = 30,
    ) -> None:
        self.request = request
        self.log_tail = log_tail
        self.burst_size = burst_size
        self.pool = ThreadPoolExecutor(6)
        self.lock = threading.Lock()
        self.latest: dict[int, Answer] = {}
        self.answers: list[tuple[float, Answer]] = []  # (sent at, answer)

    def burst(self) -> list[tuple[float, Answer]]:
        def one(_: int) -> tuple[float, Answer]:
            sent = time.monotonic()
            return sent, self.request()

        got = list(self.pool.map(one, range(self.burst_size)))
        with self.lock:
            for _sent, answer in got:  # (a worker's answers may come back out of order)
                known = self.latest.get(answer["pid"])
                if known is None or reads(answer) > reads(known):
                    self.latest[answer["pid"]] = answer
            self.answers += got
        return got

    def until(self, predicate: Callable[[Traffic], bool], timeout: float, what: str) -> None:
        """Bursts until ``predicate(self)`` holds; fail after ``timeout`` seconds."""
        wait_until(lambda: self.burst() and predicate(self), timeout, interval=0, what=what)

    def forget(self, pid: int) -> None:
        """The worker ``pid`` is gone (killed): no longer one of the workers checked."""
        with self.lock:
            self.latest.pop(pid, None)

    def warm_up(self, workers: Collection[int] | None = None) -> dict[int, Answer]:
        """Traffic until every worker has answered at least 5 times (``WORKERS`` distinct
        ones; or each of ``workers``, pids), then 0.5 s more; the latest answer of each
        worker (the base of :meth:`check_hit_ratios`)."""

        def warm(t: Traffic) -> bool:
            pids = t.latest if workers is None else workers
            return (workers is not None or len(t.latest) == WORKERS) and all(
                pid in t.latest and reads(t.latest[pid]) >= 5 for pid in pids
            )

        self.until(warm, timeout=60, what=f"{WORKERS} distinct workers to answer")
        warm_end = time.monotonic() + 0.5
        while time.monotonic() < warm_end:
            self.burst()
        return {pid: dict(a) for pid, a in self.latest.items()}

    def check_hit_ratios(self, base: dict[int, Answer], min_reads: int = 50) -> None:
        """Every worker of ``base`` (and no other) served at least 90% of its reads since
        ``base`` from its local copy, over at least ``min_reads`` reads each."""

        def reads_since(pid: int) -> int:
            return reads(self.latest[pid]) - reads(base[pid])

        self.until(
            lambda t: all(reads_since(pid) >= min_reads for pid in base),
            timeout=60,
            what=f"{min_reads} reads in every worker after warm-up",
        )
        assert set(self.latest) == set(base), "a worker was replaced (crashed?)"
        for pid, a in self.latest.items():
            ratio = (a["hits"] - base[pid]["hits"]) / reads_since(pid)
            assert ratio >= 0.9, (
                f"worker {pid}: hit ratio {ratio:.0%} after warm-up ({a}); "
                f"server log:\n{self.log_tail()}"
            )

    def wait_every_worker_serves(self, value: Any, acked: float, staleness: float) -> None:
        """Traffic until every worker has served ``value`` (written by another node, its
        write acknowledged at ``acked``, a ``time.monotonic()``); no worker may serve another
        value to a request sent more than ``staleness`` seconds after ``acked``."""
        seen: set[int] = set()
        checked = len(self.answers)

        def all_seen(t: Traffic) -> bool:
            nonlocal checked
            for sent, a in t.answers[checked:]:
                if a["value"] == value:
                    seen.add(a["pid"])
                else:
                    assert sent <= acked + staleness, (
                        f"worker {a['pid']} served {a['value']!r} more than "
                        f"max_staleness={staleness}s after {value!r} was written"
                    )
            checked = len(t.answers)
            return seen >= set(t.latest)

        self.until(all_seen, timeout=staleness + 20, what=f"every worker to serve {value!r}")

    def check_writes_seen(
        self,
        write: Callable[[Any], object],
        values: list[Any],
        staleness: float,
        base: dict[int, Answer],
    ) -> None:
        """Each of ``values`` written in turn by another node (``write(value)``) is served by
        every worker (by ``staleness`` at the latest); the workers keep their hit ratios
        since ``base`` (see :meth:`check_hit_ratios`) and each has heard invalidations."""
        for value in values:
            write(value)
            self.wait_every_worker_serves(value, time.monotonic(), staleness)
        self.check_hit_ratios(base)
        for pid, a in self.latest.items():
            assert a["invalidations"] > base[pid]["invalidations"], f"worker {pid}: {a}"

    def close(self) -> None:
        self.pool.shutdown()
