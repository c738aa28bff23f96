"""The controller's state machine with a fake cluster (no Ray), and the metadata stores."""

from __future__ import annotations

import asyncio
import inspect

import numpy as np
import pytest
import torch

from raymoe import ConfigError, DTypeError, ExpertIdError, MoELayer, PoolSpec, ShapeError
from raymoe._private.controller import Controller
from raymoe._private.placement import Placement, contiguous, replicated
from raymoe._private.router import Router
from raymoe._private.shard import ExpertShard
from raymoe._private.stats import merge_stats
from raymoe.errors import NonFiniteError
from raymoe.store import EmbeddedStore, MemoryStore
from tests.helpers import spec_dict


class Calls:
    def __init__(self, shards):
        self.shards = shards

    async def compute(self, n, x, ids, w):
        return self.shards[n].compute(x, ids, w)

    def retryable(self, error):
        return False


class FakeRouter(Router):
    def configure_pool(self, shards, placement, weights=None, spec=None, routing_version=0):
        self.configure(Calls(shards), placement, weights, spec, routing_version)


class FakeCluster:
    """Actors are plain objects; 'restarting' one replaces it by a fresh, empty instance."""

    def __init__(self, spec):
        self.spec = spec
        self.actors: dict[tuple[str, int], object] = {}
        self.killed = []
        self.node_ids = ["node-a"]
        self.refuse: set[str] = set()  # nodes where a gateway cannot bind its port

    def shard(self, i):
        return self.actors.setdefault(("shard", i), ExpertShard(self.spec, i))

    def router(self, i):
        return self.actors.setdefault(("router", i), FakeRouter(self.spec))

    def restart(self, role, i):
        self.actors.pop((role, i))
        return getattr(self, role)(i)

    def put(self, value):
        return value

    async def call(self, handle, method, *args, timeout=None):
        out = getattr(handle, method)(*args)
        return await out if inspect.isawaitable(out) else out

    def kill(self, handles):
        self.killed += handles

    def nodes(self):
        return list(self.node_ids)

    def gateway(self, key, node):
        return self.actors.setdefault(("gateway", key), FakeGateway(node, self))


class FakeGateway:
    def __init__(self, node, cluster):
        self.node, self.cluster = node, cluster

    def endpoint(self):
        if self.node in self.cluster.refuse:
            raise RuntimeError(f"Failed to bind to address {self.node}:50051")
        return f"{self.node or 'any'}:50051"


def setup(store=None, **gateway):
    spec = PoolSpec.from_dict({**spec_dict({"kind": "topk", "k": 2}, E=8),
                               "shards": {"count": 2, "routers": 2},
                               "gateway": {"enabled": bool(gateway), **gateway}})  # fmt: skip
    layer = MoELayer(spec).eval()
    with torch.no_grad():
        for p in layer.parameters():
            p.mul_(1.5)  # unlike the seeded init
    weights = {k: v.numpy() for k, v in layer.state_dict().items()}
    cluster = FakeCluster(spec)
    ctl = Controller(spec, cluster, store or MemoryStore())
    return ctl, cluster, layer, weights


async def served(ctl, x):
    return await ctl.routers[0].forward(x.numpy())


def test_start_configures_everything_and_saves_the_goal_first():
    ctl, _, layer, weights = setup()

    async def main():
        await ctl.start(contiguous(8, 2), weights)
        return await served(ctl, x)

    x = torch.randn(9, 16)
    y = asyncio.run(main())
    with torch.no_grad():
        assert np.abs(y - layer(x).numpy()).max() <= 1e-5
    g = Controller.load_goal(ctl.store, ctl.spec.name)
    assert g["spec"] == ctl.spec and g["placement"].version == 1 and g["has_rows"]
    assert g["pending"] is None
    assert all(r.ready for r in ctl.routers)


