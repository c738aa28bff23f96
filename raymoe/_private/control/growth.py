"""Pure helpers for the weights of experts added at runtime: validating the rows an operator
gives, growing the gate, drawing seeded rows. No Ray calls; the controller applies them.
(The grown spec is ``PoolSpec.with_experts_added``; where the new experts go is
``raymoe.placement.place_new``.)"""

from __future__ import annotations

import numpy as np
import torch

from raymoe._private.data.gates import layer_weights, prefix
from raymoe.config import PoolSpec
from raymoe.errors import ConfigError, DTypeError, NonFiniteError, ShapeError
from raymoe.kernels import make_bank, seeded_bank


def gate_shapes(grown: PoolSpec, count: int) -> dict[str, tuple]:
    """Shapes of the gate rows that the last ``count`` experts of ``grown`` bring."""
    return grown.routing.gate_rows(grown.d_model, grown.num_experts, count)


def new_weights(grown: PoolSpec, E: int, count: int, weights: dict):
    """Validate an add_experts ``weights`` dict -> (expert rows by bank name, gate rows)."""
    bank = make_bank(grown, torch.zeros(1, dtype=torch.int64))
    want = {
        f"experts.{k}": (count, *v.shape[1:])
        for k, v in bank.export_rows(torch.zeros(1, dtype=torch.int64)).items()
    }
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
        missing = sorted(
            n
            for n in want
            if n.startswith("experts.") and n.removeprefix("experts.") not in expert_rows
        )
        raise ConfigError(f"expert weights {missing} missing (give all or none)", "weights")
    return expert_rows or None, gate_rows


def grow_gate(old: PoolSpec, grown: PoolSpec, gate: dict, rows: dict) -> dict:
    """The gate weights of ``grown``: ``gate`` with the new experts' rows appended, given in
    ``rows`` or else the seeded ones of their ids (those of ``MoELayer(grown)``)."""
    from raymoe.routing.base import gate_rows
    from raymoe.routing.product_key import key_rows

    E, count = old.num_experts, grown.num_experts - old.num_experts
    out = {k: np.asarray(v) for k, v in gate.items()}
    for name, shape in gate_shapes(grown, count).items():
        new = rows.get(name)
        if name == "router.keys":
            if new is None:
                first = old.routing.grid(E)[0]
                new = key_rows(grown, 0, torch.arange(first, first + shape[1])).numpy()
            out[name] = grow_keys(out[name], old, grown, new)
            continue
        first = len(out[name]) if name in out else E  # rows stack over experts, or groups
        if new is None and name == "router.correction_bias":
            new = np.zeros(shape, np.float32)
        elif new is None:
            rows_new = torch.arange(first, first + shape[0])
            new = gate_rows(grown, name, rows_new, shape[1:]).numpy()
        out[name] = np.concatenate([out[name], new.astype(out[name].dtype)])
    return out


def grow_layer_gate(old: PoolSpec, grown: PoolSpec, layer: int, gate: dict, rows: dict) -> dict:
    """The pool gate weights of ``grown``: :func:`grow_gate` of layer ``layer`` (``rows``
    by the layer's names), every other layer's as they were."""
    p = prefix(old, layer)
    mine = layer_weights(old, gate, layer)
    new = grow_gate(old.layer(layer), grown.layer(layer), mine, rows)
    out = {k: v for k, v in gate.items() if p and not k.startswith(p)}
    out.update({p + k: v for k, v in new.items()})
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


def seeded_rows(spec: PoolSpec, ids: np.ndarray) -> dict[str, np.ndarray]:
    """The seeded init of flat ids ``ids``, by bank name."""
    bank = seeded_bank(spec, torch.as_tensor(ids))
    return {k: v.numpy() for k, v in bank.export_rows(torch.arange(len(ids))).items()}
