"""A pool's optimizer step on its own (the Stepper on in-process shards): replicas'
gradients summed at the owner, one step, replicas refreshed with rows and state; gradients
of a removed expert dropped; the state follows an expert that moves."""

from __future__ import annotations

import numpy as np
import torch

from raymoe._private.data.shard import ExpertShard
from raymoe.optim import OptimizerSpec, RowState
from raymoe.optim.steps import step_rows
from raymoe.placement import contiguous, diff, realize
from tests.unit.control.fakes import run, setup, start

ADAM = OptimizerSpec(kind="adam", lr=0.1).to_dict()


def _backward(shard, expert: int, seed: int) -> None:
    """A backward on ``shard`` of 3 tokens routed to ``expert`` alone."""
    g = torch.Generator().manual_seed(seed)
    local = int(torch.nonzero(shard.expert_ids == expert)[0, 0])
    x = torch.randn(3, 16, generator=g).numpy()
    ids = np.full((3, 1), local, np.int64)
    shard.backward(x, ids, np.ones((3, 1), np.float32), torch.randn(3, 16, generator=g).numpy())


def _replicated(ctl):
    """Expert 0 on shards 0 and 1 (owner: 0)."""
    p = ctl.placement
    e, s = p.pairs()
    return realize(p, np.append(e, 0), np.append(s, 1))


def test_step_sums_replicas_at_the_owner_and_refreshes_the_other():
    ctl, _, _, weights = setup()
    start(ctl, contiguous(8, 2), weights)
    target = _replicated(ctl)
    run(ctl.migrator.copy(ctl.placement, diff(ctl.placement, target), ctl.spec, ctl.shards, True))
    a, b = ctl.shards
    _backward(a, 0, 1)
    _backward(b, 0, 2)
    summed = {k: a.expert_grads([0])[k] + b.expert_grads([0])[k] for k in a.expert_grads([0])}
    before = a.export_experts(np.array([0]))
    experts, refreshed = run(ctl.stepper.step(target, ctl.shards, ADAM, 0.5))
    assert (experts, refreshed) == (1, 1)
    # the reference: the summed gradient, halved, one Adam step of the row
    bank = torch.nn.Module()
    for k, v in before.items():
        bank.register_parameter(k, torch.nn.Parameter(torch.as_tensor(v)))
    ids = torch.tensor([0])
    grads = {k: torch.as_tensor(v) for k, v in summed.items()}
    step_rows(OptimizerSpec.of(ADAM), bank, ids, ids, grads, RowState(), 0.5)
    after_a, after_b = a.export_experts(np.array([0])), b.export_experts(np.array([0]))
    for k, p in bank.named_parameters():
        assert np.allclose(after_a[k], p.detach().numpy(), atol=1e-6), k
    for k, v in after_a.items():  # rows and optimizer state, equal on both replicas
        assert np.array_equal(v, after_b[k]), k
    assert after_a["opt.step"].tolist() == [1] and len(a.grads) == len(b.grads) == 0


def test_gradients_of_an_expert_that_moved_reach_its_new_owner_and_state_moves():
    ctl, _, _, weights = setup()
    start(ctl, contiguous(8, 2), weights)
    old = ctl.placement
    a, b = ctl.shards
    _backward(a, 1, 3)
    run(ctl.stepper.step(old, ctl.shards, ADAM, 1.0))  # expert 1 has state on shard 0
    _backward(a, 1, 4)  # then moves to shard 1 before the next step
    e, s = old.pairs()
    moved = realize(old, e, np.where(e == 1, 1, s))
    run(ctl.migrator.copy(old, diff(old, moved), ctl.spec, ctl.shards, True))
    run(ctl.migrator.free(diff(old, moved), ctl.shards))
    assert len(a.state) == 0 and b.state.ids.tolist() == [1]
    experts, _ = run(ctl.stepper.step(moved, ctl.shards, ADAM, 1.0))
    assert experts == 1 and len(a.grads) == 0
    assert b.export_experts(np.array([1]))["opt.step"].tolist() == [2]


def test_gradients_of_a_removed_expert_are_dropped():
    ctl, _, _, weights = setup()
    start(ctl, contiguous(8, 2), weights)
    a, _ = ctl.shards
    _backward(a, 2, 5)
    p = ctl.placement
    e, s = p.pairs()
    keep = e != 2
    removed = realize(p, e[keep], s[keep])
    assert removed.replicas()[2] == 0
    assert run(ctl.stepper.step(removed, ctl.shards, ADAM, 1.0)) == (0, 0)
    assert len(a.grads) == 0


def test_optimizer_state_is_written_with_the_rows_and_read_back(tmp_path):
    ctl, _, _, weights = setup()
    start(ctl, contiguous(8, 2), weights)
    a, _ = ctl.shards
    _backward(a, 1, 6)
    run(ctl.stepper.step(ctl.placement, ctl.shards, ADAM, 1.0))
    file = str(tmp_path / "rows.safetensors")
    held = a.expert_ids.numpy()
    a.write_rows(file, held)
    again = ExpertShard(ctl.spec, 0)
    again.configure(held, files=[file])
    assert again.state.ids.tolist() == [1]
    for k, v in a.export_experts(held).items():
        assert np.array_equal(again.export_experts(held)[k], v), k
