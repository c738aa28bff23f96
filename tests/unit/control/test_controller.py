"""The controller's lifecycle and reconcile loop on a fake cluster (no Ray): start, update,
recover, shutdown."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch

from raymoe._private.control.controller import Controller
from raymoe._private.control.goal import Goal
from raymoe._private.metrics import RecordingMetrics
from raymoe.errors import PoolUnavailableError
from raymoe.placement import contiguous, with_replicas
from raymoe.store import EmbeddedStore
from tests.unit.control.fakes import close, run, served, settle, setup, start


def test_start_saves_the_goal_before_any_actor_is_configured():
    ctl, cluster, layer, weights = setup()
    seen = []

    async def check():
        seen.append(ctl.store.get(Goal.key(ctl.spec.name)) is not None)

    cluster.before["configure"] = check
    start(ctl, contiguous(8, 2), weights)
    assert seen and all(seen)
    close(ctl, layer, torch.randn(9, 16))
    g = Goal.load(ctl.store, ctl.spec.name)
    assert g.spec == ctl.spec and g.placement.version == 1 and g.has_rows and g.pending is None
    assert all(r.ready() for r in ctl.routers)


def test_update_reloads_a_restarted_shard_and_router():
    ctl, cluster, layer, weights = setup()
    start(ctl, contiguous(8, 2), weights)
    ctl.roster.shards[1] = cluster.restart("shard", 1)  # comes back empty
    ctl.roster.routers[1] = cluster.restart("router", 1)
    assert not ctl.shards[1].ready and not ctl.routers[1].ready()
    settle(ctl)
    assert ctl.goal.sources  # rows from the weight files (the controller holds none)
    close(ctl, layer, torch.randn(9, 16))


def test_update_publishes_a_newer_placement():
    ctl, _, _, weights = setup()
    start(ctl, contiguous(8, 2), weights)
    ctl.goal = ctl.goal.replace(placement=ctl.placement.bump())
    settle(ctl)
    assert [r.table.version for r in ctl.routers] == [2, 2]


def test_update_survives_a_failing_cluster(caplog):
    ctl, _, _, weights = setup()
    start(ctl, contiguous(8, 2), weights)
    ctl.goal = None  # break the goal: update must log and return, not raise
    run(ctl.update())
    assert "controller update failed" in caplog.text


def test_polls_tell_dead_actors_from_bugs(caplog):
    """A dead actor is None quietly; an unexpected error is logged with the method's name
    (a typo in a method name must not look like an actor that does not answer)."""
    ctl, cluster, _, weights = setup()
    start(ctl, contiguous(8, 2), weights)
    cluster.dead.add(id(ctl.shards[0]))
    with caplog.at_level(logging.ERROR):
        assert run(ctl.poll(ctl.shards, "status"))[0] is None
        assert "status" not in caplog.text
        assert run(ctl.poll(ctl.shards, "no_such_method")) == [None, None]
    assert "no_such_method() of actor 1 failed" in caplog.text  # 0 is dead: quiet


def test_recover_resumes_from_the_store(tmp_path):
    ctl, cluster, layer, weights = setup(EmbeddedStore(tmp_path))
    placement = with_replicas(contiguous(8, 2), {3: [1]}).bump().bump().bump()
    start(ctl, placement, weights)
    again = Controller(ctl.spec, cluster, EmbeddedStore(tmp_path))  # the restarted one
    run(again.recover())
    assert again.placement.version == 4 and again.describe().replicas == 9
    close(again, layer, torch.randn(9, 16))


def test_a_restarted_controller_takes_the_gate_from_a_configured_router(tmp_path):
    """Router 0 restarted and not configured yet (its gate is the seeded one) when the
    controller comes back: the gate it re-publishes is the one served, not router 0's."""
    ctl, cluster, layer, weights = setup(EmbeddedStore(tmp_path))
    start(ctl, contiguous(8, 2), weights)
    cluster.restart("router", 0)
    again = Controller(ctl.spec, cluster, EmbeddedStore(tmp_path))
    run(again.recover())
    settle(again)
    close(again, layer, torch.randn(9, 16))


