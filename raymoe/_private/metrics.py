"""The pool's metrics: one catalog (name, kind, help, tags, buckets), and the small interface
the routers, the controller and the gateway record through.

In actors the recorder is :class:`RayMetrics` (``ray.util.metrics``: Ray's metrics agent
serves them in Prometheus format on every node, where KubeRay's PodMonitor and the Grafana
dashboard in ``deploy/grafana`` find them, prefixed ``ray_``). Plain classes get
:class:`NullMetrics`; unit tests get :class:`RecordingMetrics`.

Every series carries the ``pool`` tag. Cardinality is bounded: per-expert load is exported
for the ``TOP_EXPERTS`` hottest experts and one ``other``; shards are few; error classes
are raymoe's.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass
from typing import Protocol

TOP_EXPERTS = 16

LATENCY_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
TOKENS = (1, 16, 64, 256, 1024, 4096, 16384, 65536)
BYTES = (1 << 10, 1 << 16, 1 << 20, 1 << 24, 1 << 28, 1 << 32)


@dataclass(frozen=True)
class Metric:
    name: str
    kind: str  # counter, gauge or histogram
    help: str
    tags: tuple[str, ...] = ()
    buckets: tuple[float, ...] = ()

    @property
    def exported(self) -> str:
        """The name Prometheus scrapes (Ray prefixes ``ray_``)."""
        return f"ray_{self.name}"


CATALOG = {m.name: m for m in (
    # routers: the data path
    Metric("raymoe_requests_total", "counter", "forward requests served"),
    Metric("raymoe_request_errors_total", "counter", "forward requests failed, by error class",
           ("error",)),
    Metric("raymoe_tokens_total", "counter", "tokens served"),
    Metric("raymoe_request_latency_seconds", "histogram", "request latency at the router",
           buckets=LATENCY_S),
    Metric("raymoe_stage_seconds", "histogram", "seconds per stage of a batch (route, "
           "dispatch, combine)", ("stage",), LATENCY_S),
    Metric("raymoe_batch_tokens", "histogram", "tokens per batch", buckets=TOKENS),
    Metric("raymoe_queue_depth", "gauge", "requests waiting in a router's queue", ("router",)),
    Metric("raymoe_shard_pairs_total", "counter", "(token, expert) pairs sent to each shard",
           ("shard",)),
    Metric("raymoe_retries_total", "counter", "sub-batches sent again (shard down or loading)"),
    Metric("raymoe_hedges_total", "counter", "sub-batches sent to other replicas (shard silent)"),
    Metric("raymoe_degraded_requests_total", "counter",
           "requests served without some of their experts (faults.on_unreachable: degrade)"),
    # the controller: layout, load, changes, recovery
    Metric("raymoe_placement_version", "gauge", "placement version in service"),
    Metric("raymoe_shards", "gauge", "shards of the pool"),
    Metric("raymoe_replicas", "gauge", "expert replicas of the pool"),
    Metric("raymoe_imbalance", "gauge", "max / mean shard load of the controller's load window"),
    Metric("raymoe_expert_load", "gauge", "pairs per second of the hottest experts (load "
           "window), and of all the others together", ("expert",)),
    Metric("raymoe_changes_total", "counter", "placement changes applied, by operation",
           ("op",)),
    Metric("raymoe_rebalances_total", "counter", "rebalances applied (manual or automatic)",
           ("trigger",)),
    Metric("raymoe_bytes_moved_total", "counter", "bytes of expert weights copied by changes"),
    Metric("raymoe_replicas_moved_total", "counter", "replicas created at new places"),
    Metric("raymoe_degraded", "gauge", "conditions the pool serves around (lost weights...; "
           "raymoe status lists them)"),
    Metric("raymoe_recoveries_total", "counter", "actors brought back after a restart",
           ("role",)),
    # the gateway
    Metric("raymoe_gateway_calls_total", "counter", "gateway calls, by method and status",
           ("method", "code")),
)}  # fmt: skip


class Metrics(Protocol):
    """How the pool records (``name`` from :data:`CATALOG`; tags as keyword arguments)."""

    def inc(self, name: str, value: float = 1.0, **tags: str) -> None: ...
    def set(self, name: str, value: float, **tags: str) -> None: ...
    def observe(self, name: str, value: float, **tags: str) -> None: ...


class NullMetrics:
    """Records nothing (plain classes outside Ray)."""

    def inc(self, name, value=1.0, **tags):
        pass

    def set(self, name, value, **tags):
        pass

    def observe(self, name, value, **tags):
        pass


class RecordingMetrics:
    """Keeps what is recorded, by (name, tags): totals, last values, observations."""

    def __init__(self):
        self.totals: collections.Counter = collections.Counter()
        self.values: dict = {}
        self.observed: dict = collections.defaultdict(list)

    def inc(self, name, value=1.0, **tags):
        _check(name, tags)
        self.totals[(name, tuple(sorted(tags.items())))] += value

    def set(self, name, value, **tags):
        _check(name, tags)
        self.values[(name, tuple(sorted(tags.items())))] = value

    def observe(self, name, value, **tags):
        _check(name, tags)
        self.observed[(name, tuple(sorted(tags.items())))].append(value)

    def total(self, name: str, **tags) -> float:
        """Sum of ``name`` over the series whose tags include ``tags``."""
        want = set(tags.items())
        return sum(v for (n, t), v in self.totals.items() if n == name and want <= set(t))


class RayMetrics:
    """Records through ``ray.util.metrics`` (inside a Ray worker), every series tagged with
    the pool's name. The Ray metric objects are made on first use."""

    def __init__(self, pool: str):
        self.pool = pool
        self._made: dict = {}

    def _get(self, name: str):
        m = self._made.get(name)
        if m is None:
            from ray.util import metrics as ray_metrics  # NOTE: only where Ray runs

            spec = CATALOG[name]
            keys = ("pool", *spec.tags)
            if spec.kind == "histogram":
                m = ray_metrics.Histogram(name, spec.help, list(spec.buckets), tag_keys=keys)
            else:
                kind = ray_metrics.Counter if spec.kind == "counter" else ray_metrics.Gauge
                m = kind(name, spec.help, tag_keys=keys)
            m.set_default_tags({"pool": self.pool})
            self._made[name] = m
        return m

    def inc(self, name, value=1.0, **tags):
        if value:  # NOTE: Ray refuses an increment of 0
            _check(name, tags)
            self._get(name).inc(float(value), tags=tags or None)

    def set(self, name, value, **tags):
        _check(name, tags)
        self._get(name).set(float(value), tags=tags or None)

    def observe(self, name, value, **tags):
        _check(name, tags)
        self._get(name).observe(float(value), tags=tags or None)


def _check(name: str, tags: dict) -> None:
    metric = CATALOG.get(name)
    if metric is None:
        raise KeyError(f"unknown metric {name!r}; catalog: {sorted(CATALOG)}")
    if set(tags) != set(metric.tags):
        raise KeyError(f"{name}: tags {sorted(tags)}, expected {sorted(metric.tags)}")


def top_experts(load, k: int = TOP_EXPERTS) -> list[tuple[str, float]]:
    """(expert tag, value) of the ``k`` hottest experts of ``load`` ([E]) and ``other``."""
    import numpy as np

    load = np.asarray(load, np.float64)
    if not len(load):
        return []
    k = min(k, len(load))
    hot = np.argpartition(-load, k - 1)[:k]
    hot = hot[np.argsort(-load[hot], kind="stable")]
    out = [(str(int(e)), float(load[e])) for e in hot]
    out.append(("other", float(load.sum() - load[hot].sum())))
    return out
