"""Pure helpers for experts added at runtime: the grown spec, the grown gate weights, the
validated new rows and where the new experts go. No Ray calls; the controller applies them."""

from __future__ import annotations

import numpy as np
import torch

from raymoe._private import policy
from raymoe._private.placement import Placement
from raymoe.config import PoolSpec
from raymoe.errors import ConfigError, DTypeError, NonFiniteError, ShapeError
from raymoe.kernels import make_bank


def initial_placement(spec: PoolSpec) -> Placement:
    """Contiguous blocks (whole sub-key rows for product-key pools), the spec's replica
    targets, and no replica for removed experts."""
    from raymoe._private.placement import contiguous, replicated

    r = spec.routing
    align = r.grid(spec.num_experts)[1] if r.kind == "product_key" else 1
    p = contiguous(spec.num_experts, spec.shards.count, align=align)
    if spec.shards.replicas:
        p = replicated(p, spec.shards.replicas)
    if spec.experts.removed:
        expert, shard = policy.pairs(p)
        keep = ~np.isin(expert, spec.experts.removed)
        p = policy.realize(p, expert[keep], shard[keep], p.version)
    return p


MAX_ADD = 1 << 20  # experts one add_experts call may create


def grown_spec(spec: PoolSpec, count: int) -> PoolSpec:
    """``spec`` with ``count`` more experts, or a ConfigError saying why it cannot grow."""
    r = spec.routing
    if isinstance(count, bool) or not isinstance(count, (int, np.integer)):
        raise ConfigError(f"count must be an int, got {type(count).__name__}", "count")
    if not 1 <= count <= MAX_ADD:
        raise ConfigError(f"count must be in [1, {MAX_ADD}], got {count}", "count")
    data = spec.model_dump(mode="json")
    if r.kind == "product_key":
        cols = r.grid(spec.num_experts)[1]
        if count % cols:
            raise ConfigError(f"a product_key pool grows by whole sub-key rows of {cols} "
                              f"experts; {count} is not a multiple of {cols}", "count")  # fmt: skip
        data["routing"]["columns"] = cols
    elif r.kind != "topk" or r.n_groups is not None:
        raise ConfigError(f"{r.kind} routing cannot add experts at runtime; topk (without "
                          "groups) and product_key can", "routing")  # fmt: skip
    data["experts"]["num_experts"] = spec.num_experts + count
    return PoolSpec.from_dict(data)


