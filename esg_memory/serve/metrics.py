"""Prometheus metrics of the HTTP service, kept by ``prometheus_client`` in one registry per app.

`Metrics` is the small facade the service, the batcher and the middleware call (``counter``,
``histogram``, ``gauge``, ``inc``, ``observe``, ``value``, ``render``); behind it every series is a
``prometheus_client`` `Counter`, `Histogram` or `Gauge` (read at scrape time through
``Gauge.set_function``) in the app's own `CollectorRegistry`, so two apps in one process never share
series and the library's process-wide default registry is left alone. Label values are bounded by
construction (route templates, status codes, operation names), never raw paths or edit ids, so a
scraper cannot be made to store unbounded series.

Names: ``counter("writes_total", ...)`` is exposed as ``esg_memory_writes_total`` (a trailing
``_total`` is the counter suffix, not doubled; ``prometheus_client`` adds a ``_created`` sample).
A metric declared without ``labels`` takes its label names from its first ``inc``/``observe``.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["CONTENT_TYPE", "LATENCY_BUCKETS", "Metrics"]

logger = logging.getLogger("esg_memory.serve")

#: Request-latency histogram bounds in seconds (tiny models answer in ms, 7B models in seconds).
LATENCY_BUCKETS: tuple[float, ...] = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)


def _content_type() -> str:
    try:
        from prometheus_client import CONTENT_TYPE_LATEST
    except ImportError:  # the serve extra is missing: the app cannot be built anyway
        return "text/plain; version=0.0.4; charset=utf-8"
    return CONTENT_TYPE_LATEST


#: The ``Content-Type`` of `Metrics.render`'s text (``prometheus_client.CONTENT_TYPE_LATEST``).
CONTENT_TYPE = _content_type()


class Metrics:
    """Counters, histograms and gauges (callables read at scrape time) in a private registry."""

    def __init__(self, prefix: str = "esg_memory") -> None:
        from prometheus_client import CollectorRegistry

        self.prefix = prefix
        self.registry = CollectorRegistry()
        self.content_type = CONTENT_TYPE
        self._lock = threading.Lock()
        self._decl: dict[str, tuple[str, str, tuple[float, ...] | None]] = {}  # name -> (kind, help, bounds)
        self._made: dict[str, tuple[Any, tuple[str, ...]]] = {}  # name -> (metric, its label names)

    def _name(self, name: str) -> str:
        return f"{self.prefix}_{name}"

    def _declare(self, name: str, kind: str, help_text: str, bounds: tuple[float, ...] | None,
                 labels: Sequence[str] | None) -> None:
        with self._lock:
            old = self._decl.get(name)
            if old is not None:
                if old[0] != kind:
                    raise ValueError(f"metric {name!r} is already a {old[0]}")
                return  # declaring again (another component over the same Metrics) is a no-op
            self._decl[name] = (kind, help_text, bounds)
            if labels is not None:
                self._make(name, tuple(sorted(labels)))

    def _make(self, name: str, labelnames: tuple[str, ...]) -> Any:
        """Create the ``prometheus_client`` metric (caller holds the lock)."""
        from prometheus_client import Counter, Histogram

        kind, help_text, bounds = self._decl[name]
        if kind == "counter":
            metric = Counter(self._name(name), help_text, labelnames, registry=self.registry)
        else:
            metric = Histogram(self._name(name), help_text, labelnames, buckets=bounds,
                               registry=self.registry)
        self._made[name] = (metric, labelnames)
        return metric

    def _series(self, name: str, kind: str, labels: dict[str, Any]) -> Any:
        keys = tuple(sorted(labels))
        with self._lock:
            decl = self._decl.get(name)
            if decl is None or decl[0] != kind:
                raise KeyError(f"no {kind} named {name!r} was declared")
            made = self._made.get(name)
            metric, labelnames = made if made is not None else (self._make(name, keys), keys)
        if keys != labelnames:
            raise ValueError(f"metric {name!r} has labels {list(labelnames)}, got {list(keys)}")
        return metric.labels(**{k: str(v) for k, v in labels.items()}) if keys else metric

    # ------------------------------------------------------------------ declaring
    def counter(self, name: str, help_text: str, labels: Sequence[str] | None = None) -> None:
        """Declare a counter; ``labels``: its label names (else those of its first `inc`)."""
        self._declare(name, "counter", help_text, None, labels)

    def histogram(self, name: str, help_text: str, bounds: tuple[float, ...] = LATENCY_BUCKETS,
                  labels: Sequence[str] | None = None) -> None:
        """Declare a histogram with increasing bucket ``bounds`` (``+Inf`` is added)."""
        if not bounds or list(bounds) != sorted(bounds):
            raise ValueError("histogram bounds must be non-empty and increasing")
        self._declare(name, "histogram", help_text, tuple(float(b) for b in bounds), labels)

    def gauge(self, name: str, help_text: str, read: Callable[[], float]) -> None:
        """Declare a gauge whose value is ``read()`` at each scrape (NaN if it raises)."""
        from prometheus_client import Gauge

        def safe() -> float:
            try:
                return float(read())
            except Exception:  # a broken gauge must not take the whole scrape down
                logger.debug("gauge %s failed", name, exc_info=True)
                return math.nan

        with self._lock:
            old = self._decl.get(name)
            if old is not None:
                if old[0] != "gauge":
                    raise ValueError(f"metric {name!r} is already a {old[0]}")
                self._made[name][0].set_function(safe)  # the newest reader wins
                return
            self._decl[name] = ("gauge", help_text, None)
            g = Gauge(self._name(name), help_text, registry=self.registry)
            g.set_function(safe)
            self._made[name] = (g, ())

    # ------------------------------------------------------------------ recording
    def inc(self, name: str, value: float = 1.0, **labels: Any) -> None:
        """Add ``value`` (>= 0) to a counter's series."""
        self._series(name, "counter", labels).inc(value)

    def observe(self, name: str, value: float, **labels: Any) -> None:
        """Record one observation in a histogram's series."""
        self._series(name, "histogram", labels).observe(float(value))

    def value(self, name: str, **labels: Any) -> float:
        """A counter's current value (0 when the series was never touched)."""
        base = self._name(name[:-6] if name.endswith("_total") else name)
        got = self.registry.get_sample_value(f"{base}_total", {k: str(v) for k, v in labels.items()})
        return 0.0 if got is None else float(got)

    def render(self) -> str:
        """The exposition text (``prometheus_client.generate_latest`` of this registry)."""
        from prometheus_client import generate_latest

        return generate_latest(self.registry).decode("utf-8")
