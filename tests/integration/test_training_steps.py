"""Training steps through a served pool equal an in-process run, step for step (fp32, 1e-5):
``RemoteMoE`` + ``PoolOptimizer`` against ``MoELayer`` + ``ExpertOptimizer``, with gradient
accumulation, clipping by a global norm, every expert on 2 shards, and the pool changing in
the middle: a drained shard and a rebalance between micro-batches (gradients pending), added
and removed experts between steps."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import raymoe
from raymoe import MoELayer, PoolSpec, RemoteMoE, checkpoint
from raymoe.optim import ExpertOptimizer, PoolOptimizer
from tests.helpers import spec_dict

pytestmark = pytest.mark.integration

D, H, STEPS, LR, CLIP = 16, 24, 22, 0.05, 0.3
FFN = spec_dict({"kind": "topk", "k": 2, "bias": True}, E=8, d=D, H=H)
PEER = spec_dict({"kind": "product_key", "heads": 2, "k": 3, "d_key": 8}, E=64, d=D, kind="peer")
# NOTE: Adam divides by sqrt(v) + eps: an element whose gradient is a near-cancelling sum, of
# the order of eps, moves by up to lr, and the last bits of its sum depend on how the pool
# splits the batch. eps = 1e-6 keeps the comparison about the pool, not fp32 summation order.
ADAM = {"lr": LR, "eps": 1e-6}
CASES = {  # name: (spec, optimizer, experts added at once)
    "ffn-adam-object_store": (FFN, {"kind": "adam", **ADAM}, 2),
    "ffn-adamw-grpc": (FFN, {"kind": "adamw", "weight_decay": 0.1, **ADAM}, 2),
    "peer-sgd-object_store": (PEER, {"kind": "sgd", "lr": LR, "momentum": 0.9}, 8),
}


def _random(shape, g) -> torch.Tensor:
    return torch.randn(shape, generator=g) * 0.3


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, ray_cluster):
    base, optimizer, added = CASES[request.param]
    transport = request.param.rsplit("-", 1)[1]
    shards = {"count": 3, "transport": transport, "min_replicas": 2}
    spec = PoolSpec.from_dict({**base, "name": f"steps-{request.param}", "shards": shards})
    ref = MoELayer(spec)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(_random(p.shape, g))
    pool = raymoe.serve(spec, weights={k: v.clone() for k, v in ref.state_dict().items()})
    yield pool, ref, optimizer, added
    pool.shutdown()


def _new_experts(ref: MoELayer, moe: RemoteMoE, count: int, g) -> dict[str, torch.Tensor]:
    """Weights of ``count`` added experts, by pool names: expert rows and gate rows."""
    out = {
        f"experts.{k}": _random((count, *p.shape[1:]), g) for k, p in ref.experts.named_parameters()
    }
    if ref.spec.routing.kind == "product_key":  # one more row of sub-keys
        heads, _, _, half = ref.router.keys.shape
        out["router.keys"] = _random((heads, count // ref.router.keys.shape[2], half), g)
    else:
        out["router.weight"] = _random((count, D), g)
        out["router.bias"] = _random((count,), g)
    return out


def _follow(ref: MoELayer, moe: RemoteMoE, new: dict[str, torch.Tensor] | None = None):
    """``ref`` as the pool changed it: its experts (and ``new`` rows of added ones); the
    gate as ``moe``'s after ``sync`` (its trained rows were just checked equal to ``ref``'s)."""
    out = MoELayer(moe.spec)
    with torch.no_grad():
        out.router.load_state_dict(moe.gate.router.state_dict())
        for k, p in out.experts.named_parameters():
            rows = [getattr(ref.experts, k)] + ([new[f"experts.{k}"]] if new else [])
            p.copy_(torch.cat(rows))
    return out


def _live(spec) -> torch.Tensor:
    removed = torch.tensor(spec.experts.removed, dtype=torch.int64)
    every = torch.arange(spec.num_experts)
    return every[~torch.isin(every, removed)]


def _check(pool, moe: RemoteMoE, ref: MoELayer, step: int) -> None:
    for (name, a), b in zip(
        moe.gate.router.named_parameters(), ref.router.parameters(), strict=True
    ):
        a = a[tuple(slice(0, n) for n in b.shape)]  # after sync, before ref grows
        assert float((a - b).detach().abs().max()) <= 1e-5, (step, name)
    ids = _live(moe.spec)  # the pool's live experts that ref has
    ids = ids[ids < ref.spec.num_experts]
    first, second = pool.expert_weights(ids, replica=0), pool.expert_weights(ids, replica=1)
    for name, p in ref.experts.named_parameters():
        assert float((first[name] - p[ids]).detach().abs().max()) <= 1e-5, (step, name)
        assert torch.equal(first[name], second[name]), (step, name)  # replicas agree


def test_steps_equal_in_process_across_pool_changes(case, tmp_path):
    pool, ref, optimizer, added = case
    moe = RemoteMoE(pool)
    kind = optimizer["kind"]
    hyper = {k: v for k, v in optimizer.items() if k != "kind"}
    pool_opt, ref_opt = PoolOptimizer(pool, kind, **hyper), ExpertOptimizer(ref, kind, **hyper)
    gate_opt = torch.optim.SGD(moe.gate.router.parameters(), lr=LR)
    ref_gate_opt = torch.optim.SGD(ref.router.parameters(), lr=LR)
    g = torch.Generator().manual_seed(11)
    norms = []
    for step in range(STEPS):
        if step in (13, 17):  # experts added, then one removed, between steps
            new = None
            if step == 13:
                new = _new_experts(ref, moe, added, g)
                pool.add_experts(added, {k: v.numpy() for k, v in new.items()})
            else:
                pool.remove_experts([1])
            assert moe.sync()
            _check(pool, moe, ref, step)  # before: the trained rows kept
            ref = _follow(ref, moe, new)
            ref_opt.attach(ref)
            gate_opt = torch.optim.SGD(moe.gate.router.parameters(), lr=LR)
            ref_gate_opt = torch.optim.SGD(ref.router.parameters(), lr=LR)
        for micro in range(2):  # two micro-batches a step: gradients accumulate
            if micro == 1 and step == 5:  # replicas move while gradients are pending: they
                pool.drain_shard(1)  # follow their experts, and so does the optimizer state
            if micro == 1 and step == 9:
                pool.rebalance()
            x = torch.randn(12, D, generator=g)
            target = torch.randn(12, D, generator=g)
            y_ref = ref(x)
            (y_ref - target).square().mean().backward()
            y = moe(x)
            (y - target).square().mean().backward()
            assert float((y - y_ref).detach().abs().max()) <= 1e-5, step
        total = pool_opt.clip_grad_norm_(CLIP, moe.gate.router.parameters())
        ref_total = ref_opt.clip_grad_norm_(CLIP, ref.router.parameters())
        assert abs(total - ref_total) <= 1e-5 * max(1.0, ref_total), step
        norms.append(total)
        report = pool_opt.step()
        assert report["experts"] == ref_opt.step()["experts"], step
        gate_opt.step()
        ref_gate_opt.step()
        for opt in (pool_opt, ref_opt, gate_opt, ref_gate_opt):
            opt.zero_grad()
        _check(pool, moe, ref, step)
    assert max(norms) > CLIP  # clipping did clip
    assert report["replicas_refreshed"] > 0
    # the optimizer state moved with the experts and is in checkpoints
    manifest = pool.save(tmp_path / "ckpt")
    assert manifest["files"]
    _, weights, _ = checkpoint.read(tmp_path / "ckpt")
    live = _live(ref.spec).numpy()
    for name, p in ref.experts.named_parameters():
        got = weights[f"experts.{name}"][live]
        assert np.abs(got - p.detach().numpy()[live]).max() <= 1e-5, name
