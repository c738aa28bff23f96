"""The weight ledger: for each shard, the weight increments a restarted shard reloads.

A pool given weights (or grown with given ones) holds rows that are not its seeded init;
a shard that Ray restarts comes back empty and must get them again. The controller keeps,
per shard, a list of increments ``(expert ids [n], object ref of their rows)``: the rows it
was configured with, then every chunk copied to it. Kept bounded: increments of experts that
left the shard are dropped, and past twice the rows the shard holds, its current rows are
taken back from it (a few MB per call) to replace them.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from raymoe._private import timeouts
from raymoe._private.control.cluster import ActorUnreachable, Cluster

log = logging.getLogger(__name__)

CHUNK_BYTES = 4 << 20  # weights per call while copying or taking rows back


def rows_per_chunk(bytes_per_expert: int) -> int:
    """Experts per copy call (a few MB: small calls interleave with sub-batches)."""
    return max(1, CHUNK_BYTES // max(bytes_per_expert, 1))


class WeightLedger:
    def __init__(self, cluster: Cluster, bytes_per_expert: int):
        self.cluster = cluster
        self.step = rows_per_chunk(bytes_per_expert)
        self._rows: dict[int, list[tuple[np.ndarray, Any]]] = {}

    def increments(self, shard: int) -> list[tuple[np.ndarray, Any]]:
        return list(self._rows.get(shard, []))

    def add(self, shard: int, ids: np.ndarray, ref) -> None:
        self._rows.setdefault(shard, []).append((ids, ref))

    def set(self, shard: int, ids: np.ndarray, ref) -> None:
        self._rows[shard] = [(ids, ref)]

    def forget(self, shard: int) -> None:
        self._rows.pop(shard, None)

    def size(self, shard: int) -> int:
        """Expert rows kept for ``shard`` (counted with repeats)."""
        return sum(len(ids) for ids, _ in self._rows.get(shard, []))

    async def export(self, handle, ids: np.ndarray) -> list[tuple[np.ndarray, dict]]:
        """(ids, rows) chunks of a shard's experts ``ids``, a few MB per call."""
        got = []
        for i in range(0, len(ids), self.step):
            part = ids[i : i + self.step]
            rows = await self.cluster.call(
                handle, "export_experts", part, timeout=timeouts.EXPORT_S
            )
            got.append((part, rows))
        return got

    async def rows(self, handle, ids: np.ndarray) -> dict[str, np.ndarray]:
        """``{"ids": ids, name: [n, ...]}``: a shard's rows of experts ``ids``."""
        chunks = await self.export(handle, ids)
        out = {"ids": np.asarray(ids, np.int64)}
        for name in chunks[0][1] if chunks else ():
            out[name] = np.concatenate([rows[name] for _, rows in chunks])
        return out

    async def capture(self, shard: int, handle, ids: np.ndarray) -> None:
        """Take ``shard``'s current rows of ``ids`` as its one increment."""
        chunks = await self.export(handle, ids)
        self._rows[shard] = [(part, self.cluster.put(rows)) for part, rows in chunks]

    async def compact(self, shard: int, handle, live: np.ndarray) -> None:
        """Keep ``shard``'s increments within twice the rows it holds (``live`` ids): drop
        those of experts that left it; if that is not enough, take its rows back."""
        kept = [(ids, ref) for ids, ref in self._rows.get(shard, []) if np.isin(ids, live).any()]
        if shard in self._rows:
            self._rows[shard] = kept
        if sum(len(ids) for ids, _ in kept) <= 2 * max(len(live), 1):
            return
        try:
            await self.capture(shard, handle, live)
        except ActorUnreachable:
            self._rows[shard] = kept
            log.warning("shard %d: weight increments not compacted; the next change retries", shard)
            return
        log.info(
            "shard %d: weight increments taken back from the shard (%d experts)", shard, len(live)
        )
