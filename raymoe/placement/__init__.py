"""Placement: where every expert lives, and the pure policies that decide it.

Glossary (the one place these words are defined; raymoe uses them with these meanings):

- **expert**: a logical expert, by its global id in ``[0, E)``. Ids are stable: an expert
  removed at runtime keeps its id (with no replica) and the id is never reused.
- **slot**: one column of the ``[T, S]`` routes a gate produces; a token's choices fill its
  slots, and ``-1`` marks an empty slot (a dropped token, or padding).
- **pair**: one (token, slot) with a valid expert id: one unit of expert work. Load is
  counted in pairs.
- **shard**: an actor holding one expert bank.
- **place**: one position (local index) in a shard's bank. It holds one replica, or is free.
- **replica**: one physical copy of an expert, at one place of one shard. A live expert has
  at least one; routers spread its pairs evenly over its replicas, so a replica *carries*
  ``load[e] / replicas[e]``.
- **placement**: every expert's replicas as (shard, local index) pairs; immutable.
- **placement version**: the number of a placement. Every change (of replicas, of the shard
  count, or of the routing state that goes with them) publishes the next version, made by
  :meth:`Placement.bump` alone. A batch is dispatched under exactly one version.
- **routing version**: the placement version at which the routing state (spec, gate weights)
  last changed; routers swap both together.
- **load**: pairs per expert (a decayed window, or a count); a shard's load is the sum of
  what its replicas carry. **imbalance** is max / mean shard load over the serving shards.
- **budget**: what a policy may use (shards, replicas, places per shard, pins, moves);
  a **plan** is a policy's answer: a placement and what it costs.

Everything here is pure numpy: no Ray, no torch, no weights. Multi-layer pools lay the
experts of every layer out in one flat id space (:mod:`raymoe.config.layers`); a policy
plans one layer at a time over that layer's flat ids (:mod:`.layered`), since balance is
per layer, and never needs to know about layers.
"""

from raymoe.placement.budget import Budget, Plan, imbalance, lower_bound, shard_loads
from raymoe.placement.policies import DEFAULT_POLICY, POLICIES, get_policy
from raymoe.placement.rules import bias_step, shards_for
from raymoe.placement.table import (
    Change,
    Placement,
    contiguous,
    diff,
    initial,
    place_new,
    realize,
    with_replicas,
)

__all__ = [
    "DEFAULT_POLICY",
    "POLICIES",
    "Budget",
    "Change",
    "Placement",
    "Plan",
    "bias_step",
    "contiguous",
    "diff",
    "get_policy",
    "imbalance",
    "initial",
    "lower_bound",
    "place_new",
    "realize",
    "shard_loads",
    "shards_for",
    "with_replicas",
]
