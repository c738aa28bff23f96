"""``PoolOptimizer``: the lazy row optimizer of a served pool's experts. Its steps run on the
shards (``PoolHandle.step``): gradients of replicas are summed at each expert's owner, the
owner steps the expert and its state, and its other replicas are refreshed, all under one
placement version."""

from __future__ import annotations

from raymoe.optim.base import RowOptimizer
from raymoe.optim.rules import OptimizerSpec


class PoolOptimizer(RowOptimizer):
    """Steps every expert of ``pool`` (a :class:`~raymoe.PoolHandle`) with gradients from
    backwards through it (:class:`~raymoe.RemoteMoE`).

        opt = PoolOptimizer(pool, "adamw", lr=1e-3, weight_decay=0.01)
        loss.backward(); opt.clip_grad_norm_(1.0, model.parameters()); opt.step()
        opt.zero_grad()
    """

    def __init__(self, pool, optimizer: OptimizerSpec | str = "adam", **hyper):
        super().__init__(optimizer, **hyper)
        self.pool = pool

    def grad_square_sum(self) -> float:
        return self.pool.grad_square_sum()

    def _step(self, scale: float) -> dict:
        return self.pool.step(self.spec, scale=scale)

    def zero_grad(self) -> None:
        self.pool.zero_grad()
