"""Failure domains: the replicas of an expert on distinct shards and distinct nodes.

A **domain** is what one fault takes down with all its shards: a Ray node. ``domains`` is
[N] int64, the domain of each shard (any labels; shards with equal labels share a node).
With ``min_replicas`` m, every live expert not pinned keeps at least ``min(m, A)`` replicas
(A: active shards), spread over at least ``min(m, D)`` domains (D: domains holding an
active shard); a pinned expert keeps its count and is spread as far as it allows. Then one
shard's or one node's failure leaves every expert with a replica.

:func:`spread` is a repair that runs after any plan (a policy's, a scale, a restarted shard
that came back on another node): it adds the missing replicas, and moves a replica that
shares its domain with another replica of the same expert, rather than adding one, when the
expert already has its count. Loops run over rounds and shards, never experts.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from raymoe.placement.table import Placement, realize

GREEDY = 20_000  # up to this many experts short of a replica: placed one by one


def wanted(p: Placement, min_replicas: int, pins: dict[int, int]) -> np.ndarray:
    """[E] the replicas each expert must spread over: ``min_replicas``, a pin's count, 0 for
    an expert without replicas (removed)."""
    m = np.where(p.replicas() > 0, min_replicas, 0).astype(np.int64)
    for e, c in pins.items():
        if e < len(m):
            m[e] = c
    return m


def gaps(p: Placement, domains: np.ndarray, want: np.ndarray, active: np.ndarray) -> np.ndarray:
    """[E] bool: the experts short of their replicas or of their domains."""
    dom, D = _labels(domains, active)
    count, distinct, _ = _spread_of(p, dom, D)
    A = int(active.sum())
    return (count < np.minimum(want, A)) | (distinct < np.minimum(want, D))


def spread(
    p: Placement,
    domains: np.ndarray,
    min_replicas: int,
    pins: dict[int, int] | None = None,
    active: np.ndarray | None = None,
) -> Placement:
    """``p`` (same version) with every expert on its replicas and domains (module doc);
    ``p`` itself when it already is. ``active``: [N] the shards that may hold replicas."""
    N = p.num_shards
    active = np.ones(N, bool) if active is None else np.asarray(active, bool)
    want = wanted(p, min_replicas, pins or {})
    if not gaps(p, domains, want, active).any():
        return p
    dom, D = _labels(domains, active)
    A = int(active.sum())
    expert, shard = p.pairs()
    for _ in range(int(want.max(initial=0))):  # NOTE: one replica per short expert a round
        order = np.lexsort((shard, expert))  # CSR order: rows as q.pairs() numbers them
        expert, shard = expert[order], shard[order]
        q = dataclasses.replace(p, **_csr(p, expert, shard))
        count, distinct, dup = _spread_of(q, dom, D)
        short_dom = distinct < np.minimum(want, D)
        short = (count < np.minimum(want, A)) | short_dom
        es = np.flatnonzero(short)
        if not len(es):
            break
        chosen = _choose(es, expert, shard, dom, D, active, short_dom[es])
        ok = chosen >= 0
        # an expert with its count, short only of domains: a replica sharing a domain moves
        moving = ok & (count[es] >= np.minimum(want[es], A)) & (dup[es] >= 0)
        keep = np.ones(len(expert), bool)
        keep[dup[es[moving]]] = False
        expert = np.concatenate([expert[keep], es[ok]])
        shard = np.concatenate([shard[keep], chosen[ok]])
    out = realize(p, expert, shard)
    return dataclasses.replace(out, version=p.version)


def _labels(domains: np.ndarray, active: np.ndarray) -> tuple[np.ndarray, int]:
    """(domain index per shard in [0, D'), D: domains holding an active shard)."""
    _, dom = np.unique(np.asarray(domains), return_inverse=True)
    return dom.astype(np.int64), len(np.unique(dom[active]))


def _spread_of(p: Placement, dom: np.ndarray, D: int):
    """([E] replicas, [E] distinct domains, [E] row of a replica sharing its domain with
    another replica of the expert, or -1)."""
    E = p.num_experts
    expert, shard = p.pairs()
    key = expert * (int(dom.max(initial=0)) + 1) + dom[shard]
    order = np.argsort(key, kind="stable")
    repeat = np.zeros(len(key), bool)
    repeat[order[1:]] = key[order[1:]] == key[order[:-1]]
    count = p.replicas()
    distinct = count - np.bincount(expert[repeat], minlength=E)
    dup = np.full(E, -1, np.int64)
    rows = np.flatnonzero(repeat)
    dup[expert[rows]] = rows
    return count, distinct, dup


def _choose(es, expert, shard, dom, D, active, need_domain) -> np.ndarray:
    """[len(es)] a shard for one more replica of each expert ``es`` (-1: none fits): active,
    not holding it, and in a new domain where ``need_domain``. Few experts: each in turn to
    the fitting shard holding the fewest replicas; many: a fitting shard drawn uniformly
    (seeded), which balances them as well at that scale."""
    N = len(dom)
    row = np.full(int(expert.max(initial=0)) + 1, -1, np.int64)
    row[es] = np.arange(len(es))
    mine = row[expert] >= 0
    holds = np.zeros((len(es), N), bool)
    holds[row[expert[mine]], shard[mine]] = True
    has = np.zeros((len(es), int(dom.max(initial=0)) + 1), bool)
    has[row[expert[mine]], dom[shard[mine]]] = True
    fits = active[None, :] & ~holds & ~(need_domain[:, None] & has[:, dom])  # [len(es), N]
    chosen = np.full(len(es), -1, np.int64)
    if len(es) <= GREEDY:
        held = np.bincount(shard, minlength=N).astype(np.float64)
        for i in range(len(es)):  # NOTE: few experts (a repair); big pools take the draw
            if fits[i].any():
                s = int(np.argmin(np.where(fits[i], held, np.inf)))
                chosen[i] = s
                held[s] += 1
        return chosen
    score = np.random.default_rng(len(es)).random((len(es), N))
    pick = np.argmax(np.where(fits, score, -1.0), axis=1)
    ok = fits[np.arange(len(es)), pick]
    chosen[ok] = pick[ok]
    return chosen


def _csr(p: Placement, expert: np.ndarray, shard: np.ndarray) -> dict:
    """Fields of a placement of these pairs, sorted by expert then shard (places are not
    needed to count them)."""
    ptr = np.zeros(p.num_experts + 1, np.int64)
    np.cumsum(np.bincount(expert, minlength=p.num_experts), out=ptr[1:])
    return {"ptr": ptr, "shard": shard, "local": np.zeros(len(shard), np.int64)}
