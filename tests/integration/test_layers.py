"""Multi-layer pools served for real: every layer equals ``MoEStack`` (<= 1e-5) for every
routing kind, with batches that mix layers; per-layer operations under traffic; per-layer
balance after a rebalance under Zipf load; a 32-layer pool on a bounded set of actors; the
SDK, the admin plane and the CLI with layers; and bad layer input refused."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import ray
import torch

import raymoe
from raymoe import ExpertIdError, LayerIndexError, MoEStack, PoolSpec
from raymoe.cli import main
from tests.helpers import ClientThreads, spec_dict
from tests.integration.gateway_common import ADMIN, DATA, gateway_section

pytestmark = pytest.mark.integration

D = 16
# one layer of each routing kind an FFN pool can have (product-key layers: PEER, below)
KINDS = [
    ({"kind": "topk", "k": 3, "renormalize": True}, None),
    (
        {"kind": "topk", "k": 2, "score": "sigmoid", "n_groups": 4, "topk_groups": 2},
        {"hidden": 8, "gate": True},
    ),
    ({"kind": "dense"}, None),
    ({"kind": "switch", "capacity_factor": 0.5}, None),
    ({"kind": "expert_choice", "k": 2}, None),
    ({"kind": "hash", "vocab_size": 100}, None),
    ({"kind": "hierarchical", "n_groups": 4, "k_groups": 2, "k": 2}, None),
    ({"kind": "soft", "slots_per_expert": 2}, None),
]


def every_kind_spec(name: str, transport: str) -> PoolSpec:
    layers = [{"routing": r, **({"shared": s} if s else {})} for r, s in KINDS]
    layers[2]["num_experts"] = 12  # layers may differ in size
    return PoolSpec.from_dict(
        {
            **spec_dict({"kind": "topk", "k": 2}, E=16, d=D),
            "name": name,
            "layers": layers,
            "shards": {"count": 3, "routers": 2, "transport": transport},
        }
    )


def random_weights(stack: MoEStack, seed: int) -> dict:
    """The stack's weights, redrawn (so nothing passes by sharing the seeded init)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in stack.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return {k: v.clone() for k, v in stack.state_dict().items()}


def inputs(spec: PoolSpec, layer: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 5 + seed % 4, D, generator=g)
    kw = {"x": x}
    if spec.layer(layer).routing.kind == "hash":
        kw["token_ids"] = torch.randint(0, 100, (x.shape[0] * x.shape[1],), generator=g)
    return kw


@pytest.mark.parametrize("transport", ["object_store", "grpc"])
def test_every_layer_equals_moestack_with_batches_mixing_layers(ray_cluster, transport):
    spec = every_kind_spec(f"t-layers-{transport}", transport)
    stack = MoEStack(spec).eval()
    pool = raymoe.serve(spec, weights=random_weights(stack, 3))
    try:
        cases = [(layer, inputs(spec, layer, i)) for i in range(6) for layer in range(8)]
        random.Random(0).shuffle(cases)
        refs = [
            pool.forward_async(kw["x"], layer=layer, token_ids=kw.get("token_ids"))
            for layer, kw in cases
        ]  # all in flight at once: the routers batch requests of different layers
        for (layer, kw), ref in zip(cases, refs, strict=True):
            with torch.no_grad():
                want = stack(kw["x"], layer=layer, token_ids=kw.get("token_ids"))
            got = torch.from_numpy(np.array(ray.get(ref)))
            assert (got - want).abs().max().item() <= 1e-5, (layer, spec.layer(layer).routing)
        d = pool.describe()
        assert d.layers == 8 and d.experts == 7 * 16 + 12
        assert d.live_per_layer == (16, 16, 12, 16, 16, 16, 16, 16)
    finally:
        pool.shutdown()


