"""Placement: where every expert lives.

Glossary (used with these meanings everywhere in raymoe):
- *expert*: a logical expert, by its global id in ``[0, E)``.
- *shard*: an actor holding one expert bank; its experts are addressed by *local* index.
- *replica*: one physical copy of an expert on one shard. An expert has >= 1 replicas.
- *placement*: for each expert, its replicas as (shard, local index) pairs; immutable and
  versioned. A batch is dispatched under exactly one version.

Replicas are stored in CSR form so that a placement of 1M experts is a handful of tensors.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class Placement:
    """Shapes: E experts, R replicas in all (R >= E), N shards.

    ptr:      [E + 1] int64, the replicas of expert e are rows ptr[e]:ptr[e+1]
    shard:    [R] int64, shard of each replica
    local:    [R] int64, local index of each replica on its shard
    """

    version: int
    num_shards: int
    ptr: torch.Tensor
    shard: torch.Tensor
    local: torch.Tensor

    @property
    def num_experts(self) -> int:
        return self.ptr.numel() - 1

    def replicas(self) -> torch.Tensor:
        """[E] int64 replica count per expert."""
        return self.ptr[1:] - self.ptr[:-1]

    def shard_experts(self, shard: int) -> torch.Tensor:
        """Global ids held by ``shard``, in local-index order: [E_local]."""
        rows = (self.shard == shard).nonzero().squeeze(1)
        expert = torch.searchsorted(self.ptr, rows, right=True) - 1
        return expert[torch.argsort(self.local[rows])]

    def shard_layout(self, shard: int) -> torch.Tensor:
        """[L] the global id at each local index of ``shard`` (-1 = a free place), with L one
        past its largest local index in use."""
        rows = (self.shard == shard).nonzero().squeeze(1)
        expert = torch.searchsorted(self.ptr, rows, right=True) - 1
        size = int(self.local[rows].max()) + 1 if len(rows) else 0
        out = torch.full((size,), -1, dtype=torch.int64)
        out[self.local[rows]] = expert
        return out

    def to_bytes(self) -> bytes:
        """A compact, pickle-free encoding (``.npz``) for the metadata store."""
        buf = io.BytesIO()
        arrays = {k: getattr(self, k).numpy() for k in ("ptr", "shard", "local")}
        np.savez(buf, version=self.version, num_shards=self.num_shards, **arrays)
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> Placement:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            return cls(int(z["version"]), int(z["num_shards"]), *(
                torch.from_numpy(z[k].copy()) for k in ("ptr", "shard", "local")))  # fmt: skip

    def primary(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(shard [E], local [E]) of each expert's first replica (meaningless for an expert
        without replicas: a removed one)."""
        first = self.ptr[:-1].clamp(max=max(self.shard.numel() - 1, 0))
        return self.shard[first], self.local[first]


def contiguous(num_experts: int, num_shards: int, *, align: int = 1, version: int = 1) -> Placement:
    """One replica per expert, in contiguous blocks; block edges on multiples of ``align``.

    For product-key pools ``align`` is sqrt(E): each shard holds whole sub-key rows, so the
    experts a token selects (few rows) touch few shards.
    """
    units = math.ceil(num_experts / align)
    unit_shard = torch.arange(units) * num_shards // units
    shard = unit_shard.repeat_interleave(align)[:num_experts]
    starts = torch.searchsorted(shard, torch.arange(num_shards))
    local = torch.arange(num_experts) - starts[shard]
    return Placement(version, num_shards, torch.arange(num_experts + 1), shard, local)


def with_replicas(base: Placement, expert_shards: dict[int, list[int]], version: int) -> Placement:
    """``base`` plus extra replicas: expert -> shards that get one more copy (appended locally)."""
    next_local = torch.bincount(base.shard, minlength=base.num_shards).tolist()
    extra: dict[int, list[tuple[int, int]]] = {}
    for e, shards in expert_shards.items():
        for s in shards:
            extra.setdefault(e, []).append((s, next_local[s]))
            next_local[s] += 1
    counts = base.replicas().clone()
    for e, reps in extra.items():
        counts[e] += len(reps)
    ptr = torch.zeros(base.num_experts + 1, dtype=torch.int64)
    ptr[1:] = counts.cumsum(0)
    shard = torch.empty(int(ptr[-1]), dtype=torch.int64)
    local = torch.empty_like(shard)
    base_counts = base.replicas()
    # copy the base replicas into their new rows, then the extra ones after them
    offs = torch.repeat_interleave(ptr[:-1] - base.ptr[:-1], base_counts)
    rows = torch.arange(base.shard.numel()) + offs
    shard[rows], local[rows] = base.shard, base.local
    for e, reps in extra.items():
        at = int(ptr[e]) + int(base_counts[e])
        for i, (s, loc) in enumerate(reps):
            shard[at + i], local[at + i] = s, loc
    return Placement(version, base.num_shards, ptr, shard, local)


def replicated(base: Placement, targets: dict[int, int], version: int | None = None) -> Placement:
    """``base`` with expert ``e`` on ``targets[e]`` shards: the extra replicas go on the shards
    after its first replica's (wrapping round), so copies of one expert never share a shard."""
    first, _ = base.primary()
    extra = {}
    for e, count in sorted(targets.items()):
        have = int(base.replicas()[e])
        start = int(first[e])
        extra[e] = [(start + j) % base.num_shards for j in range(have, min(count, base.num_shards))]
    extra = {e: s for e, s in extra.items() if s}
    return with_replicas(base, extra, base.version if version is None else version)
