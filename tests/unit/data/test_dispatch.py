"""Dispatch and combine without Ray: placement + dispatch + ExpertShard + combine equals
MoELayer for every routing kind and example config, 1/2/3/8 shards, with and without
replicas; replicas share their expert's pairs evenly; failed shards are avoided; a shard
whose places hold other experts than the router means refuses the sub-batch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from raymoe import MoELayer, PoolSpec
from raymoe._private.data import training
from raymoe._private.data.dispatch import (
    DispatchTable,
    combine,
    digest_of,
    places_digest,
    resplit,
    split_by_shard,
)
from raymoe._private.data.shard import ExpertShard
from raymoe.errors import PlacementMismatchError, ShardNotReadyError
from raymoe.kernels import native
from raymoe.placement import contiguous, with_replicas
from tests.helpers import ROUTINGS


def served_like(layer: MoELayer, x, placement, token_ids=None):
    """What the pool computes: gate in the router, experts on shards, combine, shared."""
    spec = layer.spec
    shards = [ExpertShard(spec, n, placement.shard_experts(n)) for n in range(placement.num_shards)]
    for sh in shards:  # the pool is loaded with the layer's weights (they are seeded alike)
        sh.import_experts(
            sh.expert_ids.numpy(),
            {k: v[sh.expert_ids].numpy() for k, v in _bank_state(layer).items()},
        )
    routes = layer.route(x, x, token_ids=token_ids)
    subs = split_by_shard(routes.ids, routes.weights, DispatchTable(placement))
    parts = [
        (
            s,
            torch.from_numpy(
                shards[s.shard].compute(
                    x[s.tokens].numpy(), s.local_ids.numpy(), s.weights.float().numpy()
                )
            ),
        )
        for s in subs
    ]
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
        own = placement.primary()[0]
        hot = {0: [(own[0] + 1) % shards], 5: [n for n in range(shards) if n != own[5]]}
        hot = {e: s for e, s in hot.items() if shards > 1}  # one shard: no second replica
        got_r = served_like(layer, x, with_replicas(placement, hot), tok)
        assert (got_r - want).abs().max().item() <= 1e-5


@pytest.mark.parametrize("name", ["mixtral-tiny", "deepseek-tiny", "switch-tiny"])
def test_example_configs_sharded(name):
    spec = PoolSpec.from_yaml(Path(__file__).parents[3] / "examples" / "configs" / f"{name}.yaml")
    layer = MoELayer(spec).eval()
    x = torch.randn(64, spec.d_model)
    with torch.no_grad():
        got = served_like(layer, x, contiguous(spec.num_experts, 3))
        assert (got - layer(x)).abs().max().item() <= 1e-5


def test_replicas_share_their_experts_pairs_evenly():
    """Pairs of a replicated expert are dealt round its replicas, continuing from batch to
    batch: each replica carries its share (even one-token decode batches spread)."""
    p = with_replicas(contiguous(6, 3), {4: [0, 1]})  # expert 4 (on 2) on all three
    table = DispatchTable(p)
    counts = np.zeros(3, np.int64)
    for _ in range(30):  # decode: one token, expert 4 in slot 0
        for sub in split_by_shard(torch.tensor([[4, 1]]), torch.ones(1, 2), table):
            counts[sub.shard] += int((sub.expert_ids == 4).sum())
    assert counts.tolist() == [10, 10, 10]
    ids = torch.full((99, 1), 4)
    sizes = {s.shard: s.tokens.numel() for s in split_by_shard(ids, torch.ones(99, 1), table)}
    assert sorted(sizes.values()) == [33, 33, 33]
    slot0 = torch.stack([torch.full((60,), 4), torch.arange(60) % 4], 1)  # always slot 0
    per = np.zeros(3, np.int64)
    for s in split_by_shard(slot0, torch.ones(60, 2), table):
        per[s.shard] += int((s.expert_ids == 4).sum())
    assert per.tolist() == [20, 20, 20]


def test_failed_shards_are_avoided_where_a_replica_lives_elsewhere():
    p = with_replicas(contiguous(6, 3), {4: [0]})  # expert 4 on shards 2 and 0; 0 on 0 only
    table = DispatchTable(p)
    ids = torch.tensor([[4, 0]] * 8)
    avoid = torch.tensor([False, False, True])
    subs = split_by_shard(ids, torch.ones(8, 2), table, avoid=avoid)
    assert {s.shard for s in subs} == {0}  # expert 4 all on shard 0 now
    first = split_by_shard(ids, torch.ones(8, 2), table)
    again = [r for s in first for r in resplit(s, table, torch.tensor([True, False, False]))]
    assert all((s.expert_ids[s.expert_ids >= 0] == 4).all() or s.shard == 0 for s in again)


def test_shard_export_import():
    spec = PoolSpec.from_dict(ROUTINGS["topk"])
    sh = ExpertShard(spec, 0, np.array([3, 7, 9]))
    rows = sh.export_experts(np.array([9]))
    assert rows["w_gate"].shape == (1, 24, 16)
    doubled = {k: v * 2 for k, v in rows.items()}
    sh.import_experts(np.array([9]), doubled)
    assert np.allclose(sh.export_experts(np.array([9]))["w_gate"], doubled["w_gate"])
    with pytest.raises(KeyError, match="does not hold"):
        sh.export_experts(np.array([4]))


def test_places_digest_tells_apart_what_a_stale_placement_changes():
    g = torch.Generator().manual_seed(0)
    local = torch.randint(0, 64, (32, 4), generator=g)
    experts = torch.randint(0, 1 << 20, (64,), generator=g)
    local[3, 2:] = -1  # padding counts for nothing
    gid = torch.where(local >= 0, experts[local.clamp(min=0)], -1)
    base = places_digest(local, gid)
    assert places_digest(local, torch.where(local >= 0, gid, 12345)) == base
    changed = []
    for e in local[0, :2].tolist():  # a place that now holds another expert, or none
        for other in (experts[e] + 1, -1, experts[(e + 1) % 64]):
            moved = experts.clone()
            moved[e] = other
            changed.append(places_digest(local, moved[local.clamp(min=0)]))
    a, b = local[0, 0].item(), local[1, 0].item()
    swapped = experts.clone()
    swapped[[a, b]] = experts[[b, a]]  # two places' experts swapped
    changed.append(places_digest(local, swapped[local.clamp(min=0)]))
    assert base not in changed


def test_shard_refuses_a_sub_batch_its_places_do_not_hold():
    spec = PoolSpec.from_dict(ROUTINGS["topk"])
    sh = ExpertShard(spec, 0, np.array([3, 7, 9]))
    x = np.ones((2, 16), np.float32)
    local = np.array([[0, 2], [1, -1]])
    w = np.full((2, 2), 0.5, np.float32)
    meant = torch.tensor([[3, 9], [7, -1]])
    y = sh.compute(x, local, w, places_digest(torch.from_numpy(local), meant))
    assert np.array_equal(y, sh.compute(x, local, w))  # no digest: not checked
    sh.free(np.array([2]))  # expert 9's place freed
    for local_now in (local, np.array([[0, 5], [1, -1]])):  # the freed place; one past the bank
        with pytest.raises(PlacementMismatchError, match="places do not hold"):
            sh.compute(x, local_now, w, places_digest(torch.from_numpy(local), meant))
    sh.place(np.array([2]), np.array([4]))  # ... and reused by expert 4
    with pytest.raises(PlacementMismatchError):
        sh.compute(x, local, w, places_digest(torch.from_numpy(local), meant))
    assert sh.status()["mismatches"] == 3


def test_a_loading_shard_exports_and_writes_nothing(tmp_path):
    spec = PoolSpec.from_dict(ROUTINGS["topk"])
    sh = ExpertShard(spec, 0, np.array([3, 7, 9]))
    sh.configure(np.array([3, 7, 9]), ready=False)  # restarted, rows being loaded
    with pytest.raises(ShardNotReadyError):
        sh.export_experts(np.array([3]))
    with pytest.raises(ShardNotReadyError):
        sh.write_rows(str(tmp_path / "rows.safetensors"), np.array([3]))
    assert not (tmp_path / "rows.safetensors").exists()


@pytest.mark.parametrize("kind", ["topk", "product_key", "expert_choice"])
def test_sharded_backward_equals_layer(kind):
    """Shards' backward (recomputed, any replica) + assembly = MoELayer's gradients."""
    spec = PoolSpec.from_dict(ROUTINGS[kind])
    layer = MoELayer(spec)
    x = torch.randn(23, 16, requires_grad=True)
    routes = layer.route(x, x)
    ids, w = routes.ids.detach(), routes.weights.detach().requires_grad_()
    y = layer.experts(x, ids, w)
    gy = torch.randn_like(y)
    y.backward(gy)
    placement = contiguous(spec.num_experts, 3, align=8 if kind == "product_key" else 1)
    own = placement.primary()[0]  # experts 0 and 5 get replicas on every other shard
    placement = with_replicas(placement, {e: [n for n in range(3) if n != own[e]] for e in (0, 5)})
    shards = [ExpertShard(spec, n, placement.shard_experts(n)) for n in range(3)]
    subs = split_by_shard(ids, w.detach(), DispatchTable(placement))
    xd = x.detach()
    got = [
        shards[s.shard].backward(
            xd[s.tokens].numpy(),
            s.local_ids.numpy(),
            s.weights.numpy(),
            gy[s.tokens].numpy(),
            places_digest(s.local_ids, s.expert_ids),
        )
        for s in subs
    ]
    gx, gw = training.assemble(subs, got, xd, ids.shape[1])
    assert (gx - x.grad).abs().max() <= 1e-5
    assert (gw - w.grad).abs().max() <= 1e-5
    for name, p in layer.experts.named_parameters():
        want = p.grad.to_dense() if p.grad.is_sparse else p.grad
        total = torch.zeros_like(want)
        for sh in shards:
            live = sh.expert_ids[sh.expert_ids >= 0].numpy()
            total[live] += torch.from_numpy(sh.expert_grads(live)[name])
        assert (total - want).abs().max() <= 1e-5, name
        assert want.abs().sum() > 0
    for sh in shards:
        sh.zero_grad()
        live = sh.expert_ids[sh.expert_ids >= 0].numpy()
        assert all(float(np.abs(v).sum()) == 0 for v in sh.expert_grads(live).values())


@pytest.mark.parametrize("shards", [1, 3])
def test_one_place_per_expert_splits_as_the_general_path(shards):
    g = torch.Generator().manual_seed(shards)
    ids = torch.randint(0, 40, (50, 6), generator=g)
    ids[torch.rand(50, 6, generator=g) < 0.2] = -1
    w = torch.rand(50, 6, generator=g)
    fast = DispatchTable(contiguous(40, shards))
    general = DispatchTable(contiguous(40, shards))
    general._one_place = None  # every expert has one replica: the fast path applies
    assert fast._one_place is not None
    for a, b in zip(fast.choose(ids), general.choose(ids), strict=True):
        assert torch.equal(a, b)
    for a, b in zip(split_by_shard(ids, w, fast), split_by_shard(ids, w, general), strict=True):
        assert a.shard == b.shard
        for f in ("tokens", "local_ids", "weights", "expert_ids", "slots"):
            assert torch.equal(getattr(a, f), getattr(b, f))
    replicated = with_replicas(contiguous(40, 3), {3: [2]})  # two places: the general path
    assert DispatchTable(replicated)._one_place is None


@pytest.mark.parametrize("T", [0, 1, 50])
@pytest.mark.parametrize("replicated", [False, True])
@pytest.mark.parametrize("shards", [1, 3])
def test_the_c_split_equals_the_torch_split(monkeypatch, shards, replicated, T):
    """Every field of every sub-batch, and its places digest, with and without the C kernel:
    each expert's one place looked up by the kernel, or places picked among replicas."""
    g = torch.Generator().manual_seed(shards + 10 * T)
    ids = torch.randint(0, 40, (T, 6), generator=g)
    ids[torch.rand(T, 6, generator=g) < 0.2] = -1
    if T > 3:
        ids[3] = -1  # a token with no expert
    w = torch.rand(T, 6, generator=g)
    placement = contiguous(40, shards)
    if replicated:
        placement = with_replicas(placement, {3: [0], 17: [shards - 1]})
    native_subs = split_by_shard(ids, w, DispatchTable(placement))
    monkeypatch.setattr(native, "library", lambda: None)
    torch_subs = split_by_shard(ids, w, DispatchTable(placement))
    assert len(native_subs) == len(torch_subs)
    for a, b in zip(native_subs, torch_subs, strict=True):
        assert a.shard == b.shard and a.digest is not None and b.digest is None
        for f in ("tokens", "local_ids", "weights", "expert_ids", "slots"):
            assert torch.equal(getattr(a, f), getattr(b, f))
        assert a.digest == digest_of(b) == places_digest(b.local_ids, b.expert_ids)


def test_the_c_places_digest_equals_the_torch_one_and_bounds_places():
    g = torch.Generator().manual_seed(1)
    experts = torch.randint(-1, 1 << 40, (64,), generator=g)
    local = torch.randint(-1, 64, (32, 5), generator=g)
    want = places_digest(local, torch.where(local >= 0, experts[local.clamp(min=0)], -1))
    assert native.places_digest(local, experts) == want
    local[2, 3] = 64
    with pytest.raises(IndexError):
        native.places_digest(local, experts)
    with pytest.raises(IndexError):
        native.split(
            torch.tensor([[40]]), torch.ones(1, 1), 1, table=torch.zeros(40, dtype=torch.int64)
        )
