"""Controller: the goal state of one pool and the loop that converges the actual state to it.

The goal (spec, placement, whether the pool holds weights that are not the seeded init) is
saved to the metadata store before any actor is started, so a restarted controller resumes
exactly: it re-attaches to its named shards and routers and carries on. Actual state is
converged by :meth:`Controller.update`, a pass of numbered steps that never raises:

1. every shard is up and holds its experts (a restarted shard comes back empty and is
   configured again, from the weights the controller keeps in the object store);
2. every router is up, configured with the shards, the gate weights and the placement;
3. every router runs the current placement version.

All Ray calls go through a :class:`Cluster` (``actors.RayCluster``); this class makes none.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any, Protocol

import numpy as np

from raymoe._private.placement import Placement
from raymoe.config import PoolSpec
from raymoe.store import MetadataStore

log = logging.getLogger(__name__)

STATUS_TIMEOUT_S = 5.0  # a status call slower than this counts as "not answering"


class Cluster(Protocol):
    """What the controller needs from Ray (a fake in unit tests)."""

    def shard(self, index: int) -> Any: ...  # get or create the named shard actor
    def router(self, index: int) -> Any: ...  # get or create the named router actor
    def put(self, value: Any) -> Any: ...  # object ref owned by the controller
    async def call(self, handle: Any, method: str, *args, timeout: float | None = None): ...
    def kill(self, handles: list) -> None: ...


class Controller:
    def __init__(self, spec: PoolSpec, cluster: Cluster, store: MetadataStore):
        self.spec = spec
        self.cluster = cluster
        self.store = store
        self.placement: Placement | None = None
        self.has_rows = False  # the pool holds weights other than its seeded init
        self.shards: list = []
        self.routers: list = []
        self._rows: dict[int, Any] = {}  # shard -> object ref of its rows
        self._gate = None  # object ref of the gate / shared-expert weights
        self._busy: dict[tuple[str, int], asyncio.Task] = {}
        self._published: dict[int, int] = {}  # router -> placement version it runs
        self.degraded: list[str] = []

    # --- goal state ---------------------------------------------------------------------

    def _key(self, name: str) -> str:
        return f"{self.spec.name}/{name}"

    def save(self) -> None:
        goal = {"spec": self.spec.model_dump(mode="json"), "has_rows": self.has_rows}
        self.store.put(self._key("placement"), self.placement.to_bytes())
        self.store.put(self._key("goal"), json.dumps(goal).encode())

    @classmethod
    def load_goal(cls, store: MetadataStore, pool: str) -> tuple[PoolSpec, Placement, bool]:
        goal = store.get(f"{pool}/goal")
        placement = store.get(f"{pool}/placement")
        if goal is None or placement is None:
            raise LookupError(f"no saved state for pool {pool!r}")
        g = json.loads(goal)
        return PoolSpec.from_dict(g["spec"]), Placement.from_bytes(placement), g["has_rows"]

    # --- lifecycle ----------------------------------------------------------------------

    async def start(self, placement: Placement, weights: dict[str, np.ndarray] | None) -> None:
        """Deploy: save the goal, start every actor, load weights, wait until all serve."""
        self.placement = placement
        experts = {k: v for k, v in (weights or {}).items() if k.startswith("experts.")}
        self.has_rows = bool(experts)
        self.save()
        for n in range(placement.num_shards):
            ids = placement.shard_experts(n).numpy()
            if experts:
                rows = {k.removeprefix("experts."): np.asarray(v)[ids] for k, v in experts.items()}
                self._rows[n] = self.cluster.put(rows)
        gate = {k: v for k, v in (weights or {}).items() if not k.startswith("experts.")}
        self._gate = self.cluster.put(gate) if gate else None
        self.shards = [self.cluster.shard(n) for n in range(placement.num_shards)]
        self.routers = [self.cluster.router(i) for i in range(self.spec.shards.routers)]
        await asyncio.gather(*(self._configure_shard(n) for n in range(len(self.shards))))
        await asyncio.gather(*(self._configure_router(i) for i in range(len(self.routers))))

    async def recover(self) -> None:
        """Resume after a controller restart: re-attach, rebuild what only lived in memory."""
        self.spec, self.placement, self.has_rows = self.load_goal(self.store, self.spec.name)
        self.shards = [self.cluster.shard(n) for n in range(self.placement.num_shards)]
        self.routers = [self.cluster.router(i) for i in range(self.spec.shards.routers)]
        # the weight refs died with the old controller: take them back from live actors
        gate = await self._call_or_none(self.routers, "gate_weights")
        live = next((g for g in gate if g is not None), None)
        self._gate = self.cluster.put(live) if live else None
        if self.has_rows:
            for n, h in enumerate(self.shards):
                ids = self.placement.shard_experts(n).numpy()
                try:
                    rows = await self.cluster.call(h, "export_experts", ids, timeout=60)
                    self._rows[n] = self.cluster.put(rows)
                except Exception as e:
                    self.degraded.append(f"shard {n} lost its weights with the controller: {e}")
        await self.update()

    async def shutdown(self) -> None:
        for t in self._busy.values():
            t.cancel()
        self.cluster.kill(self.routers + self.shards)
        for key in self.store.keys(self._key("")):
            self.store.delete(key)

    # --- reconcile ----------------------------------------------------------------------

    async def update(self) -> None:
        """One reconcile pass (the numbered steps of the module docstring); never raises."""
        try:
            shard_status = await self._call_or_none(self.shards, "status")
            for n, st in enumerate(shard_status):  # 1. shards hold their experts
                if st is not None and not st["ready"]:
                    self._spawn(("shard", n), self._configure_shard(n))
            router_status = await self._call_or_none(self.routers, "describe")
            for i, st in enumerate(router_status):  # 2. routers configured
                if st is None:
                    continue
                if not st["ready"]:
                    self._spawn(("router", i), self._configure_router(i))
                elif st["placement_version"] != self.placement.version:  # 3. current version
                    self._spawn(("router", i), self._publish(i))
        except Exception:
            log.exception("controller update failed; retrying on the next pass")

    async def run(self, interval_s: float = 0.25) -> None:
        while True:
            await self.update()
            await asyncio.sleep(interval_s)

    def _spawn(self, key: tuple[str, int], coro) -> None:
        if key in self._busy and not self._busy[key].done():
            coro.close()
            return
        self._busy[key] = asyncio.get_running_loop().create_task(coro)

    async def _configure_shard(self, n: int) -> None:
        ids = self.placement.shard_experts(n).numpy()
        rows = self._rows.get(n)
        if self.has_rows and rows is None:
            return  # NOTE: never serve seeded weights in place of lost ones (see degraded)
        await self.cluster.call(self.shards[n], "configure", ids, rows)

    async def _configure_router(self, i: int) -> None:
        await self.cluster.call(self.routers[i], "configure_pool", self.shards, self.placement,
                                self._gate)  # fmt: skip
        self._published[i] = self.placement.version

    async def _publish(self, i: int) -> None:
        await self.cluster.call(self.routers[i], "set_placement", self.placement)
        self._published[i] = self.placement.version

    async def _call_or_none(self, handles: list, method: str) -> list:
        async def one(h):
            try:
                return await self.cluster.call(h, method, timeout=STATUS_TIMEOUT_S)
            except Exception:
                return None

        return await asyncio.gather(*(one(h) for h in handles))

    # --- introspection ------------------------------------------------------------------

    def describe(self) -> dict:
        p = self.placement
        return {
            "name": self.spec.name,
            "spec": self.spec.model_dump(mode="json"),
            "placement_version": p.version,
            "shards": p.num_shards,
            "routers": len(self.routers),
            "experts": p.num_experts,
            "replicas": int(p.shard.numel()),
            "experts_per_shard": np.bincount(p.shard.numpy(), minlength=p.num_shards).tolist(),
            "degraded": list(self.degraded),
        }

    async def stats(self, window_s: float = 60.0) -> dict:
        """Throughput, latency percentiles, batch sizes and loads, merged over routers."""
        got = [s for s in await self._call_or_none(self.routers, "stats") if s is not None]
        return merge_stats(got, self.placement.num_shards, self.spec.num_experts, window_s)


def merge_stats(router_stats: list[dict], num_shards: int, num_experts: int, window_s: float):
    """Pure: combine routers' :meth:`Router.stats` into one pool-wide view."""
    reqs = [r for s in router_stats for r in s["requests"]]
    shard_load = np.zeros(num_shards, np.int64)
    expert_load = np.zeros(num_experts, np.int64)
    counters: dict[str, int] = {}
    for s in router_stats:
        shard_load[: len(s["shard_load"])] += s["shard_load"]
        expert_load += s["expert_load"]
        for k, v in s["counters"].items():
            counters[k] = counters.get(k, 0) + v
    out: dict[str, Any] = {"requests": len(reqs), "counters": counters}
    if reqs:
        ends = np.array([r[0] for r in reqs])
        recent = ends >= ends.max() - window_s
        lat = np.array([r[2] for r in reqs])[recent] * 1000
        tokens = np.array([r[1] for r in reqs])[recent]
        span = max(float(ends[recent].max() - ends[recent].min()), 1e-3)
        out.update(tokens_per_s=float(tokens.sum() / span) if recent.sum() > 1 else None,
                   latency_ms={"p50": float(np.percentile(lat, 50)),
                               "p99": float(np.percentile(lat, 99))})  # fmt: skip
    batches = [b for s in router_stats for b in s["batch_tokens"]]
    if batches:
        out["batch_tokens"] = {"mean": float(np.mean(batches)), "max": int(max(batches))}
    mean = shard_load.mean() if num_shards else 0
    out["pairs_per_shard"] = shard_load.tolist()
    out["imbalance"] = float(shard_load.max() / mean) if mean else 1.0
    out["expert_load"] = expert_load
    return out