def test_product_key_layers_equal_moestack(ray_cluster):
    spec = PoolSpec.from_dict(
        {
            **spec_dict(
                {"kind": "product_key", "heads": 2, "k": 3, "d_key": 8}, E=64, d=D, kind="peer"
            ),
            "name": "t-layers-pk",
            "layers": 3,
            "shards": {"count": 2},
        }
    )
    stack = MoEStack(spec).eval()
    pool = raymoe.serve(spec, weights=random_weights(stack, 4))
    try:
        for layer in (2, 0, 1):
            x = torch.randn(7, D)
            with torch.no_grad():
                assert (pool.forward(x, layer=layer) - stack(x, layer=layer)).abs().max() <= 1e-5
        r = pool.add_experts(8, layer=1)  # one more sub-key row of layer 1
        assert r.expert_ids == tuple(range(64, 72)) and r.layer == 1
        grown = MoEStack(spec.with_experts_added(8, layer=1)).eval()
        grown.load_state_dict(_grown_state(stack, grown, pool), strict=True)
        x = torch.randn(9, D)
        with torch.no_grad():
            for layer in range(3):
                assert (pool.forward(x, layer=layer) - grown(x, layer=layer)).abs().max() <= 1e-5
    finally:
        pool.shutdown()


def _grown_state(stack: MoEStack, grown: MoEStack, pool) -> dict:
    """``grown``'s seeded state with ``stack``'s weights of the experts it had, and the
    gate the pool grew (the routers' own)."""
    gate = ray.get(pool._routers[0].gate_weights.remote())
    out = {}
    old = stack.state_dict()
    for k, v in grown.state_dict().items():
        if k in gate:
            out[k] = torch.tensor(gate[k])
        elif ".experts." in k and old[k].shape != v.shape:
            out[k] = torch.cat([old[k], v[len(old[k]) :]])
        else:
            out[k] = old[k]
    return out


class LayerTraffic(ClientThreads):
    """Clients sending requests to random layers; each answer is checked against the
    stacks current when it started and after (:meth:`change`)."""

    def __init__(self, pool, stack, clients=6):
        self.pool, self.num_layers = pool, stack.spec.num_layers
        g = torch.Generator().manual_seed(11)
        self.xs = [torch.randn(6 + 2 * i, D, generator=g) for i in range(clients)]
        self.stacks = [stack]
        self.epoch = 0
        self.errors: list[float] = []
        self.failures: list[BaseException] = []
        super().__init__(clients)

    def change(self, stack):
        self.stacks.append(stack)
        return self

    def __call__(self):
        self.epoch += 1

    def _run(self, i):
        rng = random.Random(i)
        while not self.stop.is_set():
            e, layer = self.epoch, rng.randrange(self.num_layers)
            try:
                y = self.pool.forward(self.xs[i], layer=layer)
                with torch.no_grad():
                    now = self.stacks[e : self.epoch + 2]  # queued behind changes: theirs
                    ok = [s(self.xs[i], layer=layer) for s in now]
                self.errors.append(min((y - w).abs().max().item() for w in ok))
            except BaseException as err:  # the test asserts there are none
                self.failures.append(err)


def _stack(spec: PoolSpec, state: dict) -> MoEStack:
    """``MoEStack(spec)`` with ``state``'s weights where shapes agree (the seeded init of
    added experts and their gate rows elsewhere)."""
    stack = MoEStack(spec).eval()
    own = stack.state_dict()
    merged = {}
    for k, v in own.items():
        old = state[k]
        merged[k] = old if old.shape == v.shape else torch.cat([old, v[len(old) :]])
    stack.load_state_dict(merged)
    return stack


