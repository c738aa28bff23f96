"""Make before break: the cluster work of moving a pool from one placement to the next while
traffic flows. The controller runs the stages in order and keeps the goal:

1. copy: the weights of every new replica go to their new places, a few MB per call, from a
   replica in the old placement (or the given or seeded rows of added experts);
2. publish: every router gets the new placement version (with the routing state that
   changed: spec, gate rows, removed ids, correction bias), swapped atomically;
3. drain: wait until no batch runs under an older version;
4. free: old places are forgotten.

NOTE: a place an in-flight batch reads is never written: new replicas go to places the old
placement leaves free (``placement.realize``), and old places are freed only after 3.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import numpy as np

from raymoe._private import timeouts
from raymoe._private.control import growth
from raymoe._private.control.cluster import ActorUnreachable, Cluster
from raymoe.config import PoolSpec
from raymoe.errors import ShardNotReadyError
from raymoe.optim.rows import STATE_PREFIX
from raymoe.placement import Change, Placement

log = logging.getLogger(__name__)
CHUNK_BYTES = 4 << 20  # weights per copy call


def rows_per_chunk(bytes_per_expert: int) -> int:
    """Experts per copy call (a few MB: small calls interleave with sub-batches)."""
    return max(1, CHUNK_BYTES // max(bytes_per_expert, 1))


class Migrator:
    """The stages 1, 3 and 4 (publishing is the controller's: it owns the routing state)."""

    def __init__(self, cluster: Cluster, expert_bytes: int):
        self.cluster = cluster
        self.step = rows_per_chunk(expert_bytes)

    async def copy(
        self,
        old: Placement,
        change: Change,
        spec: PoolSpec,
        shards: list,
        has_rows: bool,
        new_rows: dict | None = None,
    ) -> None:
        """Stage 1: put every replica ``change`` adds in place. With ``has_rows`` the rows
        come from a replica in ``old`` (or ``new_rows``, the given rows of added experts, in
        id order from ``old.num_experts``); without, shards draw the seeded init."""
        e, s, local = change.added
        if not len(e):
            return
        rows = await self._source_rows(old, e, spec, shards, new_rows) if has_rows else None
        await asyncio.gather(
            *(
                self._place(n, shards[n], e[s == n], local[s == n], rows, spec)
                for n in np.unique(s).tolist()
            )
        )

    async def _source_rows(self, old, added, spec, shards, new_rows) -> dict[str, dict]:
        """{name: {expert: row}} of every expert in ``added``."""
        rows: dict[str, dict] = {}
        known = added < old.num_experts
        await self._export(old, np.unique(added[known]), shards, rows)
        fresh = np.unique(added[~known])  # added experts: given rows, or the seeded init
        if len(fresh):
            given = new_rows or growth.seeded_rows(spec, fresh)
            at = fresh - old.num_experts if new_rows else np.arange(len(fresh))
            for k, v in given.items():
                rows.setdefault(k, {}).update(zip(fresh.tolist(), v[at], strict=True))
        return rows

    async def _export(self, old: Placement, ids: np.ndarray, shards: list, rows: dict) -> None:
        """Fill ``rows`` with experts ``ids`` read from a replica of each in ``old``: the
        first one, else (a shard down or reloading) the next, for up to
        ``timeouts.SOURCE_S`` (a shard comes back in seconds)."""
        end = asyncio.get_running_loop().time() + timeouts.SOURCE_S
        turn = 0
        while len(ids):
            count = old.replicas()[ids]
            src = old.shard[old.ptr[ids] + turn % count]
            chunks = [
                (n, mine[i : i + self.step])
                for n in np.unique(src).tolist()
                for mine in [ids[src == n]]
                for i in range(0, len(mine), self.step)
            ]
            # NOTE: source shards export at once; each one's calls queue in its copy group
            got = await asyncio.gather(
                *(
                    self.cluster.call(shards[n], "export_experts", c, timeout=timeouts.EXPORT_S)
                    for n, c in chunks
                ),
                return_exceptions=True,
            )
            failed = []
            for (_, c), g in zip(chunks, got, strict=True):
                if isinstance(g, ActorUnreachable | ShardNotReadyError):
                    failed.append(c)
                    continue
                if isinstance(g, BaseException):
                    raise g
                for k, v in g.items():
                    rows.setdefault(k, {}).update(zip(c.tolist(), v, strict=True))
            ids = np.concatenate(failed) if failed else ids[:0]
            turn += 1
            if len(ids) and asyncio.get_running_loop().time() > end:
                raise ShardNotReadyError(f"no replica of experts {ids[:5].tolist()} answered")
            if len(ids) and turn % int(old.replicas()[ids].max()) == 0:
                await asyncio.sleep(0.5)  # every replica tried: wait for one to come back

    async def _place(self, n: int, handle, ids, local, rows, spec) -> None:
        """Place on shard ``n`` a few MB at a time, after growing its bank once: small copies
        interleave with the routers' sub-batches instead of stalling them. A shard that is
        restarting (down, or loading its experts) is waited for, up to ``SOURCE_S``."""
        end = asyncio.get_running_loop().time() + timeouts.SOURCE_S

        async def call(method: str, *args) -> None:
            while True:
                try:
                    return await self.cluster.call(handle, method, *args, timeout=timeouts.PLACE_S)
                except (ActorUnreachable, ShardNotReadyError):
                    if asyncio.get_running_loop().time() > end:
                        raise
                    await asyncio.sleep(0.5)

        await call("reserve", int(local.max()) + 1)
        step = self.step
        for i in range(0, len(ids), step):
            chunk = ids[i : i + step]
            part = None
            if rows is not None:
                part = {k: _stack(k, v, chunk) for k, v in rows.items()}
            await call("place", local[i : i + step], chunk, part, spec)

    async def drain(self, routers: list, version: int, timeout_s: float) -> None:
        """Stage 3: wait until no router runs a batch under a version older than ``version``.

        NOTE: a dead router's batches died with it (Ray retries its requests elsewhere)."""

        async def one(router) -> None:
            with contextlib.suppress(ActorUnreachable):
                await self.cluster.call(
                    router,
                    "drained",
                    version,
                    timeout_s,
                    timeout=timeout_s + timeouts.DRAIN_GRACE_S,
                )

        await asyncio.gather(*(one(r) for r in routers))

    async def free(self, change: Change, shards: list) -> None:
        """Stage 4: every shard forgets the places ``change`` drops."""
        _, s, local = change.dropped
        for n in np.unique(s).tolist():
            if n >= len(shards):
                continue  # a shard removed with the change
            try:
                await self.cluster.call(shards[n], "free", local[s == n], timeout=timeouts.FREE_S)
            except ActorUnreachable:
                log.warning("shard %d did not free its old places (it restarts empty)", n)


def _stack(name: str, rows: dict, ids: np.ndarray) -> np.ndarray:
    """The rows ``name`` of ``ids`` stacked. Optimizer state (``opt.*``) comes only from
    shards that hold some, and an added expert has none: zeros (step 0, no state) there."""
    if not name.startswith(STATE_PREFIX):
        return np.stack([rows[e] for e in ids.tolist()])
    blank = np.zeros_like(next(iter(rows.values())))
    return np.stack([rows.get(e, blank) for e in ids.tolist()])