def test_the_gate_is_never_read_from_a_router_not_configured_yet():
    """What checkpoints save and grown gates start from: not a restarted router's seeded
    gate, and an error when no configured router answers."""
    ctl, cluster, _, weights = setup()
    start(ctl, contiguous(8, 2), weights)
    cluster.restart("router", 0)
    ctl.roster.routers[0] = cluster.router(0)
    gate = run(ctl.roster.gate_weights())
    assert np.array_equal(gate["router.weight"], weights["router.weight"])
    cluster.dead.add(id(ctl.routers[1]))
    with pytest.raises(PoolUnavailableError, match="no configured router"):
        run(ctl.roster.gate_weights())


def test_shutdown_kills_actors_and_forgets_state():
    ctl, cluster, _, weights = setup()
    start(ctl, contiguous(8, 2), weights)
    run(ctl.shutdown())
    assert len(cluster.killed) == 4 and ctl.store.keys() == []
    with pytest.raises(LookupError):
        Goal.load(ctl.store, ctl.spec.name)


def test_describe_is_typed_and_complete():
    ctl, _, _, weights = setup()
    start(ctl, contiguous(8, 2), weights)
    d = ctl.describe()
    assert (d.shards, d.routers, d.experts, d.live_experts, d.replicas) == (2, 2, 8, 8, 8)
    assert d.experts_per_shard == (4, 4) and d.to_dict()["spec"]["d_model"] == 16
    y = served(ctl, torch.randn(5, 16))
    assert all(isinstance(a, np.ndarray) for a in y)


def test_metrics_follow_changes_load_and_recovery():
    metrics = RecordingMetrics()
    ctl, cluster, _, weights = setup(E=16, shards=4, metrics=metrics)
    start(ctl, contiguous(16, 4), weights)
    ctl.load.load = np.ones(16)
    ctl.load.load[:4] = 40  # a hot set on shard 0
    ctl.record_state()
    assert metrics.values[("raymoe_imbalance", ())] == ctl.imbalance() > 2
    hot = {dict(t)["expert"]: v for (n, t), v in metrics.values.items() if "expert_load" in n}
    assert set(hot) == {str(e) for e in range(16)} | {"other"} and hot["other"] == 0
    assert hot["0"] == pytest.approx(40 * math.log(2) / ctl.spec.control.load_half_life_s)
    report = run(ctl.rebalance(trigger="auto"))
    assert metrics.total("raymoe_rebalances_total", trigger="auto") == 1
    assert metrics.total("raymoe_changes_total", op="rebalance") == 1
    assert metrics.total("raymoe_replicas_moved_total") == report.replicas_added > 0
    assert metrics.total("raymoe_bytes_moved_total") == report.bytes_moved > 0
    ctl.record_state()
    assert metrics.values[("raymoe_placement_version", ())] == 2
    assert metrics.values[("raymoe_replicas", ())] == ctl.placement.num_replicas
    ctl.roster.shards[1] = cluster.restart("shard", 1)
    settle(ctl)
    settle(ctl)  # seen ready again: one recovery, not one per pass
    assert metrics.total("raymoe_recoveries_total", role="shard") == 1
    run(ctl.rebalance(dry_run=True))
    assert metrics.total("raymoe_changes_total") == 1  # a dry run changes and counts nothing


def test_a_router_gone_for_good_is_replaced_and_configured():
    ctl, cluster, layer, weights = setup()
    start(ctl, contiguous(8, 2), weights)
    old = ctl.routers[1]
    cluster.dead.add(id(old))
    cluster.actors.pop(("router", 1))  # killed for good: its name is free again
    settle(ctl)  # the new one is started ...
    assert ctl.routers[1] is not old
    settle(ctl)  # ... and configured
    assert ctl.routers[1].ready()
    close(ctl, layer, torch.randn(9, 16))


