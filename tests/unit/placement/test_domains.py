"""Failure domains (``shards.min_replicas``): every expert on distinct shards and on as many
nodes as hold shards, repaired by :func:`spread` after any plan, kept by every policy."""

from __future__ import annotations

import numpy as np
import pytest

from raymoe.placement import POLICIES, Budget, diff, get_policy, initial
from raymoe.placement.domains import gaps, spread, wanted


def domains_of(p, expert: int, doms) -> set[int]:
    lo, hi = p.ptr[expert], p.ptr[expert + 1]
    return {int(doms[s]) for s in p.shard[lo:hi]}


def check(p, doms, m, pins=None, active=None):
    active = np.ones(p.num_shards, bool) if active is None else active
    assert not gaps(p, np.asarray(doms), wanted(p, m, pins or {}), active).any()
    e, s = p.pairs()
    assert len(set(zip(e.tolist(), s.tolist(), strict=True))) == len(e)  # distinct shards


def test_every_expert_gets_a_replica_on_another_node_evenly():
    p = initial(12, 4)
    doms = np.array([0, 0, 1, 1])
    q = spread(p, doms, 2)
    check(q, doms, 2)
    assert q.version == p.version and (q.replicas() == 2).all()
    assert all(domains_of(q, e, doms) == {0, 1} for e in range(12))
    assert q.held().tolist() == [6, 6, 6, 6]
    assert diff(p, q).replicas_dropped == 0  # only added; old places kept


def test_a_node_lost_moves_replicas_that_now_share_a_node():
    doms = np.array([0, 0, 1, 1])
    q = spread(initial(12, 4), doms, 2)
    after = np.array([0, 0, 0, 1])  # shard 2 restarted on node 0
    r = spread(q, after, 2)
    check(r, after, 2)
    assert (r.replicas() == 2).all()  # moved, not added
    assert spread(r, after, 2) is r  # nothing left to repair


def test_one_node_means_distinct_shards_and_pins_keep_their_count():
    p = initial(8, 3, replicas={0: 3})
    q = spread(p, np.zeros(3), 2, pins={0: 3})
    check(q, np.zeros(3), 2, pins={0: 3})
    assert q.replicas()[0] == 3 and (q.replicas()[1:] == 2).all()


def test_more_replicas_than_shards_is_capped_and_removed_experts_stay_empty():
    p = initial(6, 2, removed=[3])
    q = spread(p, np.array([0, 1]), 4)
    assert q.replicas().tolist() == [2, 2, 2, 0, 2, 2]


def test_drained_shards_get_nothing():
    active = np.array([True, True, True, False])
    q = spread(initial(8, 4), np.array([0, 0, 1, 1]), 2, active=active)
    check(q, np.array([0, 0, 1, 1]), 2, active=active)
    new = diff(initial(8, 4), q).added[1]
    assert 3 not in new.tolist()


def test_a_million_experts_spread_over_three_nodes():
    doms = np.array([0, 0, 0, 1, 1, 1, 2, 2])
    q = spread(initial(1 << 20, 8), doms, 2)
    check(q, doms, 2)
    held = q.held()
    assert held.max() / held.mean() < 1.2


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_every_policy_keeps_the_floor(name):
    rng = np.random.default_rng(0)
    load = rng.zipf(1.3, 32).astype(np.float64)
    current = spread(initial(32, 4), np.arange(4), 2)
    budget = Budget(4, 2 * 32 + 8, min_replicas=2)
    plan = get_policy(name)(load, current, budget, bytes_per_expert=1)
    assert (plan.placement.replicas() >= 2).all()
