"""Expert banks against naive loops, forward and backward; shard-independent init."""

from __future__ import annotations

import pytest
import torch

from raymoe import PoolSpec
from raymoe.kernels import ffn, make_bank, peer
from raymoe.kernels.grouping import group_by_expert
from tests import naive
from tests.helpers import spec_dict


def _routes(T, S, E, seed=0, empty=0.2):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, E, (T, S), generator=g)
    ids[torch.rand(T, S, generator=g) < empty] = -1
    return ids, torch.rand(T, S, generator=g)


def _bank(kind="ffn", E=6, **ex):
    spec = PoolSpec.from_dict(spec_dict({"kind": "topk", "k": 1}, E=E, kind=kind, **ex))
    return spec, make_bank(spec)


FFN_CASES = [
    {"gated": True, "activation": "silu"},
    {"gated": True, "activation": "gelu", "bias": True},
    {"gated": False, "activation": "relu"},
    {"gated": False, "activation": "gelu_tanh", "bias": True},
    # GPT-OSS: a limit this low clamps many gate and up values (both sides)
    {"gated": True, "activation": "silu", "bias": True, "clamped_swiglu": {"limit": 0.3}},
    {"gated": True, "activation": "silu", "weight_input": True},  # Llama 4
]


def _case_id(ex: dict) -> str:
    extra = [k for k in ("clamped_swiglu", "weight_input") if k in ex]
    return "-".join([str(ex["gated"]), ex["activation"], *extra])


# Each way the bank computes its grouped projections (see ``ffn._layout``): one grouped_mm
# (19 tokens reach every expert), a loop over the few experts 2 tokens reach, a padded bmm.
LAYOUTS = {"grouped_mm": (0.0, 19), "loop": (0.0, 2), "padded": (float("inf"), 19)}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("ex", FFN_CASES, ids=_case_id)
def test_ffn_bank_forward_backward_match_loops(ex, layout, monkeypatch):
    pad_ratio, T = LAYOUTS[layout]
    monkeypatch.setattr(ffn, "PAD_RATIO", pad_ratio)
    _spec, bank = _bank(**ex)
    with torch.no_grad():  # biases start at random too, but make sure they are non-zero
        for name, p in bank.named_parameters():
            if name.startswith("b_"):
                p.normal_()
    x = torch.randn(T, 16, requires_grad=True)
    ids, w = _routes(T, 3 if T > 2 else 1, 6, empty=0.2 if T > 2 else 0.0)
    lay = ffn._layout(group_by_expert(ids, w, 6))
    assert layout == (
        "padded" if isinstance(lay, ffn._Padded) else "loop" if lay.sparse else "grouped_mm"
    )
    y = bank(x, ids, w)
    sd = {f"experts.{n}": p for n, p in bank.named_parameters()}
    ref_params = {k: v.detach().clone().requires_grad_() for k, v in sd.items()}
    x2 = x.detach().clone().requires_grad_()
    clamp = ex.get("clamped_swiglu") and {"alpha": 1.702, **ex["clamped_swiglu"]}
    ref = naive.combine(
        lambda e, xt: naive.ffn_expert(ref_params, e, xt, ex["gated"], ex["activation"], clamp),
        x2,
        ids,
        w,
        weight_input=ex.get("weight_input", False),
    )
    assert (y - ref).abs().max() <= 1e-5
    g = torch.randn_like(y)
    y.backward(g)
    ref.backward(g)
    torch.testing.assert_close(x.grad, x2.grad, atol=1e-5, rtol=1e-4)
    for name, p in bank.named_parameters():
        torch.testing.assert_close(p.grad, ref_params[f"experts.{name}"].grad, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("chunk", [None, 2], ids=["one-chunk", "chunks-of-2"])
@pytest.mark.parametrize("sparse", [True, False])
def test_peer_bank_forward_backward_match_loops(sparse, chunk, monkeypatch):
    if chunk:  # 2 tokens at a time (7 slots x d=16 each)
        monkeypatch.setattr(peer, "GATHERED_PER_CHUNK", chunk * 7 * 16)
    _spec, bank = _bank("peer", E=50, sparse_grad=sparse)
    x = torch.randn(9, 16, requires_grad=True)
    ids, w = _routes(9, 7, 50)
    y = bank(x, ids, w)
    ref_params = {
        f"experts.{n}": p.detach().clone().requires_grad_() for n, p in bank.named_parameters()
    }
    x2 = x.detach().clone().requires_grad_()
    ref = naive.combine(lambda e, xt: naive.peer_expert(ref_params, e, xt, "gelu"), x2, ids, w)
    assert (y - ref).abs().max() <= 1e-5
    g = torch.randn_like(y)
    y.backward(g)
    ref.backward(g)
    torch.testing.assert_close(x.grad, x2.grad, atol=1e-5, rtol=1e-4)
    for name, p in bank.named_parameters():
        assert p.grad.is_sparse == sparse
        torch.testing.assert_close(
            p.grad.to_dense(), ref_params[f"experts.{name}"].grad, atol=1e-5, rtol=1e-4
        )


def test_group_by_expert_sorts_once_and_skips_empty_slots():
    ids = torch.tensor([[2, -1], [0, 2], [-1, -1]])
    w = torch.tensor([[0.1, 0.2], [0.3, 0.4], [0.5, 0.6]])
    g = group_by_expert(ids, w, 3)
    assert g.expert.tolist() == [0, 2, 2]
    assert g.token.tolist() == [1, 0, 1]
    assert g.weight.tolist() == pytest.approx([0.3, 0.1, 0.4])
    assert g.counts.tolist() == [1, 0, 2] and g.offsets.tolist() == [1, 1, 3]


@pytest.mark.parametrize("kind", ["ffn", "peer"])
def test_subset_bank_equals_rows_of_full_bank(kind):
    from raymoe.kernels.init import block_rows

    E = 140_000 if kind == "peer" else 9_000  # several init blocks either way
    spec, full = _bank(kind, E=E)
    B = block_rows((16,) if kind == "peer" else (24, 16))
    assert E > 2 * B
    ids = torch.tensor([E - 1, 3, B + 1, 2 * B - 1, 0])
    part = make_bank(spec, ids)
    for (name, p), (_, q) in zip(full.named_parameters(), part.named_parameters(), strict=True):
        assert torch.equal(p[ids], q), name


def test_export_import_rows_round_trip():
    _, bank = _bank(E=5)
    rows = bank.export_rows(torch.tensor([1, 3]))
    _, other = _bank(E=5)
    with torch.no_grad():
        for p in other.parameters():
            p.zero_()
    other.import_rows(torch.tensor([0, 4]), rows)
    assert torch.equal(other.w_gate[0], bank.w_gate[1])
    assert torch.equal(other.w_down[4], bank.w_down[3])
    assert other.w_up[2].abs().sum() == 0
    with pytest.raises(KeyError):
        other.import_rows(torch.tensor([0]), {"w_gate": rows["w_gate"][:1]})


def test_empty_batch_and_all_empty_slots():
    _, bank = _bank()
    assert bank(
        torch.zeros(0, 16), torch.zeros(0, 2, dtype=torch.long), torch.zeros(0, 2)
    ).shape == (0, 16)
    y = bank(torch.randn(3, 16), torch.full((3, 2), -1), torch.ones(3, 2))
    assert torch.equal(y, torch.zeros(3, 16))