def test_update_reloads_a_restarted_shard_and_router():
    ctl, cluster, layer, weights = setup()
    x = torch.randn(9, 16)

    async def main():
        await ctl.start(contiguous(8, 2), weights)
        ctl.shards[1] = cluster.restart("shard", 1)  # comes back empty
        ctl.routers[1] = cluster.restart("router", 1)
        assert not ctl.shards[1].ready and not ctl.routers[1].ready
        await ctl.update()
        await asyncio.gather(*ctl._busy.values())
        return await asyncio.gather(*(r.forward(x.numpy()) for r in ctl.routers))

    outs = asyncio.run(main())
    with torch.no_grad():
        for y in outs:
            assert np.abs(y - layer(x).numpy()).max() <= 1e-5


def test_weight_increments_stay_bounded_and_reload_a_shard():
    """Many changes: what the controller keeps to reload a shard stays within twice the
    rows the shard holds, and a shard restarted afterwards serves the right weights."""
    ctl, cluster, layer, weights = setup()
    x = torch.randn(9, 16)

    async def main():
        await ctl.start(contiguous(8, 2), weights)
        for i in range(12):
            await ctl.replicate(i % 8, 2)
            await ctl.replicate(i % 8, 1)
        sizes = {n: sum(len(ids) for ids, _ in ctl._rows[n]) for n in range(2)}
        live = {n: len(ctl.placement.shard_experts(n)) for n in range(2)}
        ctl.shards[0] = cluster.restart("shard", 0)
        await ctl.update()
        return sizes, live, await served(ctl, x)

    sizes, live, y = _run(main())
    assert all(sizes[n] <= 2 * live[n] for n in range(2)), (sizes, live)
    with torch.no_grad():
        assert np.abs(y - layer(x).numpy()).max() <= 1e-5


def test_update_publishes_a_newer_placement():
    ctl, _, _, weights = setup()

    async def main():
        await ctl.start(contiguous(8, 2), weights)
        ctl.placement = replicated(ctl.placement, {}, version=2)
        await ctl.update()
        await asyncio.gather(*ctl._busy.values())

    asyncio.run(main())
    assert [r.placement.version for r in ctl.routers] == [2, 2]


def test_update_survives_a_failing_cluster(caplog):
    ctl, _, _, weights = setup()

    async def main():
        await ctl.start(contiguous(8, 2), weights)
        ctl.placement = None  # break the goal: update must log and return, not raise
        await ctl.update()

    asyncio.run(main())
    assert "controller update failed" in caplog.text


def test_recover_resumes_from_the_store(tmp_path):
    store = EmbeddedStore(tmp_path)
    ctl, cluster, layer, weights = setup(store)
    x = torch.randn(9, 16)

    async def main():
        await ctl.start(replicated(contiguous(8, 2), {3: 2}, version=4), weights)
        again = Controller(ctl.spec, cluster, EmbeddedStore(tmp_path))  # the restarted one
        await again.recover()
        return again, await again.routers[1].forward(x.numpy())

    again, y = asyncio.run(main())
    assert again.placement.version == 4 and again.describe()["replicas"] == 9
    assert again._rows.keys() == {0, 1}  # weights taken back from the live shards
    with torch.no_grad():
        assert np.abs(y - layer(x).numpy()).max() <= 1e-5


def test_shutdown_kills_actors_and_forgets_state():
    ctl, cluster, _, weights = setup()
    asyncio.run(ctl.start(contiguous(8, 2), weights))
    asyncio.run(ctl.shutdown())
    assert len(cluster.killed) == 4 and ctl.store.keys() == []
    with pytest.raises(LookupError):
        Controller.load_goal(ctl.store, ctl.spec.name)


def test_merge_stats():
    r = {"requests": [(10.0, 4, 0.002), (11.0, 4, 0.004)], "batch_tokens": [8],
         "counters": {"batches": 1}, "shard_load": np.array([6, 2]),
         "expert_load": np.ones(8, np.int64)}  # fmt: skip
    st = merge_stats([r, r], 2, 8, window_s=60)
    assert st["requests"] == 4 and st["counters"] == {"batches": 2}
    assert st["pairs_per_shard"] == [12, 4] and st["imbalance"] == 1.5
    assert st["tokens_per_s"] == 16.0 and st["latency_ms"]["p50"] == pytest.approx(3.0)


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


