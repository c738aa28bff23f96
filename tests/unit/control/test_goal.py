"""The goal saves and loads itself (one key, pickle-free), and the metadata stores."""

from __future__ import annotations

import pytest

from raymoe import PoolSpec
from raymoe._private.control.goal import Goal
from raymoe.store import EmbeddedStore, MemoryStore
from tests.helpers import spec_dict


def _spec(**shards):
    return PoolSpec.from_dict({**spec_dict({"kind": "topk", "k": 2}, E=8), "shards": shards})


def test_goal_round_trips_with_a_pending_change():
    spec = _spec(count=2, replicas={3: 2})
    goal = Goal.initial(spec)
    assert goal.placement.replicas()[3] == 2 and spec.pins == {3: 2}
    grown = spec.with_experts_added(2)
    pending = goal.placement.bump()
    goal = goal.replace(
        has_rows=True,
        drained=frozenset({1}),
        routing_version=1,
        pending=pending,
        pending_spec=grown,
    )
    back = Goal.from_bytes(goal.to_bytes())
    assert back.spec == spec and back.pending_spec == grown
    assert back.placement.same_layout(goal.placement) and back.pending.version == 2
    assert (back.has_rows, back.drained, back.routing_version) == (True, frozenset({1}), 1)


def test_goal_is_one_key_in_the_store(tmp_path):
    store = EmbeddedStore(tmp_path)
    goal = Goal.initial(_spec(count=2))
    goal.save(store)
    assert store.keys() == [Goal.key(goal.spec.name)]
    assert Goal.load(store, goal.spec.name).placement.same_layout(goal.placement)
    Goal.forget(store, goal.spec.name)
    with pytest.raises(LookupError):
        Goal.load(store, goal.spec.name)


@pytest.mark.parametrize("make", [MemoryStore, EmbeddedStore], ids=["memory", "embedded"])
def test_store_roundtrip(make, tmp_path):
    store = make(tmp_path) if make is EmbeddedStore else make()
    assert store.get("p/a") is None
    store.put("p/a", b"1")
    store.put("p/b/c", b"2")
    store.put("q", b"3")
    assert store.get("p/a") == b"1" and store.keys("p/") == ["p/a", "p/b/c"]
    store.delete("p/a")
    store.delete("p/a")  # idempotent
    assert store.keys("p/") == ["p/b/c"]
