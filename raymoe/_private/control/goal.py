"""The goal state of a pool: what the controller converges the actual state to, and saves
before it acts, so that a restarted controller resumes exactly.

It is one frozen value (spec, placement, routing version, drained shards, where the weights
that are not the seeded init are durable, and the change being applied) stored under one key
as a pickle-free ``.npz``: a crash between two writes can never leave half of it updated.
The operator's pins, and the experts added and removed, are the spec's: one source of truth.

Weights live on the shards only. What a shard reloads after a restart (or a whole pool
after its cluster restarts) is in ``sources``: safetensors files of expert rows (a
checkpoint's row files, then files of experts added since, later files winning), read by
memory map, only the rows the shard holds; experts in none of them have their seeded init.
``gate_file`` holds the gate and shared-expert weights when they are not the seeded ones.
"""

from __future__ import annotations

import dataclasses
import io
import json
from dataclasses import dataclass

import numpy as np

from raymoe.config import PoolSpec
from raymoe.placement import Placement, domains, initial
from raymoe.placement.layered import initial_layers
from raymoe.store import MetadataStore

_ARRAYS = ("ptr", "shard", "local", "layer_offsets")


@dataclass(frozen=True)
class Goal:
    spec: PoolSpec
    placement: Placement
    sources: tuple[str, ...] = ()  # files of expert rows, oldest first (see the module doc)
    gate_file: str | None = None  # the gate weights, if not the seeded ones
    drained: frozenset[int] = frozenset()  # shards that must hold nothing
    routing_version: int = 0  # placement version that last changed spec or gate weights
    pending: Placement | None = None  # the placement being applied ...
    pending_spec: PoolSpec | None = None  # ... and the spec that goes with it, if it changes

    @classmethod
    def initial(cls, spec: PoolSpec) -> Goal:
        """A new pool's goal: contiguous blocks (whole sub-key rows for product-key pools),
        the spec's pins, no replica for removed experts."""
        if spec.multi_layer:  # every layer spread over every shard
            layers = [spec.layer(i) for i in range(spec.num_layers)]
            placement = initial_layers(
                [spec.flat.ids(i) for i in range(spec.num_layers)],
                spec.shards.count,
                [s.routing.align(s.num_experts) for s in layers],
                spec.pins,
                spec.removed_ids,
            )
            return cls(spec, _spread(spec, placement))
        E = spec.num_experts
        placement = initial(
            E,
            spec.shards.count,
            align=spec.routing.align(E),
            replicas=spec.pins,
            removed=spec.experts.removed,
        )
        return cls(spec, _spread(spec, placement))

    def replace(self, **changes) -> Goal:
        return dataclasses.replace(self, **changes)

    @property
    def has_rows(self) -> bool:
        """Whether some expert's weights are not its seeded init."""
        return bool(self.sources)

    # --- the store ---------------------------------------------------------------------

    @staticmethod
    def key(pool: str) -> str:
        return f"{pool}/goal"

    def save(self, store: MetadataStore) -> None:
        store.put(self.key(self.spec.name), self.to_bytes())

    @classmethod
    def load(cls, store: MetadataStore, pool: str) -> Goal:
        data = store.get(cls.key(pool))
        if data is None:
            raise LookupError(f"no saved state for pool {pool!r}")
        return cls.from_bytes(data)

    @classmethod
    def forget(cls, store: MetadataStore, pool: str) -> None:
        for key in store.keys(f"{pool}/"):
            store.delete(key)

    def to_bytes(self) -> bytes:
        meta = {
            "spec": self.spec.model_dump(mode="json"),
            "sources": list(self.sources),
            "gate_file": self.gate_file,
            "drained": sorted(self.drained),
            "routing_version": self.routing_version,
            "placement": _meta(self.placement),
            "pending": _meta(self.pending),
            "pending_spec": self.pending_spec.model_dump(mode="json")
            if self.pending_spec
            else None,
        }
        arrays = {f"placement.{k}": getattr(self.placement, k) for k in _ARRAYS}
        if self.pending is not None:
            arrays.update({f"pending.{k}": getattr(self.pending, k) for k in _ARRAYS})
        buf = io.BytesIO()
        np.savez(buf, meta=np.frombuffer(json.dumps(meta).encode(), np.uint8), **arrays)
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> Goal:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            meta = json.loads(z["meta"].tobytes())
            arrays = {k: z[k].astype(np.int64) for k in z.files if k != "meta"}
        pending_spec = meta["pending_spec"]
        return cls(
            spec=PoolSpec.from_dict(meta["spec"]),
            placement=_placement(meta["placement"], arrays, "placement"),
            sources=tuple(meta["sources"]),
            gate_file=meta["gate_file"],
            drained=frozenset(meta["drained"]),
            routing_version=meta["routing_version"],
            pending=_placement(meta["pending"], arrays, "pending"),
            pending_spec=PoolSpec.from_dict(pending_spec) if pending_spec else None,
        )


def _meta(p: Placement | None) -> dict | None:
    return None if p is None else {"version": p.version, "num_shards": p.num_shards}


def _placement(meta: dict | None, arrays: dict, prefix: str) -> Placement | None:
    if meta is None:
        return None
    return Placement(
        meta["version"], meta["num_shards"], *(arrays[f"{prefix}.{k}"] for k in _ARRAYS)
    )


def _spread(spec: PoolSpec, placement: Placement) -> Placement:
    """``placement`` with ``shards.min_replicas`` replicas of each expert on distinct shards
    (the nodes are not known yet: the controller spreads them over nodes once shards run)."""
    m = spec.shards.min_replicas
    if m <= 1:
        return placement
    return domains.spread(placement, np.arange(placement.num_shards), m, spec.pins)
