"""``RemoteMoE``: an MoE layer whose gate lives in the client model and whose experts live in a
served pool, with autograd through the pool.

    moe = raymoe.RemoteMoE(pool, layer=0)      # the gate starts as the pool's
    y = moe(x)                                 # gate here, experts on the shards
    (y.square().mean()).backward()             # grads of x and of moe's gate parameters;
    pool.expert_grads(ids)                     # the experts' gradients add up on the shards

The forward gates ``x`` with the module's own gate (trained by the user's optimizer) and sends
the routes to the pool as client routes; the backward sends the output gradient to the shards,
which return the gradients of ``x`` and of the routing weights. With autograd on, each shard
keeps its forward's activations for the backward (a bounded window,
``shards.activation_window_mb``); without them (``keep_activations=False``, or evicted) it
recomputes its part of the forward.
"""

from __future__ import annotations

import secrets

import numpy as np
import torch
from torch import nn

from raymoe._private.data.gates import layer_weights
from raymoe.config import PoolSpec
from raymoe.layer import MoEInfo, MoELayer, check_layer
from raymoe.routing import LoadStats, tokens_per_expert
from raymoe.validation import check_hidden


class _PoolExperts(torch.autograd.Function):
    """y = the pool's routed experts of ``x`` under routes (``ids``, ``w``)."""

    @staticmethod
    def forward(ctx, x, w, pool, layer, ids, keep):
        ctx.save_for_backward(x, w, ids)
        ctx.pool, ctx.layer, ctx.keep = pool, layer, keep
        # NOTE: not pool.forward: that adds the pool's shared experts, and this module's own
        # (trained here) are added by RemoteMoE
        return pool.train_forward(x.detach(), ids, w.detach(), layer=layer, keep=keep)

    @staticmethod
    def backward(ctx, grad_y):
        x, w, ids = ctx.saved_tensors
        gx, gw = ctx.pool.backward(
            x.detach(), ids, w.detach(), grad_y.contiguous(), layer=ctx.layer, keep=ctx.keep
        )
        return gx.to(x.dtype), gw.to(w.dtype), None, None, None, None


class RemoteMoE(nn.Module):
    """MoE layer ``layer`` of ``pool``: gate and aux losses here, routed experts in the pool.

    ``forward(x, token_ids=None, return_info=False)`` as :class:`~raymoe.MoELayer`'s. The
    gate's parameters (``self.gate.router``) start as the pool's and are this module's to
    train; the experts' gradients add up on the pool's shards (``pool.expert_grads``,
    ``pool.zero_grad``, or ``raymoe.optim.PoolOptimizer``). ``keep_activations``: the
    shards keep the activations of forwards under autograd for their backward, instead of
    recomputing them. Shared experts are computed here, like the gate (and trained with
    it). With ``soft`` routing, the gate mixes each sequence's tokens into slots here, the
    pool's experts compute the slots, and their outputs are mixed back here.
    """

    def __init__(self, pool, layer: int = 0, *, keep_activations: bool = True):
        super().__init__()
        spec = PoolSpec.from_dict(pool.describe().spec)
        self.pool, self.layer = pool, check_layer(spec, layer)
        own = spec.layer(layer)
        self.gate = MoELayer(own, experts=False)
        self.spec = own
        self.keep_activations = keep_activations
        self._load_gate(spec, keep={})

    def _load_gate(self, spec: PoolSpec, keep: dict[str, torch.Tensor]) -> None:
        """Load the pool's gate weights, then ``keep`` over them where they overlap."""
        weights = layer_weights(spec, self.pool.gate_weights(), self.layer)
        state = self.gate.state_dict()
        loaded = {k: torch.as_tensor(np.array(v)) for k, v in weights.items() if k in state}
        for k, old in keep.items():
            new = loaded.get(k, state[k])
            if new.dim() == old.dim():
                at = tuple(slice(0, min(a, b)) for a, b in zip(old.shape, new.shape, strict=True))
                new[at] = old[at]
            loaded[k] = new
        self.gate.load_state_dict({**state, **loaded})

    def sync(self) -> bool:
        """Follow the pool's experts after ``add_experts`` / ``remove_experts``: the gate
        grows to the pool's experts; its rows of existing experts keep their trained values,
        new rows (or sub-keys) take the pool's. -> whether it changed; then the gate has new
        parameters, and its optimizer must be made again."""
        spec = PoolSpec.from_dict(self.pool.describe().spec)
        own = spec.layer(self.layer)
        if own == self.spec:
            return False
        trained = {k: v.detach().clone() for k, v in self.gate.state_dict().items()}
        self.gate = MoELayer(own, experts=False)
        self.spec = own
        self._load_gate(spec, keep=trained)
        return True

    def _experts(self, inputs: torch.Tensor, routes) -> torch.Tensor:
        """The pool's routed experts of ``inputs`` ([n, d]) under ``routes``."""
        keep = None
        if self.keep_activations and torch.is_grad_enabled():
            keep = secrets.randbits(63)  # this forward's key on the shards
        return _PoolExperts.apply(inputs, routes.weights, self.pool, self.layer, routes.ids, keep)

    def forward(self, x: torch.Tensor, *, token_ids=None, return_info: bool = False):
        spec = self.spec
        T = check_hidden(x, d_model=spec.d_model, dtype=spec.torch_dtype)
        flat = x.reshape(T, spec.d_model)
        gate = self.gate
        if gate.router.mixes and T:  # soft: slots mixed here, computed there, mixed back
            gate.check_route_inputs(flat, x, token_ids=token_ids)
            mix = gate.router.mix(x)
            routes = mix.routes
            y = gate.router.unmix(self._experts(mix.x, routes), mix)
        else:
            routes = gate.route(flat, x, token_ids=token_ids)
            y = self._experts(flat, routes) if T else torch.zeros_like(flat)
        out = (y + gate.shared_output(flat)).view(x.shape)
        if not return_info:
            return out
        load = LoadStats(tokens_per_expert(routes.ids, spec.num_experts), routes.dropped)
        return out, MoEInfo(routes.ids, routes.weights, routes.aux_losses, load)
