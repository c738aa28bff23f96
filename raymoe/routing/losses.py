"""Auxiliary losses and load statistics of one routing decision.

Shape letters: T tokens, E experts, S slots per token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def tokens_per_expert(ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """``ids``: [T, S] (-1 = empty) -> [E] int64 count of (token, slot) pairs per expert."""
    flat = ids.reshape(-1)
    return torch.bincount(flat[flat >= 0], minlength=num_experts)


def load_balancing_loss(probs: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Switch Transformer loss ``E * sum_i f_i P_i``.

    ``probs``: [T, E] router probabilities, ``ids``: [T, S] chosen experts; ``f_i`` is the
    share of tokens sent to expert i (summing to S over i, as in Mixtral's variant), ``P_i``
    the mean router probability of expert i.
    """
    T, E = probs.shape
    f = tokens_per_expert(ids, E).to(probs.dtype) / max(T, 1)
    return E * (f * probs.mean(0)).sum()


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE router z-loss: mean over tokens of ``logsumexp(logits)^2``. ``logits``: [T, E]."""
    return torch.logsumexp(logits.float(), dim=-1).square().mean()


@dataclass(frozen=True)
class LoadStats:
    """Load of one batch. ``tokens_per_expert``: [E] int64."""

    tokens_per_expert: torch.Tensor
    dropped_tokens: int

    @property
    def imbalance(self) -> float:
        """max / mean tokens per expert (1.0 is perfect balance)."""
        t = self.tokens_per_expert.double()
        mean = t.mean().item() if t.numel() else 0.0
        return t.max().item() / mean if mean > 0 else 1.0

    @property
    def entropy(self) -> float:
        """Entropy (nats) of the token share over experts; log(E) is perfect balance."""
        t = self.tokens_per_expert.double()
        total = t.sum()
        if total <= 0:
            return 0.0
        p = t[t > 0] / total
        return float(-(p * p.log()).sum())
