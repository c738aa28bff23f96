"""Multi-layer specs, flat ids, the reference ``MoEStack``, per-layer planning and the router
over every layer, without Ray."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch

from raymoe import ConfigError, LayerIndexError, MoELayer, MoEStack, PoolSpec
from raymoe._private.data.gates import split_weights
from raymoe._private.data.router import Router
from raymoe.kernels import seeded_bank
from raymoe.placement import Budget, get_policy, imbalance, shard_loads
from raymoe.placement.layered import initial_layers, layer_imbalances, plan_layers, subset
from raymoe.placement.table import realize
from tests.helpers import spec_dict
from tests.unit.data.test_router import LocalShards


def layered(layers, E=8, **extra) -> PoolSpec:
    return PoolSpec.from_dict(
        {**spec_dict({"kind": "topk", "k": 2}, E=E), "layers": layers, **extra}
    )


# --- the spec -------------------------------------------------------------------------


def test_a_count_of_layers_is_that_many_template_layers():
    spec = layered(3, shards={"count": 2})
    assert spec.num_layers == 3 and spec.num_experts == 24 and spec.multi_layer
    assert [spec.layer(i).seed for i in range(3)] == [0, 1, 2]
    assert spec.flat.ids(2).tolist() == list(range(16, 24))
    assert PoolSpec.from_yaml(spec.to_yaml()) == spec
    single = PoolSpec.from_dict(spec_dict({"kind": "topk", "k": 2}))
    assert single.num_layers == 1 and single.layer(0) is single and not single.multi_layer


def test_layers_may_differ_and_errors_name_the_layer():
    spec = layered(
        [{}, {"num_experts": 12, "routing": {"kind": "switch"}}, {"shared": {"hidden": 4}}]
    )
    assert spec.layer(1).num_experts == 12 and spec.layer(1).routing.kind == "switch"
    assert spec.layer(2).shared.hidden == 4 and spec.layer(0).shared is None
    assert spec.num_experts == 28 and spec.slots == 2
    with pytest.raises(ConfigError, match=r"k=2 exceeds") as e:
        layered([{}, {"num_experts": 1}])
    assert e.value.field == "layers.1.routing.k"
    for bad, field in (
        ({"layers": 0}, "layers"),
        ({"layers": 300}, "layers"),
        (
            {
                "layers": 2,
                "experts": {"kind": "ffn", "num_experts": 8, "hidden": 4, "removed": [1]},
            },
            "experts.removed",
        ),
        ({"layers": 2, "id_blocks": [[0, 8], [1, 7]]}, "id_blocks"),
        ({"layers": 2, "id_blocks": [[0, 8], [2, 8]]}, "id_blocks"),
    ):
        with pytest.raises(ConfigError) as e:
            PoolSpec.from_dict({**spec_dict({"kind": "topk", "k": 2}, E=8), **bad})
        assert e.value.field == field, bad


def test_growth_appends_a_block_and_never_renumbers():
    spec = layered(3)
    grown = spec.with_experts_added(2, layer=0).with_experts_added(3, layer=2)
    assert grown.blocks == ((0, 8), (1, 8), (2, 8), (0, 2), (2, 3))
    assert grown.flat.ids(0).tolist() == [*range(8), 24, 25]
    assert grown.flat.ids(1).tolist() == list(range(8, 16))  # untouched
    assert grown.flat.ids(2).tolist() == [*range(16, 24), 26, 27, 28]
    assert (grown.flat.layer_of[grown.flat.ids(2)] == 2).all()
    assert grown.flat.expert_of[28] == 10
    removed = grown.with_experts_removed([1, 27])
    assert removed.layer(0).experts.removed == (1,) and removed.layer(2).experts.removed == (9,)
    assert removed.removed_ids == (1, 27) and removed.live_experts == 27
    with pytest.raises(ConfigError, match="layer 3"):
        spec.with_experts_added(1, layer=3)
    with pytest.raises(ConfigError, match="whole groups"):
        layered([{}, {"routing": {"kind": "hierarchical", "n_groups": 2}}]).with_experts_added(
            1, layer=1
        )


# --- the reference --------------------------------------------------------------------


def test_moestack_layers_are_the_single_layer_specs():
    spec = layered(3).with_experts_added(2, layer=1)
    stack = MoEStack(spec).eval()
    x = torch.randn(6, 16)
    with torch.no_grad():
        for i in range(3):
            assert torch.equal(stack(x, layer=i), MoELayer(spec.layer(i)).eval()(x))
    assert not torch.equal(stack.layers[0].router.weight, stack.layers[1].router.weight)
    bank = seeded_bank(spec, torch.as_tensor(spec.flat.ids(1)))  # what shards draw
    assert torch.equal(bank.w_up, stack.layers[1].experts.w_up)
    for bad in (3, -1, "1", True):
        with pytest.raises(LayerIndexError):
            stack(x, layer=bad)


def test_split_weights_lays_out_every_layer_by_flat_id():
    spec = layered(2).with_experts_added(2, layer=0)
    stack = MoEStack(spec)
    rows, gate = split_weights(spec, stack.state_dict())
    assert rows["w_up"].shape[0] == spec.num_experts
    assert torch.equal(
        torch.as_tensor(rows["w_up"][spec.flat.ids(0)]), stack.layers[0].experts.w_up
    )
    assert set(gate) == {"layers.0.router.weight", "layers.1.router.weight"}
    partial = {k: v for k, v in stack.state_dict().items() if not k.startswith("layers.1.experts")}
    with pytest.raises(ConfigError, match="layers \\[1\\]"):
        split_weights(spec, partial)


# --- planning -------------------------------------------------------------------------


def test_initial_placement_spreads_every_layer_over_every_shard():
    spec = layered(4, E=8, shards={"count": 4})
    groups = [spec.flat.ids(i) for i in range(4)]
    p = initial_layers(groups, 4, [1] * 4, {}, ())
    for g in groups:
        assert sorted(subset(p, g).shard.tolist()) == [0, 0, 1, 1, 2, 2, 3, 3]
    assert p.held().tolist() == [8, 8, 8, 8]
    assert all(len(set(p.local[p.shard == n].tolist())) == 8 for n in range(4))  # own places


def test_plan_layers_balances_each_layer_where_a_flat_plan_need_not():
    rng = np.random.default_rng(0)
    E, L, N = 16, 4, 4
    groups = [np.arange(i * E, (i + 1) * E) for i in range(L)]
    load = np.concatenate([rng.zipf(1.6, E).astype(float) for _ in range(L)])
    current = initial_layers(groups, N, [1] * L, {}, ())
    budget = Budget(N, E * L + 16)
    policy = get_policy("balanced")
    plan = plan_layers(policy, load, current, budget, groups, bytes_per_expert=1)
    after = layer_imbalances(load, plan.placement, groups, np.ones(N, bool))
    assert max(after) == pytest.approx(plan.imbalance_after)
    assert max(after) <= 1.1
    flat = policy(load, current, budget, bytes_per_expert=1).placement  # one pool-wide plan
    assert imbalance(shard_loads(load, flat)) <= 1.1
    assert max(layer_imbalances(load, flat, groups, np.ones(N, bool))) > max(after)
    # unchanged when already balanced: the same placement, no version bump
    again = plan_layers(policy, load, plan.placement, budget, groups, bytes_per_expert=1)
    assert again.placement is plan.placement and again.replicas_added == 0


def test_subset_keeps_shards_and_places():
    spec = layered(2, E=4, shards={"count": 2})
    p = initial_layers([spec.flat.ids(0), spec.flat.ids(1)], 2, [1, 1], {5: 2}, (2,))
    p = realize(p, *p.pairs())
    sub = subset(p, spec.flat.ids(1))
    assert sub.num_experts == 4 and sub.replicas().tolist() == [1, 2, 1, 1]
    e, s = sub.pairs()
    full_e, full_s = p.pairs()
    mine = np.isin(full_e, spec.flat.ids(1))
    assert sorted(zip(e + 4, s, strict=True)) == sorted(
        zip(full_e[mine], full_s[mine], strict=True)
    )
    assert subset(p, spec.flat.ids(0)).replicas().tolist() == [1, 1, 0, 1]  # 2 removed


# --- the router over every layer ------------------------------------------------------


def test_router_batches_mixing_layers_equal_moestack():
    spec = layered(
        [{}, {"routing": {"kind": "expert_choice", "k": 2}}, {"shared": {"hidden": 4}}],
        shards={"count": 2},
    )
    stack = MoEStack(spec).eval()
    p = initial_layers([spec.flat.ids(i) for i in range(3)], 2, [1] * 3, {}, ())
    rows, gate = split_weights(spec, stack.state_dict())

    class Layer:  # what LocalShards reads: the flat bank's parameters
        experts = seeded_bank(spec, torch.arange(spec.num_experts))

    with torch.no_grad():
        for k, v in rows.items():
            getattr(Layer.experts, k).copy_(torch.as_tensor(v))

    async def go():
        router = Router(spec)
        router.configure(LocalShards(spec, Layer, p), p, gate)
        xs = [(i % 3, torch.randn(5 + i, 16)) for i in range(9)]
        outs = await asyncio.gather(*(router.forward(x.numpy(), layer=i) for i, x in xs))
        with pytest.raises(LayerIndexError):
            await router.forward(xs[0][1].numpy(), layer=3)
        return xs, outs

    xs, outs = asyncio.run(go())
    with torch.no_grad():
        for (layer, x), y in zip(xs, outs, strict=True):
            assert (torch.from_numpy(y) - stack(x, layer=layer)).abs().max() <= 1e-5
