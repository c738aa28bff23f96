"""The controller keeps the gateways: one unless per_node, none unless enabled; nodes that
join get one, nodes that leave lose theirs; one that cannot bind fails the deploy."""

from __future__ import annotations

import pytest

from raymoe._private import timeouts
from raymoe.errors import PoolError
from raymoe.placement import contiguous
from tests.unit.control.fakes import run, settle, setup, start


def test_one_gateway_unless_per_node_and_none_unless_enabled():
    for gateway, want in (({}, []), ({"port": 0}, ["any:50051"])):
        ctl, cluster, _, weights = setup(**gateway)
        cluster.node_ids = ["node-a", "node-b"]
        start(ctl, contiguous(8, 2), weights)
        assert ctl.fleet.endpoints() == want


def test_per_node_gateways_follow_nodes_that_join_and_leave(monkeypatch):
    monkeypatch.setattr(timeouts, "FLEET_CHECK_S", 0.0)
    ctl, cluster, _, weights = setup(per_node=True)
    start(ctl, contiguous(8, 2), weights)
    assert ctl.fleet.endpoints() == ["node-a:50051"]
    cluster.node_ids = ["node-a", "node-b", "node-c"]  # two join; one cannot bind
    cluster.refuse = {"node-c"}
    settle(ctl)
    assert ctl.fleet.endpoints() == ["node-a:50051", "node-b:50051"]
    assert cluster.actors.pop(("gateway", "node-c")) in cluster.killed  # its name freed
    cluster.refuse = set()
    cluster.node_ids = ["node-b", "node-c"]  # node-a leaves; node-c is tried again
    gone = ctl.fleet.gateways["node-a"][0]
    settle(ctl)
    assert ctl.fleet.endpoints() == ["node-b:50051", "node-c:50051"]
    assert gone in cluster.killed
    run(ctl.shutdown())
    assert ctl.fleet.endpoints() == []


def test_a_gateway_that_cannot_start_fails_the_deploy():
    ctl, cluster, _, weights = setup(per_node=True)
    cluster.refuse = {"node-a"}
    with pytest.raises(PoolError, match=r"node node-a: .*Failed to bind"):
        start(ctl, contiguous(8, 2), weights)
