"""Training through the pool, the data path: a forward with client routes whose shards keep
their activations, its backward, and the experts' accumulated gradients.

It runs on a :class:`ShardView`: the pool's spec, one placement version's dispatch table and
the shards, as the trainer's process holds them (:mod:`raymoe._private.direct`: the trainer
calls the shards itself, no router in between).

The backward splits the pairs as the forward did (:func:`~.dispatch.split_by_shard` with
``deal=False``: replicas picked from the ids alone) and sends each shard the gradient of its
partial sums. A shard that kept the forward's activations needs nothing else; one that did
not (evicted, or the bank changed since) is sent its tokens and routing weights too, and
recomputes its forward. It returns the gradients of its tokens and of their routing
weights; its experts' gradients add up on the shard. Any replica may take a pair: a
replica's gradients are summed with the others' when they are read.

A shard that *refuses* a sub-batch (its places hold other experts now, or it is reloading)
has done nothing: the sub-batch is split again under a newer placement version and sent
again (a forward is sent again whole). Make-before-break holds without the routers' count
of running batches: a shard checks the experts a sub-batch means under its lock
(:func:`~.dispatch.places_digest`), so a place freed or reused before the call arrives
refuses it, and one freed after it waits for it.

NOTE: any other failure of a backward is not retried (the experts' gradients add up, and a
shard that failed mid-call may have added some), so it fails with a typed error; the caller
redoes its step after ``zero_grad``.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from typing import Protocol

import numpy as np
import torch

from raymoe._private.data.dispatch import (
    DispatchTable,
    SubBatch,
    combine,
    digest_of,
    resplit,
    split_by_shard,
)
from raymoe._private.data.stages import as_tensor, read_only
from raymoe.config import PoolSpec
from raymoe.errors import ExpertIdError, InvalidInputError, PoolUnavailableError, ShapeError
from raymoe.layer import check_layer
from raymoe.optim.rows import STATE_PREFIX
from raymoe.routing.base import removed_mask
from raymoe.validation import all_finite, check_hidden, check_routes

ATTEMPTS = 4  # a sub-batch's sends before its shard's refusal fails the call


class ShardView(Protocol):
    """What training needs of a pool: its spec and the dispatch table of one placement
    version (published together), and the shards (``shards.handles[n]``: shard ``n``)."""

    spec: PoolSpec
    table: DispatchTable
    shards: object  # a router's ShardCalls: the transport to the shards
    # NOTE: a call reads (table, shards) once, together, and holds them: the view may take
    # a newer publication meanwhile

    async def newer(self, version: int, deadline: float) -> tuple[DispatchTable, object]:
        """(table, shards) of a placement version above ``version`` (the spec with them);
        :class:`PoolUnavailableError` if none comes before ``deadline``."""
        ...


async def forward(view: ShardView, x, expert_ids, weights, layer: int, keep, timeout_s: float):
    """A training forward with client routes -> y [..., d] (torch): each shard keeps its
    activations under ``keep`` for :func:`backward`. Sent again whole where a shard refused
    its part (a forward is idempotent: a key kept again replaces the first)."""
    deadline = time.monotonic() + timeout_s
    xt, flat, ids, w = _routes(view.spec, x, expert_ids, weights, layer)
    if not len(flat):
        return torch.zeros_like(xt)
    table, shards = view.table, view.shards  # of one version
    for attempt in itertools.count(1):
        subs = split_by_shard(ids, w, table, deal=False)
        calls = [_within(deadline, _compute(shards, s, flat, keep)) for s in subs]
        got = await asyncio.gather(*calls, return_exceptions=True)
        error = next((e for e in got if isinstance(e, BaseException)), None)
        if error is None:
            parts = [(s, read_only(np.asarray(y))) for s, y in zip(subs, got, strict=True)]
            return combine(flat.shape[0], flat.shape[1], parts, flat).reshape(xt.shape)
        if not shards.refused(error) or attempt == ATTEMPTS:
            raise _failed(error) from None
        table, shards = await view.newer(table.version, deadline)
    raise AssertionError("unreachable")


async def backward(
    view: ShardView, x, expert_ids, weights, grad_y, layer: int, keep, timeout_s: float
):
    """-> (grad of ``x`` [..., d], grad of ``weights`` [T, S]) (torch) for the output gradient
    ``grad_y`` of the forward of ``x`` with these routes (:func:`forward` with ``keep``, whose
    activations the shards use; else any forward, which the shards recompute)."""
    deadline = time.monotonic() + timeout_s
    xt, flat, ids, w = _routes(view.spec, x, expert_ids, weights, layer)
    g = as_tensor(grad_y) if grad_y is not None else None
    if g is None or tuple(g.shape) != tuple(xt.shape) or g.dtype != flat.dtype:
        got = None if g is None else (list(g.shape), str(g.dtype))
        raise ShapeError(f"grad_y must match x ({list(xt.shape)}, {flat.dtype}); got {got}")
    if not all_finite(g):
        raise InvalidInputError("grad_y has NaN or Inf entries")
    T, S = ids.shape
    if T == 0:
        return torch.zeros_like(xt), torch.zeros((0, S))
    g = g.reshape(T, -1)

    async def part(s: SubBatch, table: DispatchTable, shards, attempt: int, key):
        """[(sub-batch, its answer)] for ``s`` and, if refused, its pairs sent again."""
        try:
            return [(s, await _within(deadline, _backward(shards, s, flat, g, key)))]
        except Exception as e:
            if not shards.refused(e) or attempt == ATTEMPTS:
                raise _failed(e) from None
        table, shards = await view.newer(table.version, deadline)  # the refusal did nothing
        again = resplit(s, table, None, deal=False)
        got = await asyncio.gather(*(part(t, table, shards, attempt + 1, None) for t in again))
        return [p for ps in got for p in ps]

    table, shards = view.table, view.shards  # of one version
    subs = split_by_shard(ids, w, table, deal=False)
    got = await asyncio.gather(*(part(s, table, shards, 1, keep) for s in subs))
    subs, answers = zip(*[p for ps in got for p in ps], strict=True) if got else ((), ())
    grad_x, grad_w = assemble(subs, answers, flat, S)
    return grad_x.reshape(xt.shape), grad_w


async def _within(deadline: float, call):
    try:
        return await asyncio.wait_for(call, max(deadline - time.monotonic(), 0.0))
    except TimeoutError:
        raise PoolUnavailableError("a shard did not answer a training call in time") from None


async def _compute(shards, s: SubBatch, flat: torch.Tensor, keep):
    digest = digest_of(s)
    args = (flat[s.tokens].numpy(), s.local_ids.numpy(), s.weights.numpy(), digest, keep)
    return await shards.compute(s.shard, *args)


async def _backward(shards, s: SubBatch, flat: torch.Tensor, g: torch.Tensor, keep):
    """Shard ``s.shard``'s part: first with the output gradient alone (the kept forward
    needs nothing else); None back means it kept none, and it is sent the inputs too."""
    digest = digest_of(s)
    local, gs = s.local_ids.numpy(), g[s.tokens].numpy()
    if keep is not None:
        got = await shards.backward(s.shard, None, local, None, gs, digest, keep)
        if got is not None:
            return got
    x_s, w_s = flat[s.tokens].numpy(), s.weights.numpy()
    return await shards.backward(s.shard, x_s, local, w_s, gs, digest, None)


def _failed(error: BaseException) -> BaseException:
    """A shard call's failure as the trainer hears it: raymoe's own errors as they are;
    anything else (a dead shard, a timeout) as :class:`PoolUnavailableError`."""
    cause = getattr(error, "as_instanceof_cause", None)
    error = cause() if cause is not None else error
    if isinstance(error, InvalidInputError | PoolUnavailableError):
        return error
    return PoolUnavailableError(f"a shard failed during a training call: {error!r}")


def _routes(spec: PoolSpec, x, expert_ids, weights, layer: int):
    """The checked input and the routes of the experts' inputs: (x, x as [T, d], flat
    expert ids [T, S], float32 weights [T, S]). For a layer that mixes tokens (``soft``),
    ``x`` holds the slots the client mixed, and the routes theirs."""
    if expert_ids is None or weights is None:
        raise InvalidInputError("training through the pool needs client routes")
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
    own = spec.layer(layer)
    check_routes(ids, w, tokens=T, num_experts=own.num_experts, removed=removed_mask(own))
    return xt, xt.reshape(T, spec.d_model), flat_ids(spec, layer, ids.long()), w.to(torch.float32)


def flat_ids(spec: PoolSpec, layer: int, ids: torch.Tensor) -> torch.Tensor:
    """Layer ``layer``'s expert ids [..] -> the pool's flat ids (-1 stays -1)."""
    if not spec.multi_layer:
        return ids
    flat = torch.from_numpy(np.array(spec.flat.ids(layer), dtype=np.int64))
    return torch.where(ids >= 0, flat[ids.clamp(min=0)], ids)


def assemble(subs, got, flat: torch.Tensor, S: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The shards' answers to a backward (``got``: (grad of their x, grad of their
    weights) per sub-batch of ``subs``) -> (grad of ``flat`` [T, d], grad of the batch's
    weights [T, S]): the first added up per token, the second put back in each pair's slot."""
    parts = [(s, read_only(np.asarray(gx))) for s, (gx, _) in zip(subs, got, strict=True)]
    grad_x = combine(flat.shape[0], flat.shape[1], parts, flat)
    grad_w = torch.zeros((flat.shape[0], S), dtype=torch.float32)
    for s, (_, gw) in zip(subs, got, strict=True):
        here = s.local_ids >= 0
        rows = s.tokens.unsqueeze(1).expand_as(s.slots)[here]
        grad_w.index_put_((rows, s.slots[here]), read_only(np.asarray(gw))[here], True)
    return grad_x, grad_w


