"""``ExpertOptimizer``: the lazy row optimizer of an in-process layer's experts, the same
rule and rows as a pool's :class:`~raymoe.optim.PoolOptimizer` (the reference it is tested
against, and a way to train :class:`~raymoe.MoELayer` with a million experts)."""

from __future__ import annotations

import weakref

import torch

from raymoe.errors import ConfigError
from raymoe.optim.base import RowOptimizer
from raymoe.optim.rows import RowGrads, RowState
from raymoe.optim.rules import OptimizerSpec
from raymoe.optim.steps import accumulate, step_rows, touched


class ExpertOptimizer(RowOptimizer):
    """Steps the experts of ``layer`` (a :class:`~raymoe.MoELayer`) that a forward with
    autograd reached since the last step; each keeps its own optimizer state, made when it is
    first stepped. The gate is not its business: train it with any ``torch.optim``.

        opt = ExpertOptimizer(layer, "adam", lr=1e-3)
        loss.backward(); opt.step(); opt.zero_grad()
    """

    def __init__(self, layer, optimizer: OptimizerSpec | str = "adam", **hyper):
        super().__init__(optimizer, **hyper)
        self.grads = RowGrads()
        self.state = RowState()
        self._hook = None
        self.attach(layer)

    def attach(self, layer) -> None:
        """Follow ``layer`` (the same experts in a new layer: one grown by added experts);
        the optimizer state of its experts carries over (it is keyed by expert id)."""
        bank = getattr(layer, "experts", layer)
        if bank is None:
            raise ConfigError("ExpertOptimizer: the layer has no experts")
        if self._hook is not None:
            self._hook.remove()
        self.bank = bank
        self._reached: list[torch.Tensor] = []
        # NOTE: the hook holds the optimizer weakly: the layer does not keep it alive (the
        # two would hold each other, GBs of state freed only by the cycle collector)
        self._hook = bank.register_forward_pre_hook(_recorder(weakref.ref(self)))

    def __del__(self) -> None:
        if getattr(self, "_hook", None) is not None:
            self._hook.remove()

    def _record(self, bank, args) -> None:
        if torch.is_grad_enabled():
            self._reached.append(touched(args[1]))

    def _collect(self) -> None:
        """Move the bank's gradients of the experts reached so far into ``self.grads``."""
        if self._reached:
            local = torch.unique(torch.cat(self._reached))
            self._reached = []
            accumulate(self.grads, self.bank, local, local)

    def grad_square_sum(self) -> float:
        self._collect()
        return self.grads.square_sum()

    def _step(self, scale: float) -> dict:
        self._collect()
        ids = self.grads.ids
        grads = self.grads.take(ids)
        step_rows(self.spec, self.bank, ids, ids, grads, self.state, scale)
        return {
            "experts": len(ids),
            "state_rows": len(self.state),
            "state_bytes": self.state.nbytes(),
        }

    def zero_grad(self) -> None:
        self._reached = []
        self.grads.drop()
        self.bank.zero_grad(set_to_none=True)


def _recorder(optimizer: weakref.ref):
    """The forward pre-hook of an :class:`ExpertOptimizer`'s bank."""

    def record(bank, args) -> None:
        opt = optimizer()
        if opt is not None:
            opt._record(bank, args)

    return record
