"""Product-key retrieval over N = rows x cols experts (Lample et al. 2019; PEER, He 2024).

Shape letters: T tokens, h heads, n = max(rows, cols) sub-keys per half (the shorter half is
padded and its padding never selected), c = d_key / 2, k top-k.

    q            = W_q x (BatchNorm'd if configured)       [T, h * d_key] -> [h, 2, T, c]
    s_half       = q_half · K_half                          [h, 2, T, n], in chunks of T
    (i1, v1), (i2, v2) = top-k of each half                [T, h, k]
    candidates   = v1[a] + v2[b] over the k x k pairs       [T, h, k * k]
    ids          = i1[a] * cols + i2[b] for the top-k pairs [T, h, k]
    weights      = softmax over each head's k scores

The exact top-k of the N scores ``s1[i] + s2[j]`` is always among the k x k candidates, so this
is exact retrieval at O(n) cost. Heads' outputs add up: the routes are [T, h * k].

Removed experts are masked among the candidates: a head then takes the best live ones of its
k x k candidates, and a slot with no live candidate stays empty (id -1, weight 0).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from raymoe.config import PoolSpec, ProductKeyRouting
from raymoe.kernels import native
from raymoe.routing.base import (
    Gate,
    Routes,
    gate_rows,
    register_gate,
    seeded_parameter,
    softmax,
)
from raymoe.routing.select import select_topk


def key_rows(spec: PoolSpec, half: int, rows: torch.Tensor) -> torch.Tensor:
    """The seeded sub-keys ``rows`` ([n]) of one half, [h, n, d_key/2], each drawn by its
    index (a grown pool's new rows are those of ``MoELayer`` of its grown spec)."""
    r = spec.routing
    c = r.d_key // 2
    return gate_rows(spec, f"router.keys.{half}", rows, (r.heads, c), c**-0.5).transpose(0, 1)


def seeded_keys(spec: PoolSpec, row_ids: torch.Tensor, col_ids: torch.Tensor) -> torch.Tensor:
    """[h, 2, n, d_key/2] sub-keys of both halves (the shorter half padded with its next rows,
    which are never selected)."""
    return torch.stack([key_rows(spec, 0, row_ids), key_rows(spec, 1, col_ids)], dim=1)


# NOTE: tokens are scored in chunks whose scores fit in cache (4 MB): 1M experts, 8 heads,
# 1024 tokens scored at once (64 MB) ran ~1.4x slower, and its page faults made it vary.
SCORES_PER_CHUNK = 1 << 20


@register_gate
class ProductKeyGate(Gate):
    kind = "product_key"

    def __init__(self, spec: PoolSpec):
        super().__init__(spec)
        r = spec.routing
        assert isinstance(r, ProductKeyRouting)
        self.cfg = r
        self.rows, self.cols = r.grid(spec.num_experts)
        self.n = max(self.rows, self.cols)
        d = spec.d_model
        self.query = nn.Linear(d, r.heads * r.d_key, bias=False)
        self.query.weight = seeded_parameter(spec, "router.query.weight", (r.heads * r.d_key, d))
        self.keys = torch.nn.Parameter(
            seeded_keys(spec, torch.arange(self.n), torch.arange(self.n))
        )
        self.query_norm = nn.BatchNorm1d(r.heads * r.d_key) if r.query_batchnorm else None

    def queries(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: [T, d] -> [h, 2, T, c] fp32 queries (BatchNorm'd over the whole batch)."""
        r = self.cfg
        q = self.query(x.float()) if x.dtype != torch.float32 else self.query(x)
        if self.query_norm is not None:
            q = self.query_norm(q)
        return q.view(x.shape[0], r.heads, 2, r.d_key // 2).permute(1, 2, 0, 3)

    def sub_key_scores(self, q: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """``q``: [h, 2, t, c] -> [h, 2, t, n] fp32 scores of every sub-key: one matmul per
        (head, half), each token's scores a contiguous row for the top-k. ``out``: a buffer
        to write them into (no autograd), at least as big."""
        keys = self.keys.float().transpose(-1, -2)
        if out is None:
            s = torch.matmul(q, keys)
        else:
            shape = (*q.shape[:3], self.n)
            s = torch.matmul(q, keys, out=out.view(-1)[: math.prod(shape)].view(shape))
        if self.rows != self.cols:  # the shorter half's padding is never selected
            s[:, 0, :, self.rows :] = float("-inf")
            s[:, 1, :, self.cols :] = float("-inf")
        return s

    def forward(self, x, *, token_ids=None, seq_len=None) -> Routes:
        q = self.queries(x)
        h, _, T, _ = q.shape
        step = max(1, SCORES_PER_CHUNK // (h * 2 * self.n))
        # NOTE: one buffer for every chunk's scores: a fresh 4 MB each time was ~5 ms of page
        # faults per 1,024 tokens (1M experts, 8 heads)
        buf = None
        if step < T and not (torch.is_grad_enabled() and q.requires_grad):
            buf = q.new_empty((h, 2, step, self.n))
        starts = range(0, max(T, 1), step)
        parts = [self._retrieve(q[:, :, a : a + step], buf) for a in starts]
        if len(parts) == 1:
            return parts[0]
        return Routes(torch.cat([p.ids for p in parts]), torch.cat([p.weights for p in parts]))

    def _retrieve(self, q: torch.Tensor, buf: torch.Tensor | None = None) -> Routes:
        """Routes of the tokens of ``q`` ([h, 2, t, c]); ``buf``: see ``sub_key_scores``."""
        k, cols = self.cfg.k, self.cols
        v, i = select_topk(self.sub_key_scores(q, buf), k)  # [h, 2, t, k]: both halves in one call
        v, i = v.permute(2, 0, 1, 3), i.permute(2, 0, 1, 3)  # [t, h, 2, k]
        v1, v2, i1, i2 = v[:, :, 0], v[:, :, 1], i[:, :, 0], i[:, :, 1]
        T = q.shape[2]
        if self.removed is not None:
            return self._live_pairs(v1, v2, i1, i2)
        pos = native.pk_pairs(*(h.detach().reshape(-1, k).contiguous() for h in (v1, v2)))
        if pos is None:  # off the CPU: the whole k x k grid
            _, pos = select_topk((v1.unsqueeze(-1) + v2.unsqueeze(-2)).flatten(-2), k)
        pos = pos.view(v1.shape)
        a = torch.div(pos, k, rounding_mode="floor")
        b = pos - a * k
        ids = i1.gather(-1, a) * cols + i2.gather(-1, b)
        w = softmax(v1.gather(-1, a) + v2.gather(-1, b), -1)  # the pairs' scores, with grads
        return Routes(ids.reshape(T, -1), w.reshape(T, -1))

    def _live_pairs(self, v1, v2, i1, i2) -> Routes:
        """Routes among the k x k pairs of the sub-keys' top-k (``v1, v2, i1, i2``: [t, h, k])
        with removed experts masked: a head takes the best live ones; a slot with none is
        empty (id -1, weight 0)."""
        k, cols, T = self.cfg.k, self.cols, v1.shape[0]
        cand = (v1.unsqueeze(-1) + v2.unsqueeze(-2)).flatten(-2)  # [t, h, k*k]
        ids = (i1.unsqueeze(-1) * cols + i2.unsqueeze(-2)).flatten(-2)  # [t, h, k*k]
        cand = cand.masked_fill(self.removed[ids], float("-inf"))
        cv, ci = select_topk(cand, k)
        ids = ids.gather(-1, ci)
        empty = torch.isinf(cv)
        w = softmax(cv, -1).nan_to_num(0.0).masked_fill(empty, 0.0)
        ids = ids.masked_fill(empty, -1)
        return Routes(ids.reshape(T, -1), w.reshape(T, -1))
