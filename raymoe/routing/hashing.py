"""Hash routing (Roller et al. 2021): a fixed, balanced random map token id -> expert.

The table is a function of the spec: the balanced table of the first expert count, then for
each growth (``grown_from``) the fewest moves to balance again (each new expert takes its
share from the experts holding the most), then the removed experts' tokens dealt to the
live experts holding the fewest.
"""

from __future__ import annotations

import itertools

import torch

from raymoe.config import HashRouting, PoolSpec
from raymoe.routing.base import Gate, Routes, register_gate


def balanced_hash_table(vocab_size: int, num_experts: int, seed: int) -> torch.Tensor:
    """[vocab] int64: a random permutation of ``arange(vocab) % E`` (balanced to within 1)."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(vocab_size, generator=g)
    table = torch.empty(vocab_size, dtype=torch.int64)
    table[perm] = torch.arange(vocab_size) % num_experts
    return table


def hash_table(r: HashRouting, num_experts: int, removed=()) -> torch.Tensor:
    """[vocab] int64: the table of routing ``r`` over ``num_experts`` experts."""
    steps = (*r.grown_from, num_experts)
    table = balanced_hash_table(r.vocab_size, steps[0], r.seed)
    for i, (old, new) in enumerate(itertools.pairwise(steps)):
        table = _rebalanced(table, old, new, seed=r.seed + 1 + i)
    if len(removed):
        table = _without(table, num_experts, list(removed), seed=r.seed - 1)
    return table


def _rebalanced(table: torch.Tensor, old: int, new: int, seed: int) -> torch.Tensor:
    """``table`` over ``new`` experts: the fewest tokens move, from the fullest experts to
    experts ``old .. new-1``."""
    V = len(table)
    quota = torch.full((new,), V // new, dtype=torch.int64)
    quota[: V % new] += 1  # the balanced counts
    g = torch.Generator().manual_seed(seed)
    rank = torch.randperm(V, generator=g)  # which of an expert's tokens move first
    counts = torch.bincount(table, minlength=new)
    extra = (counts - quota).clamp(min=0)
    extra[old:] = 0
    tokens = torch.argsort(table * V + rank)  # by expert, then by rank
    first = torch.cumsum(counts, 0) - counts
    within = torch.arange(V) - first[table[tokens]]  # each token's place in its expert
    moving = tokens[within < extra[table[tokens]]]
    targets = torch.repeat_interleave(torch.arange(old, new), quota[old:])
    out = table.clone()
    out[moving] = targets[: len(moving)]
    return out


def _without(table: torch.Tensor, num_experts: int, removed: list[int], seed: int):
    """``table`` with the tokens of ``removed`` experts dealt to the live experts holding
    the fewest tokens."""
    out = table.clone()
    counts = torch.bincount(table, minlength=num_experts).double()
    counts[removed] = float("inf")
    g = torch.Generator().manual_seed(seed)
    gone = torch.isin(table, torch.as_tensor(removed))
    moving = gone.nonzero().squeeze(1)
    moving = moving[torch.randperm(len(moving), generator=g)]
    for t in moving.tolist():  # NOTE: a loop over the removed experts' tokens only
        e = int(torch.argmin(counts))
        out[t] = e
        counts[e] += 1
    return out


@register_gate
class HashGate(Gate):
    kind = "hash"
    needs_token_ids = True

    def __init__(self, spec: PoolSpec):
        super().__init__(spec)
        r = spec.routing
        assert isinstance(r, HashRouting)
        self.vocab_size = r.vocab_size
        table = hash_table(r, spec.num_experts, spec.experts.removed)
        # NOTE: not in the state dict: the table is the spec's (it changes as the pool grows)
        self.register_buffer("hash_table", table, persistent=False)

    def forward(self, x, *, token_ids=None, seq_len=None) -> Routes:
        assert token_ids is not None, "validated at the layer boundary"
        ids = self.hash_table[token_ids].unsqueeze(1)
        return Routes(ids, torch.ones(ids.shape, dtype=torch.float32, device=x.device))