def test_placement_bytes_roundtrip():
    p = replicated(contiguous(10, 3), {1: 3}, version=7)
    q = Placement.from_bytes(p.to_bytes())
    assert q.version == 7 and q.num_shards == 3
    assert all(torch.equal(getattr(p, k), getattr(q, k)) for k in ("ptr", "shard", "local"))


# --- experts added and removed at runtime (fake cluster: the real shards and routers) -----


_LOOP = asyncio.new_event_loop()  # one loop: the routers' queues and events live on it


def _run(coro):
    return _LOOP.run_until_complete(coro)


def _grown_reference(ctl, layer, extra: dict) -> MoELayer:
    """MoELayer of the controller's current spec holding ``layer``'s weights + ``extra`` rows."""
    ref = MoELayer(ctl.spec).eval()
    sd = {k: v.clone() for k, v in layer.state_dict().items()}
    for k, v in extra.items():
        if k == "router.keys":
            rows = v.shape[1]
            keys = torch.zeros(ref.state_dict()[k].shape)
            old = sd[k]
            keys[:, 0, : old.shape[2]] = old[:, 0]
            keys[:, 0, old.shape[2] : old.shape[2] + rows] = torch.as_tensor(v)
            keys[:, 1, : old.shape[2]] = old[:, 1]
            sd[k] = keys
        else:
            sd[k] = torch.cat([sd[k], torch.as_tensor(v)])
    ref.load_state_dict(sd)
    return ref


def _close(ctl, ref, x, atol=1e-5):
    async def each():
        return await asyncio.gather(*(r.forward(x.numpy()) for r in ctl.routers))

    ys = _run(each())
    with torch.no_grad():
        want = ref(x).numpy()
    assert all(np.abs(y - want).max() <= atol for y in ys)


def test_add_experts_with_weights_serves_them():
    ctl, _, layer, weights = setup()
    g = torch.Generator().manual_seed(3)
    extra = {
        "experts.w_gate": torch.randn(3, 24, 16, generator=g) * 0.2,
        "experts.w_up": torch.randn(3, 24, 16, generator=g) * 0.2,
        "experts.w_down": torch.randn(3, 16, 24, generator=g) * 0.2,
        "router.weight": torch.randn(3, 16, generator=g) * 3,
    }  # hot: they get chosen
    _run(ctl.start(contiguous(8, 2), weights))
    report = _run(ctl.add_experts(3, {k: v.numpy() for k, v in extra.items()}))
    assert report["expert_ids"] == [8, 9, 10] and ctl.spec.num_experts == 11
    assert all(r.placement.num_experts == 11 and r.spec.num_experts == 11 for r in ctl.routers)
    x = torch.randn(40, 16)
    ref = _grown_reference(ctl, layer, extra)
    assert torch.isin(ref(x, return_info=True)[1].expert_ids, torch.tensor([8, 9, 10])).any()
    _close(ctl, ref, x)
    assert Controller.load_goal(ctl.store, ctl.spec.name)["spec"].num_experts == 11


def test_add_experts_without_weights_takes_the_seeded_init_of_their_ids():
    spec = PoolSpec.from_dict({**spec_dict({"kind": "topk", "k": 2}, E=8),
                               "shards": {"count": 2}})  # fmt: skip
    ctl = Controller(spec, FakeCluster(spec), MemoryStore())
    _run(ctl.start(contiguous(8, 2), None))
    before = ctl.routers[0].gate_weights()["router.weight"]
    _run(ctl.add_experts(4))
    gate = ctl.routers[0].gate_weights()
    assert np.array_equal(gate["router.weight"][:8], before)  # old rows untouched
    ref = MoELayer(ctl.spec).eval()  # seeded experts by id; the grown gate from the pool
    ref.router.weight.data = torch.as_tensor(gate["router.weight"])
    _close(ctl, ref, torch.randn(30, 16))


