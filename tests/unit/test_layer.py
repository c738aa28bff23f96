"""MoELayer at its boundary: neutral state-dict names, loading, typed errors on bad input."""

from __future__ import annotations

import pytest
import torch

from raymoe import (
    DTypeError,
    ExpertIdError,
    InvalidInputError,
    LayoutError,
    MoELayer,
    NonFiniteError,
    PoolSpec,
    ShapeError,
)
from tests import naive
from tests.helpers import make_layer, spec_dict

TOPK = {"kind": "topk", "k": 2}


def test_state_dict_uses_neutral_names():
    layer = make_layer(
        {"kind": "topk", "k": 2, "bias": True, "score": "sigmoid", "correction_bias": True},
        shared={"hidden": 8, "gate": True},
    )
    assert set(layer.state_dict()) == {
        "router.weight",
        "router.bias",
        "router.correction_bias",
        "experts.w_gate",
        "experts.w_up",
        "experts.w_down",
        "shared.w_gate",
        "shared.w_up",
        "shared.w_down",
        "shared_gate.weight",
    }
    sd = layer.state_dict()
    assert sd["experts.w_gate"].shape == (8, 24, 16) and sd["experts.w_down"].shape == (8, 16, 24)
    assert sd["shared.w_down"].shape == (16, 8) and sd["shared_gate.weight"].shape == (1, 16)
    pk = make_layer({"kind": "product_key", "heads": 2, "k": 2, "d_key": 4}, E=16, kind="peer")
    shapes = {k: tuple(v.shape) for k, v in pk.state_dict().items()}
    assert shapes == {
        "router.query.weight": (8, 16),
        "router.keys": (2, 2, 4, 2),
        "experts.u": (16, 16),
        "experts.v": (16, 16),
    }


def test_load_state_dict_round_trip_changes_output():
    a, b = make_layer(TOPK, seed=1), make_layer(TOPK, seed=2)
    x = torch.randn(5, 16)
    assert not torch.equal(a(x), b(x))
    b.load_state_dict(a.state_dict())
    assert torch.equal(a(x), b(x))


def test_spec_from_yaml_path_and_same_weights_for_same_seed(tmp_path):
    p = tmp_path / "s.yaml"
    spec = PoolSpec.from_dict(spec_dict(TOPK))
    p.write_text(spec.to_yaml())
    a, b = MoELayer(str(p)), MoELayer(spec)
    x = torch.randn(4, 16)
    assert torch.equal(a(x), b(x))


def test_client_routes_bypass_the_gate():
    layer = make_layer(TOPK)
    x = torch.randn(6, 16)
    y, info = layer(x, return_info=True)
    y2 = layer(x, expert_ids=info.expert_ids, weights=info.weights)
    assert torch.equal(y, y2)


def test_backward_reaches_router_and_experts():
    layer = make_layer({**TOPK, "aux_loss_coef": 0.1})
    y, info = layer(torch.randn(8, 16), return_info=True)
    (y.square().mean() + info.aux_loss).backward()
    assert layer.router.weight.grad.abs().sum() > 0
    assert layer.experts.w_down.grad.abs().sum() > 0


BAD_INPUTS = [
    ("wrong last dim", lambda: {"x": torch.randn(4, 15)}, ShapeError, "shape \\[..., 16\\]"),
    ("1-d", lambda: {"x": torch.randn(16)}, ShapeError, "shape"),
    ("dtype", lambda: {"x": torch.randn(4, 16, dtype=torch.float64)}, DTypeError, "float32"),
    ("int", lambda: {"x": torch.ones(4, 16, dtype=torch.long)}, DTypeError, "float32"),
    ("nan", lambda: {"x": torch.full((4, 16), float("nan"))}, NonFiniteError, "NaN"),
    (
        "inf",
        lambda: {"x": torch.tensor([[float("inf")] + [0.0] * 15])},
        NonFiniteError,
        "1 NaN/Inf",
    ),
    (
        "-inf among values",
        lambda: {"x": torch.randn(4, 16).index_fill_(1, torch.tensor([3]), float("-inf"))},
        NonFiniteError,
        "4 NaN/Inf",
    ),
    ("non-contiguous", lambda: {"x": torch.randn(16, 4).T}, LayoutError, "contiguous"),
    ("wrong device", lambda: {"x": torch.randn(2, 16, device="meta")}, LayoutError, "meta"),
    ("not a tensor", lambda: {"x": [[0.0] * 16]}, InvalidInputError, "torch.Tensor"),
    (
        "ids out of range",
        lambda: {
            "x": torch.randn(2, 16),
            "expert_ids": torch.tensor([[0, 8]] * 2),
            "weights": torch.ones(2, 2),
        },
        ExpertIdError,
        "8",
    ),
    (
        "ids negative",
        lambda: {
            "x": torch.randn(2, 16),
            "expert_ids": torch.tensor([[0, -2]] * 2),
            "weights": torch.ones(2, 2),
        },
        ExpertIdError,
        "-2",
    ),
    (
        "ids/weights shapes",
        lambda: {
            "x": torch.randn(2, 16),
            "expert_ids": torch.zeros(2, 2).long(),
            "weights": torch.ones(2, 3),
        },
        ShapeError,
        "does not match",
    ),
    (
        "ids float",
        lambda: {
            "x": torch.randn(2, 16),
            "expert_ids": torch.zeros(2, 2),
            "weights": torch.ones(2, 2),
        },
        DTypeError,
        "int64",
    ),
    (
        "weights nan",
        lambda: {
            "x": torch.randn(2, 16),
            "expert_ids": torch.zeros(2, 2).long(),
            "weights": torch.full((2, 2), float("nan")),
        },
        NonFiniteError,
        "weights",
    ),
]


