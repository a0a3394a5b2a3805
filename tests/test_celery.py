"""SyncMap in a real Celery worker with the prefork pool (3 processes), its broker and result
backend on the test's Valkey. tests/celery_app.py makes its node and map at import time, in
the worker's main process, and reads the key there before the worker forks the pool's
processes; its tasks read and write the map in those processes.

Every pool process must serve the map from its own local copy (hit ratio >= 90% after
warm-up), never the value the main process cached before the fork, see another node's writes
(this test's) and a task's write, and run a ``get_or_load`` loader asked by all of them at
once only once. A pool process killed with SIGKILL is replaced by Celery with a new fork of
the main process, which works the same way, and so is each pool process Celery recycles after
``--max-tasks-per-child`` tasks. The main process keeps its own hits, its listener, and sees
every write.
"""

from __future__ import annotations

import contextlib
import gc
import os
import signal
import subprocess
import sys
import time
from collections.abc import Collection, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from celery import Celery

import syncmap
from prefork_harness import WORKERS, Answer, Traffic, reads
from servers import wait_until

pytestmark = pytest.mark.slow

TESTS = Path(__file__).resolve().parent
CHILDREN = WORKERS  # the pool's processes (--concurrency)
STALENESS = 2.0  # the map's max_staleness in the worker, s
KEY = "greeting"


class Worker:
    """A real ``celery worker`` (once :meth:`start` is called) running tests/celery_app.py
    with the prefork pool, in a process group of its own; and a Celery client for it (sends
    tasks by name, gets their results and asks the worker's main process)."""

    def __init__(self, url: str, ns: str, tmp: Path, *options: str) -> None:
        self.hostname = f"{ns}@127.0.0.1"
        self.log = tmp / "celery.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(TESTS), *sys.path]),
            "CELERY_TEST_URL": url,
            "CELERY_TEST_MAP": ns,
            "CELERY_TEST_KEY": KEY,
            "CELERY_TEST_STALENESS": str(STALENESS),
            "CELERY_TEST_QUEUE": ns,
        }
        self.cmd = [
            sys.executable, "-m", "celery", "-A", "celery_app", "worker",
            "--pool", "prefork",
            "--concurrency", str(CHILDREN),
            "-O", "fair",  # a task goes to an idle pool process
            "--hostname", self.hostname,
            "--queues", ns,
            "--without-gossip", "--without-mingle", "--without-heartbeat",
            "--loglevel", "INFO",
            *options,
        ]  # fmt: skip
        self.app = Celery("client", broker=url, backend=url)
        self.app.conf.update(task_default_queue=ns, broker_connection_retry_on_startup=True)

    def start(self) -> None:
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                self.cmd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env=self.env,
                cwd=TESTS,
                start_new_session=True,  # its process group: the main process and the pool
            )

    def log_tail(self) -> str:
        with contextlib.suppress(OSError):
            return self.log.read_text()[-4000:]
        return ""

    def alive(self) -> None:
        assert self.proc is not None, "start() first"
        if self.proc.poll() is not None:
            raise AssertionError(f"celery worker exited:\n{self.log_tail()}")

    def call(self, name: str, *args: Any, timeout: float = 30) -> Answer:
        """Task ``name`` run by the worker; its result."""
        self.alive()
        return dict(self.app.send_task(name, args=args).get(timeout=timeout))

    def control(self, command: str, **arguments: Any) -> Any:
        """``command`` run by the worker's main process (remote control); None if it has
        not answered within 2 s."""
        self.alive()
        replies = self.app.control.broadcast(
            command, arguments=arguments, destination=[self.hostname], reply=True, timeout=2
        )
        for reply in replies or []:
            if self.hostname in reply:
                return reply[self.hostname]
        return None

    def pool(self) -> set[int]:
        """The pids of the pool's processes, as the main process counts them."""
        stats = self.control("stats")
        return set(stats["pool"]["processes"]) if stats else set()

    def wait_pool(self, without: Collection[int] = ()) -> set[int]:
        """Wait until the pool has ``CHILDREN`` processes, none of ``without``; their pids."""
        got: set[int] = set()

        def full() -> bool:
            nonlocal got
            got = self.pool()
            return len(got) == CHILDREN and not got & set(without)

        wait_until(full, timeout=60, interval=0.05, what=f"{CHILDREN} pool processes")
        return got

    def traffic(self) -> Traffic:
        """Reads spread over the pool (each ``celery_app.read`` task holds its process
        10 ms)."""
        return Traffic(lambda: self.call("celery_app.read", 0.01), self.log_tail, burst_size=18)

    def stop(self, timeout: float = 20) -> int | None:
        """SIGTERM (warm shutdown) and up to ``timeout`` seconds for the main process to
        exit, then SIGKILL to whatever is left of the process group; the main process's exit
        code (None: never started)."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)
        # the results' finalizers unsubscribe from the result backend: run them now, while
        # the server is up (later, each would retry its reconnection for many seconds)
        gc.collect()
        self.app.close()
        return self.proc.returncode


def start(worker: Worker, writer: Any) -> tuple[int, set[int]]:
    """``v0`` written, then the worker started (its main process reads ``v0`` at import,
    before the pool forks), then ``v1`` written (after the fork): the pids of the main
    process and of the pool's processes."""
    writer[KEY] = "v0"
    worker.start()
    children = worker.wait_pool()
    writer[KEY] = "v1"
    assert worker.proc is not None
    return worker.proc.pid, children