def test_product_key_pool_grows_by_whole_rows():
    spec = PoolSpec.from_dict({**spec_dict({"kind": "product_key", "heads": 2, "k": 2,
                                            "d_key": 8}, E=16, kind="peer"),
                               "shards": {"count": 2}})  # fmt: skip
    layer = MoELayer(spec).eval()
    ctl = Controller(spec, FakeCluster(spec), MemoryStore())
    weights = {k: v.numpy() for k, v in layer.state_dict().items()}
    _run(ctl.start(contiguous(16, 2, align=4), weights))
    g = torch.Generator().manual_seed(1)
    extra = {"experts.u": torch.randn(8, 16, generator=g), "experts.v": torch.randn(8, 16,
             generator=g), "router.keys": torch.randn(2, 2, 4, generator=g) * 2}  # fmt: skip
    with pytest.raises(ConfigError, match="whole sub-key rows of 4"):
        _run(ctl.add_experts(6))
    _run(ctl.add_experts(8, {k: v.numpy() for k, v in extra.items()}))
    assert ctl.spec.routing.grid(24) == (6, 4)
    # each new row landed whole on one shard
    shard_of = ctl.placement.primary()[0]
    assert len(set(shard_of[16:20].tolist())) == 1 and len(set(shard_of[20:24].tolist())) == 1
    _close(ctl, _grown_reference(ctl, layer, extra), torch.randn(50, 16))


def test_remove_experts_stops_routing_to_them_and_frees_their_places():
    ctl, _, layer, weights = setup()
    _run(ctl.start(contiguous(8, 2), weights))
    report = _run(ctl.remove_experts([2, 5]))
    assert report["removed"] == [2, 5] and report["replicas_dropped"] == 2
    assert ctl.placement.replicas()[[2, 5]].tolist() == [0, 0]
    assert sum(s.status()["experts"] for s in ctl.shards) == 6  # their places were freed
    ref = MoELayer(ctl.spec).eval()
    ref.load_state_dict(layer.state_dict())
    _close(ctl, ref, torch.randn(30, 16))
    # a rebalance never gives a removed expert a replica back
    _run(ctl.rebalance(policy_name="eplb"))
    assert ctl.placement.replicas()[[2, 5]].tolist() == [0, 0]
    _close(ctl, ref, torch.randn(30, 16))


@pytest.mark.parametrize("op,args,error,match", [
    ("remove_experts", ([8],), ExpertIdError, "not in"),
    ("remove_experts", ([],), ConfigError, "at least one"),
    ("remove_experts", (list(range(7)),), ConfigError, "live experts"),  # k=2 needs 2
    ("remove_experts", ([1.5],), DTypeError, "integers"),
    ("add_experts", (0,), ConfigError, "count"),
    ("add_experts", (2, {"experts.w_up": np.zeros((2, 24, 16), np.float32)}), ConfigError,
     "missing"),
    ("add_experts", (2, {"router.weight": np.zeros((3, 16), np.float32)}), ShapeError, "shape"),
    ("add_experts", (2, {"router.weight": np.full((2, 16), np.nan, np.float32)}),
     NonFiniteError, "NaN"),
    ("add_experts", (2, {"router.nope": np.zeros((2, 16), np.float32)}), ConfigError, "unknown"),
])  # fmt: skip
def test_bad_expert_changes_are_refused_and_change_nothing(op, args, error, match):
    ctl, _, _, weights = setup()
    _run(ctl.start(contiguous(8, 2), weights))
    before = (ctl.spec, ctl.placement.version)
    with pytest.raises(error, match=match):
        _run(getattr(ctl, op)(*args))
    assert (ctl.spec, ctl.placement.version) == before


