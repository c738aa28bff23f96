"""The goal saves and loads itself (one key, pickle-free), and the metadata stores."""

from __future__ import annotations

import time

import pytest

from raymoe import PoolSpec, StoreUnavailableError
from raymoe._private.control.goal import Goal
from raymoe.errors import ConfigError
from raymoe.store import EmbeddedStore, MemoryStore, open_store
from raymoe.store.redis import RedisStore
from tests.helpers import spec_dict
from tests.redis_server import PASSWORD


def _spec(**shards):
    return PoolSpec.from_dict({**spec_dict({"kind": "topk", "k": 2}, E=8), "shards": shards})


def test_goal_round_trips_with_a_pending_change():
    spec = _spec(count=2, replicas={3: 2})
    goal = Goal.initial(spec)
    assert goal.placement.replicas()[3] == 2 and spec.pins == {3: 2}
    grown = spec.with_experts_added(2)
    pending = goal.placement.bump()
    goal = goal.replace(
        sources=("a.safetensors",),
        gate_file="g.safetensors",
        drained=frozenset({1}),
        routing_version=1,
        pending=pending,
        pending_spec=grown,
    )
    back = Goal.from_bytes(goal.to_bytes())
    assert back.spec == spec and back.pending_spec == grown
    assert back.placement.same_layout(goal.placement) and back.pending.version == 2
    assert (back.sources, back.gate_file) == (("a.safetensors",), "g.safetensors")
    assert (back.drained, back.routing_version) == (frozenset({1}), 1)


def test_goal_is_one_key_in_the_store(tmp_path):
    store = EmbeddedStore(tmp_path)
    goal = Goal.initial(_spec(count=2))
    goal.save(store)
    assert store.keys() == [Goal.key(goal.spec.name)]
    assert Goal.load(store, goal.spec.name).placement.same_layout(goal.placement)
    Goal.forget(store, goal.spec.name)
    with pytest.raises(LookupError):
        Goal.load(store, goal.spec.name)


@pytest.fixture(params=["memory", "embedded", "redis"])
def store(request, tmp_path):
    if request.param == "memory":
        return MemoryStore()
    if request.param == "embedded":
        return EmbeddedStore(tmp_path)
    return open_store(request.getfixturevalue("redis_server").env())


def test_store_roundtrip(store):
    assert store.get("p/a") is None
    store.put("p/a", b"1")
    store.put("p/b/c", b"2")
    store.put("q", b"3")
    assert store.get("p/a") == b"1" and store.keys("p/") == ["p/a", "p/b/c"]
    store.delete("p/a")
    store.delete("p/a")  # idempotent
    assert store.keys("p/") == ["p/b/c"]


def test_the_audit_log_keeps_its_last_entries(store):
    for i in range(7):
        store.append("p/audit", f"entry {i}".encode(), keep=5)
    assert store.tail("p/audit", 3) == [b"entry 4", b"entry 5", b"entry 6"]
    assert store.tail("p/audit", 100) == [f"entry {i}".encode() for i in range(2, 7)]
    assert store.tail("p/none") == [] and store.tail("p/audit", 0) == []


def test_a_goal_in_redis_survives_a_redis_restart(redis_server):
    store = open_store(redis_server.env())
    assert isinstance(store, RedisStore) and "test-redis-password" not in store.describe()
    goal = Goal.initial(_spec(count=2, replicas={3: 2}))
    goal.save(store)
    redis_server.stop()
    t = time.monotonic()
    with pytest.raises(StoreUnavailableError, match="unreachable"):
        goal.save(store)
    with pytest.raises(StoreUnavailableError):
        store.ping()
    assert time.monotonic() - t < 3  # fails fast, no retry loop
    redis_server.start()
    back = Goal.load(store, goal.spec.name)
    assert back.spec == goal.spec and back.placement.same_layout(goal.placement)


def test_redis_credentials_and_urls_are_checked(redis_server):
    with pytest.raises(StoreUnavailableError, match="RAYMOE_REDIS_PASSWORD"):
        RedisStore(redis_server.url, password="wrong").ping()
    with pytest.raises(StoreUnavailableError, match="RAYMOE_REDIS_PASSWORD"):
        RedisStore(redis_server.url).ping()
    with pytest.raises(ConfigError, match="redis://"):
        RedisStore("http://localhost:6379")
    url = f"redis://:{PASSWORD}@127.0.0.1:{redis_server.port}/0"
    store = RedisStore(url)  # the password in the URL works too, and is never shown
    store.ping()
    assert PASSWORD not in store.describe()
