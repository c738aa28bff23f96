"""Single-neuron experts (PEER, He 2024): a gather and a dot per (token, slot).

Shape letters: T tokens, S slots per token (heads x top-k), E experts in the bank, d width.

    E_i(x) = v_i * act(u_i · x)      y[t] = sum_s w[t, s] * act(u[ids[t, s]] · x[t]) * v[ids[t, s]]

The second half is exactly ``embedding_bag(mode="sum")`` with per-sample weights, so the
``[T, S, d]`` gather of ``v`` is never materialised; gradients of ``u`` and ``v`` are sparse
when the spec asks for it (a 1M-expert bank is 2 GB; a dense gradient would double that).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from raymoe.config import PeerExperts, PoolSpec
from raymoe.kernels import native, tables
from raymoe.kernels.activations import activation
from raymoe.kernels.bank import ExpertBank, register_bank

# NOTE: without autograd, tokens go through in chunks whose gathered ``u`` rows ([t, S, d]) stay
# in cache (8 MB, one buffer): 1024 tokens x 128 slots at once (134 MB) ran ~2x slower, most
# of it page faults. With autograd, at once: each chunk's dense gradient would be a whole table.
GATHERED_PER_CHUNK = 1 << 21


@register_bank
class PeerBank(ExpertBank):
    kind = "peer"

    def __init__(
        self,
        num_experts: int,
        d_model: int,
        *,
        act: str = "gelu",
        sparse_grad: bool = True,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ):
        super().__init__(num_experts, d_model)
        self.act_name = act
        self.act = activation(act)
        self.sparse_grad = sparse_grad
        self.u = nn.Parameter(tables.zeros((num_experts, d_model), dtype, device))
        self.v = nn.Parameter(tables.zeros((num_experts, d_model), dtype, device))

    @classmethod
    def from_spec(
        cls,
        spec: PoolSpec,
        expert_ids: torch.Tensor,
        *,
        device: torch.device | str = "cpu",
        seeded: bool = True,
    ) -> PeerBank:
        ex = spec.experts
        assert isinstance(ex, PeerExperts)
        bank = cls(
            len(expert_ids),
            spec.d_model,
            act=ex.activation,
            sparse_grad=ex.sparse_grad,
            dtype=spec.torch_dtype,
            device=device,
        )
        scale = 1.0 / math.sqrt(spec.d_model)
        if seeded:  # else zeros: the caller imports every row
            bank.seed_rows(spec, expert_ids, {"u": scale, "v": scale})
        return bank

    def forward(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and self.u.requires_grad:
            u = F.embedding(ids.clamp(min=0), self.u, sparse=self.sparse_grad)  # [T, S, d]
            return self._combine(u, x, ids, weights)
        w = weights.to(x.dtype).contiguous()
        y = native.peer(x.contiguous(), ids.contiguous(), w, self.u, self.v, self.act_name)
        if y is not None:  # one pass over the rows, in C
            return y
        T, S = ids.shape
        step = max(1, GATHERED_PER_CHUNK // (max(S, 1) * self.d_model))
        buf = x.new_empty((min(T, step) * S, self.d_model))  # the chunks' gathered u rows
        out = []
        for a in range(0, T, step):
            i = ids[a : a + step]
            u = torch.index_select(self.u, 0, i.clamp(min=0).view(-1), out=buf[: i.numel()])
            u = u.view(*i.shape, -1)
            out.append(self._combine(u, x[a : a + step], i, weights[a : a + step]))
        return out[0] if len(out) == 1 else torch.cat(out)

    def _combine(self, u: torch.Tensor, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor):
        """``u``: the gathered rows [t, S, d] -> y [t, d]."""
        valid = ids >= 0
        s = torch.linalg.vecdot(u, x.unsqueeze(1))  # [t, S]; NOTE: 5x bmm's speed here
        h = self.act(s) * torch.where(valid, weights.to(s.dtype), 0)
        return F.embedding_bag(
            ids.clamp(min=0), self.v, per_sample_weights=h, mode="sum", sparse=self.sparse_grad
        )
