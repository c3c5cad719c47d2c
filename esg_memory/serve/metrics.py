"""Prometheus text-format metrics for the HTTP service, without a client-library dependency.

Counters and histograms are kept in plain dicts under one lock; rendering is a snapshot. Label
values are bounded by construction (route templates, status codes), never raw paths or edit ids,
so a scraper cannot be made to store unbounded series.
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

__all__ = ["LATENCY_BUCKETS", "Metrics"]

#: Request-latency histogram bounds in seconds (tiny models answer in ms, 7B models in seconds).
LATENCY_BUCKETS: tuple[float, ...] = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)

Labels = tuple[tuple[str, str], ...]


@dataclass
class _Hist:
    bounds: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    n: int = 0

    def __post_init__(self) -> None:
        self.counts = [0] * len(self.bounds)

    def observe(self, value: float) -> None:
        i = bisect.bisect_left(self.bounds, value)
        if i < len(self.counts):
            self.counts[i] += 1
        self.total += value
        self.n += 1


def _fmt_labels(labels: Labels, extra: Iterable[tuple[str, str]] = ()) -> str:
    items = [*labels, *extra]
    if not items:
        return ""
    esc = [(k, v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")) for k, v in items]
    return "{" + ",".join(f'{k}="{v}"' for k, v in esc) + "}"


def _num(v: float) -> str:
    if v == float("inf"):
        return "+Inf"
    return repr(float(v)) if not float(v).is_integer() else str(int(v))


class Metrics:
    """Thread-safe counters, gauges (callables read at scrape time) and histograms."""

    def __init__(self, prefix: str = "esg_memory") -> None:
        self.prefix = prefix
        self._lock = threading.Lock()
        self._help: dict[str, tuple[str, str]] = {}
        self._counters: dict[str, dict[Labels, float]] = {}
        self._hists: dict[str, dict[Labels, _Hist]] = {}
        self._bounds: dict[str, tuple[float, ...]] = {}
        self._gauges: dict[str, Callable[[], float]] = {}

    def _name(self, name: str) -> str:
        return f"{self.prefix}_{name}"

    def counter(self, name: str, help_text: str) -> None:
        with self._lock:
            self._help[name] = ("counter", help_text)
            self._counters.setdefault(name, {})

    def histogram(self, name: str, help_text: str, bounds: tuple[float, ...] = LATENCY_BUCKETS) -> None:
        if list(bounds) != sorted(bounds) or not bounds:
            raise ValueError("histogram bounds must be non-empty and increasing")
        with self._lock:
            self._help[name] = ("histogram", help_text)
            self._hists.setdefault(name, {})
            self._bounds[name] = tuple(float(b) for b in bounds)

    def gauge(self, name: str, help_text: str, read: Callable[[], float]) -> None:
        with self._lock:
            self._help[name] = ("gauge", help_text)
            self._gauges[name] = read

    def inc(self, name: str, value: float = 1.0, **labels: str) -> None:
        key = tuple(sorted((k, str(v)) for k, v in labels.items()))
        with self._lock:
            series = self._counters[name]
            series[key] = series.get(key, 0.0) + value

    def observe(self, name: str, value: float, **labels: str) -> None:
        key = tuple(sorted((k, str(v)) for k, v in labels.items()))
        with self._lock:
            series = self._hists[name]
            hist = series.get(key)
            if hist is None:
                hist = series[key] = _Hist(self._bounds[name])
            hist.observe(float(value))

    def value(self, name: str, **labels: str) -> float:
        """A counter's current value (0 when the series was never touched)."""
        key = tuple(sorted((k, str(v)) for k, v in labels.items()))
        with self._lock:
            return self._counters.get(name, {}).get(key, 0.0)

    def render(self) -> str:
        """The exposition text (format 0.0.4)."""
        with self._lock:
            helps = dict(self._help)
            counters = {n: dict(s) for n, s in self._counters.items()}
            hists = {
                n: {k: (list(h.counts), h.total, h.n, h.bounds) for k, h in s.items()}
                for n, s in self._hists.items()
            }
            gauges = dict(self._gauges)
        lines: list[str] = []
        for name in sorted(helps):
            kind, text = helps[name]
            full = self._name(name)
            lines.append(f"# HELP {full} {text}")
            lines.append(f"# TYPE {full} {kind}")
            if kind == "counter":
                for labels, v in sorted(counters[name].items()):
                    lines.append(f"{full}{_fmt_labels(labels)} {_num(v)}")
            elif kind == "gauge":
                try:
                    v = float(gauges[name]())
                except Exception:  # a broken gauge must not take the whole scrape down
                    v = float("nan")
                lines.append(f"{full} {_num(v) if v == v else 'NaN'}")
            else:
                for labels, (counts, total, n, bounds) in sorted(hists[name].items()):
                    cum = 0
                    for b, c in zip(bounds, counts, strict=True):
                        cum += c
                        lines.append(f"{full}_bucket{_fmt_labels(labels, [('le', _num(b))])} {cum}")
                    lines.append(f"{full}_bucket{_fmt_labels(labels, [('le', '+Inf')])} {n}")
                    lines.append(f"{full}_sum{_fmt_labels(labels)} {_num(total)}")
                    lines.append(f"{full}_count{_fmt_labels(labels)} {n}")
        return "\n".join(lines) + "\n"
