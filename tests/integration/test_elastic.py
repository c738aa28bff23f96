"""Runtime operations on a live pool under concurrent traffic: no request fails, every answer
equals MoELayer, and the pool's layout changes as asked (checked through describe)."""

from __future__ import annotations

import contextlib

import pytest
import torch

import raymoe
from raymoe import ConfigError, ExpertIdError, MoELayer, PoolSpec
from tests.helpers import ClientThreads, spec_dict

pytestmark = pytest.mark.integration


class Traffic(ClientThreads):
    """``clients`` threads sending requests until stopped; records errors and failures.

    While an operation that changes the layer's function runs (experts added or removed),
    a request may be served by the layer before or after it: :meth:`change` names the layer
    after, and a request is checked against the layers current from when it started to
    after the change running when it ended (a request queued behind two changes may be
    served by the second's layer)."""

    def __init__(self, pool, layer, clients=6):
        self.pool = pool
        self.xs = [
            torch.randn(8 + 4 * i, 16, generator=torch.Generator().manual_seed(i))
            for i in range(clients)
        ]
        self.wants = [self._outputs(layer)]  # per epoch: the right output of every client
        self.epoch = 0
        self.errors: list[float] = []
        self.failures: list[BaseException] = []
        super().__init__(clients)

    def _outputs(self, layer):
        with torch.no_grad():
            return [layer(x) for x in self.xs]

    @contextlib.contextmanager
    def change(self, layer):
        """The operation run inside turns the pool's function into ``layer``'s."""
        self.wants.append(self._outputs(layer))
        yield
        self.epoch += 1

    def _run(self, i):
        while not self.stop.is_set():
            e = self.epoch
            try:
                y = self.pool.forward(self.xs[i])
                ok = [w[i] for w in self.wants[e : self.epoch + 2]]
                self.errors.append(min((y - w).abs().max().item() for w in ok))
            except BaseException as err:  # the test asserts there are none
                self.failures.append(err)


@pytest.mark.parametrize("transport", ["object_store", "grpc"])
def test_operations_under_traffic_fail_nothing(ray_cluster, transport):
    spec = PoolSpec.from_dict(
        {
            **spec_dict({"kind": "topk", "k": 2, "renormalize": True}, E=16),
            "name": f"t-elastic-{transport}",
            "shards": {"count": 3, "routers": 2, "transport": transport},
        }
    )
    layer = MoELayer(spec).eval()
    with torch.no_grad():
        for p in layer.experts.parameters():
            p.mul_(1.5)  # weights unlike the seeded init: copies must carry these
    pool = raymoe.serve(spec, weights=layer.state_dict())
    try:
        with Traffic(pool, layer) as traffic:
            v0 = pool.describe().placement_version
            r = pool.replicate(3, 3)
            assert r.replicas_added == 2 and r.version > v0
            assert pool.replicate(3, 3).replicas_added == 0  # idempotent
            assert pool.pin(5, 2).pinned == {5: 2}
            plan = pool.rebalance(dry_run=True)
            assert plan.dry_run and plan.version == pool.describe().placement_version
            pool.rebalance()
            d = pool.drain_shard(0)
            assert pool.describe().experts_per_shard[0] == 0, d
            pool.scale_shards(5)
            d = pool.describe()
            assert d.shards == 5 and min(d.experts_per_shard) > 0, d  # drain ended
            pool.scale_shards(2)
            d = pool.describe()
            assert d.shards == 2 and sum(d.experts_per_shard) >= 16
            pool.replicate(3, 1)
            pool.unpin(5)
        assert not traffic.failures, traffic.failures[:1]
        assert len(traffic.errors) > 20 and max(traffic.errors) <= 1e-5
        x = torch.randn(40, 16)
        with torch.no_grad():
            assert (pool.forward(x) - layer(x)).abs().max().item() <= 1e-5
    finally:
        pool.shutdown()


