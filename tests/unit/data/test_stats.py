"""Windowed statistics: a window ends now, old buckets fall out, idle pools read zero, the
controller's load is taken apart from the stats, and merging over routers."""

from __future__ import annotations

import numpy as np
import pytest

from raymoe._private.data import stats as S
from raymoe._private.data.stats import RouterStats, merge


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def _router(E=8, N=2):
    clock = Clock()
    return RouterStats(E, N, clock=clock), clock


def test_a_window_counts_only_what_happened_in_it():
    r, clock = _router()
    r.batch(np.array([0, 0, 1]), np.array([3, 0]), tokens=2)  # old traffic: all on shard 0
    r.request(2, 0.010)
    clock.t += 30
    r.batch(np.array([5, 6]), np.array([0, 2]), tokens=1)  # recent traffic: shard 1
    r.request(1, 0.002)
    recent = r.window(5.0)
    assert recent["shard_pairs"].tolist() == [0, 2] and recent["tokens"] == 1
    assert recent["expert_load"].tolist() == [0, 0, 0, 0, 0, 1, 1, 0]
    assert recent["latency_s"] == [0.002]
    everything = r.window(60.0)
    assert everything["shard_pairs"].tolist() == [3, 2] and everything["tokens"] == 3


def test_an_idle_pool_reads_zero_now():
    r, clock = _router()
    r.batch(np.array([1]), np.array([1, 0]), tokens=1)
    r.request(1, 0.001)
    clock.t += 120
    w = r.window(60.0)
    assert w["tokens"] == 0 and w["requests"] == 0 and not w["shard_pairs"].any()
    pool = merge([w], np.array([True, True]), 8, 60.0)
    assert pool.tokens_per_s == 0.0 and pool.latency is None and pool.imbalance == 1.0


def test_take_load_is_independent_of_the_stats():
    r, _ = _router()
    r.batch(np.array([2, 2, 3]), np.array([1, 2]), tokens=2)
    assert r.take_load().tolist() == [0, 0, 2, 1, 0, 0, 0, 0]
    assert not r.take_load().any()  # taken
    assert r.window(60.0)["expert_load"].tolist() == [0, 0, 2, 1, 0, 0, 0, 0]  # still there


def test_buckets_are_bounded(monkeypatch):
    monkeypatch.setattr(S, "MAX_ENTRIES", 10)
    r, clock = _router(E=100)
    for i in range(20):
        r.batch(np.arange(i, i + 5) % 100, np.array([5, 0]), tokens=5)
        clock.t += 2
    r.window(1.0)
    assert sum(b.experts.size for b in r.buckets) <= 10


def test_experts_and_shards_can_grow():
    r, _clock = _router(E=4, N=2)
    r.batch(np.array([3]), np.array([1, 0]), tokens=1)
    r.resize(6, 3)
    r.batch(np.array([5]), np.array([0, 0, 1]), tokens=1)
    w = r.window(10.0)
    assert w["expert_load"].tolist() == [0, 0, 0, 1, 0, 1]
    assert w["shard_pairs"].tolist() == [1, 0, 1]


def test_merge_sums_routers_and_measures_imbalance_over_serving_shards():
    a = {
        "window_s": 10.0,
        "tokens": 40,
        "requests": 4,
        "latency_s": [0.002, 0.004],
        "batch_tokens": [8],
        "shard_pairs": np.array([6, 2, 0]),
        "expert_load": np.ones(8, np.int64),
        "counters": {"batches": 1},
    }
    st = merge([a, a], np.array([True, True, False]), 8, 10.0)  # shard 2 holds nothing
    assert st.requests == 8 and st.counters == {"batches": 2} and st.tokens_per_s == 8.0
    assert st.pairs_per_shard == (12, 4, 0) and st.imbalance == pytest.approx(1.5)
    assert st.latency.p50_ms == pytest.approx(3.0) and st.batch_tokens_max == 8


def test_load_map_splits_each_expert_over_its_replicas_like_a_naive_loop():
    from raymoe.placement import contiguous, with_replicas

    p = with_replicas(contiguous(10, 3), {0: [1, 2], 7: [0, 1]})
    load = np.arange(10, dtype=np.int64) * 6
    for bins in (1, 3, 4, 10, 64):
        B = min(bins, 10)
        naive = np.zeros((3, B))
        for e in range(10):
            holders = [s for s in range(3) if e in p.shard_experts(s)]
            for s in holders:
                naive[s, e * B // 10] += load[e] / len(holders)
        got = S.load_map(load, p, bins)
        assert got.shape == (3, B) and np.allclose(got, naive)
        assert got.sum() == pytest.approx(load.sum())  # every pair lands once


@pytest.mark.parametrize("bins", [0, -3, S.MAX_LOAD_BINS + 1])
def test_load_map_bins_are_bounded(bins):
    from raymoe.errors import InvalidInputError
    from raymoe.placement import contiguous

    with pytest.raises(InvalidInputError, match="load_bins"):
        S.load_map(np.zeros(4), contiguous(4, 2), bins)


def test_requests_served_directly_count_as_load_and_requests_without_a_batch():
    r, _ = _router(E=4)
    r.served_directly(
        experts=np.array([1, 3, 9]),  # 9: an expert removed since, dropped
        pairs=np.array([2, 5, 7]),
        shard_pairs=np.array([2, 5]),
        latency_s=[(16, 0.004), (8, 0.003)],
    )
    w = r.window(60)
    assert w["expert_load"].tolist() == [0, 2, 0, 5]
    assert w["shard_pairs"].tolist() == [2, 5]
    assert w["requests"] == 2 and w["tokens"] == 24 and w["latency_s"] == [0.004, 0.003]
    assert w["counters"]["direct_requests"] == 2 and "batches" not in w["counters"]
    assert r.take_load().tolist() == [0, 2, 0, 5]
