"""What the in-process and the pool optimizers share: hyper-parameters, clipping, the step
and zero_grad protocol of ``torch.optim``."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable

import torch

from raymoe.errors import InvalidInputError
from raymoe.optim.rules import OptimizerSpec


class RowOptimizer:
    """Base class. ``optimizer``: a kind (``sgd``, ``adam``, ``adamw``) or an
    :class:`OptimizerSpec`; ``hyper``: its fields (``lr``, ``betas``, ...)."""

    def __init__(self, optimizer: OptimizerSpec | str = "adam", **hyper):
        if isinstance(optimizer, OptimizerSpec):
            self.spec = dataclasses.replace(optimizer, **hyper)
        else:
            self.spec = OptimizerSpec.of({"kind": optimizer, **hyper})
        self._scale = 1.0  # set by clip_grad_norm_, used by the next step

    @property
    def lr(self) -> float:
        return self.spec.lr

    @lr.setter
    def lr(self, value: float) -> None:  # for schedules
        self.spec = dataclasses.replace(self.spec, lr=float(value))

    def grad_square_sum(self) -> float:
        """The sum of squares of the experts' accumulated gradients."""
        raise NotImplementedError

    def clip_grad_norm_(self, max_norm: float, params: Iterable[torch.Tensor] = ()) -> float:
        """Clip by the global norm over the experts' gradients and ``params``' (the rest of
        the model's: the gate, attention, ...), as ``torch.nn.utils.clip_grad_norm_``:
        ``params``' gradients are scaled now, the experts' by the next :meth:`step`.
        -> the total norm before clipping."""
        if not (math.isfinite(max_norm) and max_norm > 0):
            raise InvalidInputError(f"max_norm must be a positive number; got {max_norm}")
        grads = [p.grad for p in params if p.grad is not None]
        local = sum(float(g.detach().double().square().sum()) for g in grads)
        total = math.sqrt(self.grad_square_sum() + local)
        coef = min(1.0, max_norm / (total + 1e-6))
        for g in grads:
            g.detach().mul_(coef)
        self._scale = coef
        return total

    def step(self) -> dict:
        """Apply one step to every expert with gradients; their gradients are used up."""
        scale, self._scale = self._scale, 1.0
        return self._step(scale)

    def _step(self, scale: float) -> dict:
        raise NotImplementedError

    def zero_grad(self) -> None:
        raise NotImplementedError
