"""The pure stages of one router batch around dispatch: *route* (gate every request, or take
its client routes, into one [R, S] batch) and what *combine* needs (the renormalisation of
degrade mode, each layer's rows); see :mod:`.router` for the data path they belong to."""

from __future__ import annotations

import collections
import warnings

import numpy as np
import torch

from raymoe._private.data.batcher import Request
from raymoe._private.data.dispatch import SubBatch, combine
from raymoe._private.data.gates import Gates
from raymoe.config import PoolSpec
from raymoe.errors import InvalidInputError
from raymoe.layer import MoELayer, check_layer
from raymoe.validation import check_hidden


def checked(
    spec: PoolSpec, gates: Gates, x, expert_ids, weights, token_ids, deadline, future, layer
):
    """A caller's forward arguments, validated (typed errors, naming the layer of a
    multi-layer pool), as a :class:`Request`."""
    layer = check_layer(spec, layer)
    xt = as_tensor(x)
    T = check_hidden(
        xt,
        d_model=spec.d_model,
        dtype=spec.torch_dtype,
        allow_nonfinite=spec.limits.allow_nonfinite,
        max_tokens=spec.limits.max_request_tokens,
    )
    flat = xt.reshape(T, spec.d_model)
    ids, w, tok = as_tensor(expert_ids), as_tensor(weights), as_tensor(token_ids)
    try:
        gates.layers[layer].check_route_inputs(flat, xt, token_ids=tok, expert_ids=ids, weights=w)
    except InvalidInputError as e:
        if not spec.multi_layer:
            raise
        raise type(e)(f"layer {layer}: {e}") from None
    return Request(xt, flat, ids, w, tok, deadline, future, layer)


@torch.no_grad()
def route_batch(batch: list[Request], gates: Gates):
    """(rows [R, d], ids [R, S], weights [R, S], mixes) of the whole batch, in request order:
    the rows are the requests' tokens, or for a mixing gate (soft routing) their slots, the
    ids are flat ids (every layer's experts live in one id space), and ``mixes[i]`` is
    request ``i``'s :class:`~raymoe.routing.soft.Mix` (None for tokens)."""
    rows: list = [r.flat for r in batch]
    mixes: list = [None] * len(batch)
    routes: list = [None] * len(batch)
    for layer in sorted({r.layer for r in batch}):
        mine = [i for i, r in enumerate(batch) if r.layer == layer]
        _route_layer(batch, mine, gates.layers[layer], rows, mixes, routes)
        for i in mine:
            ids, w = routes[i]
            routes[i] = (gates.flat(layer, ids), w)
    S = max(a.shape[1] for a, _ in routes)
    ids = torch.cat([_pad(a, S, -1) for a, _ in routes])
    w = torch.cat([_pad(b, S, 0.0) for _, b in routes])
    flat = torch.cat(rows) if len(rows) > 1 else rows[0]
    return flat, ids, w, mixes


def _route_layer(batch, mine: list[int], layer: MoELayer, rows, mixes, routes) -> None:
    """Fill ``rows``, ``mixes`` and ``routes`` (the layer's expert ids) of requests ``mine``,
    all of one layer."""
    gated = []
    for i in mine:
        r = batch[i]
        if r.expert_ids is not None:
            routes[i] = (r.expert_ids.long(), r.weights.to(torch.float32))
        elif layer.router.mixes:
            mixes[i] = mix = layer.router.mix(r.x)
            rows[i] = mix.x
            routes[i] = (mix.routes.ids, mix.routes.weights)
        elif layer.router.batch_coupled:
            rt = layer.route(r.flat, r.x, token_ids=r.token_ids)
            routes[i] = (rt.ids, rt.weights)
        else:
            gated.append(i)
    if not gated:
        return
    # token-wise gates: one gating call for all of them (batched routing matmuls)
    xs = torch.cat([batch[i].flat for i in gated])
    tok = None
    if layer.router.needs_token_ids:
        tok = torch.cat([batch[i].token_ids for i in gated])
    rt = layer.route(xs, xs, token_ids=tok)
    start = 0
    for i in gated:
        t = batch[i].tokens
        routes[i] = (rt.ids[start : start + t], rt.weights[start : start + t])
        start += t


@torch.no_grad()
def combine_rows(d: int, flat, parts, gates: Gates, spans: dict, scale=None) -> torch.Tensor:
    """The shards' partial sums (``parts``: [(sub-batch, [t, d])], times ``scale`` [R, 1] in
    degrade mode), plus each layer's shared experts on its rows (``spans``: layer -> [rows
    of its requests])."""
    y = combine(flat.shape[0], d, parts, flat)
    if scale is not None:
        y *= scale.to(y.dtype)
    for layer, rows in spans.items():
        gate = gates.layers[layer]
        if gate.shared is None:
            continue
        if len(spans) == 1:
            return y + gate.shared_output(flat)
        y[rows] += gate.shared_output(flat[rows])
    return y


def renormalise(w: torch.Tensor, dropped: list[SubBatch]):
    """When pairs were dropped (degrade mode): ([R, 1] scale of each row's routed output,
    [R] bool rows that lost pairs). The scale is a row's weight sum over what remains of
    it, so its remaining experts carry its whole weight (0 for a row that lost every
    expert). (None, None) when nothing was dropped."""
    if not dropped:
        return None, None
    total = w.sum(1, dtype=torch.float64)
    lost = torch.zeros_like(total)
    for sub in dropped:
        lost.index_add_(0, sub.tokens, sub.weights.sum(1, dtype=torch.float64))
    kept = total - lost
    ok = kept.abs() > 1e-12 * total.abs().clamp(min=1e-30)
    scale = torch.where(ok, total / torch.where(ok, kept, 1.0), 0.0)
    return scale.unsqueeze(1), lost != 0


def spans_of(batch: list[Request], mixes: list) -> dict[int, torch.Tensor]:
    """layer -> the batch rows of its requests."""
    spans: dict[int, list] = collections.defaultdict(list)
    start = 0
    for r, mix in zip(batch, mixes, strict=True):
        rows = r.tokens if mix is None else mix.x.shape[0]
        spans[r.layer].append(torch.arange(start, start + rows))
        start += rows
    return {layer: torch.cat(parts) for layer, parts in spans.items()}


def still_valid(r: Request, gates: Gates) -> bool:
    """False (and the caller told why) when ``r``'s client routes name experts removed after
    it was admitted."""
    layer = gates.layers[r.layer] if r.layer < len(gates.layers) else None
    if r.expert_ids is None or layer is None or layer.router.removed is None:
        return True
    try:
        layer.check_route_inputs(r.flat, r.x, expert_ids=r.expert_ids, weights=r.weights)
    except Exception as e:
        r.future.set_exception(e)
        return False
    return True


def _pad(a: torch.Tensor, S: int, value) -> torch.Tensor:
    if a.shape[1] == S:
        return a
    return torch.nn.functional.pad(a, (0, S - a.shape[1]), value=value)


def as_tensor(a):
    """A request's numpy array as a tensor (no copy where contiguous); anything else as it
    is, for validation to name its type."""
    if a is None or isinstance(a, torch.Tensor) or not isinstance(a, np.ndarray):
        return a
    return read_only(np.ascontiguousarray(a))


def read_only(a: np.ndarray) -> torch.Tensor:
    """``a`` as a tensor, no copy, for reading only: an array out of the object store is not
    writable, which torch warns of (once a process) and which is fine here."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(a)
