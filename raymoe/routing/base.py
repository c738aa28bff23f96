"""The gate interface: hidden states -> (expert ids, weights), plus auxiliary losses.

Glossary: a *gate* is the pure routing function (it lives in the router actor of a pool and in
every :class:`raymoe.MoELayer`); *routes* are its output. Expert ids are global, ``-1`` marks an
empty slot (a token dropped by capacity, or padding of a variable number of experts).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from raymoe.config import PoolSpec
from raymoe.routing.losses import load_balancing_loss, router_z_loss

SMALL_SOFTMAX = 1 << 15  # elements: below this, softmax() runs on the calling thread
LOG2_E = 1.4426950408889634


def softmax(t: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """``t.softmax(dim)``. On a small tensor it is computed as ``exp2`` of the scaled
    differences over their sum: torch's softmax (and ``exp``) hand even a few hundred
    elements to MKL's vector math, whose OpenMP threads then spin for ~4 ms of a core
    (measured here), a core a pool's other processes on the same machine were waiting for.
    MoELayer and the pool both gate through this, so their results stay equal."""
    if t.numel() >= SMALL_SOFTMAX:
        return t.softmax(dim)
    e = torch.exp2((t - t.amax(dim, keepdim=True)) * LOG2_E)
    return e / e.sum(dim, keepdim=True)


def removed_mask(spec: PoolSpec) -> torch.Tensor | None:
    """[E] bool, True for a (layer) spec's removed experts; None when none are."""
    gone = list(spec.experts.removed)
    if not gone:
        return None
    out = torch.zeros(spec.num_experts, dtype=torch.bool)
    out[gone] = True
    return out


@dataclass
class Routes:
    """One routing decision. Shapes: T tokens, S slots.

    ids:        [T, S] int64 global expert ids, -1 = empty slot
    weights:    [T, S] combine weights, 0 on empty slots
    aux_losses: name -> scalar, already multiplied by the spec's coefficients
    dropped:    tokens that got no expert at all
    """

    ids: torch.Tensor
    weights: torch.Tensor
    aux_losses: dict[str, torch.Tensor] = field(default_factory=dict)
    dropped: int = 0


class Gate(nn.Module):
    """Base class of the routing kinds; subclasses register under their spec ``kind``."""

    kind: ClassVar[str]
    needs_token_ids: ClassVar[bool] = False
    needs_sequences: bool = False
    # NOTE: a batch-coupled gate's choice for a token depends on the other tokens of the batch
    # (capacity, expert choice): a router gates each request of a coalesced batch on its own.
    batch_coupled: ClassVar[bool] = False
    # NOTE: a mixing gate (soft routing) sends mixes of tokens ("slots") to the experts, not
    # tokens: ``mix(x)`` makes them, ``unmix(y, mix)`` combines their outputs back
    mixes: ClassVar[bool] = False

    def __init__(self, spec: PoolSpec):
        super().__init__()
        self.num_experts = spec.num_experts
        self.d_model = spec.d_model
        # [E] bool, True for removed experts (never selected); None when none are
        self.register_buffer("removed", removed_mask(spec), persistent=False)
        self.live = spec.experts.live  # experts not removed
        self.aux_loss_coef = spec.routing.aux_loss_coef
        self.z_loss_coef = spec.routing.z_loss_coef

    def forward(
        self,
        x: torch.Tensor,
        *,
        token_ids: torch.Tensor | None = None,
        seq_len: int | None = None,
    ) -> Routes:
        """``x``: [T, d]; ``token_ids``: [T] for hash routing; ``seq_len`` when x is [B*L, d]."""
        raise NotImplementedError

    def _aux_losses(
        self, logits: torch.Tensor, probs: torch.Tensor, ids: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Switch load-balancing and z-loss, computed only when their coefficient is set."""
        out = {}
        if self.aux_loss_coef:
            out["load_balancing"] = self.aux_loss_coef * load_balancing_loss(probs, ids)
        if self.z_loss_coef:
            out["z_loss"] = self.z_loss_coef * router_z_loss(logits)
        return out


GATES: dict[str, type[Gate]] = {}


def register_gate(cls: type[Gate]) -> type[Gate]:
    GATES[cls.kind] = cls
    return cls


def make_gate(spec: PoolSpec) -> Gate:
    kind = spec.routing.kind
    try:
        cls = GATES[kind]
    except KeyError:
        raise ValueError(f"unknown routing kind {kind!r}; valid: {sorted(GATES)}") from None
    return cls(spec)


def seeded_parameter(
    spec: PoolSpec, name: str, shape: tuple[int, ...], scale: float | None = None
) -> nn.Parameter:
    """A router parameter with the spec's deterministic initialisation (see kernels.init)."""
    from raymoe.kernels.init import init_tensor

    if scale is None:
        scale = spec.d_model**-0.5
    return nn.Parameter(init_tensor(name, shape, seed=spec.seed, scale=scale, dtype=torch.float32))


def seeded_rows(
    spec: PoolSpec, name: str, shape: tuple[int, ...], scale: float | None = None
) -> nn.Parameter:
    """A router parameter stacked over experts (``shape[0]`` rows), each row drawn by its
    index: the rows of experts ``a..b`` are the same whatever the expert count, so a pool
    grown at runtime holds exactly the gate of ``MoELayer`` of its grown spec."""
    return nn.Parameter(gate_rows(spec, name, torch.arange(shape[0]), shape[1:], scale))


def gate_rows(
    spec: PoolSpec,
    name: str,
    rows: torch.Tensor,
    shape: tuple[int, ...],
    scale: float | None = None,
) -> torch.Tensor:
    """The seeded rows ``rows`` ([n]) of the stacked router parameter ``name``: [n, *shape]."""
    from raymoe.kernels.init import init_rows

    scale = spec.d_model**-0.5 if scale is None else scale
    return init_rows(name, rows, shape, seed=spec.seed, scale=scale, dtype=torch.float32)
