"""Controller: the goal state of one pool and the loop that converges the actual state to it.

The :class:`~.goal.Goal` (spec, placement, pins, drained shards, the change being applied)
is saved to the metadata store before any actor is started or any weight moves, so a
restarted controller resumes exactly: it re-attaches to its named actors and carries on.
Actual state is converged by :meth:`Controller.update`, a pass of numbered steps that never
raises:

1. every shard is up and holds its experts (a restarted shard comes back empty and is
   configured again, its rows read from the goal's weight files);
2. every router is up, configured with the shards, the gate weights and the placement;
3. every router runs the current placement version;
4. the gateways run: one, or one per alive node (:class:`~.fleet.GatewayFleet`);
5. every expert is on ``shards.min_replicas`` shards and as many nodes (failure domains,
   :class:`~.nodes.ShardNodes`): repaired when a node died and its shards restarted on
   others.

Runtime operations (:mod:`.operations`, a mixin, as is :mod:`.spreading` for the failure
domains) run one at a time: each is planned by a pure function of
:mod:`.plans` and applied make before break (:meth:`Controller.apply`, the stages of
:class:`~.migration.Migrator`).
Serving never pauses. The pending change is saved first, so a controller that dies midway
finishes it when it comes back.

The controller holds no expert weights: shards hold them, and what a restarted shard (or a
restarted cluster) reloads is in files the goal names (:mod:`.durable`). It owns its
helpers and hands them their dependencies: the :class:`~.journal.Journal` (its writes to
the metadata store), the :class:`~.migration.Migrator`, the :class:`~.fleet.GatewayFleet`
and the :class:`~.load.LoadWindow`. All Ray calls go through a :class:`~.cluster.Cluster`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from typing import Any

import numpy as np

from raymoe._private import timeouts
from raymoe._private.control import durable, plans
from raymoe._private.control.cluster import ActorUnreachable, Cluster
from raymoe._private.control.fleet import GatewayFleet
from raymoe._private.control.goal import Goal
from raymoe._private.control.journal import Journal
from raymoe._private.control.load import LoadWindow
from raymoe._private.control.loop import ControlLoop
from raymoe._private.control.migration import Migrator
from raymoe._private.control.nodes import ShardNodes
from raymoe._private.control.operations import Operations
from raymoe._private.control.roster import Roster
from raymoe._private.control.spreading import FailureDomains
from raymoe._private.control.standby import Standby
from raymoe._private.control.training import Stepper
from raymoe._private.data.stats import check_load_bins, load_map, merge
from raymoe._private.metrics import Metrics, NullMetrics, top_experts
from raymoe.config import PoolSpec
from raymoe.errors import PoolUnavailableError, ResourceLimitError
from raymoe.kernels import expert_bytes
from raymoe.placement import Change, Placement, diff
from raymoe.reports import PoolDescription, PoolStats
from raymoe.store import MetadataStore

log = logging.getLogger(__name__)
BUDGET_SHARE = 0.8  # of the cluster's memory: the default memory budget


class Controller(Operations, FailureDomains):
    def __init__(
        self,
        spec: PoolSpec,
        cluster: Cluster,
        store: MetadataStore,
        metrics: Metrics | None = None,
    ):
        self.goal = Goal.initial(spec)
        self.metrics = metrics or NullMetrics()
        self.cluster = cluster
        self.store = store
        self.journal = Journal(store, spec.name)
        self.gate = None  # object ref of the gate / shared-expert weights
        self.degraded: list[str] = []
        self.last_change: dict[str, float] = {}  # seconds of each stage of the last change
        self.resumed_changes = 0
        self.expert_bytes = expert_bytes(spec)
        self.roster = Roster(cluster)
        self.migrator = Migrator(cluster, self.expert_bytes)
        self.stepper = Stepper(cluster)
        self.fleet = GatewayFleet(cluster, spec.name, spec.gateway)
        self.load = LoadWindow(spec.num_experts, spec.control.load_half_life_s)
        self.loop = ControlLoop(self)
        self.nodes = ShardNodes()
        self.standby = Standby(self)
        self.ops = asyncio.Lock()  # one runtime operation at a time
        self._busy: dict[tuple[str, int], asyncio.Task] = {}
        self._reconfigure: set[int] = set()  # routers to send new shard handles
        self._hot_experts: set[str] = set()  # the expert tags of the load gauge

    @property
    def spec(self) -> PoolSpec:
        return self.goal.spec

    @property
    def placement(self) -> Placement:
        return self.goal.placement

    @property
    def shards(self) -> list:
        return self.roster.shards

    @property
    def routers(self) -> list:
        return self.roster.routers

    # --- lifecycle ----------------------------------------------------------------------

    async def start(self, goal: Goal) -> None:
        """Deploy ``goal`` (a new pool's, or a saved one after its cluster restarted): save
        it, start every actor, load the weights from the goal's files, wait until all
        serve."""
        self.goal = goal
        self.save()
        self.gate = self._gate_ref()
        self.roster.attach(self.goal)
        self.standby.attach(goal.spec.shards.spares)
        await asyncio.gather(
            *(self.roster.configure_shard(n, self.goal) for n in range(len(self.shards)))
        )
        await self._configure_routers()
        await self.fleet.ensure(strict=True)

    def _gate_ref(self):
        """The goal's gate weights in the object store (None: the seeded ones)."""
        f = self.goal.gate_file
        return self.cluster.put(durable.read_gate(f)) if f else None

    async def recover(self) -> None:
        """Resume after a controller restart: re-attach, rebuild what only lived in memory,
        and finish a change that was under way."""
        self.goal = Goal.load(self.store, self.spec.name)
        spec = self.goal.spec
        self.load = LoadWindow(spec.num_experts, spec.control.load_half_life_s)
        self.roster.attach(self.goal)
        self.standby.attach(spec.shards.spares)
        self._spawn(("standby", 0), self.standby.run())  # before the slow steps below
        gate = next((g for g in await self.poll(self.routers, "gate_weights") if g), None)
        self.gate = self.cluster.put(gate) if gate else self._gate_ref()
        p = self.goal.placement
        pending, pending_spec = self.goal.pending, self.goal.pending_spec
        if pending is not None and pending.num_experts != p.num_experts:
            # an unacknowledged add_experts: drop it (Ray retries the call, which starts over)
            self.goal = self.goal.replace(pending=None, pending_spec=None)
            self.save(strict=False)
        elif pending is not None:
            log.info("finishing placement %d, cut short by a controller restart", pending.version)
            async with self.ops:
                await self.apply(pending, spec=pending_spec)
            self.resumed_changes += 1
        self.metrics.inc("raymoe_recoveries_total", role="controller")
        await self.fleet.ensure()  # the running ones, found again by name
        await self.update()

    async def shutdown(self) -> None:
        for t in self._busy.values():
            t.cancel()
        self.fleet.stop()
        self.cluster.kill(self.routers + self.shards + self.standby.spares)
        Goal.forget(self.store, self.spec.name)
        durable.forget(self.spec.name)

    # --- the store ----------------------------------------------------------------------

    def commit(self, **changes) -> None:
        """Change the goal and save it, before any side effect: when the store is down this
        raises :class:`StoreUnavailableError` and nothing changed."""
        goal = self.goal.replace(**changes)
        self.journal.save(goal)
        self.goal = goal

    def save(self, strict: bool = True) -> None:
        """Save the goal (see :class:`~.journal.Journal`: ``strict`` before side effects)."""
        self.journal.save(self.goal, strict)

    def check_budget(self, replicas: int, op: str) -> None:
        """Refuse ``op`` (:class:`ResourceLimitError`, before it changes anything) if the
        pool would hold more than its memory budget in ``replicas`` expert replicas."""
        limit = self.spec.limits.max_pool_bytes
        budget = limit or int(BUDGET_SHARE * self.cluster.memory_bytes())
        need = replicas * self.expert_bytes
        if need > budget:
            where = "limits.max_pool_bytes" if limit else "80% of the cluster's memory"
            raise ResourceLimitError(
                f"{op} would hold {replicas:,} expert replicas ({need / 2**30:.2f} GiB), over "
                f"the pool's memory budget of {budget / 2**30:.2f} GiB ({where}); nothing changed"
            )

    def problems(self) -> list[str]:
        """What keeps the pool degraded (served, but not as its goal says)."""
        problem = self.journal.problem()
        spares = [
            f"shard {n}: its process restarts; spare {j} stands in"
            for n, j in sorted(self.standby.standing.items())
        ]
        return [*self.degraded, *spares, *([problem] if problem else [])]

    # --- reconcile ----------------------------------------------------------------------

    async def update(self) -> None:
        """One reconcile pass (the numbered steps of the module docstring); never raises."""
        self.journal.retry(self.goal)  # 0. the store holds the goal (after an outage)
        try:
            shard_status = await self.poll(self.shards, "status")
            self.nodes.observe(shard_status)
            revived = [n for n, st in enumerate(shard_status) if st is None]
            revived = [n for n in revived if self.roster.revive("shard", n)]
            for n in revived:  # gone for good (its node died): a new, empty one
                shard_status[n] = {"ready": False}
                self._reconfigure.update(range(len(self.routers)))  # the new handle
            for n, st in enumerate(shard_status):  # 1. shards hold their experts
                reloading = st is not None and st.get("loading")  # by itself, from the store
                if (
                    st is not None
                    and not st["ready"]
                    and not reloading
                    and self._idle(("shard", n))
                ):
                    self._spawn(("shard", n), self.roster.configure_shard(n, self.goal))
                    self.metrics.inc("raymoe_recoveries_total", role="shard")
            router_status = await self.poll(self.routers, "describe")
            for i, st in enumerate(router_status):  # 2. routers configured
                if st is None:  # killed for good: a new one (configured on the next pass)
                    self.roster.revive("router", i)
                    continue
                stale = st.get("routing_version") != self.goal.routing_version
                if not st["ready"] or stale or i in self._reconfigure:
                    if self._idle(("router", i)):
                        self._reconfigure.discard(i)
                        if not st["ready"]:
                            self.metrics.inc("raymoe_recoveries_total", role="router")
                    self._spawn(
                        ("router", i), self.roster.configure_router(i, self.goal, self.gate)
                    )
                elif st["placement_version"] != self.placement.version:  # 3. current version
                    self._spawn(("router", i), self.roster.publish(i, self.goal))
                elif st.get("stand_ins", {}) != self.standby.standing:  # 3b. spares in use
                    self._spawn(("router", i), self.standby.publish(i))
            if self.fleet.due():  # 4. gateways
                self._spawn(("gateways", 0), self.fleet.ensure())
            if self._spread_due():  # 5. every expert on its failure domains
                self._spawn(("spread", 0), self._respread())
        except Exception:
            log.exception("controller update failed; retrying on the next pass")

    async def run(self) -> None:
        self._spawn(("standby", 0), self.standby.run())  # NOTE: its own loop (see standby)
        next_step = time.monotonic()
        while True:
            await self.update()
            if time.monotonic() >= next_step:
                next_step = time.monotonic() + timeouts.LOAD_INTERVAL_S
                await self.loop.step()
            await asyncio.sleep(timeouts.UPDATE_INTERVAL_S)

    async def poll(self, handles: list, method: str, *args) -> list:
        """``method(*args)`` of every actor at once; None for each that is down or
        restarting (the GCS says so: a call would wait for its restart, and hold up the
        whole pass) or does not answer in ``timeouts.STATUS_S`` (any other failure is
        logged with the method's name)."""
        up = await self.alive(handles)

        async def one(i: int, h) -> Any:
            if not up[i]:
                return None
            try:
                return await self.cluster.call(h, method, *args, timeout=timeouts.STATUS_S)
            except ActorUnreachable:
                return None
            except Exception:
                log.exception("%s() of actor %d failed", method, i)
                return None

        return await asyncio.gather(*(one(i, h) for i, h in enumerate(handles)))

    async def alive(self, handles: list) -> list[bool]:
        """Whether each actor's process is up (all of them when the GCS cannot say)."""
        try:
            return await asyncio.to_thread(self.cluster.alive, handles)
        except Exception:
            log.exception("the actor table could not be read")
            return [True] * len(handles)

    def _idle(self, key: tuple[str, int]) -> bool:
        """Whether no task of ``key`` runs."""
        return key not in self._busy or self._busy[key].done()

    def _spawn(self, key: tuple[str, int], coro) -> None:
        """Run ``coro`` unless the task of ``key`` still runs."""
        if not self._idle(key):
            coro.close()
            return
        self._busy[key] = asyncio.get_running_loop().create_task(coro)

    # --- make before break ----------------------------------------------------------------

    async def apply(
        self,
        target: Placement,
        spec: PoolSpec | None = None,
        gate: dict | None = None,
        new_rows: dict | None = None,
        op: str = "change",
    ) -> Change:
        """Move to ``target`` without pausing or failing requests (the stages of
        :class:`~.migration.Migrator`). With ``spec`` (and ``gate``, when the gate weights
        change) the routing state moves with it: experts added (``new_rows``: their weights
        by name, in id order) or removed; ``op`` names the operation (metrics). Callers hold
        ``self.ops``. -> what it copied and freed."""
        target = self.spread(target)
        self.check_budget(target.num_replicas, op)
        old = self.placement
        change = diff(old, target)
        t = [time.perf_counter()]
        if gate is not None:  # durable before it serves
            gate_file = await asyncio.to_thread(
                durable.write_gate, self.spec.name, target.version, gate
            )
        self.goal = self.goal.replace(pending=target, pending_spec=spec)
        self.save()  # NOTE: saved before any weight moves
        try:  # 1. copy
            await self.migrator.copy(
                old, change, spec or self.spec, self.shards, self.goal.has_rows, new_rows
            )
        except Exception as e:
            self.goal = self.goal.replace(pending=None, pending_spec=None)
            self.save(strict=False)
            raise PoolUnavailableError(f"could not copy weights to new places: {e}") from e
        t.append(time.perf_counter())
        if spec is not None:
            self.goal = self.goal.replace(spec=spec, routing_version=target.version)
        if gate is not None:
            self.goal = self.goal.replace(gate_file=gate_file)
            self.gate = self.cluster.put(gate)
            self.load.resize(spec.num_experts, spec.removed_ids)
        self.goal = self.goal.replace(placement=target)
        await self.roster.publish_all(self.goal, self.gate, routing=spec is not None)  # 2.
        if spec is not None:  # callers' own gates from before are stale from now on
            await self.roster.fence_all(self.goal)
        t.append(time.perf_counter())
        drain_s = self.spec.control.drain_timeout_s
        await self.migrator.drain(self.routers, target.version, drain_s)  # 3.
        t.append(time.perf_counter())
        await self.migrator.free(change, self.shards)  # 4.
        self.goal = self.goal.replace(pending=None, pending_spec=None)
        self.save(strict=False)  # the change happened: a store outage only delays this
        if gate is not None:
            self._prune()
        t.append(time.perf_counter())
        self._record_change(op, change)
        self.last_change = dict(
            zip(("copy", "publish", "drain", "free"), np.diff(t).tolist(), strict=True)
        )
        log.info(
            "placement %d applied in %s",
            target.version,
            ", ".join(f"{k} {v * 1e3:.0f} ms" for k, v in self.last_change.items()),
        )
        return change

    def _record_change(self, op: str, change: Change) -> None:
        m = self.metrics
        m.inc("raymoe_changes_total", op=op)
        m.inc("raymoe_replicas_moved_total", change.replicas_added)
        m.inc("raymoe_bytes_moved_total", change.replicas_added * self.expert_bytes)

    # --- the control loop ---------------------------------------------------------------

    async def collect_load(self) -> np.ndarray:
        """Fold the routers' new per-expert counts into the load window; -> the new counts."""
        counts = await self.poll(self.routers, "take_load")
        return self.load.add(counts, self.spec.removed_ids, self.spec.slots)

    async def update_bias(self, counts: np.ndarray) -> None:
        """One aux-loss-free step: the routers' selection bias moves towards balance (in
        every layer that has one)."""
        async with self.ops:
            gate = plans.bias_stepped(self.spec, dict(await self.roster.gate_weights()), counts)
            # the same layout, next version: routers swap gate and placement together
            await self.apply(self.placement.bump(), spec=self.spec, gate=gate, op="bias")

    def record_state(self) -> None:
        """The layout and load gauges (each control step)."""
        m, p = self.metrics, self.placement
        m.set("raymoe_placement_version", p.version)
        m.set("raymoe_shards", p.num_shards)
        m.set("raymoe_replicas", p.num_replicas)
        m.set("raymoe_imbalance", self.imbalance())
        m.set("raymoe_degraded", len(self.problems()))
        hot = dict(top_experts(self.load.per_second()))
        for expert in self._hot_experts - hot.keys():  # no longer hot: no stale value
            m.set("raymoe_expert_load", 0.0, expert=expert)
        for expert, value in hot.items():
            m.set("raymoe_expert_load", value, expert=expert)
        self._hot_experts = set(hot)

    def imbalance(self) -> float:
        return plans.pool_imbalance(self.goal, self._load())

    def _load(self) -> np.ndarray:
        return self.load.or_uniform(self.spec.removed_ids)

    # --- introspection ------------------------------------------------------------------

    def describe(self) -> PoolDescription:
        return plans.description(
            self.goal, len(self.routers), self.problems(), self.last_change, self.resumed_changes
        )

    async def stats(self, window_s: float = 60.0, load_bins: int = 0) -> PoolStats:
        """Traffic over the last ``window_s`` seconds, merged over the routers; with
        ``load_bins``, its load map (shard x bins of experts) too."""
        placement = self.placement
        if load_bins:
            check_load_bins(load_bins)  # before any poll
        windows = await self.poll(self.routers, "stats", window_s)
        stats = merge(
            [w for w in windows if w is not None],
            placement.held() > 0,
            self.spec.num_experts,
            window_s,
        )
        stats = plans.per_layer(self.spec, stats, placement)
        if not load_bins:
            return stats
        return dataclasses.replace(
            stats, load_map=load_map(stats.expert_load, placement, load_bins)
        )
