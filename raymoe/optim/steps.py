"""A bank's side of training: read the gradients of the rows a backward touched, and step
rows with their lazy state. Shared by the shards and the in-process :class:`ExpertOptimizer`,
so that both apply the same arithmetic to the same rows."""

from __future__ import annotations

import torch

from raymoe.kernels.bank import ExpertBank
from raymoe.optim.rows import RowGrads, Rows, RowState
from raymoe.optim.rules import OptimizerSpec, apply


def touched(ids: torch.Tensor) -> torch.Tensor:
    """The local experts a batch's routes ``ids`` ([T, S], -1 = none) reach, sorted."""
    return torch.unique(ids[ids >= 0])


def take_bank_grads(bank: ExpertBank, local: torch.Tensor) -> Rows:
    """The gradients of rows ``local`` ([n]) out of the bank's ``.grad`` (dense or sparse),
    which is cleared. Rows no backward reached read as zeros."""
    out = {}
    for name, p in bank.named_parameters():
        g = p.grad
        if g is None:
            out[name] = p.new_zeros((len(local), *p.shape[1:]))
        elif g.is_sparse:
            out[name] = g.coalesce().index_select(0, local).to_dense()
        else:
            out[name] = g[local].clone()
        p.grad = None
    return out


@torch.no_grad()
def step_rows(
    spec: OptimizerSpec,
    bank: ExpertBank,
    local: torch.Tensor,
    ids: torch.Tensor,
    grads: Rows,
    state: RowState,
    scale: float = 1.0,
) -> None:
    """One optimizer step of the bank's rows ``local`` ([n]), whose expert ids are ``ids``
    ([n], sorted unique: the state's keys), with gradients ``grads`` ({name: [n, ...]})
    times ``scale`` (gradient clipping)."""
    if not len(ids):
        return
    params = {k: p[local] for k, p in bank.named_parameters()}
    if scale != 1.0:
        grads = {k: g * scale for k, g in grads.items()}
    slot = state.slots(ids, spec.state_names, params)
    rows = {s: {k: t[slot] for k, t in state.tensors[s].items()} for s in spec.state_names}
    steps = state.steps[slot]
    apply(spec, params, grads, rows, steps)
    for k, p in bank.named_parameters():
        p[local] = params[k]
    for s, group in rows.items():
        for k, t in group.items():
            state.tensors[s][k][slot] = t
    state.steps[slot] = steps


def accumulate(grads: RowGrads, bank: ExpertBank, local: torch.Tensor, ids: torch.Tensor) -> None:
    """Move the bank's gradients of rows ``local`` (experts ``ids``) into ``grads``."""
    grads.add(ids, take_bank_grads(bank, local))
