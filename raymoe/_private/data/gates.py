"""What a router holds of a pool's weights: every layer's gate and shared experts (an
:class:`~raymoe.layer.MoELayer` without routed experts per layer), and the map from each
layer's expert ids to the pool's flat ids (:mod:`raymoe.config.layers`)."""

from __future__ import annotations

import numpy as np
import torch

from raymoe.config import PoolSpec
from raymoe.layer import MoELayer


def prefix(spec: PoolSpec, layer: int) -> str:
    """The prefix of layer ``layer``'s weight names: none for a single-layer pool,
    ``layers.{l}.`` for a multi-layer one (the names of :class:`~raymoe.layer.MoEStack`)."""
    return f"layers.{layer}." if spec.multi_layer else ""


def layer_weights(spec: PoolSpec, weights: dict, layer: int) -> dict:
    """Layer ``layer``'s entries of a pool's ``weights``, by their neutral names."""
    p = prefix(spec, layer)
    if not p:
        return dict(weights)
    return {k.removeprefix(p): v for k, v in weights.items() if k.startswith(p)}


def pool_weights(spec: PoolSpec, per_layer: list[dict]) -> dict:
    """The inverse of :func:`layer_weights`: one dict of every layer's weights."""
    return {prefix(spec, i) + k: v for i, w in enumerate(per_layer) for k, v in w.items()}


class Gates:
    """Shapes: T tokens, S slots. ``layers[l]`` gates layer ``l``; :meth:`flat` maps its
    routes to flat ids."""

    def __init__(self, spec: PoolSpec, weights: dict | None = None, old: Gates | None = None):
        """``weights`` (pool names) if given; else ``old``'s, for each layer whose expert
        count did not change; else the seeded init."""
        self.spec = spec
        self.layers: list[MoELayer] = []
        for i in range(spec.num_layers):
            layer = MoELayer(spec.layer(i), experts=False).eval()
            own = layer.state_dict()
            if weights:
                state = layer_weights(spec, weights, i)
            elif old is not None and i < len(old.layers) and _same_size(old.layers[i], layer):
                state = old.layers[i].state_dict()
            else:
                state = None
            if state is not None:
                tensors = {k: torch.as_tensor(np.asarray(v)) for k, v in state.items() if k in own}
                layer.load_state_dict(tensors, strict=True)
            self.layers.append(layer)
        self._flat = (
            [torch.as_tensor(spec.flat.ids(i)) for i in range(spec.num_layers)]
            if spec.multi_layer
            else None
        )

    def flat(self, layer: int, ids: torch.Tensor) -> torch.Tensor:
        """[T, S] layer ``layer``'s expert ids -> flat ids (-1 stays -1)."""
        if self._flat is None:
            return ids
        return torch.where(ids >= 0, self._flat[layer][ids.clamp(min=0)], ids)

    def state_dict(self) -> dict[str, np.ndarray]:
        """Every layer's gate and shared-expert weights, by pool names (copies)."""
        own = [g.state_dict() for g in self.layers]
        copies = [{k: v.detach().numpy().copy() for k, v in w.items()} for w in own]
        return pool_weights(self.spec, copies)


def _same_size(a: MoELayer, b: MoELayer) -> bool:
    return a.spec.num_experts == b.spec.num_experts


def split_weights(spec: PoolSpec, weights: dict) -> tuple[dict, dict]:
    """A pool's ``weights`` -> (expert rows by bank name, stacked over the flat ids; the
    gate and shared-expert weights by pool names). Every layer's experts, or none."""
    from raymoe.errors import ConfigError

    per_layer = [layer_weights(spec, weights, i) for i in range(spec.num_layers)]
    rows = [{k[8:]: v for k, v in w.items() if k.startswith("experts.")} for w in per_layer]
    gate = pool_weights(
        spec, [{k: v for k, v in w.items() if not k.startswith("experts.")} for w in per_layer]
    )
    if not any(rows):
        return {}, gate
    if not spec.multi_layer:
        return rows[0], gate
    missing = [i for i, r in enumerate(rows) if not r]
    if missing:
        raise ConfigError(f"expert weights of layers {missing[:5]} missing (give all or none)")
    flat = {}
    for name in rows[0]:
        first = np.asarray(rows[0][name])
        out = np.zeros((spec.num_experts, *first.shape[1:]), first.dtype)
        for i, r in enumerate(rows):
            out[spec.flat.ids(i)] = np.asarray(r[name])
        flat[name] = out
    return flat, gate
