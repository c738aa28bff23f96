"""Soft MoE (Puigcerver et al. 2023): experts process *slots*, soft mixes of a sequence's
tokens, instead of tokens.

Per sequence ``X`` [L, d], with ``n = E * p`` slots (``p`` per expert) and the gate's
``router.weight`` ``Phi`` [n, d]:

    logits   = X Phi^T                      [L, n]   (the live experts' slots)
    dispatch = softmax over the L tokens    (each slot: a convex mix of the tokens)
    combine  = softmax over the n slots     (each token: a convex mix of the slot outputs)
    slots    = dispatch^T X                 [n, d]; slot s goes to expert s // p
    Y        = combine  f(slots)            [L, d]

The experts run on slot rows like on tokens (one expert per row, weight 1), so shards and
transports need nothing new: :meth:`SoftGate.mix` makes the rows, :meth:`SoftGate.unmix`
combines their outputs back into the sequence.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from raymoe.config import PoolSpec
from raymoe.routing.base import Gate, Routes, register_gate, seeded_rows, softmax


@dataclass
class Mix:
    """Slots of ``B`` sequences: ``x`` [B*n, d] their inputs, ``routes`` [B*n, 1] the expert
    of each (weight 1), ``combine`` [B, L, n] the weights that mix them back."""

    x: torch.Tensor
    routes: Routes
    combine: torch.Tensor


@register_gate
class SoftGate(Gate):
    kind = "soft"
    needs_sequences = True
    batch_coupled = True
    mixes = True

    def __init__(self, spec: PoolSpec):
        super().__init__(spec)
        self.per_expert = spec.routing.slots_per_expert
        n = spec.num_experts * self.per_expert
        self.weight = seeded_rows(spec, "router.weight", (n, spec.d_model))
        expert = torch.arange(n) // self.per_expert
        live = torch.ones(n, dtype=torch.bool) if self.removed is None else ~self.removed[expert]
        # the slots of live experts (a removed expert's slots are as if deleted)
        self.register_buffer("slots", live.nonzero().squeeze(1), persistent=False)
        self.register_buffer("slot_expert", expert[live], persistent=False)

    def mix(self, x: torch.Tensor) -> Mix:
        """``x`` [B, L, d] -> the slots of its sequences."""
        B, _, d = x.shape
        phi = self.weight[self.slots].float()
        logits = torch.einsum("bld,nd->bln", x.float(), phi)
        slots = torch.einsum("bln,bld->bnd", softmax(logits, 1), x.float())
        n = phi.shape[0]
        ids = self.slot_expert.to(x.device).repeat(B).unsqueeze(1)
        routes = Routes(ids, torch.ones(B * n, 1, device=x.device))
        return Mix(slots.reshape(B * n, d).to(x.dtype), routes, softmax(logits, 2))

    def unmix(self, y: torch.Tensor, mix: Mix) -> torch.Tensor:
        """``y`` [B*n, d], the slots' outputs -> [B*L, d], each token's mix of them."""
        B, L, n = mix.combine.shape
        out = torch.einsum("bln,bnd->bld", mix.combine, y.reshape(B, n, -1).float())
        return out.reshape(B * L, -1).to(y.dtype)

    def forward(self, x, *, token_ids=None, seq_len=None) -> Routes:
        raise TypeError("soft routing routes slots, not tokens: use mix() and unmix()")
