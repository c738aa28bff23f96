"""The sharded data path without Ray: placement + dispatch + ExpertShard + combine equals
MoELayer for every routing kind and example config, 1/2/3/8 shards, with and without replicas."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from raymoe import MoELayer, PoolSpec
from raymoe._private.dispatch import combine, split_by_shard
from raymoe._private.placement import contiguous, with_replicas
from raymoe._private.shard import ExpertShard
from tests.helpers import ROUTINGS


def served_like(layer: MoELayer, x, placement, token_ids=None):
    """What the pool computes: gate in the router, experts on shards, combine, shared."""
    spec = layer.spec
    shards = [ExpertShard(spec, n, placement.shard_experts(n).numpy())
              for n in range(placement.num_shards)]  # fmt: skip
    for sh in shards:  # the pool is loaded with the layer's weights (they are seeded alike)
        sh.import_experts(
            sh.expert_ids.numpy(),
            {k: v[sh.expert_ids].numpy() for k, v in _bank_state(layer).items()},
        )
    routes = layer.route(x, x, token_ids=token_ids)
    subs = split_by_shard(routes.ids, routes.weights, placement)
    parts = [(s, torch.from_numpy(shards[s.shard].compute(x[s.tokens].numpy(),
                                                          s.local_ids.numpy(),
                                                          s.weights.float().numpy())))
             for s in subs]  # fmt: skip
    return combine(x.shape[0], spec.d_model, parts, x) + layer.shared_output(x)


def _bank_state(layer):
    return {n: p.detach() for n, p in layer.experts.named_parameters()}


@pytest.mark.parametrize("shards", [1, 2, 3, 8])
@pytest.mark.parametrize("kind", sorted(ROUTINGS))
def test_sharded_equals_layer(kind, shards):
    spec = PoolSpec.from_dict(ROUTINGS[kind])
    layer = MoELayer(spec).eval()
    x = torch.randn(37, 16)
    tok = torch.randint(0, 100, (37,)) if kind == "hash" else None
    align = 8 if kind == "product_key" else 1
    placement = contiguous(spec.num_experts, shards, align=align)
    with torch.no_grad():
        want = layer(x, token_ids=tok)
        got = served_like(layer, x, placement, tok)
        assert (got - want).abs().max().item() <= 1e-5
        hot = {0: [shards - 1], 5: list(range(shards))}
        got_r = served_like(layer, x, with_replicas(placement, hot, 2), tok)
        assert (got_r - want).abs().max().item() <= 1e-5


@pytest.mark.parametrize("name", ["mixtral-tiny", "deepseek-tiny", "switch-tiny"])
def test_example_configs_sharded(name):
    spec = PoolSpec.from_yaml(Path(__file__).parents[2] / "examples" / "configs" / f"{name}.yaml")
    layer = MoELayer(spec).eval()
    x = torch.randn(64, spec.d_model)
    with torch.no_grad():
        got = served_like(layer, x, contiguous(spec.num_experts, 3))
        assert (got - layer(x)).abs().max().item() <= 1e-5


def test_placement_contiguous_and_row_aligned():
    p = contiguous(10, 3)
    assert p.shard.tolist() == [0, 0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert p.local.tolist() == [0, 1, 2, 3, 0, 1, 2, 0, 1, 2]
    assert p.shard_experts(1).tolist() == [4, 5, 6]
    q = contiguous(64, 3, align=8)  # whole sub-key rows of 8 per shard
    for n in range(3):
        assert q.shard_experts(n).numel() % 8 == 0
    big = contiguous(1 << 20, 64, align=1024)
    assert torch.bincount(big.shard).tolist() == [16 * 1024] * 64


def test_replicas_are_appended_and_balanced():
    p = with_replicas(contiguous(6, 2), {1: [1], 4: [0, 1]}, version=2)
    assert p.replicas().tolist() == [1, 2, 1, 1, 3, 1]
    assert p.shard_experts(1).tolist() == [3, 4, 5, 1, 4]
    assert p.shard_experts(0).tolist() == [0, 1, 2, 4]
    ids = torch.full((100, 1), 4)
    subs = split_by_shard(ids, torch.ones(100, 1), p)
    sizes = {s.shard: s.tokens.numel() for s in subs}
    assert sum(sizes.values()) == 100 and min(sizes.values()) >= 30


def test_shard_export_import_and_load():
    spec = PoolSpec.from_dict(ROUTINGS["topk"])
    sh = ExpertShard(spec, 0, np.array([3, 7, 9]))
    rows = sh.export_experts(np.array([9]))
    assert rows["w_gate"].shape == (1, 24, 16)
    sh.compute(np.random.randn(4, 16).astype(np.float32), np.array([[0, 2]] * 4),
               np.ones((4, 2), np.float32))  # fmt: skip
    ids, counts = sh.take_load()
    assert ids.tolist() == [3, 7, 9] and counts.tolist() == [4, 0, 4]
    assert sh.take_load()[1].tolist() == [0, 0, 0]
    with pytest.raises(KeyError, match="does not hold"):
        sh.export_experts(np.array([4]))