async def expert_grads(view: ShardView, expert_ids, layer: int, timeout_s: float) -> dict:
    """The gradients accumulated for layer ``layer``'s experts ``expert_ids`` ([n]), summed
    over the shards that hold some (their replicas, and places they moved away from since
    the last step): ``{name: [n, ...]}``."""
    flat = _flat_ids(view.spec, expert_ids, layer)
    calls = asyncio.gather(*(h.expert_grads.remote(flat) for h in view.shards.handles))
    got = await _within(time.monotonic() + timeout_s, calls)
    return {name: sum(g[name] for g in got) for name in got[0]}


async def expert_weights(
    view: ShardView, expert_ids, layer: int, replica: int, timeout_s: float
) -> dict[str, np.ndarray]:
    """The weights of layer ``layer``'s experts ``expert_ids`` ([n]) as replica ``replica``
    (of each expert's, in placement order, modulo its count) holds them: ``{name: [n, ...]}``."""
    flat = _flat_ids(view.spec, expert_ids, layer)
    ptr, shard = view.table.ptr.numpy(), view.table.shard.numpy()
    count = ptr[flat + 1] - ptr[flat]
    if not bool((count > 0).all()):
        raise ExpertIdError(f"removed experts have no weights: {expert_ids}")
    on = shard[ptr[flat] + int(replica) % count]
    shards = np.unique(on).tolist()
    handles = view.shards.handles
    calls = asyncio.gather(*(handles[n].export_experts.remote(flat[on == n]) for n in shards))
    got = await _within(time.monotonic() + timeout_s, calls)
    out: dict[str, np.ndarray] = {}
    for n, rows in zip(shards, got, strict=True):
        for name, v in rows.items():
            if not name.startswith(STATE_PREFIX):
                out.setdefault(name, np.zeros((len(flat), *v.shape[1:]), v.dtype))[on == n] = v
    return out


def _flat_ids(spec: PoolSpec, expert_ids, layer: int) -> np.ndarray:
    layer = check_layer(spec, layer)
    ids = torch.as_tensor(np.asarray(expert_ids, dtype=np.int64)).reshape(-1)
    if bool(((ids < 0) | (ids >= spec.layer(layer).num_experts)).any()):
        raise ExpertIdError(f"expert ids out of range for layer {layer}")
    return flat_ids(spec, layer, ids).numpy()


async def zero_grad(view: ShardView, timeout_s: float) -> None:
    """Every shard drops its experts' accumulated gradients."""
    calls = asyncio.gather(*(h.zero_grad.remote() for h in view.shards.handles))
    await _within(time.monotonic() + timeout_s, calls)
