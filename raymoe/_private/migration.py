"""Make before break: how the controller moves a pool from one placement to the next while
traffic flows (a mixin of :class:`raymoe._private.controller.Controller`; its Ray calls go
through the controller's ``cluster``).

1. copy: the weights of every new replica go to their new places, a few MB per call, from a
   replica in the old placement (or the given or seeded rows of added experts);
2. publish: every router gets the new placement version (with the routing state that
   changed: spec, gate rows, removed ids, correction bias), swapped atomically;
3. drain: wait until no batch runs under an older version;
4. free: old places are forgotten.

The pending placement is saved first, so a controller that dies midway finishes the change
when it comes back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import numpy as np

from raymoe._private import growth, policy
from raymoe._private.placement import Placement
from raymoe.config import PoolSpec
from raymoe.errors import PoolUnavailableError

log = logging.getLogger(__name__)

COPY_CHUNK_BYTES = 4 << 20  # weights per place() call while copying experts


class MakeBeforeBreak:
    """Needs the controller's ``spec``, ``placement``, ``pending``, ``store``, ``cluster``,
    ``shards``, ``routers``, ``_rows``, ``has_rows``, load and pins (see Controller)."""

    async def _apply(self, target: Placement, spec: PoolSpec | None = None,
                     gate: dict | None = None, new_rows: dict | None = None) -> None:  # fmt: skip
        """Move from the current placement to ``target`` without pausing or failing requests.
        With ``spec`` (and ``gate``: the gate weights, when they change) the routing state
        moves with it: experts added (``new_rows``: their weights, by name, in id order) or
        removed. Callers hold ``self._ops``."""
        old = self.placement
        t = [time.perf_counter()]
        self.pending = target
        self.store.put(self._key("pending"), target.to_bytes())
        if spec is not None:
            self.store.put(self._key("pending_spec"), spec.model_dump_json().encode())
        try:
            await self._make(old, target, spec or self.spec, new_rows)  # 1. weights placed
        except Exception as e:
            self._end_pending()
            raise PoolUnavailableError(f"could not copy weights to new places: {e}") from e
        t.append(time.perf_counter())
        if spec is not None:
            self.spec, self.routing_version = spec, target.version
            if gate is not None:
                self._gate = self.cluster.put(gate)
            grown = np.zeros(spec.num_experts)
            grown[: len(self.load)] = self.load[: spec.num_experts]
            self.load = grown
            self.load[list(spec.experts.removed)] = 0
            self.pins = {e: c for e, c in self.pins.items() if e not in spec.experts.removed}
        self.placement = target
        routing = spec is not None
        await asyncio.gather(*(self._publish_quiet(i, routing) for i in range(len(self.routers))))
        t.append(time.perf_counter())
        timeout = self.spec.control.drain_timeout_s  # 3. no batch left on the old version
        await asyncio.gather(*(self._drain(r, target.version, timeout) for r in self.routers))
        t.append(time.perf_counter())
        await self._break(old, target)  # 4. old places freed
        self.save()
        self._end_pending()
        for n in range(min(old.num_shards, target.num_shards)):
            await self._compact(n)
        t.append(time.perf_counter())
        self.last_apply = dict(zip(("copy", "publish", "drain", "free"), np.diff(t).tolist(),
                                   strict=True))  # fmt: skip
        log.info(
            "placement %d applied in %s",
            target.version,
            ", ".join(f"{k} {v * 1e3:.0f} ms" for k, v in self.last_apply.items()),
        )

    def _end_pending(self) -> None:
        self.pending = None
        self.store.delete(self._key("pending"))
        self.store.delete(self._key("pending_spec"))

    async def _publish_quiet(self, i: int, routing: bool = False) -> None:
        try:
            await self._publish(i, routing)
        except Exception:
            log.warning("router %d missed placement %d; the update loop retries", i,
                        self.placement.version)  # fmt: skip

    async def _drain(self, router, version: int, timeout: float) -> None:  # 3.
        # NOTE: a dead router's batches died with it (Ray retries its requests elsewhere)
        with contextlib.suppress(Exception):
            await self.cluster.call(router, "drained", version, timeout, timeout=timeout + 5)

    async def _make(self, old: Placement, new: Placement, spec: PoolSpec, new_rows) -> None:
        (add_e, add_s, add_l), _ = diff(old, new)
        if not len(add_e):
            return
        rows = None
        if self.has_rows:  # copy from a replica in the old placement
            known = add_e < old.num_experts
            src_shard, _ = old.primary()
            src = src_shard.numpy()[add_e[known]]
            rows = {}
            step = max(1, COPY_CHUNK_BYTES // max(self.expert_bytes(), 1))

            async def export(s: int, ids: np.ndarray) -> None:
                got = await self.cluster.call(self.shards[s], "export_experts", ids, timeout=120)
                for k, v in got.items():
                    rows.setdefault(k, {}).update(zip(ids.tolist(), v, strict=True))

            # NOTE: source shards export at once; each one's calls queue in its copy group
            chunks = []
            for s in np.unique(src).tolist():
                mine = np.unique(add_e[known][src == s])
                chunks += [(s, mine[i : i + step]) for i in range(0, len(mine), step)]
            await asyncio.gather(*(export(s, ids) for s, ids in chunks))
            fresh = np.unique(add_e[~known])  # added experts: given rows, or the seeded init
            if len(fresh):
                given = new_rows or growth.seeded_rows(spec, fresh)
                for k, v in given.items():
                    at = fresh - old.num_experts if new_rows else np.arange(len(fresh))
                    rows.setdefault(k, {}).update(zip(fresh.tolist(), v[at], strict=True))
        step = max(1, COPY_CHUNK_BYTES // max(self.expert_bytes(), 1))
        calls = [self._place_chunks(n, add_e[add_s == n], add_l[add_s == n], rows, step)
                 for n in np.unique(add_s).tolist()]  # fmt: skip
        await asyncio.gather(*calls)

    async def _place_chunks(self, n: int, ids, local, rows, step: int) -> None:
        """Place on shard ``n`` a few MB at a time, after growing its bank once: small copies
        interleave with the routers' sub-batches instead of stalling them. Each chunk goes
        into the object store once: the shard reads it, and it stays one of the controller's
        weight increments (what a restarted shard reloads)."""
        await self.cluster.call(self.shards[n], "reserve", int(local.max()) + 1, timeout=300)
        for i in range(0, len(ids), step):
            chunk = ids[i : i + step]
            part = None
            if rows is not None:
                part = self.cluster.put({k: np.stack([v[e] for e in chunk.tolist()])
                                         for k, v in rows.items()})  # fmt: skip
                self._rows.setdefault(n, []).append((chunk, part))
            await self.cluster.call(self.shards[n], "place", local[i : i + step], chunk, part,
                                    timeout=300)  # fmt: skip

    async def _compact(self, n: int) -> None:
        """Keep shard ``n``'s weight increments (what it reloads after a restart) within twice
        the rows it holds: drop the ones of experts that left it; if that is not enough, take
        its current rows back, a few MB per call."""
        live = self.placement.shard_experts(n).numpy()
        increments = [(ids, ref) for ids, ref in self._rows.get(n, []) if np.isin(ids, live).any()]
        if n in self._rows:
            self._rows[n] = increments
        if not self.has_rows or sum(len(ids) for ids, _ in increments) <= 2 * max(len(live), 1):
            return
        step = max(1, COPY_CHUNK_BYTES // max(self.expert_bytes(), 1))
        fresh = []
        try:
            for i in range(0, len(live), step):
                ids = live[i : i + step]
                rows = await self.cluster.call(self.shards[n], "export_experts", ids, timeout=120)
                fresh.append((ids, self.cluster.put(rows)))
        except Exception:
            log.warning("shard %d: weight increments not compacted; the next change retries", n)
            return
        self._rows[n] = fresh
        log.info("shard %d: weight increments taken back from the shard (%d experts)", n,
                 len(live))  # fmt: skip

    async def _break(self, old: Placement, new: Placement) -> None:
        _, (_, drop_s, drop_l) = diff(old, new)
        for n in np.unique(drop_s).tolist():
            if n < len(self.shards):
                try:
                    await self.cluster.call(self.shards[n], "free", drop_l[drop_s == n],
                                            timeout=30)  # fmt: skip
                except Exception:
                    log.warning("shard %d did not free its old places", n)


def diff(old: Placement, new: Placement):
    """((expert, shard, local) of replicas only in ``new``), (... only in ``old``)."""
    out = []
    for a, b in ((new, old), (old, new)):
        ea, sa = policy.pairs(a)
        eb, sb = policy.pairs(b)
        ka, kb = ea * (1 << 20) + sa, eb * (1 << 20) + sb
        only = ~np.isin(ka, kb)
        out.append((ea[only], sa[only], a.local.numpy()[only]))
    return out[0], out[1]
