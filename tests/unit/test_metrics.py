"""The metrics catalog and its recorders (pure)."""

from __future__ import annotations

import numpy as np
import pytest

from raymoe._private.metrics import CATALOG, TOP_EXPERTS, RecordingMetrics, top_experts


def test_catalog_names_kinds_and_tags_are_prometheus_shaped():
    for name, m in CATALOG.items():
        assert name == m.name and name.startswith("raymoe_") and m.exported == f"ray_{name}"
        assert m.kind in ("counter", "gauge", "histogram") and m.help
        assert (m.kind == "counter") == name.endswith("_total")
        assert bool(m.buckets) == (m.kind == "histogram")
        assert list(m.buckets) == sorted(m.buckets)
        assert "pool" not in m.tags  # every series gets it


def test_unknown_names_and_wrong_tags_are_refused():
    m = RecordingMetrics()
    with pytest.raises(KeyError, match="unknown metric"):
        m.inc("raymoe_nope_total")
    with pytest.raises(KeyError, match="tags"):
        m.inc("raymoe_shard_pairs_total", 3)  # no shard tag
    m.inc("raymoe_shard_pairs_total", 3, shard="0")
    m.inc("raymoe_shard_pairs_total", 4, shard="1")
    assert m.total("raymoe_shard_pairs_total") == 7
    assert m.total("raymoe_shard_pairs_total", shard="1") == 4


def test_top_experts_keeps_cardinality_bounded_and_sums_to_the_load():
    load = np.random.default_rng(0).zipf(1.5, 1000).astype(float)
    top = top_experts(load)
    assert len(top) == TOP_EXPERTS + 1 and top[-1][0] == "other"
    values = [v for _, v in top]
    assert sum(values) == pytest.approx(load.sum())
    assert values[:-1] == sorted(values[:-1], reverse=True)
    assert values[0] == load.max() and top[0][0] == str(int(load.argmax()))
    assert [e for e, _ in top_experts(np.array([1.0, 3.0]))] == ["1", "0", "other"]
    assert top_experts(np.zeros(0)) == []
