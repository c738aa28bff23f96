"""Product-key retrieval over N = n x n experts (Lample et al. 2019; PEER, He 2024).

Shape letters: T tokens, h heads, n = sqrt(N) sub-keys per half, c = d_key / 2, k top-k.

    q            = W_q x (BatchNorm'd if configured)       [T, h * d_key] -> [T, h, 2, c]
    s_half       = q_half · K_half                          [T, h, 2, n]
    (i1, v1), (i2, v2) = top-k of each half                [T, h, k]
    candidates   = v1[a] + v2[b] over the k x k pairs       [T, h, k * k]
    ids          = i1[a] * n + i2[b] for the top-k pairs    [T, h, k]
    weights      = softmax over each head's k scores

The exact top-k of the N scores ``s1[i] + s2[j]`` is always among the k x k candidates, so this
is exact retrieval at O(n) cost. Heads' outputs add up: the routes are [T, h * k].
"""

from __future__ import annotations

import math

import torch
from torch import nn

from raymoe.config import PoolSpec, ProductKeyRouting
from raymoe.routing.base import Gate, Routes, register_gate, seeded_parameter
from raymoe.routing.select import select_topk


@register_gate
class ProductKeyGate(Gate):
    kind = "product_key"

    def __init__(self, spec: PoolSpec):
        super().__init__(spec)
        r = spec.routing
        assert isinstance(r, ProductKeyRouting)
        self.cfg = r
        self.n = math.isqrt(spec.num_experts)
        d = spec.d_model
        self.query = nn.Linear(d, r.heads * r.d_key, bias=False)
        self.query.weight = seeded_parameter(spec, "router.query.weight", (r.heads * r.d_key, d))
        self.keys = seeded_parameter(
            spec, "router.keys", (r.heads, 2, self.n, r.d_key // 2), scale=(r.d_key // 2) ** -0.5
        )
        self.query_norm = nn.BatchNorm1d(r.heads * r.d_key) if r.query_batchnorm else None

    def sub_key_scores(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: [T, d] -> [T, h, 2, n] fp32 scores of every sub-key."""
        r = self.cfg
        q = self.query(x.float()) if x.dtype != torch.float32 else self.query(x)
        if self.query_norm is not None:
            q = self.query_norm(q)
        q = q.view(x.shape[0], r.heads, 2, r.d_key // 2)
        return torch.einsum("thpc,hpnc->thpn", q, self.keys.float())

    def forward(self, x, *, token_ids=None, seq_len=None) -> Routes:
        k, n = self.cfg.k, self.n
        s = self.sub_key_scores(x)
        v, i = select_topk(s, k)  # [T, h, 2, k]: both halves in one call, no copies
        v1, v2, i1, i2 = v[:, :, 0], v[:, :, 1], i[:, :, 0], i[:, :, 1]
        cand = (v1.unsqueeze(-1) + v2.unsqueeze(-2)).flatten(-2)  # [T, h, k*k]
        cv, ci = select_topk(cand, k)
        a = torch.div(ci, k, rounding_mode="floor")
        ids = i1.gather(-1, a) * n + i2.gather(-1, ci - a * k)
        w = cv.softmax(-1)
        T = x.shape[0]
        return Routes(ids.reshape(T, -1), w.reshape(T, -1))
