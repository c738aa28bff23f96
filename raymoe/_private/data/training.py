"""Training through the pool, the router's part: the backward of a forward with client routes,
and the experts' accumulated gradients.

The backward splits the pairs as the forward did (:func:`~.dispatch.split_by_shard`, under one
placement version) and sends each shard its tokens with the gradient of its partial sums. A
shard recomputes its forward and returns the gradients of its tokens and of their routing
weights; its experts' gradients add up on the shard. Any replica may take a pair: a
replica's gradients are summed with the others' when they are read.

NOTE: a backward is not idempotent (the experts' gradients add up), so a failed shard call
fails it with a typed error instead of being retried; the caller redoes its step after
``zero_grad``.
"""

from __future__ import annotations

import asyncio

import numpy as np
import torch

from raymoe._private.data.dispatch import combine, places_digest, split_by_shard
from raymoe._private.data.stages import as_tensor
from raymoe.errors import ExpertIdError, InvalidInputError, PoolUnavailableError, ShapeError
from raymoe.layer import check_layer
from raymoe.optim.rows import STATE_PREFIX
from raymoe.validation import check_hidden, check_routes


async def forward(router, x, expert_ids, weights, layer: int, keep: int, timeout_s: float):
    """A training forward with client routes -> y [..., d]: each shard keeps its activations
    under ``keep`` for :func:`backward`. Not batched with other requests, and its replicas
    are picked as its backward will pick them."""
    xt, flat, ids, w = await _routes(router, x, expert_ids, weights, layer, timeout_s)
    if not len(flat):
        return np.zeros(xt.shape, np.float32)

    def call(s):
        digest = places_digest(s.local_ids, s.expert_ids)
        args = (flat[s.tokens].numpy(), s.local_ids.numpy(), s.weights.numpy(), digest, keep)
        return router.shards.compute(s.shard, *args)

    subs, got = await _each_shard(router, ids, w, call, timeout_s)
    parts = [(s, torch.from_numpy(np.asarray(y))) for s, y in zip(subs, got, strict=True)]
    return combine(flat.shape[0], flat.shape[1], parts, flat).reshape(xt.shape).numpy()


async def backward(
    router, x, expert_ids, weights, grad_y, layer: int, timeout_s: float, keep: int | None = None
):
    """-> (grad of ``x`` [..., d], grad of ``weights`` [T, S]) for the output gradient
    ``grad_y`` of the forward of ``x`` with these routes (:func:`forward` with ``keep``, whose
    activations the shards use; else any forward, which the shards recompute)."""
    xt, flat, ids, w = await _routes(router, x, expert_ids, weights, layer, timeout_s)
    g = torch.from_numpy(np.ascontiguousarray(grad_y)) if grad_y is not None else None
    if g is None or tuple(g.shape) != tuple(xt.shape) or g.dtype != flat.dtype:
        got = None if g is None else (list(g.shape), str(g.dtype))
        raise ShapeError(f"grad_y must match x ({list(xt.shape)}, {flat.dtype}); got {got}")
    if not bool(torch.isfinite(g).all()):
        raise InvalidInputError("grad_y has NaN or Inf entries")
    T, S = ids.shape
    if T == 0:
        return np.zeros(xt.shape, np.float32), np.zeros((0, S), np.float32)
    g = g.reshape(T, -1)

    def call(s):
        digest = places_digest(s.local_ids, s.expert_ids)
        args = (flat[s.tokens].numpy(), s.local_ids.numpy(), s.weights.numpy())
        return router.shards.backward(s.shard, *args, g[s.tokens].numpy(), digest, keep)

    subs, got = await _each_shard(router, ids, w, call, timeout_s)
    grad_x, grad_w = assemble(subs, got, flat, S)
    return grad_x.reshape(xt.shape).numpy(), grad_w.numpy()


