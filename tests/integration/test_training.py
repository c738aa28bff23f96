"""Training through a served pool: ``RemoteMoE``'s gradients equal ``MoELayer``'s (fp32, 1e-5)
for every differentiable routing kind (soft routing too) and with a gated shared expert, over
both router -> shard transports: the gradients of the input, of the gate's and the shared
expert's parameters, and of the experts (read back from the shards)."""

from __future__ import annotations

import os
import signal
import time

import pytest
import ray
import torch

import raymoe
from raymoe import InvalidInputError, MoEStack, PoolSpec, RemoteMoE, ShapeError
from raymoe._private import direct
from tests.helpers import spec_dict

pytestmark = pytest.mark.integration

D = 16
FFN_KINDS = [
    {"kind": "topk", "k": 2, "renormalize": True, "bias": True},
    {"kind": "topk", "k": 2, "noise": True},  # noisy top-k: the same noise on both sides
    {"kind": "topk", "k": 2, "score": "sigmoid", "n_groups": 4, "topk_groups": 2,
     "correction_bias": True, "scaling": 1.5},
    {"kind": "dense"},
    {"kind": "switch", "capacity_factor": 0.5},
    {"kind": "expert_choice", "k": 2},
    {"kind": "hash", "vocab_size": 100},
    {"kind": "hierarchical", "n_groups": 4, "k_groups": 2, "k": 2},
    {"kind": "soft", "slots_per_expert": 2},  # slots mixed by RemoteMoE, computed in the pool
]  # fmt: skip
SHARED = {"hidden": 24, "gate": True}  # a last layer with a gated shared expert
PEER = spec_dict({"kind": "product_key", "heads": 2, "k": 3, "d_key": 8}, E=64, d=D, kind="peer")


def pool_spec(name: str, transport: str, peer: bool) -> PoolSpec:
    base = PEER if peer else spec_dict({"kind": "topk", "k": 2}, E=16, d=D)
    data = {**base, "name": name, "shards": {"count": 3, "transport": transport}}
    if not peer:
        data["layers"] = [{"routing": r} for r in FFN_KINDS]
        data["layers"].append({"routing": {"kind": "topk", "k": 2}, "shared": SHARED})
    # every expert on 2 shards: its gradient is the sum over the replicas that took its pairs
    data["shards"]["min_replicas"] = 2
    return PoolSpec.from_dict(data)


@pytest.fixture(scope="module", params=[(t, p) for t in ("object_store", "grpc") for p in (0, 1)])
def trained(request, ray_cluster):
    """(pool, MoEStack with the same random weights) per transport, FFN kinds and PEER."""
    transport, peer = request.param
    spec = pool_spec(f"train-{transport}-{peer}", transport, bool(peer))
    stack = MoEStack(spec)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():  # redrawn: nothing passes by sharing the seeded init
        for p in stack.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    state = stack.state_dict() if spec.multi_layer else stack.layers[0].state_dict()
    pool = raymoe.serve(spec, weights={k: v.clone() for k, v in state.items()})
    yield pool, stack
    pool.shutdown()


def _grad(p: torch.nn.Parameter) -> torch.Tensor:
    if p.grad is None:
        return torch.zeros_like(p)
    return p.grad.to_dense() if p.grad.is_sparse else p.grad


def _maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().abs().max()) if a.numel() else 0.0


def test_remote_moe_gradients_equal_moe_layer(trained):
    pool, stack = trained
    for layer, ref in enumerate(stack.layers):
        spec = ref.spec
        g = torch.Generator().manual_seed(layer)
        x = torch.randn(2, 7, D, generator=g)
        kw = {}
        if spec.routing.kind == "hash":
            kw["token_ids"] = torch.randint(0, 100, (14,), generator=g)
        grad_y = torch.randn(2, 7, D, generator=g)

        ref.zero_grad(set_to_none=True)
        x_ref = x.clone().requires_grad_()
        torch.manual_seed(layer)  # noisy gates draw their noise from the global generator
        y_ref, info_ref = ref(x_ref, return_info=True, **kw)
        ((y_ref * grad_y).sum() + info_ref.aux_loss).backward()

        moe = RemoteMoE(pool, layer=layer)
        pool.zero_grad()
        x_pool = x.clone().requires_grad_()
        torch.manual_seed(layer)
        y, info = moe(x_pool, return_info=True, **kw)
        ((y * grad_y).sum() + info.aux_loss).backward()

        kind = spec.routing.kind
        assert _maxdiff(y, y_ref) <= 1e-5, kind
        assert _maxdiff(x_pool.grad, x_ref.grad) <= 1e-5, kind
        gate = dict(moe.gate.named_parameters())  # the gate, and shared experts if any
        for name, p in ref.named_parameters():
            if not name.startswith("experts."):
                assert _maxdiff(_grad(gate[name]), _grad(p)) <= 1e-5, (kind, name)
        assert any(_grad(p).abs().sum() > 0 for p in gate.values()) or kind == "hash"
        got = pool.expert_grads(torch.arange(spec.num_experts), layer=layer)
        for name, p in ref.experts.named_parameters():
            assert _maxdiff(got[name], _grad(p)) <= 1e-5, (kind, name)
            assert _grad(p).abs().sum() > 0, (kind, name)  # the check compares something


