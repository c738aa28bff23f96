"""Serving on Ray: ``serve`` a pool, ``connect`` to one, and the ``PoolHandle`` to use it."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import ray
import torch

from raymoe._private import actors
from raymoe._private.placement import contiguous
from raymoe.config import PoolSpec, ProductKeyRouting, load_spec
from raymoe.errors import PoolNotFoundError, RaymoeError


class PoolHandle:
    """A client of one pool; safe to pass to other Ray tasks and actors."""

    def __init__(self, name: str, routers: list, shards: list | None = None, pinned=()):
        self.name = name
        self._routers = routers
        self._shards = shards or []
        self._pinned = list(pinned)  # weight rows a restarting shard reloads
        self._next = itertools.count()

    def forward_async(self, x, *, expert_ids=None, weights=None, token_ids=None):
        """Start a forward pass; returns a Ray ObjectRef of the numpy result."""
        router = self._routers[next(self._next) % len(self._routers)]
        return router.forward.remote(
            _np(x), expert_ids=_np(expert_ids), weights=_np(weights), token_ids=_np(token_ids)
        )

    def forward(self, x, *, expert_ids=None, weights=None, token_ids=None):
        """``x`` [..., d] (torch or numpy) -> output of the same kind and shape."""
        ref = self.forward_async(x, expert_ids=expert_ids, weights=weights, token_ids=token_ids)
        try:
            out = actors.wait(ref)
        except ray.exceptions.RayTaskError as e:
            cause = e.as_instanceof_cause()
            if isinstance(cause, RaymoeError):
                raise _unwrap(cause) from None
            raise
        # NOTE: results come read-only out of the object store; callers get their own copy.
        out = np.array(out)
        return torch.from_numpy(out) if isinstance(x, torch.Tensor) else out

    def describe(self) -> dict:
        return actors.wait(self._routers[0].describe.remote())

    def stats(self) -> dict:
        """Per-shard (token, expert) pairs computed since the last call, and their imbalance."""
        loads = actors.wait([s.take_load.remote() for s in self._shards])
        per_shard = [int(counts.sum()) for _, counts in loads]
        mean = sum(per_shard) / max(len(per_shard), 1)
        return {"pairs_per_shard": per_shard,
                "imbalance": max(per_shard) / mean if mean else 1.0}  # fmt: skip

    def shutdown(self) -> None:
        actors.kill(self._routers + self._shards)


def serve(spec: PoolSpec | dict | str | Path, weights: dict | None = None,
          name: str | None = None) -> PoolHandle:  # fmt: skip
    """Start a pool for ``spec`` (and ``weights`` in neutral names); starts local Ray if needed."""
    spec = load_spec(spec)
    if name is not None:
        spec = spec.model_copy(update={"name": name})
    if not ray.is_initialized():
        ray.init(namespace=actors.NAMESPACE, include_dashboard=False, log_to_driver=False)
    align = 1
    if isinstance(spec.routing, ProductKeyRouting):
        align = math.isqrt(spec.num_experts)
    placement = contiguous(spec.num_experts, spec.shards.count, align=align)
    np_weights = {k: _np(v) for k, v in (weights or {}).items()}
    shards, pinned = actors.start_shards(spec, placement, np_weights)
    # routers hold the gate and shared experts only; expert rows went to the shards
    router_weights = {k: v for k, v in np_weights.items() if not k.startswith("experts.")}
    routers = actors.start_routers(spec, shards, placement, router_weights)
    handle = PoolHandle(spec.name, routers, shards, pinned)
    handle.describe()  # wait until the routers are up
    return handle


def connect(name: str = "default") -> PoolHandle:
    """A handle to the running pool ``name`` (from any driver, task or actor in the cluster)."""
    if not ray.is_initialized():
        ray.init(address="auto", namespace=actors.NAMESPACE, log_to_driver=False)
    routers = []
    for i in itertools.count():
        try:
            routers.append(actors.get_router(name, i))
        except ValueError:
            break
    if not routers:
        raise PoolNotFoundError(f"no raymoe pool named {name!r} runs in this cluster")
    return PoolHandle(name, routers)


def _np(a):
    if a is None or isinstance(a, np.ndarray):
        return a
    if isinstance(a, torch.Tensor):
        return a.detach().cpu().contiguous().numpy()
    return a


def _unwrap(err: RaymoeError) -> RaymoeError:
    """The original raymoe error class (Ray wraps it in a dual-class instance)."""
    for cls in type(err).__mro__:
        if issubclass(cls, RaymoeError) and not issubclass(cls, ray.exceptions.RayTaskError):
            return cls(*err.args)
    return err
