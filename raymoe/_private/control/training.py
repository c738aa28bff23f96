"""Optimizer steps of a served pool, run by the controller under its operation lock (so no
placement change interleaves with a step).

Glossary: an expert's *owner* is its first replica in the placement. A step

1. gathers: every shard sends the gradients it holds of experts it does not own to their
   owners (gradients of removed experts are dropped); replicas' gradients add up there;
2. steps: every owner applies the optimizer to the experts it holds gradients for, and
   their lazy state;
3. refreshes: each owner's stepped rows, with their state, overwrite its experts' other
   replicas. All replicas are equal again before any later placement version serves.

NOTE: a step is not retried (the gradients are used up); a failure raises, and the trainer
redoes its step after ``zero_grad``.
"""

from __future__ import annotations

import asyncio

import numpy as np

from raymoe._private.control.cluster import ActorUnreachable, Cluster
from raymoe.errors import PoolUnavailableError
from raymoe.placement import Placement

STEP_S = 300.0  # a shard's part of one step (gathering, stepping or refreshing rows)


class Stepper:
    def __init__(self, cluster: Cluster):
        self.cluster = cluster

    async def _call(self, handle, method: str, *args):
        try:
            return await self.cluster.call(handle, method, *args, timeout=STEP_S)
        except ActorUnreachable as e:
            raise PoolUnavailableError(f"a shard did not answer during a step: {e}") from e

    async def gather(self, placement: Placement, shards: list) -> None:
        """Stage 1: every expert's gradients to its owner."""
        held = await asyncio.gather(*(self._call(h, "grad_ids") for h in shards))
        owner = _owners(placement)

        async def send(n: int, ids: np.ndarray) -> None:
            to = owner[ids]
            for m in np.unique(to).tolist():
                if m == n:
                    continue
                mine = ids[to == m]
                rows = await self._call(shards[n], "take_grads", mine)
                if m >= 0:  # else removed experts: dropped
                    await self._call(shards[m], "add_grads", mine, rows)

        await asyncio.gather(*(send(n, np.asarray(ids)) for n, ids in enumerate(held)))

    async def grad_square_sum(self, placement: Placement, shards: list) -> float:
        await self.gather(placement, shards)
        got = await asyncio.gather(*(self._call(h, "grad_square_sum") for h in shards))
        return float(sum(got))

    async def step(self, placement: Placement, shards: list, optimizer: dict, scale: float):
        """Stages 1-3. -> (experts stepped, replicas refreshed)."""
        await self.gather(placement, shards)
        stepped = await asyncio.gather(*(self._call(h, "step", optimizer, scale) for h in shards))
        refreshed = await asyncio.gather(
            *(self._refresh(placement, shards, n, np.asarray(ids)) for n, ids in enumerate(stepped))
        )
        return sum(len(s) for s in stepped), sum(refreshed)

    async def _refresh(self, placement: Placement, shards: list, n: int, ids: np.ndarray) -> int:
        """Stage 3 for owner ``n``'s stepped experts ``ids``. -> replicas refreshed."""
        copies = ids[placement.replicas()[ids] > 1]
        if not len(copies):
            return 0
        rows = await self._call(shards[n], "export_experts", copies)
        expert, shard = placement.pairs()
        at = np.isin(expert, copies) & (shard != n)
        calls = []
        for m in np.unique(shard[at]).tolist():
            mine = expert[at & (shard == m)]
            pick = np.searchsorted(copies, mine)
            calls.append(
                self._call(shards[m], "refresh", mine, {k: v[pick] for k, v in rows.items()})
            )
        await asyncio.gather(*calls)
        return int(at.sum())


def _owners(placement: Placement) -> np.ndarray:
    """[E] the owner shard of each expert; -1 for a removed one."""
    first, _ = placement.primary()
    return np.where(placement.replicas() > 0, first, -1)
