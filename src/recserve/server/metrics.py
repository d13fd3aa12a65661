"""Prometheus metrics of one server, in a registry of its own (so several servers can share a
process, as in tests).

Exposed at ``GET /metrics``:

- ``recserve_requests_total{model,protocol}``, ``recserve_request_failures_total{model,protocol,
  reason}`` (``reason``: invalid_argument, not_found, too_large, overloaded, unavailable,
  internal), ``recserve_items_total{model}``;
- histograms ``recserve_queue_duration_seconds`` (waiting in the batcher),
  ``recserve_compute_duration_seconds`` (engine call), ``recserve_request_duration_seconds``
  (arrival to response, by protocol), ``recserve_batch_items`` and ``recserve_batch_requests``
  (per engine call: items, and requests joined by dynamic batching);
- gauges read at scrape time: ``recserve_queue_depth`` (requests waiting or in flight),
  ``recserve_inflight_batches``, ``recserve_model_ready``, and every numeric entry of the engine's
  ``stats()`` as ``recserve_engine_<stat>`` (queue depth, cache hit rates, bytes per tier, as
  the engine reports them; nested dicts flatten with ``_``).

Requests for models that are not loaded count under ``model=""`` so that callers cannot grow
the label set.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric

LATENCY_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
)  # fmt: skip
ITEM_BUCKETS = tuple(float(2**i) for i in range(14))
REQUEST_BUCKETS = (1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class ModelView:
    """What the metrics read of one loaded model at scrape time."""

    def __init__(
        self,
        queue_depth: Callable[[], int],
        inflight_batches: Callable[[], int],
        ready: Callable[[], bool],
        engine_stats: Callable[[], Mapping[str, Any]],
    ) -> None:
        self.queue_depth = queue_depth
        self.inflight_batches = inflight_batches
        self.ready = ready
        self.engine_stats = engine_stats


class RequestMetrics:
    """The metric children of one (model, protocol), looked up once."""

    def __init__(self, metrics: ServerMetrics, model: str, protocol: str) -> None:
        self._metrics, self._model, self._protocol = metrics, model, protocol
        self.requests = metrics.requests.labels(model, protocol)
        self.total = metrics.total_seconds.labels(model, protocol)
        self.queue = metrics.queue_seconds.labels(model)
        self.compute = metrics.compute_seconds.labels(model)
        self.items = metrics.items.labels(model)

    def success(self, items: int, queue_s: float, compute_s: float, total_s: float) -> None:
        self.items.inc(items)
        self.queue.observe(queue_s)
        self.compute.observe(compute_s)
        self.total.observe(total_s)

    def failure(self, reason: str) -> None:
        self._metrics.failures.labels(self._model, self._protocol, reason).inc()


class ServerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        reg = self.registry
        self.requests = Counter(
            "recserve_requests", "Inference requests received.", ["model", "protocol"], registry=reg
        )
        self.failures = Counter(
            "recserve_request_failures",
            "Inference requests answered with an error, by reason.",
            ["model", "protocol", "reason"],
            registry=reg,
        )
        self.items = Counter("recserve_items", "Items inferred.", ["model"], registry=reg)
        self.queue_seconds = Histogram(
            "recserve_queue_duration_seconds",
            "Time a request waited in the dynamic batcher.",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=reg,
        )
        self.compute_seconds = Histogram(
            "recserve_compute_duration_seconds",
            "Time of the engine call that answered a request.",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=reg,
        )
        self.total_seconds = Histogram(
            "recserve_request_duration_seconds",
            "Time from a request's arrival to its response.",
            ["model", "protocol"],
            buckets=LATENCY_BUCKETS,
            registry=reg,
        )
        self.batch_items = Histogram(
            "recserve_batch_items",
            "Items per engine call.",
            ["model"],
            buckets=ITEM_BUCKETS,
            registry=reg,
        )
        self.batch_requests = Histogram(
            "recserve_batch_requests",
            "Requests joined into one engine call by dynamic batching.",
            ["model"],
            buckets=REQUEST_BUCKETS,
            registry=reg,
        )
        self._models: dict[str, ModelView] = {}
        self._children: dict[tuple[str, str], RequestMetrics] = {}
        reg.register(_ModelCollector(self._models))

    def for_request(self, model: str, protocol: str) -> RequestMetrics:
        """Metric children of ``model`` ("" when not loaded) and ``protocol``; counts a request."""
        key = (model, protocol)
        children = self._children.get(key)
        if children is None:
            children = self._children[key] = RequestMetrics(self, model, protocol)
        children.requests.inc()
        return children

    def batch_observer(self, model: str) -> Callable[[int, int], None]:
        items, requests = self.batch_items.labels(model), self.batch_requests.labels(model)

        def observe(n_items: int, n_requests: int) -> None:
            items.observe(n_items)
            requests.observe(n_requests)

        return observe

    def add_model(self, name: str, view: ModelView) -> None:
        self._models[name] = view

    def remove_model(self, name: str) -> None:
        self._models.pop(name, None)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _ModelCollector:
    def __init__(self, models: dict[str, ModelView]) -> None:
        self._models = models

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        depth = GaugeMetricFamily(
            "recserve_queue_depth", "Requests waiting or in flight.", labels=["model"]
        )
        inflight = GaugeMetricFamily(
            "recserve_inflight_batches", "Engine calls in flight.", labels=["model"]
        )
        ready = GaugeMetricFamily(
            "recserve_model_ready", "1 if the model is ready.", labels=["model"]
        )
        engine: dict[str, GaugeMetricFamily] = {}
        for name, view in list(self._models.items()):
            depth.add_metric([name], view.queue_depth())
            inflight.add_metric([name], view.inflight_batches())
            ready.add_metric([name], 1.0 if view.ready() else 0.0)
            for stat, value in numeric_stats(view.engine_stats()):
                metric = f"recserve_engine_{stat}"
                if metric not in engine:
                    engine[metric] = GaugeMetricFamily(
                        metric, f"Engine statistic {stat!r}.", labels=["model"]
                    )
                engine[metric].add_metric([name], value)
        yield depth
        yield inflight
        yield ready
        yield from engine.values()


def numeric_stats(stats: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, float]]:
    """Every number in ``stats`` (nested mappings flattened, keys joined with ``_``)."""
    for key, value in stats.items():
        name = re.sub(r"[^a-zA-Z0-9_]", "_", f"{prefix}{key}")
        if isinstance(value, int | float):  # bool included
            yield name, float(value)
        elif isinstance(value, Mapping):
            yield from numeric_stats(value, f"{name}_")
