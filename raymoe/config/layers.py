"""Multi-layer pools: the ``layers`` section, and how (layer, expert) maps to a flat id.

A pool can hold the MoE layers of a whole model. Every layer has its own gate, shared experts
and routed experts; all layers' experts have the pool's expert kind and shapes, so one shard
bank holds experts of any layer. Places, replicas and the placement use **flat ids**: layer
``l``'s expert ``e`` is flat id ``FlatIds.ids(l)[e]``. Flat ids are laid out in *blocks*
``(layer, count)`` in creation order: first one block per layer, then one per
``add_experts`` call, so growing a layer never renumbers another's experts (ids are stable).
"""

from __future__ import annotations

import numpy as np
from pydantic import NonNegativeInt, PositiveInt

from raymoe.config.routing import RoutingSpec, _Section
from raymoe.config.sections import SharedSpec

MAX_LAYERS = 256


class LayerSpec(_Section):
    """One layer's differences from the pool's template (its ``experts``, ``routing`` and
    ``shared`` sections); ``removed`` holds the layer's removed experts (layer ids)."""

    num_experts: PositiveInt | None = None
    removed: tuple[NonNegativeInt, ...] = ()
    routing: RoutingSpec | None = None
    shared: SharedSpec | None = None


class FlatIds:
    """The flat id space of a pool's layers, from its blocks ``(layer, count)``.

    layer_of: [E] the layer of each flat id; expert_of: [E] its id within that layer.
    """

    def __init__(self, blocks: tuple[tuple[int, int], ...], num_layers: int):
        layers = np.asarray([b[0] for b in blocks], np.int64)
        counts = np.asarray([b[1] for b in blocks], np.int64)
        self.num_layers = num_layers
        self.layer_of = np.repeat(layers, counts)
        starts = np.zeros(num_layers, np.int64)  # a block's first id within its layer
        first = np.empty(len(blocks), np.int64)
        for i, (layer, count) in enumerate(blocks):
            first[i], starts[layer] = starts[layer], starts[layer] + count
        block_start = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
        within = np.arange(int(counts.sum())) - np.repeat(block_start, counts)
        self.expert_of = np.repeat(first, counts) + within
        self.sizes = starts  # [L] experts per layer
        order = np.lexsort((self.expert_of, self.layer_of))
        self._ptr = np.concatenate([[0], np.cumsum(starts)])
        self._ids = order  # flat ids sorted by (layer, expert)

    @property
    def num_experts(self) -> int:
        return len(self.layer_of)

    def ids(self, layer: int) -> np.ndarray:
        """[E_l] the flat id of each of ``layer``'s experts, in expert order."""
        return self._ids[self._ptr[layer] : self._ptr[layer + 1]]

    def flat(self, layer: int, experts) -> np.ndarray:
        """Flat ids of ``layer``'s ``experts`` (layer ids, which must exist)."""
        return self.ids(layer)[np.asarray(experts, np.int64)]
