"""The automatic control loop on the fake cluster: autoscaling with bounds and a cooldown,
aux-loss-free bias updates, and a failing step that does not stop the loop."""

from __future__ import annotations

import numpy as np
import torch

from raymoe import MoELayer, PoolSpec
from raymoe._private.control.controller import Controller
from raymoe.placement import contiguous
from raymoe.store import MemoryStore
from tests.helpers import spec_dict
from tests.unit.control.fakes import FakeCluster, close, run, start


def _controlled(control: dict, routing: dict | None = None, shards: int = 1):
    spec = PoolSpec.from_dict(
        {
            **spec_dict(routing or {"kind": "topk", "k": 2}, E=8),
            "shards": {"count": shards},
            "control": control,
        }
    )
    ctl = Controller(spec, FakeCluster(spec), MemoryStore())
    start(ctl, contiguous(8, shards), None)
    return ctl


def _traffic(ctl, tokens: int, seconds: float = 1.0):
    if tokens:
        run(ctl.routers[0].forward(torch.randn(tokens, 16).numpy()))
    ctl.load._t -= seconds  # as if the tokens came over ``seconds``


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
    run(ctl.loop.step())
    assert ctl.placement.num_shards == 3 and len(ctl.shards) == 3  # 5 wanted, 3 allowed
    x = torch.randn(20, 16)
    close(ctl, MoELayer(ctl.spec).eval(), x)
    _traffic(ctl, 0)
    run(ctl.loop.step())
    assert ctl.placement.num_shards == 1
    close(ctl, MoELayer(ctl.spec).eval(), x)


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
    run(ctl.loop.step())
    n = ctl.placement.num_shards
    _traffic(ctl, 0)
    run(ctl.loop.step())
    assert ctl.placement.num_shards == n > 1


def test_aux_loss_free_bias_moves_towards_balance():
    ctl = _controlled(
        {"bias_update_rate": 0.01},
        routing={"kind": "topk", "k": 2, "score": "sigmoid", "correction_bias": True},
    )
    run(ctl.routers[0].forward(torch.randn(300, 16).numpy()))
    counts = ctl.routers[0].traffic.total.copy()
    v = ctl.goal.routing_version
    run(ctl.loop.step())
    bias = ctl.routers[0].gate_weights()["router.correction_bias"]
    assert np.allclose(bias, 0.01 * np.sign(counts.mean() - counts))
    assert ctl.goal.routing_version > v  # published with the gate, as a new version
    ref = MoELayer(ctl.spec).eval()  # the pool gates with the updated bias
    ref.router.correction_bias.copy_(torch.as_tensor(bias))
    close(ctl, ref, torch.randn(20, 16))


def test_auto_rebalance_runs_when_imbalance_passes_the_target():
    ctl = _controlled(
        {"auto_rebalance": True, "rebalance_interval_s": 0.01, "target_imbalance": 1.05}, shards=2
    )
    ids = torch.tensor([[0, 1]] * 64)  # experts 0 and 1 only: shard 0 takes everything
    run(
        ctl.routers[0].forward(
            torch.randn(64, 16).numpy(),
            expert_ids=ids.numpy(),
            weights=np.full((64, 2), 0.5, np.float32),
        )
    )
    ctl.loop._last_rebalance -= 1
    run(ctl.loop.step())
    assert ctl.placement.version > 1 and ctl.imbalance() <= 1.05


def test_a_failing_step_is_logged_and_the_loop_goes_on(caplog):
    ctl = _controlled({"autoscale": True, "auto_rebalance": True, "rebalance_interval_s": 0.01})

    async def broken(*a, **k):
        raise RuntimeError("boom")

    ctl.loop.autoscale = broken
    run(ctl.loop.step())
    assert "control step failed" in caplog.text
