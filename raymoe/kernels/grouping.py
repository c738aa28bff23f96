"""Group (token, slot) pairs by expert with one sort.

Glossary: a *slot* is one column of the ``[T, S]`` expert-id tensor a router produces; a *pair*
is one (token, slot) with a valid expert id (``-1`` marks an empty slot: a dropped token or a
padded column). Pairs are sorted by expert so every expert's tokens are one contiguous segment.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Grouped:
    """Pairs sorted by expert.

    Shapes: P = number of valid pairs, E = experts in the bank.
    token:   [P] int64, the token of each pair
    expert:  [P] int64, its (local) expert id, ascending
    weight:  [P] combine weight of each pair
    counts:  [E] int64, pairs per expert
    offsets: [E] int32, end of each expert's segment (``grouped_mm``'s ``offs``)
    """

    token: torch.Tensor
    expert: torch.Tensor
    weight: torch.Tensor
    counts: torch.Tensor
    offsets: torch.Tensor


def group_by_expert(ids: torch.Tensor, weights: torch.Tensor, num_experts: int) -> Grouped:
    """``ids``: [T, S] local expert ids (-1 = empty), ``weights``: [T, S] -> :class:`Grouped`."""
    _T, S = ids.shape
    flat = ids.reshape(-1)
    valid = flat >= 0
    pair = valid.nonzero().squeeze(1)
    expert, order = torch.sort(flat[pair], stable=True)
    pair = pair[order]
    counts = torch.bincount(expert, minlength=num_experts)
    return Grouped(
        token=torch.div(pair, S, rounding_mode="floor"),
        expert=expert,
        weight=weights.reshape(-1)[pair],
        counts=counts,
        offsets=counts.cumsum(0).to(torch.int32),
    )
