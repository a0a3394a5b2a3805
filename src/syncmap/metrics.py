"""Metrics of every map and lock of the process, for Prometheus and OpenTelemetry.

Nothing here runs on the read path: maps keep their counters anyway (:attr:`SyncMap.stats`),
and an exporter reads them when it is scraped or collected. Locks count acquisitions, wait
times and lost holds as they happen (see :mod:`syncmap._stats`).

Prometheus (``pip install syncmap[prometheus]``)::

    from prometheus_client import REGISTRY
    from syncmap.metrics import PrometheusCollector

    REGISTRY.register(PrometheusCollector())

=========================================  =======  ========================================
name                                       type     labels
=========================================  =======  ========================================
``syncmap_map_requests_total``             counter  ``map``, ``result`` (hit, miss)
``syncmap_map_invalidations_total``        counter  ``map`` (change messages received)
``syncmap_map_resyncs_total``              counter  ``map``, ``cause`` (gap, epoch, ...)
``syncmap_map_local_items``                gauge    ``map``
``syncmap_map_verified_age_seconds``       gauge    ``map`` (since last proven current)
``syncmap_lock_wait_seconds``              histo.   ``lock``
``syncmap_lock_acquisitions_total``        counter  ``lock``
``syncmap_lock_lost_total``                counter  ``lock`` (holds found expired or taken)
=========================================  =======  ========================================

Under prometheus_client's multiprocess mode (gunicorn workers and ``PROMETHEUS_MULTIPROC_DIR``)
a custom collector only sees the worker that serves the scrape; call
:func:`start_multiprocess_export` in each worker instead (gunicorn's ``post_fork`` hook): it
copies the same series into prometheus_client's own metrics every ``interval`` seconds, which
the multiprocess collector adds up across workers.

OpenTelemetry (``pip install syncmap[otel]``): ``OpenTelemetryMetrics()`` creates observable
instruments on the global (or given) meter provider, named as redis-py names its client-side
cache's (``redis.client.csc.requests`` with ``redis.client.csc.result``):
``syncmap.map.requests`` (``syncmap.map.name``, ``syncmap.map.result``),
``syncmap.map.invalidations``, ``syncmap.map.resyncs`` (``syncmap.map.resync.cause``),
``syncmap.map.items``, ``syncmap.map.verified_age`` (s), ``syncmap.lock.wait.duration``
(a histogram, s; ``syncmap.lock.name``), ``syncmap.lock.acquisitions``, ``syncmap.lock.lost``.

Keys are never labels. Lock names are (one series per name, at most 1000 names, the rest under
``_other``): name locks per resource class, not per user or order, or expect ``_other``.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Iterable, Iterator
from typing import Any

from ._stats import LOCK_WAIT_BUCKETS, MapTotals, registry

__all__ = ["OpenTelemetryMetrics", "PrometheusCollector", "start_multiprocess_export"]


def _map_series(totals: dict[str, MapTotals]) -> dict[str, list[tuple[tuple[str, ...], float]]]:
    """Every map series as ``{family: [(label values, value)]}`` (one source for all exports)."""
    series: dict[str, list[tuple[tuple[str, ...], float]]] = {
        "requests": [],
        "invalidations": [],
        "resyncs": [],
        "local_items": [],
        "verified_age": [],
    }
    for name, t in sorted(totals.items()):
        series["requests"] += [((name, "hit"), t.hits), ((name, "miss"), t.misses)]
        series["invalidations"].append(((name,), t.invalidations))
        series["resyncs"] += [((name, cause), n) for cause, n in sorted(t.resync_causes.items())]
        series["local_items"].append(((name,), t.local_items))
        series["verified_age"].append(((name,), t.verified_age))
    return series


class PrometheusCollector:
    """A prometheus_client collector of every map and lock of this process; register it
    once: ``REGISTRY.register(PrometheusCollector())``."""

    def __init__(self) -> None:
        import prometheus_client.core  # noqa: F401  (the optional extra: fail here if absent)

    def describe(self) -> Iterable[Any]:
        return []  # (unchecked: register() does not call collect() to find the names)

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        series = _map_series(registry.map_totals())
        families = (
            (CounterMetricFamily, "syncmap_map_requests", "Map reads by result: hit (served from "
             "the local copy) or miss (read from the server)", ["map", "result"], "requests"),
            (CounterMetricFamily, "syncmap_map_invalidations", "Change messages received",
             ["map"], "invalidations"),
            (CounterMetricFamily, "syncmap_map_resyncs", "Times the local copy was dropped "
             "because its coherence could not be proven, by cause", ["map", "cause"], "resyncs"),
            (GaugeMetricFamily, "syncmap_map_local_items", "Entries in the local copies",
             ["map"], "local_items"),
            (GaugeMetricFamily, "syncmap_map_verified_age_seconds", "Seconds since the local "
             "copy was last proven current (the oldest of the process's maps of that name)",
             ["map"], "verified_age"),
        )  # fmt: skip
        for kind, name, doc, labels, key in families:
            family = kind(name, doc, labels=labels)
            for values, value in series[key]:
                family.add_metric(list(values), value)
            yield family

        locks = registry.lock_snapshots()
        wait = HistogramMetricFamily(
            "syncmap_lock_wait_seconds",
            "Time from asking for a lock to holding it",
            labels=["lock"],
            unit="seconds",
        )
        acquisitions = CounterMetricFamily(
            "syncmap_lock_acquisitions", "Lock acquisitions", labels=["lock"]
        )
        lost = CounterMetricFamily(
            "syncmap_lock_lost", "Holds found expired or taken while held", labels=["lock"]
        )
        bounds = [*(str(b) for b in LOCK_WAIT_BUCKETS), "+Inf"]
        for name, (count, lost_count, counts, total) in sorted(locks.items()):
            cumulative, buckets = 0, []
            for bound, n in zip(bounds, counts, strict=True):
                cumulative += n
                buckets.append((bound, cumulative))
            wait.add_metric([name], buckets, total)
            acquisitions.add_metric([name], count)
            lost.add_metric([name], lost_count)
        yield wait
        yield acquisitions
        yield lost


_export_lock = threading.Lock()
_exporter: _MultiprocessExporter | None = None


def _forget_exporter() -> None:
    """In a forked child: the parent's exporter thread does not run here, and the child's
    counts start from zero (prometheus_client's multiprocess values restart too): the
    exporter copies from zero, in a thread of the child's own."""
    global _export_lock
    _export_lock = threading.Lock()
    if _exporter is not None:
        _exporter.forked()


os.register_at_fork(after_in_child=_forget_exporter)


class _MultiprocessExporter:
    """Copies the series into prometheus_client's own metrics (multiprocess-aware)."""

    def __init__(self, interval: float) -> None:
        from prometheus_client import Counter, Gauge, Histogram

        self.interval = interval
        self.requests = Counter("syncmap_map_requests", "Map reads by result", ["map", "result"])
        self.invalidations = Counter(
            "syncmap_map_invalidations", "Change messages received", ["map"]
        )
        self.resyncs = Counter(
            "syncmap_map_resyncs", "Local copies dropped, by cause", ["map", "cause"]
        )
        self.local_items = Gauge(
            "syncmap_map_local_items", "Entries in the local copies", ["map"],
            multiprocess_mode="livesum",
        )  # fmt: skip
        self.verified_age = Gauge(
            "syncmap_map_verified_age_seconds", "Seconds since last proven current", ["map"],
            multiprocess_mode="livemax",
        )  # fmt: skip
        self.wait = Histogram(
            "syncmap_lock_wait_seconds", "Time from asking for a lock to holding it", ["lock"],
            buckets=LOCK_WAIT_BUCKETS,
        )  # fmt: skip
        self.acquisitions = Counter("syncmap_lock_acquisitions", "Lock acquisitions", ["lock"])
        self.lost = Counter("syncmap_lock_lost", "Holds found expired or taken", ["lock"])
        self._copied: dict[tuple[str, tuple[str, ...]], float] = {}
        registry.wait_listeners.append(self._on_wait)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="syncmap-metrics", daemon=True)
        self._thread.start()

    def forked(self) -> None:
        """(In a forked child, see _forget_exporter.)"""
        self._copied = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="syncmap-metrics", daemon=True)
        self._thread.start()

    def _on_wait(self, name: str, wait: float) -> None:
        self.wait.labels(name).observe(wait)

    def _add(self, counter: Any, family: str, values: tuple[str, ...], value: float) -> None:
        key = (family, values)
        delta = value - self._copied.get(key, 0.0)
        if delta > 0:
            counter.labels(*values).inc(delta)
        self._copied[key] = max(value, self._copied.get(key, 0.0))

    def export(self) -> None:
        series = _map_series(registry.map_totals())
        for family, counter in (
            ("requests", self.requests),
            ("invalidations", self.invalidations),
            ("resyncs", self.resyncs),
        ):
            for values, value in series[family]:
                self._add(counter, family, values, value)
        for values, value in series["local_items"]:
            self.local_items.labels(*values).set(value)
        for values, value in series["verified_age"]:
            self.verified_age.labels(*values).set(value if math.isfinite(value) else math.inf)
        for name, (acquisitions, lost, _, _) in registry.lock_snapshots().items():
            self._add(self.acquisitions, "acquisitions", (name,), acquisitions)
            self._add(self.lost, "lost", (name,), lost)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.export()


