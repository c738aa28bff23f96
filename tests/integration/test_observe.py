"""What an operator watches, on a real pool: the metrics Ray's Prometheus endpoint serves
carry the values ``pool.stats()``, ``describe()`` and the operations' reports give, and every
query of the Grafana dashboard names a metric the pool exports."""

from __future__ import annotations

import collections
import time
import urllib.request

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

import raymoe
from raymoe import ShapeError
from raymoe._private.metrics import CATALOG
from tests.dashboard import base, dashboard_metrics
from tests.integration.gateway_common import DATA, gateway_spec

pytestmark = pytest.mark.integration


def scrape(port: int, pool: str) -> dict:
    """{(metric, ((tag, value), ...)): value} of ``pool``'s series, summed over the workers
    that export them (Ray labels each with its worker, node and session)."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read()
    out: dict = collections.defaultdict(float)
    for family in text_string_to_metric_families(text.decode()):
        for s in family.samples:
            metric = CATALOG.get(base(s.name).removeprefix("ray_"))
            if metric is None or s.labels.get("pool") != pool:
                continue
            keep = {k: v for k, v in s.labels.items() if k in metric.tags}
            if s.name.endswith("_bucket"):
                keep["le"] = s.labels["le"]
            out[(s.name, tuple(sorted(keep.items())))] += s.value
    return dict(out)


def settled(port: int, pool: str, want: dict, timeout_s: float = 30.0) -> dict:
    """The scrape once every ``want`` value is there (Ray reports every half second)."""
    deadline = time.monotonic() + timeout_s
    while True:
        got = scrape(port, pool)
        if all(got.get(k) == v for k, v in want.items()) or time.monotonic() > deadline:
            return got
        time.sleep(0.5)


def test_scraped_metrics_match_stats_describe_and_reports(ray_cluster, metrics_port, tokens):
    spec = gateway_spec("observe", tokens)
    pool = raymoe.serve(spec)
    try:
        (endpoint,) = pool.gateways()
        rng = np.random.default_rng(0)
        with raymoe.Client(endpoint, token=DATA) as client:
            for i in range(6):
                client.forward(rng.standard_normal((3 + i, 16), dtype=np.float32))
        hot = np.zeros((40, 2), np.int64)  # every pair on experts 0 and 1 (shard 0)
        hot[:, 1] = 1
        for _ in range(4):
            x = rng.standard_normal((40, 16), dtype=np.float32)
            pool.forward(x, expert_ids=hot, weights=np.full((40, 2), 0.5, np.float32))
        with pytest.raises(ShapeError):
            pool.forward(np.zeros((2, 15), np.float32))
        end = time.monotonic() + 10  # the gateway hands its direct requests over within 1 s
        while (st := pool.stats(window_s=600)).requests < 10:
            assert time.monotonic() < end, st
            time.sleep(0.2)
        replicated = pool.replicate(5, 2)
        deadline = time.monotonic() + 30  # the controller's load window sees the hot set
        while pool.rebalance(dry_run=True).imbalance_before < 1.5:
            assert time.monotonic() < deadline
            time.sleep(0.5)
        rebalanced = pool.rebalance()
        d = pool.describe()
        want = {
            ("ray_raymoe_requests_total", ()): st.requests,
            ("ray_raymoe_tokens_total", ()): st.tokens,
            ("ray_raymoe_request_latency_seconds_count", ()): st.requests,
            ("ray_raymoe_request_errors_total", (("error", "ShapeError"),)): 1,
            ("ray_raymoe_placement_version", ()): d.placement_version,
            ("ray_raymoe_shards", ()): d.shards,
            ("ray_raymoe_replicas", ()): d.replicas,
            ("ray_raymoe_changes_total", (("op", "replicate"),)): 1,
            ("ray_raymoe_changes_total", (("op", "rebalance"),)): 1,
            ("ray_raymoe_rebalances_total", (("trigger", "manual"),)): 1,
            ("ray_raymoe_bytes_moved_total", ()): replicated.bytes_moved + rebalanced.bytes_moved,
            ("ray_raymoe_replicas_moved_total", ()): (
                replicated.replicas_added + rebalanced.replicas_added
            ),
            ("ray_raymoe_gateway_calls_total", (("code", "OK"), ("method", "Forward"))): 6,
        }
        for n, pairs in enumerate(st.pairs_per_shard):
            want[("ray_raymoe_shard_pairs_total", (("shard", str(n)),))] = pairs
        got = settled(metrics_port, "observe", want)
        assert {k: got.get(k) for k in want} == want
        assert st.requests == 10 and st.tokens == sum(range(3, 9)) + 160
        assert rebalanced.changed and d.placement_version == rebalanced.version
        hot_load = {dict(t)["expert"]: v for (n, t), v in got.items() if "expert_load" in n}
        assert max(hot_load, key=hot_load.get) in ("0", "1")  # the experts the load is on
        # the gauge follows the layout: what the rebalance reported, same window
        imbalance = got[("ray_raymoe_imbalance", ())]
        assert imbalance == pytest.approx(rebalanced.imbalance_after, rel=0.05)
        exported = {base(n) for n, _ in got}
        # every panel has data on a live pool, but for events that did not happen here
        assert dashboard_metrics() - exported == {
            "ray_raymoe_retries_total",
            "ray_raymoe_recoveries_total",
            "ray_raymoe_hedges_total",
            "ray_raymoe_degraded_requests_total",
        }
    finally:
        pool.shutdown()