@pytest.fixture
def worker(server, ns, tmp_path, request) -> Iterator[Worker]:
    """A celery worker for tests/celery_app.py, not started yet; stopped (its whole process
    group) after the test. ``request.param`` (if any): more options of ``celery worker``."""
    w = Worker(server.url, ns, tmp_path, *getattr(request, "param", ()))
    try:
        yield w
    finally:
        w.stop()


def test_the_map_is_a_near_cache_in_every_celery_pool_process(worker, server, ns, client):
    with syncmap.connect(server.url) as node, node.map(ns) as writer:
        main, children = start(worker, writer)
        traffic = worker.traffic()
        try:
            base = traffic.warm_up(children)
            # the map was made in the main process, and nothing inherited across the fork is
            # trusted: each process dropped its copy and serves only what it read since
            stale = [a for _, a in traffic.answers if a["value"] != "v1"]
            assert not stale, f"a pool process served the value cached before the fork: {stale[:3]}"
            for pid, a in base.items():
                assert a["main"] == main, a
                assert a["resync_causes"].get("fork", 0) >= 1, (pid, a)

            # hit ratio per process after warm-up: >= 90%, over >= 50 reads each
            traffic.check_hit_ratios(base)

            # another node's writes: every process serves each one (by max_staleness at the
            # latest, per the contract), heard by its own listener, and keeps serving hits
            traffic.check_writes_seen(
                lambda v: writer.__setitem__(KEY, v), ["v2", "v3", "v4"], STALENESS, base
            )

            # a task's write: the other node (this test's) and every process see it
            written_by = worker.call("celery_app.write", KEY, "v5")["pid"]
            acked = time.monotonic()
            assert written_by in children
            wait_until(
                lambda: writer.get(KEY) == "v5" and writer.get_local(KEY) == "v5",
                STALENESS + 10,
                what="the test's node to serve the task's write",
            )
            traffic.wait_every_worker_serves("v5", acked, STALENESS)

            # get_or_load asked by every process at once: the loader runs once
            hot = f"{ns}-hot"
            with ThreadPoolExecutor(2 * CHILDREN) as pool:
                loaded = list(
                    pool.map(lambda _: worker.call("celery_app.load", hot), range(2 * CHILDREN))
                )
            loads = int(client.get(f"{hot}:loads") or 0)
            assert {a["pid"] for a in loaded} == children, loaded
            assert len({a["value"] for a in loaded}) == 1, loaded
            assert loads == 1, f"the loader ran {loads} times: {loaded}"

            # a pool process killed: Celery forks a new one from the main process, which
            # drops its inherited copy, serves the last value, hits and sees writes
            victim = min(children)
            os.kill(victim, signal.SIGKILL)
            traffic.forget(victim)
            children = worker.wait_pool(without={victim})
            (newcomer,) = children - set(base)
            base = traffic.warm_up(children)
            fresh = [a for _, a in traffic.answers if a["pid"] == newcomer]
            assert all(a["value"] == "v5" for a in fresh), fresh
            assert base[newcomer]["main"] == main, base[newcomer]
            assert base[newcomer]["resync_causes"].get("fork", 0) >= 1, base[newcomer]
            traffic.check_writes_seen(lambda v: writer.__setitem__(KEY, v), ["v6"], STALENESS, base)
        finally:
            traffic.close()

        # the main process (made the node, forked the pool, replaced a process): still a
        # near cache with its own listener, and it has seen every write
        def main_serves_v6() -> Any:
            answer = worker.control("syncmap_main", reads=200)
            return answer if answer and answer["values"] == [repr("v6")] else None

        state = wait_until(main_serves_v6, STALENESS + 10, what="the main process to serve v6")
        assert state["pid"] == main and state["main"] == main, state
        assert state["preloaded"] == "v0", state
        assert state["hits"] >= 0.9 * (state["hits"] + state["misses"]), state
        assert state["invalidations"] >= 6, state  # v1..v6, heard by its own listener
        assert "fork" not in state["resync_causes"], state
        assert state["listeners"], state

        code = worker.stop()
        assert code == 0, f"celery worker exited with {code}:\n{worker.log_tail()}"


