"""Small spec builders shared by the tests."""

from __future__ import annotations

import copy

import torch

from raymoe import MoELayer, PoolSpec


def spec_dict(routing: dict, *, E: int = 8, d: int = 16, H: int = 24, kind: str = "ffn",
              shared: dict | None = None, **experts) -> dict:  # fmt: skip
    ex = {"kind": kind, "num_experts": E}
    if kind == "ffn":
        ex["hidden"] = H
    ex.update(experts)
    out = {"d_model": d, "experts": ex, "routing": copy.deepcopy(routing)}
    if shared:
        out["shared"] = shared
    return out


def make_layer(routing: dict, seed: int = 0, **kw) -> MoELayer:
    spec = PoolSpec.from_dict({**spec_dict(routing, **kw), "seed": seed})
    layer = MoELayer(spec)
    with torch.no_grad():  # make optional buffers non-trivial
        cb = getattr(layer.router, "correction_bias", None)
        if cb is not None:
            cb.copy_(torch.randn(cb.shape, generator=torch.Generator().manual_seed(seed)) * 0.1)
    return layer


def state(layer: MoELayer) -> dict:
    return {k: v.detach().clone() for k, v in layer.state_dict().items()}
