"""The runtime operations of a pool, the admin plane's methods of :class:`~.controller.Controller`
(a mixin, so the controller module holds the lifecycle and the reconcile loop). Each one
holds ``self.ops`` (one at a time). A placement change is idempotent, plans with a pure
function of :mod:`.plans`, applies make before break (``Controller.apply``) and returns an
:class:`~raymoe.reports.OpReport`; the others write a checkpoint or step the optimizer
(:mod:`.training`) under one placement version."""

from __future__ import annotations

import asyncio
import dataclasses

from raymoe._private import timeouts
from raymoe._private.control import durable, growth, plans
from raymoe.errors import ResourceLimitError
from raymoe.layer import check_layer
from raymoe.placement import Placement, get_policy, place_new
from raymoe.reports import OpReport


class Operations:
    async def rebalance(
        self, dry_run: bool = False, policy_name: str | None = None, trigger: str = "manual"
    ) -> OpReport:
        """Plan with the spec's policy (or ``policy_name``) over the load window; apply."""
        name = policy_name or self.spec.control.policy
        policy = get_policy(name)
        async with self.ops:
            await self.collect_load()
            plan = plans.plan(policy, self.goal, self._load(), self.expert_bytes)
            report = plans.planned(plan, self.placement, dry_run, name)
            if report.changed and not dry_run:
                await self.apply(plan.placement, op="rebalance")
                self.metrics.inc("raymoe_rebalances_total", trigger=trigger)
            return report

    async def replicate(self, expert: int, replicas: int, layer: int = 0) -> OpReport:
        """Give ``layer``'s ``expert`` exactly ``replicas`` replicas (more on the least
        loaded shards, fewer by dropping from the most loaded); a pin set later or before
        wins in plans."""
        flat = int(plans.flat_ids(self.spec, layer, [expert])[0])
        async with self.ops:
            target = plans.replicated(self.goal, self._load(), flat, replicas)
            if target is None:
                return plans.unchanged(self.goal, self._load(), layer=layer)
            report = await self._apply_report(target, op="replicate")
            return dataclasses.replace(report, layer=layer)

    async def pin(self, expert: int, replicas: int, layer: int = 0) -> OpReport:
        """An operator's replica target for ``layer``'s ``expert`` that every later plan
        keeps."""
        report = await self.replicate(expert, replicas, layer)
        flat = int(plans.flat_ids(self.spec, layer, [expert])[0])
        async with self.ops:
            self.commit(spec=self.spec.with_pin(flat, replicas))
        return dataclasses.replace(report, pinned=plans.layer_pins(self.spec, layer))

    async def unpin(self, expert: int, layer: int = 0) -> OpReport:
        flat = int(plans.flat_ids(self.spec, layer, [expert])[0])
        async with self.ops:
            self.commit(spec=self.spec.with_pin(flat, None))
        pinned = plans.layer_pins(self.spec, layer)
        return plans.unchanged(self.goal, self._load(), pinned=pinned, layer=layer)

    async def drain_shard(self, shard: int) -> OpReport:
        """Move every replica off ``shard``; it keeps running but holds nothing."""
        plans.drain_bounds(self.goal, shard)
        async with self.ops:
            self.commit(drained=self.goal.drained | {shard})
            return await self._replan()

    async def scale_shards(self, count: int, max_shards: int | None = None) -> OpReport:
        """Grow or shrink the pool to ``count`` active shards; experts are redistributed.
        Scaling ends maintenance: shards drained before are active again afterwards."""
        limit = max_shards or self.spec.control.max_shards
        if limit is not None and count > limit:
            raise ResourceLimitError(
                f"{count} shards is over control.max_shards ({limit}); nothing changed"
            )
        plans.scale_bounds(self.goal, count, None)
        N = self.placement.num_shards
        if count == N:
            return plans.unchanged(self.goal, self._load())
        async with self.ops:
            if count > N:
                self.goal = self.goal.replace(drained=frozenset())
                await self._resize(count)
                return await self._replan(force=True)
            self.commit(drained=frozenset(range(count, N)))
            report = await self._replan()
            await self._resize(count)
            return report

    async def _replan(self, force: bool = False) -> OpReport:
        policy = get_policy(self.spec.control.policy)
        plan = plans.plan(policy, self.goal, self._load(), self.expert_bytes)
        if not (plan.replicas_added or plan.replicas_dropped or force):
            return plans.unchanged(self.goal, self._load())
        return await self._apply_report(plan.placement, op="replan")

    async def _resize(self, count: int) -> None:
        """The shard count becomes ``count`` (new shards start empty; removed ones hold
        nothing by now), published to every router as the next placement version."""
        drained = frozenset(n for n in self.goal.drained if n < count)
        self.commit(
            placement=self.placement.bump(num_shards=count),
            spec=self.spec.with_shards(count),
            drained=drained,
        )
        gone = await self.roster.resize(count)
        await self._configure_routers()
        self.cluster.kill(gone)

    async def _configure_routers(self) -> None:
        await asyncio.gather(
            *(
                self.roster.configure_router(i, self.goal, self.gate)
                for i in range(len(self.routers))
            )
        )

    async def add_experts(
        self, count: int, weights: dict | None = None, layer: int = 0
    ) -> OpReport:
        """Grow ``layer`` by ``count`` experts with ids ``E .. E+count-1`` (of the layer):
        their weights (``experts.*`` rows, stacked over the new experts) and gate rows
        (``router.weight`` etc. for ``topk``; ``router.keys`` [heads, rows, d_key/2] for the
        new sub-key rows of ``product_key``), or the seeded init of those ids where not
        given."""
        spec = self.spec
        check_layer(spec, layer)
        grown = spec.with_experts_added(count, layer)
        more = count * spec.shards.min_replicas
        self.check_budget(self.placement.num_replicas + more, "add_experts")
        old_l, grown_l = spec.layer(layer), grown.layer(layer)
        expert_rows, gate_rows = growth.new_weights(
            grown_l, old_l.num_experts, count, weights or {}
        )
        async with self.ops:
            gate = growth.grow_layer_gate(
                spec, grown, layer, await self.roster.gate_weights(), gate_rows
            )
            align = old_l.routing.align(old_l.num_experts)
            target = place_new(self.placement, count, align, plans.active(self.goal))
            if expert_rows:  # durable before they serve: a file the shards reload from
                new_flat = plans.flat_ids(
                    grown, layer, range(old_l.num_experts, grown_l.num_experts)
                )
                f = await asyncio.to_thread(
                    durable.write_rows, spec.name, target.version, new_flat, expert_rows
                )
                self.goal = self.goal.replace(sources=(*self.goal.sources, f))
            report = await self._apply_report(target, grown, gate, expert_rows, op="add_experts")
            new = tuple(range(old_l.num_experts, grown_l.num_experts))
            return dataclasses.replace(report, expert_ids=new, layer=layer)

    async def remove_experts(self, ids, layer: int = 0) -> OpReport:
        """Never route to ``layer``'s experts ``ids`` again from the next placement
        version; their places are freed once no batch runs under an older one. Ids are
        never reused."""
        flat = plans.flat_ids(self.spec, layer, ids)
        spec, target, flat = plans.removed(self.goal, flat)
        async with self.ops:
            report = await self._apply_report(target, spec, op="remove_experts")
            return dataclasses.replace(
                report, removed=plans.layer_ids(spec, layer, flat), layer=layer
            )

    async def _apply_report(self, target: Placement, *routing, op: str) -> OpReport:
        before = self.imbalance()
        change = await self.apply(target, *routing, op=op)
        return plans.report(self.goal, self._load(), change, target, self.expert_bytes, before)

    # --- not placement changes: checkpoints and training steps --------------------------

    async def save_checkpoint(self, path: str) -> dict:
        """Write a checkpoint (:mod:`raymoe.checkpoint`) to ``path`` under one placement
        version (no change applies meanwhile; traffic flows). From then on the pool reloads
        from it. -> the manifest."""
        async with self.ops:
            gate = dict(await self.roster.gate_weights())

            async def write_rows(n: int, file, ids):
                return await self.cluster.call(
                    self.shards[n], "write_rows", file, ids, timeout=timeouts.CHECKPOINT_S
                )

            manifest, sources, gate_file = await durable.write_checkpoint(
                path, self.spec, self.placement, gate, write_rows
            )
            self.goal = self.goal.replace(sources=sources, gate_file=gate_file)
            self.save(strict=False)
            self._prune()
            return manifest

    def _prune(self) -> None:
        """Drop the pool's weight files the goal no longer names."""
        g = self.goal
        durable.prune(self.spec.name, [*g.sources, *([g.gate_file] if g.gate_file else [])])

    async def grad_square_sum(self) -> float:
        """The sum of squares of every expert's accumulated gradients (summed over its
        replicas, which it gathers at the expert's owner)."""
        async with self.ops:
            return await self.stepper.grad_square_sum(self.placement, self.shards)

    async def step(self, optimizer: dict, scale: float = 1.0) -> dict:
        """One optimizer step of every expert with gradients, under one placement version."""
        async with self.ops:
            experts, refreshed = await self.stepper.step(
                self.placement, self.shards, optimizer, scale
            )
        return {"experts": experts, "replicas_refreshed": refreshed}