async def _routes(router, x, expert_ids, weights, layer: int, timeout_s: float):
    """The checked input and the routes of the experts' inputs, once the router serves:
    (x, x as [T, d], flat expert ids [T, S], float32 weights [T, S]). For a layer that mixes
    tokens (``soft``), ``x`` holds the slots the client mixed, and the routes theirs."""
    if expert_ids is None or weights is None:
        raise InvalidInputError("training through the pool needs client routes")
    spec = router.spec
    layer = check_layer(spec, layer)
    xt, ids, w = as_tensor(x), as_tensor(expert_ids), as_tensor(weights)
    limits = spec.limits
    T = check_hidden(
        xt,
        d_model=spec.d_model,
        dtype=spec.torch_dtype,
        allow_nonfinite=limits.allow_nonfinite,
        max_tokens=limits.max_request_tokens,
    )
    try:
        await asyncio.wait_for(router._ready.wait(), timeout_s)
    except TimeoutError:
        raise PoolUnavailableError("the router has no shards configured yet") from None
    gate = router.gates.layers[layer]
    removed = gate.router.removed
    check_routes(ids, w, tokens=T, num_experts=gate.spec.num_experts, removed=removed)
    flat_ids = router.gates.flat(layer, ids.long())
    return xt, xt.reshape(T, spec.d_model), flat_ids, w.to(torch.float32)


async def _each_shard(router, ids, w, call, timeout_s: float):
    """Split the pairs by shard under one placement version, replicas picked from the ids
    alone, and ``call`` every sub-batch. -> (sub-batches, answers)."""
    table = router.table
    router._running[table.version] += 1  # make before break: old places stay until done
    try:
        subs = split_by_shard(ids, w, table, deal=False)
        got = await asyncio.wait_for(asyncio.gather(*(call(s) for s in subs)), timeout_s)
    finally:
        router._running[table.version] -= 1
    return subs, got


def assemble(subs, got, flat: torch.Tensor, S: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The shards' answers to a backward (``got``: (grad of their x, grad of their
    weights) per sub-batch of ``subs``) -> (grad of ``flat`` [T, d], grad of the batch's
    weights [T, S]): the first added up per token, the second put back in each pair's slot."""
    parts = [(s, torch.from_numpy(np.asarray(gx))) for s, (gx, _) in zip(subs, got, strict=True)]
    grad_x = combine(flat.shape[0], flat.shape[1], parts, flat)
    grad_w = torch.zeros((flat.shape[0], S), dtype=torch.float32)
    for s, (_, gw) in zip(subs, got, strict=True):
        here = s.local_ids >= 0
        rows = s.tokens.unsqueeze(1).expand_as(s.slots)[here]
        grad_w.index_put_((rows, s.slots[here]), torch.from_numpy(np.asarray(gw))[here], True)
    return grad_x, grad_w


async def expert_grads(router, expert_ids, layer: int) -> dict[str, np.ndarray]:
    """The gradients accumulated for layer ``layer``'s experts ``expert_ids`` ([n]), summed
    over the shards that hold some (their replicas, and places they moved away from since
    the last step): ``{name: [n, ...]}``."""
    flat = _flat_ids(router, expert_ids, layer)
    got = await asyncio.gather(*(h.expert_grads.remote(flat) for h in router.shards.handles))
    return {name: sum(g[name] for g in got) for name in got[0]}


async def expert_weights(router, expert_ids, layer: int, replica: int) -> dict[str, np.ndarray]:
    """The weights of layer ``layer``'s experts ``expert_ids`` ([n]) as replica ``replica``
    (of each expert's, in placement order, modulo its count) holds them: ``{name: [n, ...]}``."""
    flat = _flat_ids(router, expert_ids, layer)
    ptr, shard = router.table.ptr.numpy(), router.table.shard.numpy()
    count = ptr[flat + 1] - ptr[flat]
    if not bool((count > 0).all()):
        raise ExpertIdError(f"removed experts have no weights: {expert_ids}")
    on = shard[ptr[flat] + int(replica) % count]
    shards = np.unique(on).tolist()
    handles = router.shards.handles
    got = await asyncio.gather(*(handles[n].export_experts.remote(flat[on == n]) for n in shards))
    out: dict[str, np.ndarray] = {}
    for n, rows in zip(shards, got, strict=True):
        for name, v in rows.items():
            if not name.startswith(STATE_PREFIX):
                out.setdefault(name, np.zeros((len(flat), *v.shape[1:]), v.dtype))[on == n] = v
    return out


def _flat_ids(router, expert_ids, layer: int) -> np.ndarray:
    ids = torch.as_tensor(np.asarray(expert_ids, dtype=np.int64)).reshape(-1)
    if bool(((ids < 0) | (ids >= router.spec.layer(layer).num_experts)).any()):
        raise ExpertIdError(f"expert ids out of range for layer {layer}")
    return router.gates.flat(layer, ids.unsqueeze(1)).squeeze(1).numpy()


async def zero_grad(router) -> None:
    """Every shard drops its experts' accumulated gradients."""
    await asyncio.gather(*(h.zero_grad.remote() for h in router.shards.handles))
