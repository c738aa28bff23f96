"""Training the experts: lazy row optimizers (SGD, Adam, AdamW) for an in-process layer
(:class:`ExpertOptimizer`) and for a served pool (:class:`PoolOptimizer`, whose steps run on
the shards), with the same arithmetic on the same rows."""

from raymoe.optim.local import ExpertOptimizer
from raymoe.optim.pool import PoolOptimizer
from raymoe.optim.rows import RowGrads, RowState
from raymoe.optim.rules import OptimizerSpec

__all__ = ["ExpertOptimizer", "OptimizerSpec", "PoolOptimizer", "RowGrads", "RowState"]
