"""Failure domains, a part of :class:`~.controller.Controller` (a mixin): every expert on
``shards.min_replicas`` shards and as many nodes (:mod:`raymoe.placement.domains`, the nodes
from :class:`~.nodes.ShardNodes`). Each placement the controller applies is spread first;
the reconcile loop repairs one that stopped being spread (a node died and its shards
restarted on others)."""

from __future__ import annotations

import logging

import numpy as np

from raymoe.placement import Placement, domains

log = logging.getLogger(__name__)


class FailureDomains:
    def spread(self, target: Placement) -> Placement:
        """``target`` with every expert on ``shards.min_replicas`` shards and as many nodes
        (:mod:`raymoe.placement.domains`); itself when it already is."""
        m = self.spec.shards.min_replicas
        if m <= 1:
            return target
        doms = self.nodes.domains(target.num_shards)
        return domains.spread(target, doms, m, self.spec.pins, self._active(target.num_shards))

    def _active(self, num_shards: int) -> np.ndarray:
        active = np.ones(num_shards, bool)
        active[[d for d in self.goal.drained if d < num_shards]] = False
        return active

    def _spread_due(self) -> bool:
        p, m = self.placement, self.spec.shards.min_replicas
        if m <= 1 or self.ops.locked() or not self._idle(("spread", 0)):
            return False
        return self.nodes.due(p, m, self.spec.pins, self._active(p.num_shards))

    async def _respread(self) -> None:
        """Repair the placement after the shards' nodes changed (a node died and its shards
        restarted on others)."""
        async with self.ops:
            target = self.spread(self.placement)
            if target is not self.placement:
                log.info("spreading replicas over the shards' nodes again")
                await self.apply(target.bump(), op="spread")
