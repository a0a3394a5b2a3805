"""syncmap.metrics against real Valkey: the Prometheus collector, prometheus_client's
multiprocess mode (worker processes), and the OpenTelemetry instruments (read with the SDK's
in-memory reader) export what the maps and locks of the process count."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from prometheus_client import CollectorRegistry

import syncmap
from servers import wait_until
from syncmap.metrics import OpenTelemetryMetrics, PrometheusCollector

LONG = 60.0


def _traffic(node: syncmap.Node, ns: str, client) -> tuple[syncmap.SyncMap, syncmap.SyncMap]:
    """Two maps of one name: hits, misses, invalidations and one resync (a gap)."""
    a = node.map(ns, max_staleness=LONG)
    b = node.map(ns, max_staleness=LONG)
    a.set("k", 1)
    assert b.get("k") == 1 and b.get("k") == 1 and b.get("absent") is None
    client.hincrby(f"syncmap:{{{ns}}}:meta", "seq", 1)  # the next message skips a seq
    seen = b.stats.invalidations
    a.set("j", 2)
    wait_until(lambda: b.stats.resync_causes.get("gap") == 1, 5, what="b saw the gap")
    assert b.stats.invalidations > seen
    return a, b


def _lock_traffic(node: syncmap.Node, name: str) -> None:
    with node.lock(name, ttl=5):
        pass
    lost = node.lock(name, ttl=0.2)
    assert lost.acquire()
    wait_until(lambda: not lost.locked(), 5, 0.02, what="the lock to expire")
    with pytest.raises(syncmap.LockNotHeld):
        lost.release()


def test_prometheus_collector(server, ns, client):
    reg = CollectorRegistry()
    reg.register(PrometheusCollector())
    value = reg.get_sample_value
    with syncmap.connect(server.url) as node:
        a, b = _traffic(node, ns, client)
        _lock_traffic(node, f"{ns}-lock")
        hits = a.stats.hits + b.stats.hits
        misses = a.stats.misses + b.stats.misses
        assert value("syncmap_map_requests_total", {"map": ns, "result": "hit"}) == hits
        assert value("syncmap_map_requests_total", {"map": ns, "result": "miss"}) == misses
        assert value("syncmap_map_invalidations_total", {"map": ns}) == (
            a.stats.invalidations + b.stats.invalidations
        )
        gaps = a.stats.resync_causes.get("gap", 0) + b.stats.resync_causes["gap"]
        assert value("syncmap_map_resyncs_total", {"map": ns, "cause": "gap"}) == gaps
        assert value("syncmap_map_local_items", {"map": ns}) == (
            a.stats.local_size + b.stats.local_size
        )
        assert 0 <= value("syncmap_map_verified_age_seconds", {"map": ns}) < LONG
        lock = {"lock": f"{ns}-lock"}
        assert value("syncmap_lock_acquisitions_total", lock) == 2
        assert value("syncmap_lock_wait_seconds_count", lock) == 2
        assert value("syncmap_lock_wait_seconds_bucket", {**lock, "le": "+Inf"}) == 2
        assert value("syncmap_lock_wait_seconds_sum", lock) >= 0
        assert value("syncmap_lock_lost_total", lock) == 1
        a.close()  # a closed map's counts stay (counters never go backwards)
        b.close()
        assert value("syncmap_map_requests_total", {"map": ns, "result": "hit"}) == hits
        assert value("syncmap_map_local_items", {"map": ns}) == 0


def test_keys_are_never_labels(server, ns, client):
    reg = CollectorRegistry()
    reg.register(PrometheusCollector())
    with syncmap.connect(server.url) as node, node.map(ns) as m:
        m.set("secret-key-name", 1)
        m.get("secret-key-name")
        from prometheus_client import generate_latest

        text = generate_latest(reg).decode()
        assert ns in text and "secret-key-name" not in text


def test_opentelemetry_instruments(server, ns, client):
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    otel = OpenTelemetryMetrics(provider)
    try:
        with syncmap.connect(server.url) as node:
            a, b = _traffic(node, ns, client)
            _lock_traffic(node, f"{ns}-lock")
            points: dict[str, list] = {}
            for rm in reader.get_metrics_data().resource_metrics:
                for sm in rm.scope_metrics:
                    for metric in sm.metrics:
                        points.setdefault(metric.name, []).extend(metric.data.data_points)

            def point(name: str, **attrs):
                found = [p for p in points[name] if all(p.attributes.get(k) == v
                                                         for k, v in attrs.items())]  # fmt: skip
                assert len(found) == 1, (name, attrs, points.get(name))
                return found[0]

            mine = {"syncmap.map.name": ns}
            assert point("syncmap.map.requests", **mine, **{"syncmap.map.result": "hit"}).value == (
                a.stats.hits + b.stats.hits
            )
            assert point("syncmap.map.requests", **mine, **{"syncmap.map.result": "miss"}).value
            assert point("syncmap.map.invalidations", **mine).value > 0
            cause = {"syncmap.map.resync.cause": "gap"}
            gaps = a.stats.resync_causes.get("gap", 0) + b.stats.resync_causes["gap"]
            assert point("syncmap.map.resyncs", **mine, **cause).value == gaps
            assert point("syncmap.map.items", **mine).value == (
                a.stats.local_size + b.stats.local_size
            )
            assert point("syncmap.map.verified_age", **mine).value < LONG
            lock = {"syncmap.lock.name": f"{ns}-lock"}
            assert point("syncmap.lock.acquisitions", **lock).value == 2
            assert point("syncmap.lock.lost", **lock).value == 1
            wait = point("syncmap.lock.wait.duration", **lock)
            assert wait.count == 2 and wait.sum >= 0
            a.close()
            b.close()
    finally:
        otel.close()
        provider.shutdown()


WORKER = textwrap.dedent(
    """
    import sys
    import syncmap
    from syncmap.metrics import start_multiprocess_export

    url, name = sys.argv[1], sys.argv[2]
    start_multiprocess_export(interval=60)  # at the worker's start (gunicorn: post_fork)
    with syncmap.connect(url) as node, node.map(name) as m:
        m.set("k", 1)
        for _ in range(10):
            assert m.get("k") == 1
        with node.lock(name + "-lock", ttl=5):
            pass
        start_multiprocess_export()  # copies now (the test does not wait for the interval)
    """
)


def test_prometheus_multiprocess_mode(server, ns, tmp_path):
    """Two worker processes export into PROMETHEUS_MULTIPROC_DIR; the multiprocess collector
    adds them up, as a gunicorn deployment's scrape endpoint does."""
    env = dict(os.environ, PROMETHEUS_MULTIPROC_DIR=str(tmp_path))
    for _ in range(2):
        subprocess.run([sys.executable, "-c", WORKER, server.url, ns], env=env, check=True,
                       timeout=60)  # fmt: skip
    code = textwrap.dedent(
        """
        import sys
        from prometheus_client import CollectorRegistry
        from prometheus_client.multiprocess import MultiProcessCollector

        reg = CollectorRegistry()
        MultiProcessCollector(reg)
        name = sys.argv[1]
        get = reg.get_sample_value
        print(get("syncmap_map_requests_total", {"map": name, "result": "hit"}),
              get("syncmap_lock_acquisitions_total", {"lock": name + "-lock"}),
              get("syncmap_lock_wait_seconds_count", {"lock": name + "-lock"}))
        """
    )
    out = subprocess.run([sys.executable, "-c", code, ns], env=env, check=True, timeout=60,
                         capture_output=True, text=True).stdout.split()  # fmt: skip
    assert [float(x) for x in out] == [20.0, 2.0, 2.0]