RECYCLE = 10  # tasks per pool process (--max-tasks-per-child)


@pytest.mark.parametrize(
    "worker", [("--max-tasks-per-child", str(RECYCLE))], ids=["max-tasks-per-child"], indirect=True
)
def test_pool_processes_recycled_after_max_tasks_per_child_are_near_caches(worker, server, ns):
    """Celery replaces a pool process after ``RECYCLE`` tasks with a new fork of the main
    process: each new one drops its inherited copy, serves hits from its own and sees
    another node's writes."""
    with syncmap.connect(server.url) as node, node.map(ns) as writer:
        main, first = start(worker, writer)
        traffic = worker.traffic()
        try:
            # two generations of processes beyond the first
            traffic.until(
                lambda t: len(set(t.latest) - first) >= 2 * CHILDREN,
                timeout=60,
                what="pool processes to be recycled",
            )
            writer[KEY] = "v2"
            acked = time.monotonic()
            before = set(traffic.latest)
            traffic.until(
                lambda t: (
                    t.answers[-1][0] > acked + STALENESS and len(set(t.latest) - before) >= CHILDREN
                ),
                timeout=STALENESS + 60,
                what="pool processes forked after the write",
            )
        finally:
            traffic.close()
        assert all(a["main"] == main for _, a in traffic.answers)
        stale = [(t, a) for t, a in traffic.answers if a["value"] == "v0"]
        assert not stale, f"a pool process served the value cached before the fork: {stale[:3]}"
        late = [a for t, a in traffic.answers if t > acked + STALENESS and a["value"] != "v2"]
        assert not late, f"served more than max_staleness after v2 was written: {late[:3]}"
        recycled = 0
        for pid in set(traffic.latest) - first:
            mine = sorted((a for _, a in traffic.answers if a["pid"] == pid), key=reads)
            assert mine[0]["resync_causes"].get("fork", 0) >= 1, mine[0]
            if len(mine) < RECYCLE:  # (still running)
                continue
            recycled += 1  # a whole life: its reads after its first, half of them hits at least
            hits, n = mine[-1]["hits"] - mine[0]["hits"], reads(mine[-1]) - reads(mine[0])
            assert hits >= n / 2, f"pool process {pid}: {hits} hits of {n} reads: {mine[-1]}"
        assert recycled >= CHILDREN, traffic.latest