@pytest.mark.parametrize("transport", ["object_store", "grpc"])
def test_layer_operations_under_traffic_fail_nothing(ray_cluster, transport):
    spec = PoolSpec.from_dict(
        {
            **spec_dict({"kind": "topk", "k": 2}, E=8, d=D),
            "name": f"t-layers-ops-{transport}",
            "layers": 4,
            "shards": {"count": 3, "routers": 2, "transport": transport},
        }
    )
    stack = MoEStack(spec).eval()
    pool = raymoe.serve(spec, weights=random_weights(stack, 5))
    try:
        with LayerTraffic(pool, stack) as traffic:
            grown_spec = spec.with_experts_added(3, layer=2)
            grown = _stack(grown_spec, stack.state_dict())
            traffic.change(grown)
            r = pool.add_experts(3, layer=2)
            traffic()
            assert r.expert_ids == (8, 9, 10) and r.layer == 2
            gone = grown_spec.with_experts_removed(grown_spec.flat.flat(1, [0, 5]))
            small = _stack(gone, grown.state_dict())
            traffic.change(small)
            r = pool.remove_experts([0, 5], layer=1)
            traffic()
            assert r.removed == (0, 5) and r.layer == 1
            assert pool.replicate(9, 3, layer=2).replicas_added == 2
            assert pool.pin(4, 2, layer=3).pinned == {4: 2}
            pool.rebalance()
            assert pool.unpin(4, layer=3).pinned == {}
            pool.scale_shards(4)
        assert not traffic.failures, traffic.failures[:1]
        assert len(traffic.errors) > 20 and max(traffic.errors) <= 1e-5
        d = pool.describe()
        assert d.live_per_layer == (8, 6, 11, 8) and d.shards == 4
        with pytest.raises(ExpertIdError, match="removed"):
            pool.forward(
                torch.randn(2, D),
                layer=1,
                expert_ids=torch.tensor([[0], [1]]),
                weights=torch.ones(2, 1),
            )
    finally:
        pool.shutdown()


def test_rebalance_balances_every_layer_under_zipf_load(ray_cluster):
    """4 layers of 32 experts on 4 shards; each layer's hot experts differ (a Zipf law over
    its own permutation): after one rebalance, every layer's imbalance is <= 1.05."""
    E, layers = 32, 4
    spec = PoolSpec.from_dict(
        {
            **spec_dict({"kind": "topk", "k": 2}, E=E, d=D),
            "name": "t-layers-zipf",
            "layers": layers,
            "shards": {"count": 4},
            "control": {"load_half_life_s": 600},
        }
    )
    pool = raymoe.serve(spec)
    rng = np.random.default_rng(0)
    zipf = 1.0 / np.arange(1, E + 1)
    counts = np.floor(zipf / zipf.sum() * 128).astype(int)
    counts[0] += 128 - counts.sum()  # 128 pairs a request, in Zipf proportions (exactly)
    routes = []
    for _ in range(layers):  # each layer: its own hot experts
        ids = np.repeat(rng.permutation(E), counts)
        routes.append(torch.as_tensor(rng.permutation(ids).reshape(64, 2)))

    def send(rounds: int) -> None:
        refs = [
            pool.forward_async(
                torch.randn(64, D),
                layer=layer,
                expert_ids=routes[layer],
                weights=torch.full((64, 2), 0.5),
            )
            for _ in range(rounds)
            for layer in range(layers)
        ]
        ray.get(refs)

    try:
        send(20)
        before = pool.stats(window_s=600).layer_imbalance
        report = pool.rebalance()
        send(20)
        after = pool.stats(window_s=600).layer_imbalance
        print("per-layer imbalance before", before, "after", after, report)
        assert max(before) > 1.3  # the test has something to fix
        assert len(after) == layers and max(after) <= 1.05
        assert report.imbalance_after <= 1.05
    finally:
        pool.shutdown()