def test_removed_experts_stay_removed():
    ctl, _, _, weights = setup()
    _run(ctl.start(contiguous(8, 2), weights))
    _run(ctl.remove_experts([3]))
    for op, args in [("remove_experts", ([3],)), ("replicate", (3, 2)), ("pin", (3, 1))]:
        with pytest.raises(ExpertIdError, match="removed"):
            _run(getattr(ctl, op)(*args))


def test_kinds_that_cannot_grow_say_so():
    spec = PoolSpec.from_dict({**spec_dict({"kind": "hash", "vocab_size": 100}, E=8),
                               "shards": {"count": 2}})  # fmt: skip
    ctl = Controller(spec, FakeCluster(spec), MemoryStore())
    _run(ctl.start(contiguous(8, 2), None))
    with pytest.raises(ConfigError, match="cannot add"):
        _run(ctl.add_experts(2))
    with pytest.raises(ConfigError, match="cannot remove"):
        _run(ctl.remove_experts([1]))


# --- the automatic control loop -----------------------------------------------------------


@pytest.mark.parametrize("rate,shards,want", [
    (0, 4, 1),        # idle: down to the minimum
    (350, 4, 4),      # under the target per shard, but 3 shards would carry 117 > 60 each
    (400, 4, 4),      # exactly at the target: stay
    (401, 4, 6),      # above: grow to carry it at 80% of the target
    (170, 4, 3),      # one fewer would carry 57 <= 60 each: shrink to what fits at 80%
    (10_000, 4, 8),   # capped by hi
])  # fmt: skip
def test_shards_for_has_hysteresis(rate, shards, want):
    from raymoe._private.policy import shards_for

    assert shards_for(rate, shards, target=100, down_below=0.6, lo=1, hi=8) == want


def test_shards_for_never_oscillates():
    from raymoe._private.policy import shards_for

    for rate in np.linspace(0, 2000, 401):
        n = shards_for(rate, 4, target=100, down_below=0.6, lo=1, hi=32)
        assert shards_for(rate, n, target=100, down_below=0.6, lo=1, hi=32) == n, rate


def _controlled(control: dict, routing: dict | None = None, shards: int = 1):
    spec = PoolSpec.from_dict({**spec_dict(routing or {"kind": "topk", "k": 2}, E=8),
                               "shards": {"count": shards}, "control": control})  # fmt: skip
    ctl = Controller(spec, FakeCluster(spec), MemoryStore())
    _run(ctl.start(contiguous(8, shards), None))
    return ctl


def _traffic(ctl, tokens: int, seconds: float = 1.0):
    _run(ctl.routers[0].forward(torch.randn(tokens, 16).numpy()))
    ctl._load_t -= seconds  # as if the tokens came over ``seconds``


def test_autoscaler_grows_and_shrinks_the_pool_within_bounds():
    ctl = _controlled(
        {
            "autoscale": True,
            "target_tokens_per_shard_s": 100,
            "min_shards": 1,
            "max_shards": 3,
            "scale_cooldown_s": 0,
            "load_half_life_s": 0.01,
        }
    )
    _traffic(ctl, 400)
    _run(ctl._control_step())
    assert ctl.placement.num_shards == 3 and len(ctl.shards) == 3  # 5 wanted, 3 allowed
    x = torch.randn(20, 16)
    _close(ctl, MoELayer(ctl.spec).eval(), x)
    _traffic(ctl, 0)
    _run(ctl._control_step())
    assert ctl.placement.num_shards == 1
    _close(ctl, MoELayer(ctl.spec).eval(), x)


def test_autoscaler_waits_out_its_cooldown():
    ctl = _controlled(
        {
            "autoscale": True,
            "target_tokens_per_shard_s": 100,
            "max_shards": 4,
            "scale_cooldown_s": 3600,
            "load_half_life_s": 0.01,
        }
    )
    _traffic(ctl, 400)
    _run(ctl._control_step())
    n = ctl.placement.num_shards
    _traffic(ctl, 0)
    _run(ctl._control_step())
    assert ctl.placement.num_shards == n > 1


