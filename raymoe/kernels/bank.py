"""The expert-bank interface and its registry.

An *expert bank* holds ``E_local`` experts of one kind as stacked tensors and computes

    y[t] = sum_s weights[t, s] * E_{ids[t, s]}(x[t])        (ids are local, -1 = empty slot)

for a whole batch at once, forward and backward. The in-process :class:`raymoe.MoELayer` owns
one bank with every expert; a shard actor owns one with its subset, addressed by local index.
Parameters use the neutral names of DESIGN §4 without the ``experts.`` prefix.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch
from torch import nn

from raymoe.config import PoolSpec
from raymoe.kernels.init import init_rows


class ExpertBank(nn.Module):
    """Base class: stacked expert parameters ``[E_local, ...]`` and a batched forward."""

    kind: ClassVar[str]

    def __init__(self, num_experts: int, d_model: int):
        super().__init__()
        self.num_experts = num_experts
        self.d_model = d_model

    def forward(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """``x``: [T, d], ``ids``: [T, S] local ids (-1 = empty), ``weights``: [T, S] -> [T, d]."""
        raise NotImplementedError

    @torch.no_grad()
    def seed_rows(self, spec: PoolSpec, expert_ids: torch.Tensor, scale: dict[str, float]) -> None:
        """Fill every parameter with the spec's deterministic init of global ``expert_ids``."""
        for name, p in self.named_parameters():
            p.copy_(
                init_rows(
                    f"experts.{name}",
                    expert_ids,
                    tuple(p.shape[1:]),
                    seed=spec.seed,
                    scale=scale[name],
                    dtype=p.dtype,
                    device=p.device,
                )
            )

    def row_bytes(self) -> int:
        """Bytes of one expert's parameters."""
        return sum(p[0].numel() * p.element_size() for p in self.parameters())

    @torch.no_grad()
    def export_rows(self, local: torch.Tensor) -> dict[str, torch.Tensor]:
        """The parameters of experts ``local`` ([n]) as ``{name: [n, ...]}`` (copies)."""
        return {name: p[local].clone() for name, p in self.named_parameters()}

    @torch.no_grad()
    def import_rows(self, local: torch.Tensor, rows: dict[str, torch.Tensor]) -> None:
        """Overwrite experts ``local`` with ``rows`` (as returned by :meth:`export_rows`)."""
        params = dict(self.named_parameters())
        if set(rows) != set(params):
            raise KeyError(f"expected tensors {sorted(params)}, got {sorted(rows)}")
        for name, p in params.items():
            p[local] = rows[name].to(dtype=p.dtype, device=p.device)


BANKS: dict[str, type[ExpertBank]] = {}


def register_bank(cls: type[ExpertBank]) -> type[ExpertBank]:
    BANKS[cls.kind] = cls
    return cls


def make_bank(
    spec: PoolSpec,
    expert_ids: torch.Tensor | None = None,
    *,
    device: torch.device | str = "cpu",
    seeded: bool = True,
) -> ExpertBank:
    """A bank of ``spec``'s expert kind holding global experts ``expert_ids`` (default: all).

    Weights are the spec's deterministic initialisation of exactly those experts (zeros with
    ``seeded=False``, for a caller that overwrites every row anyway).
    """
    try:
        cls = BANKS[spec.experts.kind]
    except KeyError:
        raise ValueError(
            f"unknown expert kind {spec.experts.kind!r}; valid: {sorted(BANKS)}"
        ) from None
    if expert_ids is None:
        expert_ids = torch.arange(spec.num_experts)
    return cls.from_spec(spec, expert_ids, device=device, seeded=seeded)


def expert_bytes(spec: PoolSpec) -> int:
    """Bytes of one expert's weights (what copying one replica moves)."""
    bank = make_bank(spec, torch.zeros(1, dtype=torch.int64), seeded=False)
    return sum(p.numel() * p.element_size() for p in bank.parameters())


def seeded_bank(
    spec: PoolSpec, flat_ids: torch.Tensor, *, device: torch.device | str = "cpu"
) -> ExpertBank:
    """A bank holding the seeded init of flat ids ``flat_ids`` of a pool of any number of
    layers: each expert as ``MoELayer(spec.layer(l))`` draws it."""
    if not spec.multi_layer:
        return make_bank(spec, flat_ids, device=device)
    bank = make_bank(spec, flat_ids, device=device, seeded=False)
    ids = flat_ids.cpu().numpy()
    layer_of, expert_of = spec.flat.layer_of[ids], spec.flat.expert_of[ids]
    for layer in np.unique(layer_of).tolist():
        at = np.flatnonzero(layer_of == layer)
        own = make_bank(spec.layer(layer), torch.as_tensor(expert_of[at]), device=device)
        bank.import_rows(torch.as_tensor(at), own.export_rows(torch.arange(len(at))))
    return bank