def test_backward_refuses_bad_input_and_zero_grad_clears(trained):
    pool, stack = trained
    spec = stack.layers[0].spec
    x = torch.randn(4, D)
    ids = torch.zeros(4, 1, dtype=torch.int64)
    w = torch.ones(4, 1)
    with pytest.raises(ShapeError):
        pool.backward(x, ids, w, torch.zeros(3, D))
    with pytest.raises(InvalidInputError):
        pool.backward(x, ids, w, torch.full((4, D), float("nan")))
    with pytest.raises(InvalidInputError):
        pool.backward(x, None, None, torch.zeros(4, D))
    gx, gw = pool.backward(x, ids, w, torch.ones(4, D))
    assert gx.shape == x.shape and gw.shape == w.shape
    assert pool.expert_grads([0])[next(iter(pool.expert_grads([0])))].abs().sum() > 0
    pool.zero_grad()
    for v in pool.expert_grads(list(range(spec.num_experts))).values():
        assert float(v.abs().sum()) == 0.0


def test_a_backward_whose_kept_forward_is_gone_recomputes_it(trained):
    """The first backward of a kept forward sends the shards only the output gradient; a
    second one of the same key finds nothing kept, so the router sends the inputs and the
    shards recompute: the same gradients either way."""
    pool, stack = trained
    n = stack.layers[0].spec.num_experts
    g = torch.Generator().manual_seed(11)
    x, grad_y = torch.randn(6, D, generator=g), torch.randn(6, D, generator=g)
    ids = torch.stack([torch.randperm(n, generator=g)[:2] for _ in range(6)])
    w = torch.rand(6, 2, generator=g)
    pool.train_forward(x, ids, w, keep=11)
    answers, grads = [], []
    for _ in range(2):  # kept, then recomputed
        pool.zero_grad()
        answers.append(pool.backward(x, ids, w, grad_y, keep=11))
        grads.append(pool.expert_grads(torch.arange(n)))
    for a, b in zip(*answers, strict=True):
        assert _maxdiff(a, b) <= 1e-6
    for name, v in grads[0].items():
        assert _maxdiff(v, grads[1][name]) <= 1e-6 and float(v.abs().sum()) > 0, name


def test_training_goes_on_while_the_router_restarts(trained, monkeypatch):
    """Training calls reach the shards without a router: with the pool's only router killed
    (SIGKILL, Ray restarts it) and the view trying to take a new publication at every call,
    a forward and its backward still answer, equal to ``MoELayer``'s."""
    pool, stack = trained
    monkeypatch.setattr(direct, "REFRESH_S", 0.0)
    ref = stack.layers[0]
    moe = RemoteMoE(pool, layer=0)
    router = ray.get_actor(f"{pool.name}:router:0", namespace="raymoe")
    os.kill(ray.get(router.__ray_call__.remote(lambda self: os.getpid())), signal.SIGKILL)
    g = torch.Generator().manual_seed(9)
    for _ in range(3):  # each call starts a refresh that finds the router down
        x, grad_y = torch.randn(10, D, generator=g), torch.randn(10, D, generator=g)
        ref.zero_grad(set_to_none=True)
        x_ref = x.clone().requires_grad_()
        y_ref, info_ref = ref(x_ref, return_info=True)
        ((y_ref * grad_y).sum() + info_ref.aux_loss).backward()
        pool.zero_grad()
        x_pool = x.clone().requires_grad_()
        y, info = moe(x_pool, return_info=True)
        ((y * grad_y).sum() + info.aux_loss).backward()
        assert _maxdiff(y, y_ref) <= 1e-5
        assert _maxdiff(x_pool.grad, x_ref.grad) <= 1e-5
    _until_ready(pool)


def _until_ready(pool, timeout_s: float = 60.0) -> None:
    """Wait for the restarted router to serve again (the tests after this one use it)."""
    end = time.monotonic() + timeout_s
    routed = raymoe.connect(pool.name, direct=False)  # a small request would skip it
    while True:
        try:
            routed.forward(torch.zeros(1, D), timeout_s=5.0)
            return
        except raymoe.PoolUnavailableError:
            if time.monotonic() > end:
                raise
            time.sleep(0.1)


def test_a_backward_whose_experts_moved_since_its_forward(trained, monkeypatch):
    """A shard drained between a forward and its backward refuses its part (its places are
    free now); the trainer takes the new placement and sends those pairs to the experts'
    other replicas, which recompute them: gradients still equal ``MoELayer``'s. Last in the
    module: the pool keeps a drained shard."""
    pool, stack = trained
    monkeypatch.setattr(direct, "REFRESH_S", 1e9)  # the view moves on only when refused
    ref = stack.layers[0]
    g = torch.Generator().manual_seed(5)
    x, grad_y = torch.randn(12, D, generator=g), torch.randn(12, D, generator=g)
    ref.zero_grad(set_to_none=True)
    x_ref = x.clone().requires_grad_()
    y_ref, info_ref = ref(x_ref, return_info=True)
    ((y_ref * grad_y).sum() + info_ref.aux_loss).backward()

    moe = RemoteMoE(pool, layer=0)
    pool.zero_grad()
    seen = pool._view().table.version
    x_pool = x.clone().requires_grad_()
    y, info = moe(x_pool, return_info=True)
    pool.drain_shard(0)
    ((y * grad_y).sum() + info.aux_loss).backward()
    assert pool._view().table.version > seen  # refused, and sent again

    assert _maxdiff(x_pool.grad, x_ref.grad) <= 1e-5
    got = pool.expert_grads(torch.arange(ref.spec.num_experts), layer=0)
    for name, p in ref.experts.named_parameters():
        assert _maxdiff(got[name], _grad(p)) <= 1e-5, name
