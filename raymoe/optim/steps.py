"""A bank's side of training: read the gradients of the rows a backward touched, and step
rows with their lazy state. Shared by the shards and the in-process :class:`ExpertOptimizer`,
so that both apply the same arithmetic to the same rows."""

from __future__ import annotations

import torch

from raymoe.kernels.bank import ExpertBank
from raymoe.optim.rows import RowGrads, Rows, RowState, find
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
            out[name] = _sparse_rows(g.coalesce(), local)
        else:
            out[name] = g.index_select(0, local)
        p.grad = None
    return out


def _sparse_rows(g: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
    """Rows ``local`` (sorted) of the coalesced sparse gradient ``g``, dense."""
    held, values = g.indices()[0], g.values()
    if torch.equal(held, local):
        return values
    at, found = find(held, local)
    out = values.new_zeros((len(local), *values.shape[1:]))
    out[found] = values[at[found]]
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
    params = {k: p.index_select(0, local) for k, p in bank.named_parameters()}
    if scale != 1.0:
        grads = {k: g * scale for k, g in grads.items()}
    slot = state.slots(ids, spec.state_names, params)
    rows = {
        s: {k: t.index_select(0, slot) for k, t in state.tensors[s].items()}
        for s in spec.state_names
    }
    steps = state.steps[slot]
    apply(spec, params, grads, rows, steps)
    for k, p in bank.named_parameters():
        p.index_copy_(0, local, params[k])
    for s, group in rows.items():
        for k, t in group.items():
            state.tensors[s][k].index_copy_(0, slot, t)
    state.steps[slot] = steps


def accumulate(grads: RowGrads, bank: ExpertBank, local: torch.Tensor, ids: torch.Tensor) -> None:
    """Move the bank's gradients of rows ``local`` (experts ``ids``) into ``grads``."""
    grads.add(ids, take_bank_grads(bank, local))