PRELOADED = textwrap.dedent(
    """
    import os, sys, threading
    import syncmap
    from syncmap.metrics import start_multiprocess_export

    url, name, out = sys.argv[1], sys.argv[2], sys.argv[3]
    start_multiprocess_export(interval=60)  # in the master, before the fork (--preload)
    node = syncmap.connect(url)
    m = node.map(name)
    m.set("k", 1)
    for _ in range(10):
        assert m.get("k") == 1
    start_multiprocess_export()  # the master's 10 hits
    pid = os.fork()
    if pid == 0:  # a worker: its post_fork hook starts the export again
        code = 1
        try:
            start_multiprocess_export()
            exporters = [t for t in threading.enumerate() if t.name == "syncmap-metrics"]
            for _ in range(30):
                m.get("k")
            with open(out, "w") as f:
                f.write(f"{m.stats.hits} {len(exporters)}")
            start_multiprocess_export()
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    node.close()
    """
)


def test_prometheus_multiprocess_mode_across_a_fork(server, ns, tmp_path):
    """A master that exported before forking (gunicorn --preload): the worker's counts start
    from zero, with an exporter thread of its own, so the scrape adds up each process's own
    reads once."""
    env = dict(os.environ, PROMETHEUS_MULTIPROC_DIR=str(tmp_path / "prom"))
    (tmp_path / "prom").mkdir()
    out = tmp_path / "child"
    subprocess.run([sys.executable, "-c", PRELOADED, server.url, ns, str(out)], env=env,
                   check=True, timeout=60)  # fmt: skip
    child_hits, exporters = (int(x) for x in out.read_text().split())
    assert exporters == 1
    code = textwrap.dedent(
        """
        import sys
        from prometheus_client import CollectorRegistry
        from prometheus_client.multiprocess import MultiProcessCollector

        reg = CollectorRegistry()
        MultiProcessCollector(reg)
        print(reg.get_sample_value("syncmap_map_requests_total",
                                   {"map": sys.argv[1], "result": "hit"}))
        """
    )
    total = subprocess.run([sys.executable, "-c", code, ns], env=env, check=True, timeout=60,
                           capture_output=True, text=True).stdout  # fmt: skip
    assert float(total) == 10 + child_hits
