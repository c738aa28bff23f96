"""``MoELayer``: routing + one expert bank (+ shared experts), in process.

This module is the reference semantics of raymoe: a served pool must equal it numerically for
the same spec and weights. Its ``state_dict`` uses the neutral names of DESIGN §4.

Empty batches: a batch with zero tokens returns an empty output of the right shape (and empty
routing info); it is not an error.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from raymoe.config import PoolSpec, load_spec
from raymoe.errors import InvalidInputError, LayerIndexError, ShapeError
from raymoe.kernels import make_bank
from raymoe.kernels.activations import activation
from raymoe.routing import LoadStats, Routes, make_gate, tokens_per_expert
from raymoe.routing.base import seeded_parameter
from raymoe.validation import check_hidden, check_routes, check_token_ids


@dataclass
class MoEInfo:
    """What a forward pass decided. Shapes: T tokens, S slots, E experts.

    expert_ids: [T, S] int64 (-1 = empty slot); weights: [T, S];
    aux_loss: the sum of ``aux_losses`` (0 when no coefficient is set); load: per-expert counts.
    Soft routing routes slots, not tokens: its ids and weights are [B * slots, 1], one row
    per slot (its expert, weight 1).
    """

    expert_ids: torch.Tensor
    weights: torch.Tensor
    aux_losses: dict[str, torch.Tensor] = field(default_factory=dict)
    load: LoadStats | None = None

    @property
    def aux_loss(self) -> torch.Tensor:
        return sum(self.aux_losses.values(), torch.zeros(()))


class SharedExpert(nn.Module):
    """A gated FFN applied to every token: ``w_down (act(w_gate x) * (w_up x))``."""

    def __init__(self, spec: PoolSpec):
        super().__init__()
        assert spec.shared is not None
        H, d = spec.shared.hidden, spec.d_model
        act = spec.experts.activation if spec.experts.kind == "ffn" else "silu"
        self.act = activation(act)
        kw = {"dtype": spec.torch_dtype}
        self.w_gate = nn.Parameter(seeded_parameter(spec, "shared.w_gate", (H, d)).to(**kw))
        self.w_up = nn.Parameter(seeded_parameter(spec, "shared.w_up", (H, d)).to(**kw))
        self.w_down = nn.Parameter(
            seeded_parameter(spec, "shared.w_down", (d, H), scale=H**-0.5).to(**kw)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.act(x @ self.w_gate.T) * (x @ self.w_up.T)) @ self.w_down.T


class MoELayer(nn.Module):
    """An MoE layer described by a :class:`PoolSpec` (or a dict / YAML path of one).

    ``forward(x)`` takes ``x: [..., d]`` and returns ``[..., d]``. Optional arguments:
    ``token_ids`` ([T]) for hash routing; ``expert_ids`` and ``weights`` ([T, S]) to bypass the
    gate with client routes (-1 = empty slot); ``return_info=True`` to also get a
    :class:`MoEInfo`. Input is validated and bad input raises a typed raymoe error.
    """

    def __init__(
        self,
        spec: PoolSpec | dict | str | Path,
        *,
        device: torch.device | str = "cpu",
        experts: bool = True,
    ):
        super().__init__()
        self.spec = spec = load_spec(spec)
        self.router = make_gate(spec)
        # NOTE: experts=False builds the gate and shared experts only (what a router actor
        # holds); the routed experts then live in shards and forward() is unavailable.
        self.experts = make_bank(spec, device=device) if experts else None
        self.shared = SharedExpert(spec) if spec.shared else None
        self.shared_gate = None
        if spec.shared and spec.shared.gate:
            self.shared_gate = nn.Linear(spec.d_model, 1, bias=False, dtype=spec.torch_dtype)
            with torch.no_grad():
                self.shared_gate.weight.copy_(
                    seeded_parameter(spec, "shared_gate.weight", (1, spec.d_model))
                )
        self.router.to(device)
        if self.shared is not None:
            self.shared.to(device)
        if self.shared_gate is not None:
            self.shared_gate.to(device)

    @property
    def device(self) -> torch.device:
        owner = self.experts if self.experts is not None else self.router
        return next(iter(owner.parameters()), torch.empty(0)).device

    def forward(
        self,
        x: torch.Tensor,
        *,
        token_ids: torch.Tensor | None = None,
        expert_ids: torch.Tensor | None = None,
        weights: torch.Tensor | None = None,
        return_info: bool = False,
    ):
        spec = self.spec
        T = check_hidden(
            x,
            d_model=spec.d_model,
            dtype=spec.torch_dtype,
            device=self.device,
            allow_nonfinite=spec.limits.allow_nonfinite,
        )
        flat = x.view(T, spec.d_model)
        kw = {"token_ids": token_ids, "expert_ids": expert_ids, "weights": weights}
        if self.router.mixes:
            y, routes = self._mixed(flat, x, **kw)
        else:
            routes = self.route(flat, x, **kw)
            y = self.experts(flat, routes.ids, routes.weights) if T else torch.zeros_like(flat)
        y = y + self.shared_output(flat)
        out = y.view(x.shape)
        if not return_info:
            return out
        load = LoadStats(tokens_per_expert(routes.ids, spec.num_experts), routes.dropped)
        return out, MoEInfo(routes.ids, routes.weights, routes.aux_losses, load)

    def _mixed(self, flat, x, **kw) -> tuple[torch.Tensor, Routes]:
        """Soft routing: the experts compute the slots, mixes of each sequence's tokens."""
        self.check_route_inputs(flat, x, **kw)
        if flat.shape[0] == 0:
            empty = torch.zeros((0, 1), device=flat.device)
            return torch.zeros_like(flat), Routes(empty.long(), empty)
        mix = self.router.mix(x)
        y = self.experts(mix.x, mix.routes.ids, mix.routes.weights)
        return self.router.unmix(y, mix), mix.routes

    def check_route_inputs(self, flat, x, *, token_ids=None, expert_ids=None, weights=None):
        """Raise the typed error :meth:`route` would raise for these inputs, gating nothing."""
        T = flat.shape[0]
        if self.router.mixes and (expert_ids is not None or weights is not None):
            raise InvalidInputError(
                f"{self.spec.routing.kind} routing mixes tokens into slots: no client routes"
            )
        if expert_ids is not None or weights is not None:
            check_routes(
                expert_ids,
                weights,
                tokens=T,
                num_experts=self.spec.num_experts,
                device=self.device,
                removed=self.router.removed,
            )
            return
        gate = self.router
        if gate.needs_token_ids:
            check_token_ids(token_ids, tokens=T, vocab_size=gate.vocab_size, device=self.device)
        if gate.needs_sequences and x.dim() != 3:
            raise ShapeError(
                f"{self.spec.routing.kind} routing works per sequence: x must be [B, L, d], "
                f"got {list(x.shape)}"
            )

    def route(self, flat, x, *, token_ids=None, expert_ids=None, weights=None) -> Routes:
        """Gate ``flat`` ([T, d]) or validate client routes; ``x`` is the caller's tensor."""
        T = flat.shape[0]
        self.check_route_inputs(
            flat, x, token_ids=token_ids, expert_ids=expert_ids, weights=weights
        )
        if expert_ids is not None or weights is not None:
            return Routes(expert_ids.long(), weights.to(torch.float32))
        gate = self.router
        seq_len = x.shape[1] if gate.needs_sequences else None
        if T == 0:
            empty = torch.zeros((0, self.spec.slots), device=flat.device)
            return Routes(empty.long(), empty)
        return gate(flat, token_ids=token_ids, seq_len=seq_len)

    def shared_output(self, flat: torch.Tensor) -> torch.Tensor | float:
        """The shared experts' contribution for ``flat`` ([T, d]), or 0 without them."""
        if self.shared is None:
            return 0.0
        out = self.shared(flat)
        if self.shared_gate is not None:
            out = torch.sigmoid(self.shared_gate(flat)) * out
        return out


class MoEStack(nn.Module):
    """The MoE layers of a multi-layer spec (any spec: a single-layer one is one layer):
    ``layers[l]`` is ``MoELayer(spec.layer(l))``, and ``forward(x, layer=l)`` runs it.

    Its ``state_dict`` is the weights format of a multi-layer pool: layer ``l``'s neutral
    names under ``layers.{l}.`` (``layers.3.experts.w_up``, ``layers.3.router.weight``).
    """

    def __init__(self, spec: PoolSpec | dict | str | Path, *, device: torch.device | str = "cpu"):
        super().__init__()
        self.spec = spec = load_spec(spec)
        self.layers = nn.ModuleList(
            MoELayer(spec.layer(i), device=device) for i in range(spec.num_layers)
        )

    def forward(self, x: torch.Tensor, *, layer: int = 0, **kwargs):
        check_layer(self.spec, layer)
        return self.layers[layer](x, **kwargs)


def check_layer(spec: PoolSpec, layer) -> int:
    """``layer`` as an int, or a :class:`LayerIndexError` naming the valid range."""
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < spec.num_layers:
        raise LayerIndexError(
            f"layer {layer!r} is not in [0, {spec.num_layers}) (pool {spec.name!r})"
        )
    return layer