def test_aux_loss_free_bias_moves_towards_balance():
    ctl = _controlled({"bias_update_rate": 0.01},
                      routing={"kind": "topk", "k": 2, "score": "sigmoid",
                               "correction_bias": True})  # fmt: skip
    _traffic(ctl, 300)
    counts = ctl.routers[0]._expert_load.numpy().copy()
    _run(ctl._control_step())
    bias = ctl.routers[0].gate_weights()["router.correction_bias"]
    mean = counts.mean()
    assert np.allclose(bias, 0.01 * np.sign(mean - counts))
    ref = MoELayer(ctl.spec).eval()  # the pool gates with the updated bias
    ref.router.correction_bias.copy_(torch.as_tensor(bias))
    _close(ctl, ref, torch.randn(20, 16))


def test_control_step_logs_and_goes_on(caplog):
    ctl = _controlled({"autoscale": True, "auto_rebalance": True, "rebalance_interval_s": 0.01})

    def broken(*a, **k):
        raise RuntimeError("boom")

    ctl.autoscale = broken
    _run(ctl._control_step())
    assert "control step failed" in caplog.text


@pytest.mark.parametrize("control,field", [
    ({"bias_update_rate": 0.01}, "control.bias_update_rate"),  # no correction bias to move
    ({"min_shards": 4, "max_shards": 2}, "control.max_shards"),
])  # fmt: skip
def test_impossible_control_specs_are_config_errors(control, field):
    with pytest.raises(ConfigError) as e:
        PoolSpec.from_dict({**spec_dict({"kind": "topk", "k": 2}), "control": control})
    assert e.value.field == field


# --- gateways -------------------------------------------------------------------------------


def test_one_gateway_unless_per_node_and_none_unless_enabled():
    for gateway, want in (({}, []), ({"port": 0}, ["any:50051"])):
        ctl, cluster, _, weights = setup(**gateway)
        cluster.node_ids = ["node-a", "node-b"]
        asyncio.run(ctl.start(contiguous(8, 2), weights))
        assert ctl.gateway_endpoints() == want


def test_per_node_gateways_follow_nodes_that_join_and_leave(monkeypatch):
    from raymoe._private import fleet

    monkeypatch.setattr(fleet, "CHECK_S", 0.0)
    ctl, cluster, _, weights = setup(per_node=True)

    async def main():
        await ctl.start(contiguous(8, 2), weights)
        assert ctl.gateway_endpoints() == ["node-a:50051"]
        cluster.node_ids = ["node-a", "node-b", "node-c"]  # two join; one cannot bind
        cluster.refuse = {"node-c"}
        await ctl.update()
        await asyncio.gather(*ctl._busy.values())
        assert ctl.gateway_endpoints() == ["node-a:50051", "node-b:50051"]
        assert cluster.actors.pop(("gateway", "node-c")) in cluster.killed  # its name freed
        cluster.refuse = set()
        cluster.node_ids = ["node-b", "node-c"]  # node-a leaves; node-c is tried again
        gone = ctl.gateways["node-a"][0]
        await ctl.update()
        await asyncio.gather(*ctl._busy.values())
        assert ctl.gateway_endpoints() == ["node-b:50051", "node-c:50051"]
        assert gone in cluster.killed
        await ctl.shutdown()
        assert ctl.gateway_endpoints() == []

    asyncio.run(main())


def test_a_gateway_that_cannot_start_fails_the_deploy():
    from raymoe.errors import PoolError

    ctl, cluster, _, weights = setup(per_node=True)
    cluster.refuse = {"node-a"}
    with pytest.raises(PoolError, match=r"node node-a: .*Failed to bind"):
        asyncio.run(ctl.start(contiguous(8, 2), weights))
