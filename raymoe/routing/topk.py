"""Token-choice top-k gating and the dense mixture.

``topk`` (Shazeer 2017, GShard, Mixtral, Qwen, OLMoE, DeepSeek-V2/V3):

    logits = W x (+ b) (+ N(0,1) * softplus(W_noise x) while training, if ``noise``)
    scores = softmax(logits) | sigmoid(logits)
    choice = scores (+ correction_bias)            # selection only, never in the weights
    groups: keep the ``topk_groups`` best groups (max, or sum of the top 2, of ``choice``)
    ids    = top-k of choice;  w = scores[ids] (/ sum, if renormalize) * scaling

Routing math runs in fp32 whatever the pool dtype ("selective precision", Switch §2.4).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from raymoe.config import PoolSpec, TopKRouting
from raymoe.routing.base import Gate, Routes, register_gate, seeded_rows, softmax
from raymoe.routing.select import select_topk


@register_gate
class TopKGate(Gate):
    kind = "topk"

    def __init__(self, spec: PoolSpec):
        super().__init__(spec)
        r = spec.routing
        assert isinstance(r, TopKRouting)
        self.cfg = r
        E, d = spec.num_experts, spec.d_model
        self.weight = seeded_rows(spec, "router.weight", (E, d))
        self.bias = seeded_rows(spec, "router.bias", (E,)) if r.bias else None
        if r.correction_bias:
            self.register_buffer("correction_bias", torch.zeros(E))
        else:
            self.correction_bias = None
        self.noise = nn.Linear(d, E, bias=False) if r.noise else None
        if self.noise is not None:
            self.noise.weight = seeded_rows(spec, "router.noise.weight", (E, d))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: [T, d] -> [T, E] fp32 (noise added in training mode when configured)."""
        logits = F.linear(x.float(), self.weight.float(), self.bias)
        if self.noise is not None and self.training:
            std = F.softplus(F.linear(x.float(), self.noise.weight.float()))
            logits = logits + torch.randn_like(logits) * std
        if self.removed is not None:  # as if their gate rows were deleted
            logits = logits.masked_fill(self.removed, float("-inf"))
        return logits

    def forward(self, x, *, token_ids=None, seq_len=None) -> Routes:
        r = self.cfg
        logits = self.logits(x)
        scores = softmax(logits, -1) if r.score == "softmax" else logits.sigmoid()
        choice = scores.detach()
        if self.correction_bias is not None:
            choice = choice + self.correction_bias
        if self.removed is not None:
            choice = choice.masked_fill(self.removed, float("-inf"))
        if r.n_groups is not None:
            choice = self._mask_groups(choice)
        _, ids = select_topk(choice, r.k)
        w = scores.gather(1, ids)
        if r.renormalize:
            w = w / w.sum(-1, keepdim=True)
        if r.scaling != 1.0:
            w = w * r.scaling
        probs = scores if r.score == "softmax" else scores / scores.sum(-1, keepdim=True)
        return Routes(ids, w, self._aux_losses(logits, probs, ids))

    def _mask_groups(self, choice: torch.Tensor) -> torch.Tensor:
        """Keep the experts of the ``topk_groups`` best groups; the rest become -inf."""
        r = self.cfg
        T, E = choice.shape
        grouped = choice.view(T, r.n_groups, E // r.n_groups)
        if r.group_score == "max":
            group_scores = grouped.amax(-1)
        else:  # the two best live experts (a group with one live expert: that one)
            top2 = grouped.topk(2, dim=-1).values
            group_scores = top2[..., 0] + top2[..., 1].nan_to_num(neginf=0.0)
        _, keep = select_topk(group_scores, r.topk_groups)
        mask = torch.zeros(T, r.n_groups, dtype=torch.bool, device=choice.device)
        mask.scatter_(1, keep, True)
        return grouped.masked_fill(~mask.unsqueeze(-1), float("-inf")).view(T, E)


@register_gate
class DenseGate(Gate):
    """Every expert, softmax-weighted: ids are ``0..E-1`` for every token."""

    kind = "dense"

    def __init__(self, spec: PoolSpec):
        super().__init__(spec)
        self.weight = seeded_rows(spec, "router.weight", (spec.num_experts, spec.d_model))

    def forward(self, x, *, token_ids=None, seq_len=None) -> Routes:
        logits = F.linear(x.float(), self.weight.float())
        if self.removed is not None:
            logits = logits.masked_fill(self.removed, float("-inf"))
        probs = softmax(logits, -1)
        ids = torch.arange(self.num_experts, device=x.device).expand(x.shape[0], -1)
        aux = self._aux_losses(logits, probs, ids)
        if self.removed is not None:  # live experts only
            live = (~self.removed).nonzero().squeeze(1)
            ids, probs = ids[:, live], probs[:, live]
        return Routes(ids, probs, aux)
