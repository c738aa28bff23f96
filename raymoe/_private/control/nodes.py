"""The node each shard runs on: its failure domain (:mod:`raymoe.placement.domains`).

Shards report their Ray node in their status; the controller polls it every pass. A shard
that restarted on another node (its node died) changes the domains, and a placement that
no longer spreads every expert over ``shards.min_replicas`` domains is repaired.
"""

from __future__ import annotations

import numpy as np

from raymoe.placement import Placement
from raymoe.placement.domains import gaps, wanted


class ShardNodes:
    def __init__(self):
        self.node: dict[int, str] = {}  # shard -> Ray node id, as last reported
        self._label: dict[str, int] = {}
        self._fine: tuple | None = None  # (placement version, domains) last found spread

    def observe(self, statuses: list) -> None:
        """Take the nodes from the shards' status replies (None: not answering; kept)."""
        for n, st in enumerate(statuses):
            if st is not None and st.get("node"):
                self.node[n] = st["node"]

    def domains(self, num_shards: int) -> np.ndarray:
        """[N] a label per shard, equal for shards on one node; a shard whose node is not
        known yet counts as a node of its own."""
        out = np.empty(num_shards, np.int64)
        for n in range(num_shards):
            node = self.node.get(n)
            out[n] = -1 - n if node is None else self._label.setdefault(node, len(self._label))
        return out

    def due(self, placement: Placement, min_replicas: int, pins, active: np.ndarray) -> bool:
        """Whether ``placement`` leaves some expert short of its replicas or domains (checked
        again only when the placement or the domains change)."""
        doms = self.domains(placement.num_shards)
        key = (placement.version, doms.tobytes(), active.tobytes())
        if key == self._fine:
            return False
        short = gaps(placement, doms, wanted(placement, min_replicas, pins), active).any()
        if not short:
            self._fine = key
        return bool(short)
