"""Dispatch and combine, for one batch under one placement version (the stages between
route and compute, and after it).

Shape letters: T tokens, S slots, N shards, t_n tokens sent to shard n.

A token whose experts sit on several shards is sent to each of those shards once, carrying
only the slots that live there, packed to the front ([t_n, S_n] with S_n the most slots any
of its tokens has there; -1 pads); each shard returns one pre-combined partial sum per token
it got, so traffic and work per shard are O(t_n * (d + S_n)), never O(T * S * d).

Replicas: the pairs of a replicated expert are dealt round its replicas in turn (by their
rank among that expert's pairs, continuing where the last batch stopped), so each replica
carries an equal share: the load the placement policies plan for.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from raymoe.kernels import native
from raymoe.placement import Placement

_DIGEST_K = native.DIGEST_K


@dataclass(frozen=True)
class SubBatch:
    """What one shard computes: rows ``tokens`` [t_n] of the batch and, for each, its slots
    on that shard packed to the front: ``local_ids``, ``expert_ids`` (global) and ``weights``
    [t_n, S_n] (-1 / 0 = padding); ``slots`` [t_n, S_n]: where each came from in the
    batch's [T, S] routes (where a backward puts the gradients of the weights)."""

    shard: int
    tokens: torch.Tensor
    local_ids: torch.Tensor
    weights: torch.Tensor
    expert_ids: torch.Tensor
    slots: torch.Tensor | None = None
    digest: int | None = None  # its places_digest, where the split computed it


def digest_of(sub: SubBatch) -> int:
    """``sub``'s :func:`places_digest` (computed by the split where it could)."""
    return places_digest(sub.local_ids, sub.expert_ids) if sub.digest is None else sub.digest


def places_digest(local_ids: torch.Tensor, expert_ids: torch.Tensor) -> int:
    """A 64-bit digest of the (local place, global expert) pairs of a sub-batch ([t, S]
    each; places -1 are padding). The router sends it with the sub-batch and the shard
    computes it over the experts its places hold: when they differ, the shard refuses the
    sub-batch (:class:`~raymoe.errors.PlacementMismatchError`), so a placement that went
    stale costs a retry, never a sum over the wrong experts."""
    # NOTE: sum of squares of (g * K + l), in wrapping int64: three in-place passes (~4 ms
    # per million pairs); a place holding another expert changes the sum unless a product
    # of small differences is divisible by 2**63
    key = expert_ids * _DIGEST_K
    key += local_ids
    key *= key
    return int(key.masked_fill_(local_ids < 0, 0).sum())


