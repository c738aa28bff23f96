"""Route -> dispatch -> compute -> combine, for one batch under one placement.

Shape letters: T tokens, S slots, N shards, t_n tokens sent to shard n.

A token whose experts sit on several shards is sent to each of those shards once, carrying
only the slots that live there (the others are -1); each shard returns one pre-combined
partial sum per token it got, so traffic per shard is O(t_n * d), never O(T * S * d).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from raymoe._private.placement import Placement


@dataclass(frozen=True)
class SubBatch:
    """What one shard computes: ``tokens`` [t_n] rows of the batch, ``local_ids`` and
    ``weights`` [t_n, S] (local ids on that shard, -1 = slot not on it)."""

    shard: int
    tokens: torch.Tensor
    local_ids: torch.Tensor
    weights: torch.Tensor


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
    """One :class:`SubBatch` per shard that has work (a loop over shards, never experts)."""
    shard, local = choose_replicas(ids, placement, load, avoid)
    out = []
    for n in torch.unique(shard[shard >= 0]).tolist():
        on = shard == n
        tokens = on.any(1).nonzero().squeeze(1)
        sel = on[tokens]
        out.append(SubBatch(n, tokens, torch.where(sel, local[tokens], -1),
                            torch.where(sel, weights[tokens], 0)))  # fmt: skip
    return out


def combine(T: int, d: int, parts: list[tuple[SubBatch, torch.Tensor]], like: torch.Tensor):
    """Scatter-add each shard's partial sums ([t_n, d]) into the batch output [T, d]."""
    y = torch.zeros((T, d), dtype=like.dtype, device=like.device)
    for sub, partial in parts:
        y.index_add_(0, sub.tokens, partial)
    return y
