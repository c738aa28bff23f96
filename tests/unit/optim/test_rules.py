"""The row optimizers against torch.optim: equal on rows touched at every step, and each
row its own torch optimizer when touched lazily; their state only for rows touched."""

from __future__ import annotations

import pytest
import torch

from raymoe import ConfigError
from raymoe.optim import OptimizerSpec, RowGrads, RowState
from raymoe.optim.rules import apply
from raymoe.optim.steps import step_rows

HYPER = {
    "sgd": {"lr": 0.1, "momentum": 0.9, "weight_decay": 0.01},
    "adam": {"lr": 0.01, "betas": (0.8, 0.95), "weight_decay": 0.01},
    "adamw": {"lr": 0.01, "betas": (0.8, 0.95), "weight_decay": 0.1},
}
TORCH = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}


class Bank(torch.nn.Module):
    """A stand-in bank: two stacked parameters of 6 rows."""

    def __init__(self, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w = torch.nn.Parameter(torch.randn(6, 3, 4, generator=g))
        self.b = torch.nn.Parameter(torch.randn(6, 3, generator=g))


def _grads(step: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return {"w": torch.randn(6, 3, 4, generator=g), "b": torch.randn(6, 3, generator=g)}


@pytest.mark.parametrize("kind", sorted(HYPER))
def test_every_row_every_step_equals_torch_optim(kind):
    ours, ref = Bank(), Bank()
    spec = OptimizerSpec(kind=kind, **HYPER[kind])
    opt = TORCH[kind](ref.parameters(), **HYPER[kind])
    state, rows = RowState(), torch.arange(6)
    for step in range(5):
        grads = _grads(step)
        for name, p in ref.named_parameters():
            p.grad = grads[name].clone()
        opt.step()
        step_rows(spec, ours, rows, rows, grads, state)
    for (name, a), b in zip(ours.named_parameters(), ref.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-6, rtol=0), name


@pytest.mark.parametrize("kind", sorted(HYPER))
def test_lazy_rows_each_step_like_their_own_torch_optimizer(kind):
    """Rows touched at some steps only: each row moves as if it had its own torch
    optimizer, stepped when touched; untouched rows and their state stay put."""
    ours = Bank()
    spec = OptimizerSpec(kind=kind, **HYPER[kind])
    refs = {}
    for r in range(6):
        row = {k: torch.nn.Parameter(v[r].detach().clone()) for k, v in ours.named_parameters()}
        refs[r] = (row, TORCH[kind](row.values(), **HYPER[kind]))
    state = RowState()
    schedule = [[0, 2], [2, 3], [0, 2, 5], [], [2]]
    for step, rows in enumerate(schedule):
        grads = _grads(step)
        ids = torch.tensor(rows, dtype=torch.int64)
        step_rows(spec, ours, ids, ids, {k: v[ids] for k, v in grads.items()}, state)
        for r in rows:
            row, opt = refs[r]
            for k, p in row.items():
                p.grad = grads[k][r].clone()
            opt.step()
    for r, (row, _) in refs.items():
        for k, p in row.items():
            assert torch.allclose(dict(ours.named_parameters())[k][r], p, atol=1e-6), (r, k)
    assert state.ids.tolist() == ([0, 2, 3, 5] if spec.state_names else [])
    if spec.state_names:
        assert state.steps[state.slot].tolist() == [2, 4, 1, 1]


def test_state_bytes_grow_with_rows_touched_not_experts():
    spec = OptimizerSpec(kind="adam")
    state = RowState()
    per_row = 2 * 4 * (16 + 1) + 8  # exp_avg and exp_avg_sq of a [16] and a [1] row, a step
    big = torch.nn.Module()
    big.u = torch.nn.Parameter(torch.zeros(100_000, 16))
    big.c = torch.nn.Parameter(torch.zeros(100_000, 1))
    ids = torch.tensor([5, 70_000, 99_999])
    grads = {"u": torch.ones(3, 16), "c": torch.ones(3, 1)}
    step_rows(spec, big, ids, ids, grads, state)
    assert len(state) == 3 and state.nbytes() == 3 * per_row
    assert big.u[ids].ne(0).all() and big.u.ne(0).any(1).sum() == 3


def test_row_state_export_load_drop_and_reuse():
    spec = OptimizerSpec(kind="adam")
    bank, state = Bank(), RowState()
    ids = torch.tensor([1, 4])
    step_rows(spec, bank, ids, ids, {k: v[ids] for k, v in _grads(0).items()}, state)
    rows = state.export(torch.tensor([4, 3]))
    assert rows["opt.step"].tolist() == [1, 0]
    assert rows["opt.exp_avg.w"][1].abs().sum() == 0 and rows["opt.exp_avg.w"][0].abs().sum() > 0
    other = RowState()
    other.load(torch.tensor([4, 3]), rows)
    assert other.ids.tolist() == [4]  # step 0: no state made
    again = other.export(torch.tensor([4]))
    for k, v in again.items():
        assert torch.equal(v[0], rows[k][0]), k
    state.drop(torch.tensor([1]))
    before = state.nbytes()
    state.slots(torch.tensor([9]), spec.state_names, {"w": bank.w[:1], "b": bank.b[:1]})
    assert state.nbytes() == before  # the freed slot is reused
    assert state.ids.tolist() == [4, 9] and len(RowState().export(ids)) == 0


def test_row_grads_add_take_and_square_sum():
    grads = RowGrads()
    grads.add(torch.tensor([3, 1, 3]), {"w": torch.tensor([[1.0], [2.0], [4.0]])})
    grads.add(torch.tensor([1]), {"w": torch.tensor([[1.0]])})
    assert grads.ids.tolist() == [1, 3]
    assert grads.get(torch.tensor([3, 7, 1]))["w"].flatten().tolist() == [5.0, 0.0, 3.0]
    assert grads.square_sum() == 34.0
    assert grads.take(torch.tensor([1]))["w"].flatten().tolist() == [3.0]
    assert grads.ids.tolist() == [3]
    grads.drop()
    assert len(grads) == 0
    assert grads.get(torch.tensor([3]), {"w": torch.zeros(0, 1)})["w"].sum() == 0


@pytest.mark.parametrize(
    "bad",
    [
        {"kind": "lion"},
        {"kind": "adam", "lr": -1.0},
        {"kind": "adam", "betas": (1.0, 0.9)},
        {"kind": "sgd", "momentum": 1.5},
        {"kind": "adamw", "weight_decay": float("nan")},
        {"kind": "adam", "eps": 0.0},
        {"kind": "adam", "nesterov": True},
    ],
)
def test_bad_hyper_parameters_are_config_errors(bad):
    with pytest.raises(ConfigError):
        OptimizerSpec.of(bad)


def test_apply_counts_steps_per_row():
    spec = OptimizerSpec(kind="sgd", lr=1.0)
    p = {"w": torch.zeros(2, 1)}
    steps = torch.tensor([0, 4])
    apply(spec, p, {"w": torch.ones(2, 1)}, {}, steps)
    assert steps.tolist() == [1, 5] and p["w"].flatten().tolist() == [-1.0, -1.0]