class DispatchTable:
    """A placement as torch tensors (zero-copy views), and the turn of every replicated
    expert (pairs dealt so far, per expert). Shapes as in :class:`Placement`."""

    def __init__(self, placement: Placement):
        self.version = placement.version
        self.num_shards = placement.num_shards
        self.num_experts = placement.num_experts
        self.ptr, self.shard, self.local = (
            torch.from_numpy(np.require(getattr(placement, k), np.int64, "W"))
            for k in ("ptr", "shard", "local")
        )
        self.count = self.ptr[1:] - self.ptr[:-1]
        self._turn = torch.zeros(placement.num_experts, dtype=torch.int64)
        # NOTE: where no expert has two replicas, each expert's one place packed as
        # shard << 32 | local: one gather per pair instead of four (1M pairs: ~33 -> ~12 ms)
        self._one_place = None
        if len(self.shard) and not bool((self.count > 1).any()):
            row = self.ptr[:-1].clamp(max=len(self.shard) - 1)  # as ``choose`` reads it
            self._one_place = (self.shard[row] << 32) | self.local[row]

    def choose(self, ids: torch.Tensor, avoid: torch.Tensor | None = None, deal: bool = True):
        """One replica per (token, slot): ``ids`` [T, S] -> (shard [T, S], local [T, S]).

        ``avoid`` ([N] bool, e.g. shards that just failed) moves pairs to another replica
        where the expert has one; an expert whose every replica is avoided keeps its pick.
        With ``deal=False`` the pick is a function of ``ids`` alone (a training forward and
        its backward split alike), not of the turns dealt so far."""
        valid = ids >= 0
        safe = ids.clamp(min=0)
        if self._one_place is not None:  # nothing to pick among, nothing to avoid
            packed = self._one_place[safe]
            return torch.where(valid, packed >> 32, -1), torch.where(valid, packed & 0xFFFFFFFF, -1)
        first = self.ptr[safe]
        count = self.count[safe]
        multi = valid & (count > 1)
        row = first
        if bool(multi.any()):
            pick = torch.zeros_like(ids)
            if deal:
                pick[multi] = self._deal(ids[multi], count[multi])
            else:
                pick[multi] = torch.arange(int(multi.sum())) % count[multi]
            if avoid is not None:
                pick = self._around(pick, first, count, avoid)
            row = first + pick
        shard = torch.where(valid, self.shard[row], -1)
        local = torch.where(valid, self.local[row], -1)
        return shard, local

    def _deal(self, experts: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
        """[P] replica index of each pair: its rank among the pairs of its expert, after the
        expert's turn, modulo its replicas (the turns move on by the pairs dealt)."""
        order = torch.argsort(experts, stable=True)
        sorted_e = experts[order]
        start = torch.searchsorted(sorted_e, sorted_e, right=False)
        rank = torch.empty_like(experts)
        rank[order] = torch.arange(len(experts)) - start
        pick = (rank + self._turn[experts]) % count
        self._turn.index_add_(0, experts, torch.ones_like(experts))
        return pick

    def _around(self, pick, first, count, avoid) -> torch.Tensor:
        chosen = pick
        # NOTE: walk round each expert's replicas until one is not avoided (bounded by the
        # largest replica count, a small number)
        for _ in range(int(count.max()) - 1):
            bad = avoid[self.shard[first + pick]]
            if not bool(bad.any()):
                break
            pick = torch.where(bad, (pick + 1) % count.clamp(min=1), pick)
        still = avoid[self.shard[first + pick]]
        return torch.where(still, chosen, pick)


def split_by_shard(
    ids: torch.Tensor,
    weights: torch.Tensor,
    table: DispatchTable,
    avoid: torch.Tensor | None = None,
    deal: bool = True,
) -> list[SubBatch]:
    """One :class:`SubBatch` per shard that has work: one sort of every token's slots by
    shard, then a slice per shard (a loop over shards, never experts). ``deal``: as in
    :meth:`DispatchTable.choose`."""
    T, S = ids.shape
    N = table.num_shards
    if table._one_place is not None:  # NOTE: the C split gathers each pair's place itself
        done = native.split(ids, weights, N, table=table._one_place)
        if done is not None:
            return [SubBatch(*sub) for sub in done]
    shard, local = table.choose(ids, avoid, deal)
    if S and shard.dtype == torch.int64:
        place = torch.where(shard >= 0, (shard << 32) | local, -1)
        done = native.split(ids, weights, N, place=place)
        if done is not None:
            return [SubBatch(*sub) for sub in done]
    key = torch.where(shard >= 0, shard, N)  # empty slots sort last
    order = torch.sort(key, dim=1, stable=True).indices  # [T, S]
    per = torch.zeros((T, N + 1), dtype=torch.int64).scatter_add_(1, key, torch.ones_like(key))
    start = per.cumsum(1) - per  # [T, N + 1] first sorted position of each shard's slots
    sorted_ = [a.gather(1, order) for a in (local, weights, ids)] + [order]
    out = []
    for n in (per[:, :N].sum(0) > 0).nonzero().squeeze(1).tolist():
        tokens = (per[:, n] > 0).nonzero().squeeze(1)
        count = per[tokens, n]
        width = int(count.max())
        j = torch.arange(width)
        pos = (start[tokens, n].unsqueeze(1) + j).clamp(max=S - 1)  # [t_n, S_n]
        here = j < count.unsqueeze(1)
        rows = sorted_ if len(tokens) == T else [a[tokens] for a in sorted_]  # all: no copy
        loc, w, gid, slot = (a.gather(1, pos) for a in rows)
        where = (torch.where(here, loc, -1), torch.where(here, w, 0), torch.where(here, gid, -1))
        out.append(SubBatch(n, tokens, *where, torch.where(here, slot, -1)))
    return out


def resplit(
    sub: SubBatch, table: DispatchTable, avoid: torch.Tensor | None, deal: bool = True
) -> list[SubBatch]:
    """The pairs of a failed ``sub`` split again (under ``table``, a newer placement version
    maybe), away from ``avoid``ed shards where possible; ``deal`` as in :func:`split_by_shard`."""
    out = []
    for s in split_by_shard(sub.expert_ids, sub.weights, table, avoid=avoid, deal=deal):
        slots = None
        if sub.slots is not None:
            slots = torch.where(
                s.slots >= 0, sub.slots[s.tokens].gather(1, s.slots.clamp(min=0)), -1
            )
        out.append(
            SubBatch(s.shard, sub.tokens[s.tokens], s.local_ids, s.weights, s.expert_ids, slots)
        )
    return out


def combine(T: int, d: int, parts: list[tuple[SubBatch, torch.Tensor]], like: torch.Tensor):
    """Scatter-add each shard's partial sums ([t_n, d]) into the batch output [T, d]."""
    y = torch.zeros((T, d), dtype=like.dtype, device=like.device)
    for sub, partial in parts:
        y.index_add_(0, sub.tokens, partial)
    return y