def test_bad_admin_input_is_refused_and_changes_nothing(ray_cluster):
    spec = PoolSpec.from_dict(
        {**spec_dict({"kind": "topk", "k": 2}, E=8), "name": "t-admin", "shards": {"count": 2}}
    )
    pool = raymoe.serve(spec)

    def refused(error, match, op, *args):
        before = pool.describe()
        with pytest.raises(error, match=match):
            getattr(pool, op)(*args)
        assert pool.describe() == before  # everything, not just the shard count

    try:
        refused(ExpertIdError, None, "replicate", 8, 2)
        refused(ExpertIdError, None, "pin", -1, 2)
        refused(ConfigError, "replicas", "replicate", 0, 0)
        refused(ConfigError, "replicas", "replicate", 0, 3)  # more than the shards
        refused(ConfigError, "shards", "scale_shards", 0)
        refused(ConfigError, "shards", "scale_shards", 9)  # more shards than experts
        refused(ConfigError, "shard", "drain_shard", 5)
        pool.drain_shard(1)
        refused(ConfigError, "last", "drain_shard", 0)
        refused(ConfigError, "policy", "rebalance", False, "nope")
        refused(ConfigError, "count", "add_experts", 0)
        refused(ExpertIdError, "removed|not in", "remove_experts", [99])
        x = torch.randn(8, 16)
        assert (pool.forward(x) - MoELayer(spec)(x)).abs().max().item() <= 1e-5
    finally:
        pool.shutdown()


GROWING = {
    "topk": {"kind": "topk", "k": 2, "renormalize": True},
    "switch": {"kind": "switch", "capacity_factor": 1.5},
    "expert_choice": {"kind": "expert_choice", "k": 2},
}


@pytest.mark.parametrize(
    "kind,transport",
    [
        ("topk", "object_store"),
        ("topk", "grpc"),
        ("switch", "object_store"),
        ("expert_choice", "grpc"),
    ],
)
def test_experts_added_and_removed_under_traffic(ray_cluster, kind, transport):
    spec = PoolSpec.from_dict(
        {
            **spec_dict(GROWING[kind], E=8),
            "name": f"t-grow-{kind}-{transport}",
            "shards": {"count": 2, "routers": 2, "transport": transport},
        }
    )
    layer = MoELayer(spec).eval()
    pool = raymoe.serve(spec, weights=layer.state_dict())
    g = torch.Generator().manual_seed(5)
    extra = {
        "experts.w_gate": torch.randn(4, 24, 16, generator=g) * 0.2,
        "experts.w_up": torch.randn(4, 24, 16, generator=g) * 0.2,
        "experts.w_down": torch.randn(4, 16, 24, generator=g) * 0.2,
        "router.weight": torch.randn(4, 16, generator=g) * 2,
    }
    grown = PoolSpec.from_dict(
        {
            **spec.model_dump(mode="json"),
            "experts": {**spec.experts.model_dump(), "num_experts": 12},
        }
    )
    big = MoELayer(grown).eval()
    sd = layer.state_dict()
    big.load_state_dict({k: torch.cat([sd[k], extra[k]]) if k in extra else sd[k] for k in sd})
    try:
        with Traffic(pool, layer) as traffic:
            with traffic.change(big):
                r = pool.add_experts(4, extra)
            assert r.expert_ids == (8, 9, 10, 11)
            d = pool.describe()
            assert d.experts == 12 and sum(d.experts_per_shard) == 12
            pool.replicate(9, 2)  # new experts are ordinary experts
            small = MoELayer(
                PoolSpec.from_dict(
                    {
                        **grown.model_dump(mode="json"),
                        "experts": {**grown.experts.model_dump(), "removed": [1, 9]},
                    }
                )
            ).eval()
            small.load_state_dict(big.state_dict())
            with traffic.change(small):
                r = pool.remove_experts([1, 9])
            assert r.removed == (1, 9)
            assert sum(pool.describe().experts_per_shard) == 10
            with pytest.raises(ExpertIdError, match="removed"):
                pool.forward(
                    torch.randn(2, 16),
                    expert_ids=torch.tensor([[1], [0]]),
                    weights=torch.ones(2, 1),
                )
        assert not traffic.failures, traffic.failures[:1]
        assert len(traffic.errors) > 20 and max(traffic.errors) <= 1e-5
        x = torch.randn(40, 16)
        with torch.no_grad():
            assert (pool.forward(x) - small(x)).abs().max().item() <= 1e-5
    finally:
        pool.shutdown()


