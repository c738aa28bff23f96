"""The weights of experts added at runtime, on their own: validation of given rows, the grown
gate (given rows, or exactly those of MoELayer of the grown spec), seeded expert rows."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from raymoe import ConfigError, DTypeError, MoELayer, PoolSpec, ShapeError
from raymoe._private.control import growth
from raymoe.errors import NonFiniteError
from tests.helpers import spec_dict

TOPK = PoolSpec.from_dict(spec_dict({"kind": "topk", "k": 2, "bias": True}, E=8))
PK = PoolSpec.from_dict(spec_dict({"kind": "product_key", "heads": 2, "k": 2, "d_key": 8},
                                  E=16, kind="peer"))  # fmt: skip


def _gate(spec):
    layer = MoELayer(spec)
    return {k: v.detach().numpy() for k, v in layer.state_dict().items() if k.startswith("router")}


def test_new_weights_split_expert_and_gate_rows():
    grown = TOPK.with_experts_added(2)
    rows = {"experts.w_gate": np.ones((2, 24, 16), np.float32),
            "experts.w_up": np.ones((2, 24, 16), np.float32),
            "experts.w_down": np.ones((2, 16, 24), np.float32),
            "router.weight": np.ones((2, 16), np.float64)}  # fmt: skip
    expert_rows, gate_rows = growth.new_weights(grown, 8, 2, rows)
    assert set(expert_rows) == {"w_gate", "w_up", "w_down"}
    assert gate_rows["router.weight"].dtype == np.float32  # cast to the pool's dtype
    assert growth.new_weights(grown, 8, 2, {}) == (None, {})


@pytest.mark.parametrize("rows,error,match", [
    ({"router.weight": np.ones((2, 16), np.int32)}, DTypeError, "float"),
    ({"router.weight": np.ones((3, 16), np.float32)}, ShapeError, r"\[2, 16\]"),
    ({"router.bias": np.full((2,), np.inf, np.float32)}, NonFiniteError, "NaN or Inf"),
    ({"experts.w_up": np.ones((2, 24, 16), np.float32)}, ConfigError, "missing"),
    ({"experts.w_nope": np.ones((2, 3), np.float32)}, ConfigError, "unknown"),
])  # fmt: skip
def test_bad_new_weights_are_typed_errors(rows, error, match):
    with pytest.raises(error, match=match):
        growth.new_weights(TOPK.with_experts_added(2), 8, 2, rows)


def test_a_grown_gate_without_rows_is_that_of_the_grown_layer():
    grown = TOPK.with_experts_added(3)
    gate = growth.grow_gate(TOPK, grown, _gate(TOPK), {})
    want = _gate(grown)  # MoELayer of the grown spec draws its gate rows by expert id
    for k in ("router.weight", "router.bias"):
        assert np.array_equal(gate[k], want[k]), k
    given = np.full((3, 16), 0.5, np.float32)
    gate = growth.grow_gate(TOPK, grown, _gate(TOPK), {"router.weight": given})
    assert np.array_equal(gate["router.weight"][8:], given)
    assert np.array_equal(gate["router.weight"][:8], _gate(TOPK)["router.weight"])


def test_a_product_key_gate_grows_by_rows_of_sub_keys():
    grown = PK.with_experts_added(8)  # two rows of four columns
    gate = growth.grow_gate(PK, grown, _gate(PK), {})
    want = _gate(grown)["router.keys"]  # [heads, 2, 6, 4]: rows 0..5 of the row half
    assert gate["router.keys"].shape == want.shape
    assert np.array_equal(gate["router.keys"][:, 0, :6], want[:, 0, :6])
    assert np.array_equal(gate["router.keys"][:, 1, :4], want[:, 1, :4])  # columns unchanged


def test_seeded_rows_are_the_layers_rows_of_those_ids():
    grown = TOPK.with_experts_added(2)
    rows = growth.seeded_rows(grown, np.array([8, 9]))
    layer = MoELayer(grown)
    assert torch.equal(torch.as_tensor(rows["w_gate"]), layer.experts.w_gate[8:10].detach())
