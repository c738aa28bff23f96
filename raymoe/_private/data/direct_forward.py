"""A small request sent from the caller's thread straight to the shards: the router's
stages (:mod:`.stages`: route, dispatch, combine) in the caller's process, under one
placement version a router published (:mod:`raymoe._private.direct`), without the hop
through a router actor, its queue and its batching.

It is an attempt: whatever it cannot serve at once (bad input, a shard that refuses the
call because its places changed, one that is down, slow or silent past ``wait_s``) raises
:class:`Missed`, having changed nothing (a forward is idempotent), and the caller sends the
request through a router, which retries, hedges, degrades and raises typed errors as
always. Make-before-break holds as for training: a shard checks the experts a sub-batch
means under its lock (:func:`~.dispatch.places_digest`). And a caller's gates are never
staler than the pool's function: before an operation that changes it (experts added or
removed, new gate weights) returns, every shard is fenced at its routing version
(:meth:`~.shard.ExpertShard.fence`) and refuses sub-batches gated under an older one.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from raymoe._private.data.dispatch import DispatchTable, digest_of, split_by_shard
from raymoe._private.data.gates import Gates
from raymoe._private.data.stages import checked, combine_rows, read_only, route_batch, spans_of
from raymoe.config import PoolSpec


@dataclass(frozen=True)
class Publication:
    """One router publication, held together: the spec, a placement version's dispatch
    table, the shard actors serving it and the gates of routing version ``routing_version``."""

    spec: PoolSpec
    table: DispatchTable
    handles: list
    gates: Gates
    routing_version: int


@dataclass(frozen=True)
class Routed:
    """What a served request routed: its pairs' flat expert ids and each shard's pairs."""

    experts: np.ndarray  # [P]
    shard_pairs: np.ndarray  # [N]
    stages: dict  # seconds: route, dispatch (the shards' calls), combine


class Missed(Exception):
    """This request is for a router to serve (``cause``: why)."""

    def __init__(self, cause: BaseException):
        super().__init__(repr(cause))
        self.cause = cause


@torch.no_grad()
def forward(
    now: Publication, calls, x, expert_ids, weights, token_ids, layer: int, wait_s: float
) -> tuple[np.ndarray, Routed]:
    """``x`` [..., d] through layer ``layer`` of the pool ``now`` describes -> (output,
    what it routed); ``calls``: a blocking transport to the shards
    (:func:`~raymoe._private.pool_actors.blocking_shard_calls`), each shard given
    ``wait_s`` at most. :class:`Missed` when a router is to serve it."""
    spec, gates = now.spec, now.gates
    try:
        req = checked(spec, gates, x, expert_ids, weights, token_ids, None, None, layer)
    except Exception as e:  # bad input: a router says so, in its own words
        raise Missed(e) from None
    if req.tokens == 0:
        raise Missed(ValueError("no tokens"))
    t0 = time.perf_counter()
    flat, ids, w, mixes = route_batch([req], gates)
    t1 = time.perf_counter()
    subs = split_by_shard(ids, w, now.table)
    try:  # NOTE: a send may fail too (a shard's endpoint looked up while it restarts)
        sent = [
            calls.start(
                now.handles[s.shard],
                flat[s.tokens].numpy(),
                s.local_ids.numpy(),
                s.weights.to(torch.float32).numpy(),
                digest_of(s),
                now.routing_version,
            )
            for s in subs
        ]
        got = calls.results(sent, wait_s)
    except Exception as e:
        raise Missed(e) from None
    t2 = time.perf_counter()
    parts = [(s, read_only(np.asarray(y))) for s, y in zip(subs, got, strict=True)]
    y = combine_rows(spec.d_model, flat, parts, gates, spans_of([req], mixes))
    if mixes[0] is not None:
        y = gates.layers[req.layer].router.unmix(y, mixes[0])
    shard_pairs = np.zeros(now.table.num_shards, np.int64)
    for s in subs:
        shard_pairs[s.shard] += int((s.local_ids >= 0).sum())
    stages = {"route": t1 - t0, "dispatch": t2 - t1, "combine": time.perf_counter() - t2}
    return y.reshape(req.x.shape).numpy(), Routed(ids[ids >= 0].numpy(), shard_pairs, stages)