def test_replicas_are_spread_over_the_shards_nodes_and_again_after_a_node_dies():
    ctl, cluster, layer, weights = setup(shards=4, min_replicas=2)
    cluster.shard_nodes = {0: "a", 1: "b", 2: "c", 3: "c"}
    start(ctl, Goal.initial(ctl.spec).placement, weights)
    settle(ctl)  # learns the nodes: experts on shards 2 and 3 share node c
    settle(ctl)

    def nodes_of(e):
        p = ctl.placement
        return {cluster.shard_nodes[int(s)] for s in p.shard[p.ptr[e] : p.ptr[e + 1]]}

    assert all(len(nodes_of(e)) == 2 for e in range(8))
    version = ctl.placement.version
    cluster.shard_nodes = {0: "a", 1: "b", 2: "a", 3: "b"}  # node c died; its shards moved
    settle(ctl)
    settle(ctl)
    assert ctl.placement.version > version
    assert all(len(nodes_of(e)) == 2 for e in range(8))
    close(ctl, layer, torch.randn(9, 16))
    settle(ctl)
    assert ctl.placement.version == version + 1  # repaired once, then left alone


def test_a_shard_gone_for_good_is_replaced_and_the_routers_get_its_handle():
    ctl, cluster, layer, weights = setup(shards=3, min_replicas=2)
    start(ctl, Goal.initial(ctl.spec).placement, weights)
    old = ctl.shards[1]
    cluster.dead.add(id(old))  # its node died: Ray will not restart it
    cluster.actors.pop(("shard", 1))
    settle(ctl)
    settle(ctl)
    assert ctl.shards[1] is not old and ctl.shards[1].ready
    assert all(r.shards.handles[1] is ctl.shards[1] for r in ctl.routers)
    close(ctl, layer, torch.randn(9, 16))


def test_a_spare_stands_in_for_a_dead_shard_until_it_is_back():
    ctl, cluster, layer, weights = setup(shards=3, spares=1)
    start(ctl, contiguous(8, 3), weights)
    spare, shard = ctl.standby.spares[0], ctl.shards[1]
    x = torch.randn(9, 16)
    cluster.dead.add(id(shard))  # its process died; Ray restarts it, empty
    shard.bank = None
    run(ctl.standby.step())
    assert ctl.standby.standing == {1: 0}
    assert "shard 1: its process restarts; spare 0 stands in" in ctl.describe().degraded
    assert np.array_equal(spare.expert_ids, shard.expert_ids)
    for r in ctl.routers:
        assert r.stand_ins == {1: 0} and r.shards.handles[1] is spare
    close(ctl, layer, x)  # shard 1's experts from the spare
    ctl.goal = ctl.goal.replace(placement=ctl.placement.bump())
    settle(ctl)
    run(ctl.standby.step())  # a newer placement: the spare loads again
    assert ctl.standby.loaded[0] == ctl.placement.version
    cluster.dead.discard(id(shard))  # back, and loaded
    shard.mark_ready()
    run(ctl.standby.step())
    assert ctl.standby.standing == {} and not ctl.describe().degraded
    for r in ctl.routers:
        assert r.stand_ins == {} and r.shards.handles[1] is shard
    close(ctl, layer, x)


def test_routers_drop_stand_ins_a_restarted_controller_does_not_know():
    ctl, cluster, layer, weights = setup(shards=2, spares=1)
    start(ctl, contiguous(8, 2), weights)
    cluster.dead.add(id(ctl.shards[0]))
    run(ctl.standby.step())
    cluster.dead.clear()
    ctl.standby.attach(1)  # as after a controller restart: nothing stands in
    settle(ctl)
    assert all(r.stand_ins == {} and r.shards.handles[0] is ctl.shards[0] for r in ctl.routers)
    close(ctl, layer, torch.randn(9, 16))