@pytest.mark.parametrize("name,make,err,msg", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_gets_a_typed_error_and_changes_nothing(name, make, err, msg):
    layer = make_layer(TOPK)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    kw = make()
    x = kw.pop("x")
    with pytest.raises(err, match=msg):
        layer(x, **kw)
    after = layer.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_nonfinite_allowed_when_spec_says_so():
    """With ``limits.allow_nonfinite`` a token with an Inf is computed, not refused: it
    gets what the naive loop gives it (NaN where the loop gives NaN), and the finite
    tokens of the same batch are untouched by it."""
    d = spec_dict(TOPK)
    d["limits"] = {"allow_nonfinite": True}
    layer = MoELayer(d)
    x = torch.randn(3, 16)
    x[1, 4] = float("inf")
    y, info = layer(x, return_info=True)
    sd = {k: v.detach() for k, v in layer.state_dict().items()}
    expert = lambda e, t: naive.ffn_expert(sd, e, t, gated=True, act="silu")  # noqa: E731
    ref = naive.combine(expert, x, info.expert_ids, info.weights)
    torch.testing.assert_close(y, ref, equal_nan=True, atol=1e-5, rtol=0)
    assert not torch.isfinite(y[1]).all() and torch.isfinite(y[[0, 2]]).all()
    torch.testing.assert_close(y[[0, 2]], layer(x[[0, 2]]), atol=1e-6, rtol=0)


def test_hash_routing_needs_valid_token_ids():
    layer = make_layer({"kind": "hash", "vocab_size": 10})
    with pytest.raises(InvalidInputError, match="token_ids"):
        layer(torch.randn(2, 16))
    with pytest.raises(InvalidInputError, match=r"\[0, 10\)"):
        layer(torch.randn(2, 16), token_ids=torch.tensor([0, 10]))
    with pytest.raises(ShapeError):
        layer(torch.randn(2, 16), token_ids=torch.tensor([0]))


def test_sequence_capacity_needs_3d_input():
    layer = make_layer({"kind": "switch", "capacity": 2, "capacity_scope": "sequence"})
    with pytest.raises(ShapeError, match=r"\[B, L, d\]"):
        layer(torch.randn(4, 16))


@pytest.mark.parametrize("kind", ["ffn", "peer"])
def test_bfloat16_spec_runs_and_tracks_fp32(kind):
    routing = (
        {"kind": "topk", "k": 2}
        if kind == "ffn"
        else {"kind": "product_key", "heads": 2, "k": 2, "d_key": 8}
    )
    d = spec_dict(routing, E=16, kind=kind, shared={"hidden": 8})
    fp32, bf16 = MoELayer(d), MoELayer({**d, "dtype": "bfloat16"})
    x = torch.randn(8, 16)
    y32, i32 = fp32(x, return_info=True)
    y16, i16 = bf16(x.to(torch.bfloat16), return_info=True)
    assert y16.dtype == torch.bfloat16
    same = (i32.expert_ids == i16.expert_ids).all(1)  # rows routed alike (near-ties may differ)
    assert same.sum() >= 6
    assert (y16.float()[same] - y32[same]).abs().max() < 0.05 * y32.abs().max()
    with pytest.raises(DTypeError, match="bfloat16"):
        bf16(x)