class TokenTraffic(Traffic):
    """:class:`Traffic` whose requests carry token ids (hash routing needs them), as
    sequences ``[2, L, d]`` (soft routing needs them)."""

    def __init__(self, pool, layer, clients=6):
        g = torch.Generator().manual_seed(7)
        self.tokens = [torch.randint(0, 64, (8 + 4 * i,), generator=g) for i in range(clients)]
        self.pool = pool
        self.xs = [torch.randn(2, 4 + 2 * i, 16, generator=g) for i in range(clients)]
        self.wants = [self._outputs(layer)]
        self.epoch = 0
        self.errors: list[float] = []
        self.failures: list[BaseException] = []
        ClientThreads.__init__(self, clients)

    def _outputs(self, layer):
        with torch.no_grad():
            return [layer(x, token_ids=t) for x, t in zip(self.xs, self.tokens, strict=True)]

    def _run(self, i):
        while not self.stop.is_set():
            e = self.epoch
            try:
                y = self.pool.forward(self.xs[i], token_ids=self.tokens[i])
                ok = [w[i] for w in self.wants[e : self.epoch + 2]]
                self.errors.append(min((y - w).abs().max().item() for w in ok))
            except BaseException as err:  # the test asserts there are none
                self.failures.append(err)


# the routing kinds that grow by their own rule (whole groups; a stable re-hash; new slots)
REGROWING = {
    "dense": {"kind": "dense"},
    "soft": {"kind": "soft", "slots_per_expert": 2},
    "groups": {
        "kind": "topk",
        "k": 2,
        "score": "sigmoid",
        "n_groups": 2,
        "topk_groups": 1,
        "renormalize": True,
    },
    "hash": {"kind": "hash", "vocab_size": 64},
    "hierarchical": {"kind": "hierarchical", "n_groups": 2, "k_groups": 1, "k": 2},
    "product_key": {"kind": "product_key", "heads": 2, "k": 3, "d_key": 8},
}
# (experts, experts added): product-key pools grow by whole sub-key rows (8 of an 8 x 8 grid)
SIZES = {"product_key": (64, 8)}


@pytest.mark.parametrize(
    "kind,transport",
    [
        ("groups", "object_store"),
        ("hash", "grpc"),
        ("hierarchical", "object_store"),
        ("dense", "grpc"),
        ("soft", "object_store"),
        ("product_key", "grpc"),
    ],
)
def test_every_other_kind_grows_and_shrinks_under_traffic(ray_cluster, kind, transport):
    E, count = SIZES.get(kind, (8, 4))
    spec = PoolSpec.from_dict(
        {
            **spec_dict(REGROWING[kind], E=E, kind="peer" if kind == "product_key" else "ffn"),
            "name": f"t-regrow-{kind}",
            "shards": {"count": 2, "routers": 2, "transport": transport},
        }
    )
    pool = raymoe.serve(spec)
    grown = spec.with_experts_added(count)  # groups: one more group of 4; hash: re-hashed
    smaller = grown.with_experts_removed([1, 9])
    layers = [MoELayer(s).eval() for s in (spec, grown, smaller)]
    try:
        with TokenTraffic(pool, layers[0]) as traffic:
            with traffic.change(layers[1]):
                r = pool.add_experts(count)
            assert r.expert_ids == tuple(range(E, E + count))
            with traffic.change(layers[2]):
                assert pool.remove_experts([1, 9]).removed == (1, 9)
            pool.rebalance()
        assert not traffic.failures, traffic.failures[:1]
        assert len(traffic.errors) > 20, len(traffic.errors)
        assert max(traffic.errors) <= 1e-5, sorted(traffic.errors)[-3:]
        assert pool.describe().live_experts == E + count - 2
        if kind in ("groups", "hierarchical"):  # groups stay equal
            with pytest.raises(ConfigError, match="whole groups of 4 experts"):
                pool.add_experts(3)
    finally:
        pool.shutdown()