def test_a_32_layer_pool_runs_on_a_bounded_set_of_actors(ray_cluster, capsys):
    spec = PoolSpec.from_dict(
        {
            **spec_dict({"kind": "topk", "k": 2}, E=64, d=8, H=8),
            "name": "t-layers-32",
            "layers": 32,
            "shards": {"count": 4, "routers": 1},
        }
    )
    pool = raymoe.serve(spec)
    try:
        names = [
            a["name"]
            for a in ray.util.list_named_actors(all_namespaces=True)
            if a["name"].startswith("t-layers-32:")
        ]
        assert len(names) == 1 + 1 + 4  # controller, router, shards: not per layer
        stack = MoEStack(spec).eval()
        x = torch.randn(5, 8)
        with torch.no_grad():
            for layer in (0, 17, 31):
                assert (pool.forward(x, layer=layer) - stack(x, layer=layer)).abs().max() <= 1e-5
        d = pool.describe()
        assert d.layers == 32 and d.experts == 32 * 64 and sum(d.experts_per_shard) == 2048
        from raymoe.cli import status

        text = status.render(d, pool.stats())
        assert "layers 32  live experts per layer 64" in text
        assert len(text.splitlines()) < 20  # a summary per layer, not a line per expert
    finally:
        pool.shutdown()


def test_bad_layer_input_is_refused_and_changes_nothing(ray_cluster):
    spec = PoolSpec.from_dict(
        {
            **spec_dict({"kind": "topk", "k": 2}, E=8, d=D),
            "name": "t-layers-bad",
            "layers": 2,
            "shards": {"count": 2},
        }
    )
    pool = raymoe.serve(spec)
    try:
        v = pool.describe().placement_version
        x = torch.randn(3, D)
        for bad in (2, -1, "0", 1.0, True):
            with pytest.raises(LayerIndexError, match=r"not in \[0, 2\)"):
                pool.forward(x, layer=bad)
        with pytest.raises(LayerIndexError):
            pool.replicate(0, 2, layer=2)
        with pytest.raises(LayerIndexError):
            pool.add_experts(1, layer=5)
        with pytest.raises(ExpertIdError, match="of layer 1"):
            pool.remove_experts([8], layer=1)
        with pytest.raises(ExpertIdError, match=r"layer 0: expert id 8 is out of range"):
            pool.forward(x, layer=0, expert_ids=torch.full((3, 1), 8), weights=torch.ones(3, 1))
        assert pool.describe().placement_version == v
        with torch.no_grad():
            assert (pool.forward(x, layer=1) - MoEStack(spec)(x, layer=1)).abs().max() <= 1e-5
    finally:
        pool.shutdown()


def test_sdk_admin_plane_and_cli_take_layers(ray_cluster, tokens, capsys):
    spec = PoolSpec.from_dict(
        {
            **spec_dict({"kind": "topk", "k": 2}, E=8, d=D),
            "name": "t-layers-gw",
            "layers": 3,
            "shards": {"count": 2},
            "gateway": gateway_section(tokens),
        }
    )
    stack = MoEStack(spec).eval()
    pool = raymoe.serve(spec)
    (endpoint,) = pool.gateways()
    conn = ["--target", endpoint, "--token-file", str(tokens / "admin")]
    try:
        x = torch.randn(2, 4, D)
        with raymoe.Client(endpoint, token=DATA) as c, torch.no_grad():
            for layer in range(3):
                assert (c.forward(x, layer=layer) - stack(x, layer=layer)).abs().max() <= 1e-5
            outs = list(c.forward_stream([{"x": x, "layer": i % 3} for i in range(6)]))
            for i, y in enumerate(outs):
                assert (y - stack(x, layer=i % 3)).abs().max() <= 1e-5
            with pytest.raises(LayerIndexError):
                c.forward(x, layer=3)
        with raymoe.Client(endpoint, token=ADMIN) as admin:
            r = admin.replicate(5, 2, layer=2)
            assert r.layer == 2 and r.replicas_added == 1
            with pytest.raises(LayerIndexError):
                admin.pin(0, 2, layer=7)
        assert main(["experts", "add", "2", "--layer", "1", *conn, "-o", "json"]) == 0
        out = json.loads(capsys.readouterr().out)
        assert out["expert_ids"] == [8, 9] and out["layer"] == 1
        assert pool.describe().live_per_layer == (8, 10, 8)
        assert main(["status", *conn]) == 0
        assert "layers 3  live experts per layer 8-10" in capsys.readouterr().out
    finally:
        pool.shutdown()
