"""Routing with expert capacity: Switch (token choice, top-1) and expert choice.

Shape letters: T tokens, E experts, C capacity (tokens per expert), B sequences of length L.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from raymoe.config import ExpertChoiceRouting, PoolSpec, SwitchRouting
from raymoe.routing.base import Gate, Routes, register_gate, seeded_rows, softmax
from raymoe.routing.select import select_topk


def rank_within_group(group: torch.Tensor, num_groups: int) -> torch.Tensor:
    """``group``: [T] -> [T] 0-based arrival rank of each token inside its group."""
    order = torch.sort(group, stable=True).indices
    counts = torch.bincount(group, minlength=num_groups)
    starts = counts.cumsum(0) - counts
    ranks = torch.empty_like(group)
    ranks[order] = torch.arange(group.numel(), device=group.device) - starts[group[order]]
    return ranks


@register_gate
class SwitchGate(Gate):
    """Top-1 with capacity (Switch Transformer). Tokens over capacity get id -1, weight 0.

    Earlier tokens win (arrival order). Capacity is per batch, or per sequence when
    ``capacity_scope: sequence`` (then the layer's input must be [B, L, d]).
    """

    batch_coupled = True

    kind = "switch"

    def __init__(self, spec: PoolSpec):
        super().__init__(spec)
        r = spec.routing
        assert isinstance(r, SwitchRouting)
        self.cfg = r
        self.needs_sequences = r.capacity_scope == "sequence"
        self.weight = seeded_rows(spec, "router.weight", (spec.num_experts, spec.d_model))

    def capacity(self, tokens_per_group: int) -> int:
        r = self.cfg
        if r.capacity is not None:
            return r.capacity
        factor = r.capacity_factor or 1.0
        return max(1, math.ceil(factor * tokens_per_group / self.live))

    def forward(self, x, *, token_ids=None, seq_len=None) -> Routes:
        T, E = x.shape[0], self.num_experts
        probs, logits = _masked_softmax(self, x)
        _top, choice = select_topk(probs.detach(), 1)
        choice = choice.squeeze(1)
        if self.needs_sequences:
            seq = torch.arange(T, device=x.device) // seq_len
            rank = rank_within_group(seq * E + choice, (T // seq_len) * E)
            cap = self.capacity(seq_len)
        else:
            rank = rank_within_group(choice, E)
            cap = self.capacity(T)
        kept = rank < cap
        ids = torch.where(kept, choice, -1).unsqueeze(1)
        w = probs.gather(1, choice.unsqueeze(1)) * kept.unsqueeze(1)
        aux = self._aux_losses(logits, probs, choice.unsqueeze(1))
        return Routes(ids, w, aux, dropped=int((~kept).sum()))


@register_gate
class ExpertChoiceGate(Gate):
    """Each expert takes its top-C tokens by softmax score (Zhou et al. 2022).

    C = min(T, ceil(capacity_factor * T * k / E)). A token can get 0..E experts; ids are
    padded with -1 to the largest count in the batch and listed in ascending expert order.
    """

    batch_coupled = True

    kind = "expert_choice"

    def __init__(self, spec: PoolSpec):
        super().__init__(spec)
        r = spec.routing
        assert isinstance(r, ExpertChoiceRouting)
        self.cfg = r
        self.weight = seeded_rows(spec, "router.weight", (spec.num_experts, spec.d_model))

    def forward(self, x, *, token_ids=None, seq_len=None) -> Routes:
        T, E = x.shape[0], self.num_experts
        probs, logits = _masked_softmax(self, x)  # [T, E]
        cap = min(T, math.ceil(self.cfg.capacity_factor * T * self.cfg.k / self.live))
        _, tok = select_topk(probs.detach().T, cap)  # [E, C]
        chosen = torch.zeros(T, E, dtype=torch.bool, device=x.device)
        chosen.scatter_(0, tok.T, True)
        if self.removed is not None:  # removed experts take no tokens
            chosen &= ~self.removed
        per_token = chosen.sum(1)
        width = max(int(per_token.max()), 1)
        # chosen experts first, each group in ascending expert order
        order = torch.sort((~chosen).to(torch.int8), dim=1, stable=True).indices[:, :width]
        valid = chosen.gather(1, order)
        ids = torch.where(valid, order, -1)
        w = probs.gather(1, order) * valid
        aux = self._aux_losses(logits, probs, ids)
        return Routes(ids, w, aux, dropped=int((per_token == 0).sum()))


def _masked_softmax(gate: Gate, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(probs, logits) [T, E]: a removed expert as if its gate row were deleted."""
    logits = F.linear(x.float(), gate.weight.float())
    if gate.removed is not None:
        logits = logits.masked_fill(gate.removed, float("-inf"))
    return softmax(logits, -1), logits
