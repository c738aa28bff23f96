"""How each routing kind grows and shrinks, in process: hash re-hashes moving the fewest
tokens; grouped top-k and hierarchical pools grow by whole groups; soft and dense pools by
any count; a removed expert is as if its gate rows were deleted where the kind allows it."""

from __future__ import annotations

import pytest
import torch

from raymoe import ConfigError, MoELayer, PoolSpec
from raymoe.config import HashRouting
from raymoe.routing.hashing import hash_table
from tests.helpers import spec_dict


def test_hash_growth_moves_the_fewest_tokens_and_stays_balanced():
    r = HashRouting(vocab_size=1000)
    before = hash_table(r, 8)
    grown = r.grown(8, 4)
    after = hash_table(grown, 12)
    counts = torch.bincount(after, minlength=12)
    assert counts.max() - counts.min() <= 1
    moved = before != after
    assert int(moved.sum()) == int(counts[8:].sum())  # only the new experts' share moved
    assert (after[moved] >= 8).all()
    twice = hash_table(grown.grown(12, 3), 15)
    assert int((twice != after).sum()) == int(torch.bincount(twice)[12:].sum())


def test_a_removed_hash_expert_gives_only_its_tokens_to_the_others():
    r = HashRouting(vocab_size=1000)
    full = hash_table(r, 8)
    without = hash_table(r, 8, (3,))
    assert not (without == 3).any()
    assert torch.equal(full[full != 3], without[full != 3])
    counts = torch.bincount(without, minlength=8)[torch.arange(8) != 3]
    assert counts.max() - counts.min() <= 1


@pytest.mark.parametrize(
    "routing",
    [
        {"kind": "topk", "k": 2, "n_groups": 2, "topk_groups": 1, "score": "sigmoid"},
        {"kind": "hierarchical", "n_groups": 2, "k_groups": 1, "k": 2},
    ],
)
def test_grouped_pools_grow_by_whole_groups(routing):
    spec = PoolSpec.from_dict(spec_dict(routing, E=8))
    grown = spec.with_experts_added(4)
    assert grown.routing.n_groups == 3 and grown.num_experts == 12
    with pytest.raises(ConfigError, match="whole groups of 4 experts"):
        spec.with_experts_added(2)
    old, big = MoELayer(spec), MoELayer(grown)
    for name, p in old.router.state_dict().items():  # old groups keep their rows
        assert torch.equal(big.router.state_dict()[name][: len(p)], p), name


@pytest.mark.parametrize(
    "routing",
    [
        {"kind": "topk", "k": 2, "n_groups": 2, "topk_groups": 1, "score": "sigmoid"},
        {"kind": "hierarchical", "n_groups": 2, "k_groups": 1, "k": 2},
    ],
)
def test_grouped_pools_never_route_to_removed_experts(routing):
    spec = PoolSpec.from_dict(spec_dict(routing, E=8, removed=[1, 4, 5]))
    layer = MoELayer(spec)
    _, info = layer(torch.randn(256, 16) * 3, return_info=True)
    chosen = set(info.expert_ids[info.expert_ids >= 0].tolist())
    assert not chosen & {1, 4, 5} and len(chosen) >= 3
    assert torch.isfinite(info.weights).all()


def test_a_whole_removed_group_leaves_the_hierarchical_group_softmax():
    routing = {"kind": "hierarchical", "n_groups": 3, "k_groups": 1, "k": 1}
    spec = PoolSpec.from_dict(spec_dict(routing, E=12, removed=[4, 5, 6, 7]))
    _, info = MoELayer(spec)(torch.randn(256, 16) * 3, return_info=True)
    assert not ((info.expert_ids >= 4) & (info.expert_ids < 8)).any()
    assert torch.isfinite(info.weights).all() and (info.weights > 0).all()


@pytest.mark.parametrize("kind", ["soft", "dense"])
def test_removed_experts_are_as_if_deleted(kind):
    routing = {"kind": kind, **({"slots_per_expert": 2} if kind == "soft" else {})}
    spec = PoolSpec.from_dict(spec_dict(routing, E=8, removed=[2, 6]))
    smaller = PoolSpec.from_dict(spec_dict(routing, E=6))
    layer, other = MoELayer(spec).eval(), MoELayer(smaller).eval()
    keep = [e for e in range(8) if e not in (2, 6)]
    with torch.no_grad():  # the other layer: this one's live experts, renumbered
        slots = 2 if kind == "soft" else 1
        rows = torch.tensor([e * slots + s for e in keep for s in range(slots)])
        other.router.weight.copy_(layer.router.weight[rows])
        for name, p in other.experts.named_parameters():
            p.copy_(getattr(layer.experts, name)[keep])
        x = torch.randn(2, 5, 16)
        assert (layer(x) - other(x)).abs().max() <= 1e-5


def test_soft_and_dense_pools_grow_by_any_count():
    for routing in ({"kind": "soft", "slots_per_expert": 2}, {"kind": "dense"}):
        spec = PoolSpec.from_dict(spec_dict(routing, E=8))
        grown = spec.with_experts_added(3)
        old, big = MoELayer(spec), MoELayer(grown)
        assert torch.equal(big.router.weight[: len(old.router.weight)], old.router.weight)
