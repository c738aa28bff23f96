"""Two-level gating (Jordan & Jacobs 1994): pick groups, then experts inside them.

Shape letters: T tokens, G groups, m = E / G experts per group, g = k_groups, k experts per
chosen group.

    p_group  = softmax(W_group x)                  [T, G]     -> top-g groups
    p_expert = softmax within each group of W x    [T, G, m]  -> top-k inside each chosen group
    weight   = p_group * p_expert                  ids are group * m + local index; [T, g * k]
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from raymoe.config import HierarchicalRouting, PoolSpec
from raymoe.routing.base import Gate, Routes, register_gate, seeded_rows, softmax
from raymoe.routing.select import select_topk


@register_gate
class HierarchicalGate(Gate):
    kind = "hierarchical"

    def __init__(self, spec: PoolSpec):
        super().__init__(spec)
        r = spec.routing
        assert isinstance(r, HierarchicalRouting)
        self.cfg = r
        self.m = spec.num_experts // r.n_groups
        self.weight = seeded_rows(spec, "router.weight", (spec.num_experts, spec.d_model))
        self.group = nn.Linear(spec.d_model, r.n_groups, bias=False)
        # NOTE: seeded by row: a pool grown by whole groups keeps its groups' rows
        self.group.weight = seeded_rows(spec, "router.group.weight", (r.n_groups, spec.d_model))
        empty = None
        if self.removed is not None:  # groups without live experts leave the group softmax
            empty = self.removed.view(r.n_groups, self.m).all(-1)
        self.register_buffer("empty_groups", empty, persistent=False)

    def forward(self, x, *, token_ids=None, seq_len=None) -> Routes:
        r, m = self.cfg, self.m
        T = x.shape[0]
        xf = x.float()
        group_logits = F.linear(xf, self.group.weight.float())
        within = F.linear(xf, self.weight.float())
        if self.removed is not None:  # as if their gate rows were deleted
            group_logits = group_logits.masked_fill(self.empty_groups, float("-inf"))
            within = within.masked_fill(self.removed, float("-inf"))
        p_group = softmax(group_logits, -1)
        gv, gi = select_topk(p_group, r.k_groups)  # [T, g]
        p_within = softmax(within.view(T, r.n_groups, m), -1).nan_to_num(0.0)
        p_expert = p_within.gather(1, gi.unsqueeze(-1).expand(-1, -1, m))  # [T, g, m]
        ev, ei = select_topk(p_expert, r.k)  # [T, g, k]
        ids = (gi.unsqueeze(-1) * m + ei).reshape(T, -1)
        w = (gv.unsqueeze(-1) * ev).reshape(T, -1)
        probs = (p_group.unsqueeze(-1) * p_within).reshape(T, -1)
        return Routes(ids, w, self._aux_losses(group_logits, probs, ids))
