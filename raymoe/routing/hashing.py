"""Hash routing (Roller et al. 2021): a fixed, balanced random map token id -> expert."""

from __future__ import annotations

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


@register_gate
class HashGate(Gate):
    kind = "hash"
    needs_token_ids = True

    def __init__(self, spec: PoolSpec):
        super().__init__(spec)
        r = spec.routing
        assert isinstance(r, HashRouting)
        self.vocab_size = r.vocab_size
        self.register_buffer(
            "hash_table", balanced_hash_table(r.vocab_size, spec.num_experts, r.seed)
        )

    def forward(self, x, *, token_ids=None, seq_len=None) -> Routes:
        assert token_ids is not None, "validated at the layer boundary"
        ids = self.hash_table[token_ids].unsqueeze(1)
        return Routes(ids, torch.ones(ids.shape, dtype=torch.float32, device=x.device))