def start_multiprocess_export(interval: float = 5.0) -> None:
    """In a prometheus_client multiprocess setup, in each worker process (e.g. gunicorn's
    ``post_fork``): copy this process's syncmap series into prometheus_client's own metrics
    every ``interval`` seconds, and now (lock wait times are observed as they happen, from
    the first call on). Calls after the first only copy; the scrape endpoint uses
    ``MultiProcessCollector`` as usual."""
    global _exporter
    with _export_lock:
        if _exporter is None:
            _exporter = _MultiprocessExporter(interval)
        _exporter.export()


class OpenTelemetryMetrics:
    """Observable OpenTelemetry instruments over every map and lock of this process, on
    ``meter_provider`` (default: the global one). Lock wait times are recorded into a
    histogram as acquisitions happen (OpenTelemetry has no observable histogram)."""

    def __init__(self, meter_provider: Any = None) -> None:
        from opentelemetry import metrics

        from . import __version__

        provider = meter_provider or metrics.get_meter_provider()
        meter = provider.get_meter("syncmap", __version__)
        self._instruments = [
            meter.create_observable_counter(
                "syncmap.map.requests", [self._requests], "{request}",
                "Map reads by result: hit (local copy) or miss (server)",
            ),
            meter.create_observable_counter(
                "syncmap.map.invalidations", [self._invalidations], "{message}",
                "Change messages received",
            ),
            meter.create_observable_counter(
                "syncmap.map.resyncs", [self._resyncs], "{resync}",
                "Local copies dropped because coherence could not be proven, by cause",
            ),
            meter.create_observable_gauge(
                "syncmap.map.items", [self._items], "{item}", "Entries in the local copies",
            ),
            meter.create_observable_gauge(
                "syncmap.map.verified_age", [self._verified_age], "s",
                "Seconds since the local copy was last proven current",
            ),
            meter.create_observable_counter(
                "syncmap.lock.acquisitions", [self._acquisitions], "{acquisition}",
                "Lock acquisitions",
            ),
            meter.create_observable_counter(
                "syncmap.lock.lost", [self._lost], "{hold}",
                "Holds found expired or taken while held",
            ),
        ]  # fmt: skip
        try:
            self._wait = meter.create_histogram(
                "syncmap.lock.wait.duration", "s", "Time from asking for a lock to holding it",
                explicit_bucket_boundaries_advisory=list(LOCK_WAIT_BUCKETS),
            )  # fmt: skip
        except TypeError:  # opentelemetry-api before 1.23: no advisory buckets
            self._wait = meter.create_histogram(
                "syncmap.lock.wait.duration", "s", "Time from asking for a lock to holding it"
            )
        registry.wait_listeners.append(self._on_wait)

    def close(self) -> None:
        """Stop recording lock waits (the observable instruments stay with their meter)."""
        if self._on_wait in registry.wait_listeners:
            registry.wait_listeners.remove(self._on_wait)

    def _on_wait(self, name: str, wait: float) -> None:
        self._wait.record(wait, {"syncmap.lock.name": name})

    @staticmethod
    def _observe(family: str, attrs: tuple[str, ...]) -> list[Any]:
        from opentelemetry.metrics import Observation

        series = _map_series(registry.map_totals())[family]
        return [
            Observation(value, dict(zip(attrs, values, strict=True))) for values, value in series
        ]

    def _requests(self, options: Any) -> list[Any]:
        return self._observe("requests", ("syncmap.map.name", "syncmap.map.result"))

    def _invalidations(self, options: Any) -> list[Any]:
        return self._observe("invalidations", ("syncmap.map.name",))

    def _resyncs(self, options: Any) -> list[Any]:
        return self._observe("resyncs", ("syncmap.map.name", "syncmap.map.resync.cause"))

    def _items(self, options: Any) -> list[Any]:
        return self._observe("local_items", ("syncmap.map.name",))

    def _verified_age(self, options: Any) -> list[Any]:
        return self._observe("verified_age", ("syncmap.map.name",))

    def _lock_series(self, lost: bool) -> list[Any]:
        from opentelemetry.metrics import Observation

        return [
            Observation(lost_count if lost else count, {"syncmap.lock.name": name})
            for name, (count, lost_count, _, _) in sorted(registry.lock_snapshots().items())
        ]

    def _acquisitions(self, options: Any) -> list[Any]:
        return self._lock_series(False)

    def _lost(self, options: Any) -> list[Any]:
        return self._lock_series(True)