def gate_shapes(spec: PoolSpec, count: int) -> dict[str, tuple[int, ...]]:
    """Shapes of the gate rows that ``count`` new experts of ``spec`` bring."""
    r, d = spec.routing, spec.d_model
    if r.kind == "product_key":
        return {"router.keys": (r.heads, count // r.grid(spec.num_experts)[1], r.d_key // 2)}
    out = {"router.weight": (count, d)}
    if r.bias:
        out["router.bias"] = (count,)
    if r.noise:
        out["router.noise.weight"] = (count, d)
    if r.correction_bias:
        out["router.correction_bias"] = (count,)
    return out


def new_weights(grown: PoolSpec, E: int, count: int, weights: dict):
    """Validate an add_experts ``weights`` dict -> (expert rows by bank name, gate rows)."""
    bank = make_bank(grown, torch.zeros(1, dtype=torch.int64))
    want = {f"experts.{k}": (count, *v.shape[1:]) for k, v in bank.export_rows(
        torch.zeros(1, dtype=torch.int64)).items()}  # fmt: skip
    want.update(gate_shapes(grown, count))
    unknown = sorted(set(weights) - set(want))
    if unknown:
        raise ConfigError(f"unknown weights {unknown[:5]}; expected {sorted(want)}", "weights")
    expert_rows, gate_rows = {}, {}
    for name, v in weights.items():
        a = np.asarray(v)
        if a.dtype.kind != "f":
            raise DTypeError(f"{name} must be a float array, got {a.dtype}")
        if a.shape != want[name]:
            raise ShapeError(f"{name} must have shape {list(want[name])}, got {list(a.shape)}")
        if not np.isfinite(a).all():
            raise NonFiniteError(f"{name} contains NaN or Inf")
        a = a.astype(np.float32 if grown.dtype != "float64" else np.float64)
        if name.startswith("experts."):
            expert_rows[name.removeprefix("experts.")] = a
        else:
            gate_rows[name] = a
    if expert_rows and len(expert_rows) != sum(n.startswith("experts.") for n in want):
        missing = sorted(n for n in want if n.startswith("experts.") and
                         n.removeprefix("experts.") not in expert_rows)  # fmt: skip
        raise ConfigError(f"expert weights {missing} missing (give all or none)", "weights")
    return expert_rows or None, gate_rows


def grow_gate(old: PoolSpec, grown: PoolSpec, gate: dict, rows: dict) -> dict:
    """The gate weights of ``grown``: ``gate`` with the new experts' rows appended (given in
    ``rows``, else drawn from the seeded init by expert id)."""
    from raymoe.kernels.init import init_rows

    E, count = old.num_experts, grown.num_experts - old.num_experts
    out = {k: np.asarray(v) for k, v in gate.items()}
    for name, shape in gate_shapes(grown, count).items():
        new = rows.get(name)
        if new is None and name == "router.correction_bias":
            new = np.zeros(shape, np.float32)
        elif new is None:
            ids = torch.arange(E, E + count) if name != "router.keys" else torch.arange(
                shape[1]) + E // shape[1]  # fmt: skip
            scale = grown.d_model**-0.5 if name != "router.keys" else (shape[2]) ** -0.5
            per = shape[1:] if name != "router.keys" else (shape[0], shape[2])
            new = init_rows(f"{name}.grown", ids, per, seed=grown.seed, scale=scale,
                            dtype=torch.float32).numpy()  # fmt: skip
            if name == "router.keys":
                new = new.transpose(1, 0, 2)  # [rows, h, c] -> [h, rows, c]
        if name == "router.keys":
            out[name] = grow_keys(out[name], old, grown, new)
        else:
            out[name] = np.concatenate([out[name], new.astype(out[name].dtype)])
    return out


def grow_keys(keys: np.ndarray, old: PoolSpec, grown: PoolSpec, new_rows: np.ndarray):
    """[h, 2, n, c] sub-keys with ``new_rows`` ([h, r, c]) appended to the row half; both
    halves padded to the longer one."""
    rows, cols = old.routing.grid(old.num_experts)
    rows2, _ = grown.routing.grid(grown.num_experts)
    h, _, _, c = keys.shape
    out = np.zeros((h, 2, max(rows2, cols), c), keys.dtype)
    out[:, 0, :rows] = keys[:, 0, :rows]
    out[:, 0, rows:rows2] = new_rows
    out[:, 1, :cols] = keys[:, 1, :cols]
    return out


def place_new(p: Placement, count: int, align: int, active: np.ndarray) -> Placement:
    """``p`` with experts ``E .. E+count-1`` added, in units of ``align`` (whole sub-key rows),
    each unit on the active shard holding the fewest replicas at that point."""
    E = p.num_experts
    held = np.bincount(p.shard.numpy(), minlength=p.num_shards).astype(np.float64)
    held[~active] = np.inf
    shard = np.empty(count, np.int64)
    for u in range(count // align):  # NOTE: a loop over units (rows), not experts
        n = int(np.argmin(held))
        shard[u * align : (u + 1) * align] = n
        held[n] += align
    ptr = torch.cat([p.ptr, p.ptr[-1].repeat(count)])
    wide = Placement(p.version, p.num_shards, ptr, p.shard, p.local)
    expert, old_shard = policy.pairs(p)
    return policy.realize(wide, np.concatenate([expert, np.arange(E, E + count)]),
                          np.concatenate([old_shard, shard]), p.version + 1)  # fmt: skip


def seeded_rows(spec: PoolSpec, ids: np.ndarray) -> dict[str, np.ndarray]:
    bank = make_bank(spec, torch.as_tensor(ids))
    return {k: v.numpy() for k, v in bank.export_rows(torch.arange(len(ids))).items()}
