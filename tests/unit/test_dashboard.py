"""The Grafana dashboard (``deploy/grafana/raymoe.json``): every query parses as PromQL and
names only metrics and labels the pool exports; every metric of the catalog has a panel."""

from __future__ import annotations

import json

import pytest

from raymoe._private.metrics import CATALOG
from tests.dashboard import (
    DASHBOARD,
    base,
    dashboard_metrics,
    grouping,
    parse,
    queries,
    selectors,
)

EXPORTED = {m.exported: m for m in CATALOG.values()}


@pytest.mark.parametrize("query", queries())
def test_every_query_names_exported_metrics_and_their_labels(query):
    tree = parse(query)  # a syntax error raises
    names = []
    for s in selectors(tree):
        metric = EXPORTED.get(base(s.name))
        assert metric is not None, f"{s.name} is not exported by the pool: {query}"
        if s.name != metric.exported:
            assert metric.kind == "histogram", f"{s.name}: only histograms have series suffixes"
        labels = {"pool", *metric.tags} | ({"le"} if s.name.endswith("_bucket") else set())
        assert {m.name for m in s.matchers.matchers} <= labels, query
        names.append(s.name)
    assert names, f"no metric in {query}"
    allowed = {"pool", "le"}.union(*(EXPORTED[base(n)].tags for n in names))
    assert set(grouping(tree)) <= allowed, query


def test_the_dashboard_covers_the_catalog():
    assert dashboard_metrics() == set(EXPORTED)


def test_layout_is_grafana_shaped():
    d = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids)) and d["uid"] and d["title"]
    cells = set()
    for p in d["panels"]:
        g = p["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24, p["title"]
        mine = {
            (x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])
        }
        assert not mine & cells, f"{p['title']} overlaps another panel"
        cells |= mine
        if p["type"] != "row":
            assert p["targets"] and p["datasource"]["uid"] == "${datasource}"
            assert len({t["refId"] for t in p["targets"]}) == len(p["targets"])
    names = [a["name"] for a in d["annotations"]["list"]]
    assert "Rebalances" in names  # rebalances are marked on every time series
