"""Controller: the goal state of one pool and the loop that converges the actual state to it.

The goal (spec, placement, whether the pool holds weights that are not the seeded init) is
saved to the metadata store before any actor is started, so a restarted controller resumes
exactly: it re-attaches to its named shards and routers and carries on. Actual state is
converged by :meth:`Controller.update`, a pass of numbered steps that never raises:

1. every shard is up and holds its experts (a restarted shard comes back empty and is
   configured again, from the weights the controller keeps in the object store);
2. every router is up, configured with the shards, the gate weights and the placement;
3. every router runs the current placement version;
4. the gateways run: one, or one per alive node (:mod:`raymoe._private.fleet`).

Runtime operations (rebalance, replicate, pin, drain, scale) run one at a time and change
the placement make-before-break (:meth:`Controller._apply`): copy weights to the new places,
publish the new version, wait until no batch runs under the old one, then free old places.
Serving never pauses. The pending placement is saved first, so a controller that dies midway
finishes the operation when it comes back.

All Ray calls go through a :class:`Cluster` (``actors.RayCluster``); this class makes none.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from typing import Any, Protocol

import numpy as np
import torch

from raymoe._private import growth, policy
from raymoe._private.fleet import GatewayFleet
from raymoe._private.migration import MakeBeforeBreak, diff
from raymoe._private.placement import Placement
from raymoe._private.stats import merge_stats
from raymoe.config import PoolSpec
from raymoe.errors import (
    ConfigError,
    DTypeError,
    ExpertIdError,
    PoolUnavailableError,
)
from raymoe.kernels import make_bank
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
    def nodes(self) -> list[str]: ...  # ids of the alive nodes
    def gateway(self, key: str, node: str | None) -> Any: ...  # get or create, on ``node``


class Controller(MakeBeforeBreak, GatewayFleet):
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
        self.pins: dict[int, int] = {}  # operator replica targets (goal state)
        self.drained: set[int] = set()  # shards that must hold nothing (goal state)
        self.pending: Placement | None = None  # placement being applied
        self.routing_version = 0  # placement version that last changed spec or gate weights
        self.load = np.zeros(spec.num_experts)  # decayed tokens per expert
        self._load_t = time.monotonic()
        self._ops = asyncio.Lock()  # one runtime operation at a time
        self._last_rebalance = time.monotonic()
        self._last_scale = -math.inf  # when the autoscaler last changed the shard count
        self.rate = 0.0  # tokens/s, decayed like the load window
        self.last_apply: dict[str, float] = {}  # seconds of each stage of the last change
        self._init_fleet()

    # --- goal state ---------------------------------------------------------------------

    def _key(self, name: str) -> str:
        return f"{self.spec.name}/{name}"

    def save(self) -> None:
        goal = {"spec": self.spec.model_dump(mode="json"), "has_rows": self.has_rows,
                "pins": {str(e): c for e, c in self.pins.items()},
                "drained": sorted(self.drained),
                "routing_version": self.routing_version}  # fmt: skip
        self.store.put(self._key("placement"), self.placement.to_bytes())
        self.store.put(self._key("goal"), json.dumps(goal).encode())

    @classmethod
    def load_goal(cls, store: MetadataStore, pool: str) -> dict:
        goal = store.get(f"{pool}/goal")
        placement = store.get(f"{pool}/placement")
        if goal is None or placement is None:
            raise LookupError(f"no saved state for pool {pool!r}")
        g = json.loads(goal)
        pending = store.get(f"{pool}/pending")
        pending_spec = store.get(f"{pool}/pending_spec")
        return {"spec": PoolSpec.from_dict(g["spec"]), "placement": Placement.from_bytes(placement),
                "has_rows": g["has_rows"], "pins": {int(e): c for e, c in g["pins"].items()},
                "drained": set(g["drained"]), "routing_version": g.get("routing_version", 0),
                "pending": Placement.from_bytes(pending) if pending else None,
                "pending_spec": PoolSpec.from_dict(json.loads(pending_spec))
                if pending_spec else None}  # fmt: skip

    # --- lifecycle ----------------------------------------------------------------------

    async def start(self, placement: Placement, weights: dict[str, np.ndarray] | None) -> None:
        """Deploy: save the goal, start every actor, load weights, wait until all serve."""
        self.placement = placement
        self.pins = dict(self.spec.shards.replicas)
        experts = {k: v for k, v in (weights or {}).items() if k.startswith("experts.")}
        self.has_rows = bool(experts)
        self.save()
        for n in range(placement.num_shards):
            ids = placement.shard_experts(n).numpy()
            if experts:
                rows = {k.removeprefix("experts."): np.asarray(v)[ids] for k, v in experts.items()}
                self._rows[n] = [(ids, self.cluster.put(rows))]
        gate = {k: v for k, v in (weights or {}).items() if not k.startswith("experts.")}
        self._gate = self.cluster.put(gate) if gate else None
        self.shards = [self.cluster.shard(n) for n in range(placement.num_shards)]
        self.routers = [self.cluster.router(i) for i in range(self.spec.shards.routers)]
        await asyncio.gather(*(self._configure_shard(n) for n in range(len(self.shards))))
        await asyncio.gather(*(self._configure_router(i) for i in range(len(self.routers))))
        await self.ensure_gateways(strict=True)

    async def recover(self) -> None:
        """Resume after a controller restart: re-attach, rebuild what only lived in memory,
        and finish an operation that was under way."""
        g = self.load_goal(self.store, self.spec.name)
        self.spec, self.placement, self.has_rows = g["spec"], g["placement"], g["has_rows"]
        self.pins, self.drained = g["pins"], g["drained"]
        self.routing_version = g["routing_version"]
        self.load = np.zeros(self.spec.num_experts)
        self.shards = [self.cluster.shard(n) for n in range(self.placement.num_shards)]
        self.routers = [self.cluster.router(i) for i in range(self.spec.shards.routers)]
        # the weight refs died with the old controller: take them back from live actors
        gate = await self._call_or_none(self.routers, "gate_weights")
        live = next((g for g in gate if g is not None), None)
        self._gate = self.cluster.put(live) if live else None
        if self.has_rows:
            await self._capture_rows()
        pending, spec = g["pending"], g["pending_spec"]
        if pending is not None and pending.num_experts != self.placement.num_experts:
            # an unacknowledged add_experts: drop it (Ray retries the call, which starts over)
            pending = None
            self._end_pending()
        if pending is not None:
            async with self._ops:
                await self._apply(pending, spec=spec)
        await self.ensure_gateways()  # the running ones, found again by name
        await self.update()

    async def _capture_rows(self) -> None:
        """Take every shard's current rows into the controller's weight increments."""
        for n, h in enumerate(self.shards):
            ids = self.placement.shard_experts(n).numpy()
            try:
                rows = await self.cluster.call(h, "export_experts", ids, timeout=60)
                self._rows[n] = [(ids, self.cluster.put(rows))]
            except Exception as e:
                self.degraded.append(f"shard {n} lost its weights with the controller: {e}")

    async def shutdown(self) -> None:
        for t in self._busy.values():
            t.cancel()
        self.stop_gateways()
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
                if not st["ready"] or st.get("routing_version") != self.routing_version:
                    self._spawn(("router", i), self._configure_router(i))
                elif st["placement_version"] != self.placement.version:  # 3. current version
                    self._spawn(("router", i), self._publish(i))
            if self._fleet_due():  # 4. gateways
                self._spawn(("gateways", 0), self.ensure_gateways())
        except Exception:
            log.exception("controller update failed; retrying on the next pass")

    async def run(self, interval_s: float = 0.25, load_interval_s: float = 1.0) -> None:
        next_load = time.monotonic()
        while True:
            await self.update()
            if time.monotonic() >= next_load:
                next_load = time.monotonic() + load_interval_s
                await self._control_step()
            await asyncio.sleep(interval_s)

    async def _control_step(self) -> None:
        """Collect load; update biases, autoscale and rebalance when the spec asks for it.
        Never raises: a failed step is logged and the next one starts afresh."""
        try:
            counts = await self.collect_load()
            c = self.spec.control
            if c.bias_update_rate > 0 and counts.sum() > 0:
                await self.update_bias(counts)
            if c.autoscale and not self._ops.locked():
                await self.autoscale()
            due = time.monotonic() - self._last_rebalance >= c.rebalance_interval_s
            if c.auto_rebalance and due and not self._ops.locked():
                self._last_rebalance = time.monotonic()
                if self.imbalance() > c.target_imbalance:
                    await self.rebalance()
        except Exception:
            log.exception("control step failed; retrying on the next pass")

    def _spawn(self, key: tuple[str, int], coro) -> None:
        if key in self._busy and not self._busy[key].done():
            coro.close()
            return
        self._busy[key] = asyncio.get_running_loop().create_task(coro)

    async def _configure_shard(self, n: int) -> None:
        """(Re)load shard ``n``: the layout of the current placement merged with the one
        being applied (a restart mid-operation keeps both), then every weight increment."""
        increments = self._rows.get(n, [])
        layout = self._layout(n)
        if self.has_rows and not increments and (layout >= 0).any():
            return  # NOTE: never serve seeded weights in place of lost ones (see degraded)
        h = self.shards[n]
        await self.cluster.call(h, "configure", layout, None, False)
        for ids, rows in increments:
            await self.cluster.call(h, "restore", ids, rows)
        await self.cluster.call(h, "mark_ready")

    def _layout(self, n: int) -> np.ndarray:
        layout = self.placement.shard_layout(n).numpy() if n < self.placement.num_shards else []
        layout = np.asarray(layout, np.int64)
        if self.pending is not None and n < self.pending.num_shards:
            new = self.pending.shard_layout(n).numpy()
            if len(new) > len(layout):
                layout = np.concatenate([layout, np.full(len(new) - len(layout), -1)])
            free = layout[: len(new)] < 0
            layout[: len(new)][free] = new[free]
        return layout

    async def _configure_router(self, i: int) -> None:
        await self.cluster.call(self.routers[i], "configure_pool", self.shards, self.placement,
                                self._gate, self.spec, self.routing_version)  # fmt: skip
        self._published[i] = self.placement.version

    async def _publish(self, i: int, routing: bool = False) -> None:
        """Send router ``i`` the current placement (and with ``routing``, the spec and gate
        weights that change with it)."""
        p = self.placement
        if routing:
            args = (p, self.spec, self._gate, self.routing_version)
            await self.cluster.call(self.routers[i], "set_placement", *args)
        else:
            await self.cluster.call(self.routers[i], "set_placement", p)
        self._published[i] = p.version

    async def _call_or_none(self, handles: list, method: str) -> list:
        async def one(h):
            try:
                return await self.cluster.call(h, method, timeout=STATUS_TIMEOUT_S)
            except Exception:
                return None

        return await asyncio.gather(*(one(h) for h in handles))

    # --- load -------------------------------------------------------------------------------

    async def collect_load(self) -> np.ndarray:
        """Fold the routers' new per-expert counts into the decayed window (and the token
        rate); -> the new counts alone."""
        got = await self._call_or_none(self.routers, "take_load")
        now = time.monotonic()
        dt = max(now - self._load_t, 1e-3)
        decay = 0.5 ** (dt / self.spec.control.load_half_life_s)
        self.load *= decay
        self._load_t = now
        fresh = np.zeros_like(self.load)
        for counts in got:
            if counts is not None:  # NOTE: lengths differ briefly while experts are added
                m = min(len(counts), len(fresh))
                fresh[:m] += counts[:m]
        fresh[list(self.spec.experts.removed)] = 0
        self.load += fresh
        tokens = fresh.sum() / max(self.spec.slots, 1)
        self.rate = decay * self.rate + (1 - decay) * tokens / dt
        return fresh

    async def autoscale(self) -> dict | None:
        """Scale the shard count for the measured token rate (hysteresis and a cooldown)."""
        c = self.spec.control
        if time.monotonic() - self._last_scale < c.scale_cooldown_s:
            return None
        live = self.spec.experts.live
        n = self.placement.num_shards
        want = policy.shards_for(self.rate, n, target=c.target_tokens_per_shard_s,
                                 down_below=c.scale_down_below, lo=min(c.min_shards, live),
                                 hi=min(c.max_shards or live, live))  # fmt: skip
        if want == n:
            return None
        log.info("autoscaling from %d to %d shards at %.0f tokens/s", n, want, self.rate)
        self._last_scale = time.monotonic()
        return await self.scale_shards(want, max_shards=c.max_shards)

    async def update_bias(self, counts: np.ndarray) -> None:
        """One aux-loss-free step: the routers' selection bias moves towards balance."""
        async with self._ops:
            gate = dict(await self._gate_weights())
            live = np.ones(len(counts), bool)
            live[list(self.spec.experts.removed)] = False
            bias = np.asarray(gate["router.correction_bias"], np.float32)
            gate["router.correction_bias"] = policy.bias_step(
                bias, counts, self.spec.control.bias_update_rate, live
            ).astype(np.float32)
            p = self.placement  # same layout, next version: routers swap gate and placement
            await self._apply(Placement(p.version + 1, p.num_shards, p.ptr, p.shard, p.local),
                              spec=self.spec, gate=gate)  # fmt: skip

    def imbalance(self, placement: Placement | None = None) -> float:
        p = placement or self.placement
        expert, shard = policy.pairs(p)
        loads = policy.shard_loads(self._load_or_uniform(), expert, shard, p.num_shards)
        active = [n for n in range(p.num_shards) if n not in self.drained]
        return policy.imbalance(loads[active])

    def _load_or_uniform(self) -> np.ndarray:
        """The load window, or a uniform load over live experts when nothing was measured."""
        if self.load.sum() > 0:
            return self.load
        load = np.ones(self.spec.num_experts)
        load[list(self.spec.experts.removed)] = 0
        return load

    def _budget(self, num_shards: int | None = None) -> policy.Budget:
        c, E = self.spec.control, self.spec.experts.live
        n = num_shards or self.placement.num_shards
        extra = max(n, int(c.extra_replicas * E), sum(self.pins.values()) - len(self.pins))
        pins = {**{e: 0 for e in self.spec.experts.removed}, **self.pins}  # removed: no replica
        target = 1.0 + c.plan_margin * (c.target_imbalance - 1.0)
        return policy.Budget(n, E + extra, c.capacity, pins, target,
                             frozenset(self.drained))  # fmt: skip

    def expert_bytes(self) -> int:
        bank = make_bank(self.spec, torch.zeros(1, dtype=torch.int64), seeded=False)
        return sum(p.numel() * p.element_size() for p in bank.parameters())

    # --- runtime operations (each idempotent, each returns a report) ------------------------

    async def rebalance(self, dry_run: bool = False, policy_name: str | None = None) -> dict:
        """Plan with the spec's policy (or ``policy_name``) over the load window; apply."""
        name = policy_name or self.spec.control.policy
        plans = {"incremental": policy.incremental, "eplb": policy.eplb}
        if name not in plans:
            raise ConfigError(f"unknown policy {name!r}; valid: {sorted(plans)}", "policy")
        async with self._ops:
            await self.collect_load()
            plan = plans[name](self._load_or_uniform(), self.placement, self._budget(),
                               bytes_per_expert=self.expert_bytes())  # fmt: skip
            report = {**plan.report(), "policy": name, "dry_run": dry_run}
            if dry_run or not (plan.replicas_added or plan.replicas_dropped):
                report["version"] = self.placement.version
                return report
            await self._apply(plan.placement)
            return report

    async def replicate(self, expert: int, replicas: int) -> dict:
        """Give ``expert`` exactly ``replicas`` replicas (more on the least loaded shards,
        fewer by dropping from the most loaded); a pin set later or before wins in plans."""
        self._check_expert(expert)
        active = [n for n in range(self.placement.num_shards) if n not in self.drained]
        if not 1 <= replicas <= len(active):
            raise ConfigError(f"replicas must be in [1, {len(active)}] (active shards), "
                              f"got {replicas}", "replicas")  # fmt: skip
        async with self._ops:
            expert_, shard = policy.pairs(self.placement)
            mine = expert_ == expert
            have = shard[mine].tolist()
            if len(have) == replicas:
                return self._noop_report()
            loads = policy.shard_loads(self._load_or_uniform(), expert_, shard,
                                       self.placement.num_shards)  # fmt: skip
            by_load = [n for n in np.argsort(loads, kind="stable").tolist() if n in active]
            if len(have) < replicas:
                add = [n for n in by_load if n not in have][: replicas - len(have)]
                expert_ = np.concatenate([expert_, np.full(len(add), expert)])
                shard = np.concatenate([shard, np.array(add, np.int64)])
            else:
                drop = sorted(have, key=lambda n: -loads[n])[: len(have) - replicas]
                keep = ~(mine & np.isin(shard, drop))
                expert_, shard = expert_[keep], shard[keep]
            target = policy.realize(self.placement, expert_, shard, self.placement.version + 1)
            return await self._apply_report(target)

    async def pin(self, expert: int, replicas: int) -> dict:
        """An operator's replica target for ``expert`` that every later plan keeps."""
        report = await self.replicate(expert, replicas)
        self.pins[expert] = replicas
        self.save()
        return {**report, "pinned": {expert: replicas}}

    async def unpin(self, expert: int) -> dict:
        self._check_expert(expert)
        self.pins.pop(expert, None)
        self.save()
        return {**self._noop_report(), "pinned": dict(self.pins)}

    async def drain_shard(self, shard: int) -> dict:
        """Move every replica off ``shard``; it keeps running but holds nothing."""
        N = self.placement.num_shards
        if not 0 <= shard < N:
            raise ConfigError(f"shard must be in [0, {N}), got {shard}", "shard")
        if len(self.drained | {shard}) >= N:
            raise ConfigError("cannot drain the last active shard", "shard")
        self.drained.add(shard)
        self.save()
        async with self._ops:
            return await self._replan()

    async def scale_shards(self, count: int, max_shards: int | None = None) -> dict:
        """Grow or shrink the pool to ``count`` active shards; experts are redistributed.
        Scaling ends maintenance: shards drained before are active again afterwards."""
        live = self.spec.experts.live
        top = min(max_shards or live, live)
        if not 1 <= count <= top:
            raise ConfigError(f"shards must be in [1, {top}], got {count}", "shards")
        N = self.placement.num_shards
        if count == N:
            return self._noop_report()
        async with self._ops:
            if count > N:
                self.drained.clear()
                await self._add_shards(count)
                return await self._replan(force=True)
            self.drained = set(range(count, N))
            self.save()
            report = await self._replan()
            await self._remove_shards(count)
            return report

    async def _replan(self, force: bool = False) -> dict:
        plan = policy.incremental(self._load_or_uniform(), self.placement, self._budget(),
                                  bytes_per_expert=self.expert_bytes())  # fmt: skip
        if not (plan.replicas_added or plan.replicas_dropped or force):
            return self._noop_report()
        return {**plan.report(), **(await self._apply_report(plan.placement))}

    async def _add_shards(self, count: int) -> None:
        N = self.placement.num_shards
        new = [self.cluster.shard(n) for n in range(N, count)]
        await asyncio.gather(*(self.cluster.call(h, "configure", np.zeros(0, np.int64))
                               for h in new))  # fmt: skip
        self.shards += new
        p = self.placement
        self.placement = Placement(p.version + 1, count, p.ptr, p.shard, p.local)
        self.spec = _with_shards(self.spec, count)
        self.save()
        await asyncio.gather(*(self._configure_router(i) for i in range(len(self.routers))))

    async def _remove_shards(self, count: int) -> None:
        p = self.placement
        assert int(p.shard.max()) < count, "shards to remove still hold replicas"
        gone = self.shards[count:]
        self.shards = self.shards[:count]
        self.placement = Placement(p.version + 1, count, p.ptr, p.shard, p.local)
        self.spec = _with_shards(self.spec, count)
        self.drained = {n for n in self.drained if n < count}
        self.save()
        await asyncio.gather(*(self._configure_router(i) for i in range(len(self.routers))))
        for n in range(count, count + len(gone)):
            self._rows.pop(n, None)
        self.cluster.kill(gone)

    async def add_experts(self, count: int, weights: dict | None = None) -> dict:
        """Grow the pool by ``count`` experts with ids ``E .. E+count-1``: their weights
        (``experts.*`` rows, stacked over the new experts) and gate rows (``router.weight``
        etc. for ``topk``; ``router.keys`` [heads, rows, d_key/2] for the new sub-key rows of
        ``product_key``), or the seeded init of those ids where not given."""
        spec, E = self.spec, self.spec.num_experts
        grown = growth.grown_spec(spec, count)
        expert_rows, gate_rows = growth.new_weights(grown, E, count, weights or {})
        async with self._ops:
            gate = await self._gate_weights()
            new_gate = growth.grow_gate(spec, grown, gate, gate_rows)
            if expert_rows and not self.has_rows:
                await self._capture_rows()  # from now on the controller keeps every row
                self.has_rows = True
            align = spec.routing.grid(E)[1] if spec.routing.kind == "product_key" else 1
            target = growth.place_new(self.placement, count, align, self._budget().active())
            ids = list(range(E, E + count))
            report = await self._apply_report(target, grown, new_gate, expert_rows)
            return {**report, "expert_ids": ids}

    async def remove_experts(self, ids) -> dict:
        """Never route to experts ``ids`` again from the next placement version; their
        places are freed once no batch runs under an older one. Ids are never reused."""
        a = np.asarray(ids)
        if a.size and a.dtype.kind not in "iu":
            raise DTypeError(f"expert ids must be integers, got {a.dtype}")
        ids = sorted({int(e) for e in a.reshape(-1).tolist()})
        if not ids:
            raise ConfigError("remove_experts needs at least one expert id", "ids")
        for e in ids:
            self._check_expert(e)
        data = self.spec.model_dump(mode="json")
        data["experts"]["removed"] = sorted(set(self.spec.experts.removed) | set(ids))
        data["shards"]["replicas"] = {e: r for e, r in self.spec.shards.replicas.items()
                                      if e not in ids}  # fmt: skip
        spec = PoolSpec.from_dict(data)  # the spec's checks: routing kind, experts left, ...
        async with self._ops:
            expert, shard = policy.pairs(self.placement)
            keep = ~np.isin(expert, ids)
            target = policy.realize(self.placement, expert[keep], shard[keep],
                                    self.placement.version + 1)  # fmt: skip
            return {**(await self._apply_report(target, spec)), "removed": ids}

    async def _gate_weights(self) -> dict[str, np.ndarray]:
        """The gate weights in service (from a router when the pool runs the seeded ones)."""
        for h in self.routers:
            try:
                return await self.cluster.call(h, "gate_weights", timeout=30)
            except Exception:
                continue
        raise PoolUnavailableError("no router answered; cannot read the gate weights")

    def _check_expert(self, expert: int) -> None:
        if not 0 <= expert < self.spec.num_experts:
            raise ExpertIdError(f"expert {expert} is not in [0, {self.spec.num_experts})")
        if expert in self.spec.experts.removed:
            raise ExpertIdError(f"expert {expert} was removed from the pool")

    def _noop_report(self) -> dict:
        imb = self.imbalance()
        return {"version": self.placement.version, "replicas_added": 0, "replicas_dropped": 0,
                "bytes_moved": 0, "imbalance_before": imb, "imbalance_after": imb}  # fmt: skip

    async def _apply_report(self, target: Placement, *routing) -> dict:
        before = self.imbalance()
        old = self.placement
        await self._apply(target, *routing)
        added, dropped = diff(old, target)
        return {"version": target.version, "replicas_added": len(added[0]),
                "replicas_dropped": len(dropped[0]),
                "bytes_moved": len(added[0]) * self.expert_bytes(),
                "imbalance_before": before, "imbalance_after": self.imbalance()}  # fmt: skip

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
            "last_change_s": dict(self.last_apply),  # copy, publish, drain, free
        }

    async def stats(self, window_s: float = 60.0) -> dict:
        """Throughput, latency percentiles, batch sizes and loads, merged over routers."""
        got = [s for s in await self._call_or_none(self.routers, "stats") if s is not None]
        return merge_stats(got, self.placement.num_shards, self.spec.num_experts, window_s)


def _with_shards(spec: PoolSpec, count: int) -> PoolSpec:
    data = spec.model_dump(mode="json")
    data["shards"]["count"] = count
    data["shards"]["replicas"] = {e: min(r, count) for e, r in spec.shards.replicas.items()}
    return PoolSpec.from_dict(data)
