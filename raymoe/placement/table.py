"""The placement table and every operation on it (glossary in :mod:`raymoe.placement`).

Replicas are stored in CSR form, so a placement of a million experts is three int64 arrays.
Every operation returns a new :class:`Placement`; a change of layout goes through
:func:`realize`, and every new version comes from :meth:`Placement.bump`.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, eq=False)
class Placement:
    """Shapes: E experts, R replicas in all, N shards, L layers.

    ptr:           [E + 1] int64, the replicas of expert e are rows ``ptr[e]:ptr[e+1]``
    shard:         [R] int64, the shard of each replica (ascending within an expert)
    local:         [R] int64, its place (local index) on that shard
    layer_offsets: [2] int64, ``[0, E]`` (kept for stored placements; which layer a flat id
                   belongs to is the spec's: :mod:`raymoe.config.layers`)
    """

    version: int
    num_shards: int
    ptr: np.ndarray
    shard: np.ndarray
    local: np.ndarray
    layer_offsets: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.layer_offsets is None:
            offsets = np.array([0, self.num_experts], np.int64)
            object.__setattr__(self, "layer_offsets", offsets)

    @property
    def num_experts(self) -> int:
        return len(self.ptr) - 1

    @property
    def num_replicas(self) -> int:
        return len(self.shard)

    def bump(self, **changes) -> Placement:
        """The next version, with ``changes`` (fields) applied: the one place a placement
        version is made."""
        return dataclasses.replace(self, version=self.version + 1, **changes)

    def replicas(self) -> np.ndarray:
        """[E] int64 replica count per expert (0 for a removed expert)."""
        return np.diff(self.ptr)

    @functools.cached_property
    def one_place_each(self) -> bool:
        """Whether every expert has exactly one replica (replica row e is expert e's)."""
        E = self.num_experts
        return self.num_replicas == E and bool((self.ptr == np.arange(E + 1)).all())

    def pairs(self) -> tuple[np.ndarray, np.ndarray]:
        """(expert [R], shard [R]) of every replica, in CSR order."""
        return np.repeat(np.arange(self.num_experts), self.replicas()), self.shard

    def held(self) -> np.ndarray:
        """[N] replicas held by each shard."""
        return np.bincount(self.shard, minlength=self.num_shards)

    def shard_experts(self, shard: int) -> np.ndarray:
        """Global ids held by ``shard``, in local-index order: [E_local]."""
        rows = np.flatnonzero(self.shard == shard)
        expert = np.searchsorted(self.ptr, rows, side="right") - 1
        return expert[np.argsort(self.local[rows], kind="stable")]

    def shard_layout(self, shard: int) -> np.ndarray:
        """[P] the global id at each place of ``shard`` (-1 = free), P one past its largest
        place in use."""
        rows = np.flatnonzero(self.shard == shard)
        expert = np.searchsorted(self.ptr, rows, side="right") - 1
        size = int(self.local[rows].max()) + 1 if len(rows) else 0
        out = np.full(size, -1, np.int64)
        out[self.local[rows]] = expert
        return out

    def primary(self) -> tuple[np.ndarray, np.ndarray]:
        """(shard [E], local [E]) of each expert's first replica (meaningless for an expert
        without replicas: a removed one)."""
        first = np.minimum(self.ptr[:-1], max(self.num_replicas - 1, 0))
        return self.shard[first], self.local[first]

    def same_layout(self, other: Placement) -> bool:
        return self.num_shards == other.num_shards and all(
            np.array_equal(getattr(self, k), getattr(other, k))
            for k in ("ptr", "shard", "local", "layer_offsets")
        )

    def to_bytes(self) -> bytes:
        """A compact, pickle-free encoding (``.npz``) for the metadata store."""
        buf = io.BytesIO()
        arrays = {k: getattr(self, k) for k in ("ptr", "shard", "local", "layer_offsets")}
        np.savez(buf, version=self.version, num_shards=self.num_shards, **arrays)
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> Placement:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            arrays = {k: z[k].astype(np.int64) for k in ("ptr", "shard", "local")}
            offsets = z["layer_offsets"].astype(np.int64) if "layer_offsets" in z else None
            return cls(int(z["version"]), int(z["num_shards"]), **arrays, layer_offsets=offsets)


@dataclass(frozen=True)
class Change:
    """What moving from one placement to another copies and frees. Each side is
    (expert [n], shard [n], local [n]) of the replicas only the new (or only the old) has."""

    added: tuple[np.ndarray, np.ndarray, np.ndarray]
    dropped: tuple[np.ndarray, np.ndarray, np.ndarray]

    @property
    def replicas_added(self) -> int:
        return len(self.added[0])

    @property
    def replicas_dropped(self) -> int:
        return len(self.dropped[0])


def diff(old: Placement, new: Placement) -> Change:
    """The replicas only ``new`` has (to copy) and only ``old`` has (to free)."""
    n = max(old.num_shards, new.num_shards)
    key_old, key_new = keys(old, n), keys(new, n)
    sides = []
    for p, mine, theirs in ((new, key_new, key_old), (old, key_old, key_new)):
        only = ~_contains(theirs, mine)
        expert, shard = p.pairs()
        sides.append((expert[only], shard[only], p.local[only]))
    return Change(sides[0], sides[1])


def keys(p: Placement, n: int | None = None) -> np.ndarray:
    """[R] ``expert * n + shard`` of every replica (n: at least the shard count); ascending
    for every placement made here (pairs are kept sorted by expert, then shard)."""
    expert, shard = p.pairs()
    return expert * (n or p.num_shards) + shard


def _contains(sorted_keys: np.ndarray, query: np.ndarray) -> np.ndarray:
    """[q] whether each of ``query`` is in ``sorted_keys`` (sorted first if it is not)."""
    if len(sorted_keys) == 0:
        return np.zeros(len(query), bool)
    if (np.diff(sorted_keys) < 0).any():  # e.g. a placement saved by an older version
        sorted_keys = np.sort(sorted_keys)
    pos = np.searchsorted(sorted_keys, query).clip(max=len(sorted_keys) - 1)
    return sorted_keys[pos] == query


def contiguous(num_experts: int, num_shards: int, *, align: int = 1, version: int = 1) -> Placement:
    """One replica per expert, in contiguous blocks with edges on multiples of ``align``
    (product-key pools: whole sub-key rows, so a token's experts touch few shards)."""
    units = math.ceil(num_experts / align)
    unit_shard = np.arange(units) * num_shards // units
    shard = np.repeat(unit_shard, align)[:num_experts].astype(np.int64)
    starts = np.searchsorted(shard, np.arange(num_shards))
    local = np.arange(num_experts) - starts[shard]
    return Placement(version, num_shards, np.arange(num_experts + 1), shard, local)


def with_replicas(base: Placement, expert_shards: dict[int, list[int]]) -> Placement:
    """``base`` (same version) plus one more replica of expert e on each shard in
    ``expert_shards[e]``, at the next free places of those shards."""
    expert, shard = base.pairs()
    extra_e = [e for e, shards in expert_shards.items() for _ in shards]
    extra_s = [s for shards in expert_shards.values() for s in shards]
    expert = np.concatenate([expert, np.asarray(extra_e, np.int64)])
    shard = np.concatenate([shard, np.asarray(extra_s, np.int64)])
    return _build(base, expert, shard, base.version)


def initial(
    num_experts: int,
    num_shards: int,
    *,
    align: int = 1,
    replicas: dict[int, int] | None = None,
    removed=(),
) -> Placement:
    """The placement a pool starts with: contiguous blocks; expert e on ``replicas[e]``
    shards (the extra ones on the shards after its own, wrapping round, so copies of one
    expert never share a shard); no replica for ``removed`` experts."""
    p = contiguous(num_experts, num_shards, align=align)
    first, _ = p.primary()
    extra = {}
    for e, count in sorted((replicas or {}).items()):
        extra[e] = [int(first[e] + j) % num_shards for j in range(1, min(count, num_shards))]
    p = with_replicas(p, {e: s for e, s in extra.items() if s})
    if len(removed):
        expert, shard = p.pairs()
        keep = ~np.isin(expert, np.asarray(removed))
        p = _build(p, expert[keep], shard[keep], p.version)
    return p


def realize(current: Placement, expert: np.ndarray, shard: np.ndarray) -> Placement:
    """The next version, holding exactly the (expert, shard) pairs given.

    Replicas that exist in ``current`` keep their place; new ones go after the largest place
    in use on their shard, so no place an in-flight batch of ``current`` reads is reused.
    """
    return _build(current, np.asarray(expert, np.int64), np.asarray(shard, np.int64), None)


def _build(current: Placement, expert: np.ndarray, shard: np.ndarray, version: int | None):
    """A placement of exactly these pairs, keeping the places of the ones ``current`` has;
    ``version`` None: the next version."""
    N = current.num_shards
    E = max(current.num_experts, int(expert.max()) + 1 if len(expert) else 0)
    old_e, old_s = current.pairs()
    old_key = old_e * N + old_s
    key = expert * N + shard
    order = np.argsort(old_key, kind="stable")
    sorted_old = old_key[order]
    pos = np.searchsorted(sorted_old, key).clip(max=max(len(order) - 1, 0))
    found = sorted_old[pos] == key if len(order) else np.zeros(len(key), bool)
    local = np.where(found, current.local[order][pos] if len(order) else -1, -1)
    new = ~found
    if new.any():
        top = np.full(N, -1, np.int64)
        np.maximum.at(top, old_s, current.local)
        s_new = shard[new]
        o = np.argsort(s_new, kind="stable")
        counts = np.bincount(s_new, minlength=N)
        rank = np.arange(len(o)) - np.repeat(np.cumsum(counts) - counts, counts)
        filled = np.empty(len(o), np.int64)
        filled[o] = top[s_new[o]] + 1 + rank
        local[new] = filled
    o = np.argsort(key, kind="stable")
    ptr = np.zeros(E + 1, np.int64)
    np.cumsum(np.bincount(expert, minlength=E), out=ptr[1:])
    offsets = current.layer_offsets.copy()
    offsets[-1] = E
    fields = {"ptr": ptr, "shard": shard[o], "local": local[o], "layer_offsets": offsets}
    if version is None:
        return current.bump(**fields)
    return dataclasses.replace(current, version=version, **fields)


def place_new(p: Placement, count: int, align: int, active: np.ndarray) -> Placement:
    """The next version of ``p`` with experts ``E .. E+count-1`` added, in units of
    ``align`` (whole sub-key rows), each unit on the active shard holding the fewest
    replicas at that point."""
    E = p.num_experts
    held = p.held().astype(np.float64)
    held[~active] = np.inf
    shard = np.empty(count, np.int64)
    for u in range(count // align):  # NOTE: a loop over units (rows), not experts
        n = int(np.argmin(held))
        shard[u * align : (u + 1) * align] = n
        held[n] += align
    expert, old_shard = p.pairs()
    return realize(
        p, np.concatenate([expert, np.arange(E, E + count)]), np.concatenate([old_shard, shard])
    )
