"""Router: the plain class behind a router actor (``ray.remote`` is applied in actors.py).

A router validates a request, gates it (or takes the client's routes), splits it into one
sub-batch per shard under its current placement, sends the sub-batches through a
:class:`ShardCalls` transport, and combines the partial sums with the shared experts' output.
Tensors cross actor boundaries as numpy arrays.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import torch

from raymoe._private.dispatch import combine, split_by_shard
from raymoe._private.placement import Placement
from raymoe.config import PoolSpec
from raymoe.layer import MoELayer
from raymoe.validation import check_hidden


class ShardCalls(Protocol):
    """The transport to shards (Ray object store by default). Never called with no work."""

    def compute_many(
        self, calls: list[tuple[int, np.ndarray, np.ndarray, np.ndarray]]
    ) -> list[np.ndarray]:
        """``calls``: (shard, x [t, d], local ids [t, S], weights [t, S]) -> partial sums."""
        ...


class Router:
    def __init__(
        self,
        spec: PoolSpec,
        shards: ShardCalls,
        placement: Placement,
        weights: dict[str, np.ndarray] | None = None,
    ):
        self.spec = spec
        self.shards = shards
        self.placement = placement
        self.layer = MoELayer(spec, experts=False).eval()
        if weights:
            own = self.layer.state_dict()
            self.layer.load_state_dict(
                {k: torch.as_tensor(v) for k, v in weights.items() if k in own}, strict=True
            )

    def set_placement(self, placement: Placement) -> None:
        self.placement = placement

    @torch.no_grad()
    def forward(
        self,
        x: np.ndarray,
        expert_ids: np.ndarray | None = None,
        weights: np.ndarray | None = None,
        token_ids: np.ndarray | None = None,
    ) -> np.ndarray:
        """``x`` [..., d] -> [..., d]; optional client routes [T, S] or token ids [T]."""
        spec = self.spec
        xt = _tensor(x)
        check_hidden(
            xt, d_model=spec.d_model, dtype=spec.torch_dtype,
            allow_nonfinite=spec.limits.allow_nonfinite,
            max_tokens=spec.limits.max_request_tokens,
        )  # fmt: skip
        flat = xt.reshape(-1, spec.d_model)
        routes = self.layer.route(
            flat, xt, token_ids=_tensor(token_ids), expert_ids=_tensor(expert_ids),
            weights=_tensor(weights),
        )  # fmt: skip
        subs = split_by_shard(routes.ids, routes.weights, self.placement)
        calls = [(s.shard, flat[s.tokens].numpy(), s.local_ids.numpy(),
                  s.weights.to(torch.float32).numpy()) for s in subs]  # fmt: skip
        partials = self.shards.compute_many(calls) if calls else []
        parts = [(s, torch.from_numpy(p)) for s, p in zip(subs, partials, strict=True)]
        y = combine(flat.shape[0], spec.d_model, parts, flat) + self.layer.shared_output(flat)
        return y.reshape(xt.shape).numpy()

    def describe(self) -> dict:
        p = self.placement
        return {
            "spec": self.spec.model_dump(mode="json"),
            "placement_version": p.version,
            "shards": p.num_shards,
            "experts_per_shard": np.bincount(p.shard.numpy(), minlength=p.num_shards).tolist(),
        }


def _tensor(a: np.ndarray | torch.Tensor | None) -> torch.Tensor | None:
    if a is None or isinstance(a, torch.Tensor):
        return a
    if not isinstance(a, np.ndarray):
        return a  # let validation name the wrong type
    return torch.from_numpy(np.ascontiguousarray(a))
