"""Route -> dispatch -> compute -> combine, for one batch under one placement.

Shape letters: T tokens, S slots, N shards, t_n tokens sent to shard n.

A token whose experts sit on several shards is sent to each of those shards once, carrying
only the slots that live there, packed to the front ([t_n, S_n] with S_n the most slots any
of its tokens has there; -1 pads); each shard returns one pre-combined partial sum per token
it got, so traffic and work per shard are O(t_n * (d + S_n)), never O(T * S * d).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from raymoe._private.placement import Placement


@dataclass(frozen=True)
class SubBatch:
    """What one shard computes: rows ``tokens`` [t_n] of the batch and, for each, its slots
    on that shard packed to the front: ``local_ids``, ``expert_ids`` (global) and ``weights``
    [t_n, S_n] (-1 / 0 = padding)."""

    shard: int
    tokens: torch.Tensor
    local_ids: torch.Tensor
    weights: torch.Tensor
    expert_ids: torch.Tensor


def choose_replicas(
    ids: torch.Tensor,
    placement: Placement,
    load: torch.Tensor | None = None,
    avoid: torch.Tensor | None = None,
):
    """Pick one replica per (token, slot): ``ids`` [T, S] -> (shard [T, S], local [T, S]).

    Several replicas share an expert's pairs round-robin by pair position, weighted towards
    shards with less outstanding work when ``load`` ([N]) is given (least outstanding work).
    ``avoid`` ([N] bool, e.g. shards that just failed) moves pairs to another replica where
    the expert has one; an expert whose every replica is avoided keeps its pick.
    """
    valid = ids >= 0
    safe = ids.clamp(min=0)
    first = placement.ptr[safe]
    count = placement.ptr[safe + 1] - first
    if bool((count > 1).any()):
        pos = torch.arange(ids.numel(), device=ids.device).view_as(ids)
        pick = pos % count
        if load is not None:
            # NOTE: try the replica at pick and the next one; keep the less loaded shard.
            alt = (pick + 1) % count
            s_pick, s_alt = placement.shard[first + pick], placement.shard[first + alt]
            pick = torch.where(load[s_alt] < load[s_pick], alt, pick)
        if avoid is not None:
            chosen = pick
            # NOTE: walk round each expert's replicas until one is not avoided (bounded by the
            # largest replica count, a small number).
            for _ in range(int(count.max()) - 1):
                bad = avoid[placement.shard[first + pick]]
                if not bool(bad.any()):
                    break
                pick = torch.where(bad, (pick + 1) % count, pick)
            still = avoid[placement.shard[first + pick]]
            pick = torch.where(still, chosen, pick)
        row = first + pick
    else:
        row = first
    shard = torch.where(valid, placement.shard[row], -1)
    local = torch.where(valid, placement.local[row], -1)
    return shard, local


def split_by_shard(
    ids: torch.Tensor,
    weights: torch.Tensor,
    placement: Placement,
    load: torch.Tensor | None = None,
    avoid: torch.Tensor | None = None,
) -> list[SubBatch]:
    """One :class:`SubBatch` per shard that has work: one sort of every token's slots by
    shard, then a slice per shard (a loop over shards, never experts)."""
    T, S = ids.shape
    N = placement.num_shards
    shard, local = choose_replicas(ids, placement, load, avoid)
    key = torch.where(shard >= 0, shard, N)  # empty slots sort last
    order = torch.sort(key, dim=1, stable=True).indices  # [T, S]
    per = torch.zeros((T, N + 1), dtype=torch.int64).scatter_add_(1, key, torch.ones_like(key))
    start = per.cumsum(1) - per  # [T, N + 1] first sorted position of each shard's slots
    sorted_ = [a.gather(1, order) for a in (local, weights, ids)]
    out = []
    for n in (per[:, :N].sum(0) > 0).nonzero().squeeze(1).tolist():
        tokens = (per[:, n] > 0).nonzero().squeeze(1)
        count = per[tokens, n]
        width = int(count.max())
        j = torch.arange(width)
        pos = (start[tokens, n].unsqueeze(1) + j).clamp(max=S - 1)  # [t_n, S_n]
        here = j < count.unsqueeze(1)
        loc, w, gid = (a[tokens].gather(1, pos) for a in sorted_)
        out.append(SubBatch(n, tokens, torch.where(here, loc, -1), torch.where(here, w, 0),
                            torch.where(here, gid, -1)))  # fmt: skip
    return out


def combine(T: int, d: int, parts: list[tuple[SubBatch, torch.Tensor]], like: torch.Tensor):
    """Scatter-add each shard's partial sums ([t_n, d]) into the batch output [T, d]."""
    y = torch.zeros((T, d), dtype=like.dtype, device=like.device)
    for sub, partial in parts:
        y.index_add_(0, sub.tokens, partial)
    return y
