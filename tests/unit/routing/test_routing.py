"""Every routing kind against a naive per-token reference (tests/naive.py)."""

from __future__ import annotations

import math

import pytest
import torch

from raymoe import MoELayer, PoolSpec
from raymoe.routing import product_key
from tests import naive
from tests.helpers import make_layer, spec_dict, state


def _x(T: int, d: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.randn(T, d, generator=torch.Generator().manual_seed(seed))


def _check(layer: MoELayer, x: torch.Tensor, ids, ws, **fwd) -> None:
    y, info = layer(x, return_info=True, **fwd)
    width = max((len(r) for r in ids), default=0)
    pad_ids = torch.tensor([r + [-1] * (width - len(r)) for r in ids], dtype=torch.long)
    pad_w = torch.tensor([r + [0.0] * (width - len(r)) for r in ws])
    got_ids = info.expert_ids[:, : max(width, 1)] if width else info.expert_ids
    assert torch.equal(got_ids[:, :width], pad_ids)
    assert (info.expert_ids[:, width:] == -1).all()
    torch.testing.assert_close(info.weights[:, :width], pad_w, atol=1e-6, rtol=0)
    sd = state(layer)
    ex = layer.spec.experts
    if ex.kind == "ffn":
        fn = lambda e, xt: naive.ffn_expert(sd, e, xt, ex.gated, ex.activation)  # noqa: E731
    else:
        fn = lambda e, xt: naive.peer_expert(sd, e, xt, ex.activation)  # noqa: E731
    ref = naive.combine(fn, x.view(-1, x.shape[-1]), pad_ids, pad_w).view(x.shape)
    assert (y - ref).abs().max().item() <= 1e-5


TOPK_CASES = {
    "softmax": {"kind": "topk", "k": 2},
    "softmax-renorm": {"kind": "topk", "k": 2, "renormalize": True},
    "sigmoid-scaled": {
        "kind": "topk",
        "k": 3,
        "score": "sigmoid",
        "renormalize": True,
        "scaling": 2.5,
    },
    "bias": {"kind": "topk", "k": 2, "bias": True},
    "correction-bias": {"kind": "topk", "k": 2, "score": "sigmoid", "correction_bias": True},
    "groups-top2": {
        "kind": "topk",
        "k": 3,
        "score": "sigmoid",
        "correction_bias": True,
        "n_groups": 4,
        "topk_groups": 2,
        "group_score": "top2_sum",
    },
    "groups-max": {"kind": "topk", "k": 2, "n_groups": 4, "topk_groups": 1, "group_score": "max"},
    "k-equals-E": {"kind": "topk", "k": 8, "renormalize": True},
}


@pytest.mark.parametrize("case", sorted(TOPK_CASES))
@pytest.mark.parametrize("T", [1, 7, 64])
def test_topk_matches_naive(case, T):
    r = TOPK_CASES[case]
    layer = make_layer(r)
    x = _x(T)
    ids, ws = naive.topk_routes(state(layer), x, r)
    _check(layer, x, ids, ws)


def test_topk_noise_only_in_training():
    r = {"kind": "topk", "k": 2, "noise": True}
    layer = make_layer(r).eval()
    x = _x(16)
    sd = state(layer)
    ids, ws = naive.topk_routes(sd, x, r)
    _check(layer, x, ids, ws)  # eval: no noise
    layer.train()
    torch.manual_seed(3)
    _, info = layer(x, return_info=True)
    torch.manual_seed(3)
    noise = torch.randn(16, 8)
    logits = x @ sd["router.weight"].T
    logits = logits + noise * torch.nn.functional.softplus(x @ sd["router.noise.weight"].T)
    probs = logits.softmax(-1)
    for t in range(16):
        assert info.expert_ids[t].tolist() == naive.topk_list(probs[t].tolist(), 2)


def test_topk_ties_break_towards_lower_id():
    layer = make_layer({"kind": "topk", "k": 2}, d=4, E=6)
    with torch.no_grad():
        layer.router.weight.zero_()  # every logit equal: a 6-way tie
    _, info = layer(_x(3, d=4), return_info=True)
    assert info.expert_ids.tolist() == [[0, 1]] * 3
    torch.testing.assert_close(info.weights, torch.full((3, 2), 1 / 6))


def test_dense_matches_naive():
    layer = make_layer({"kind": "dense"})
    x = _x(9)
    r = {"kind": "topk", "k": 8}
    ids, ws = naive.topk_routes(state(layer), x, r)
    order = [sorted(zip(i, w, strict=True)) for i, w in zip(ids, ws, strict=True)]
    _check(layer, x, [[e for e, _ in o] for o in order], [[w for _, w in o] for o in order])


@pytest.mark.parametrize("cf,T", [(1.0, 40), (0.5, 40), (4.0, 40), (1.0, 1)])
def test_switch_capacity_per_batch(cf, T):
    layer = make_layer({"kind": "switch", "capacity_factor": cf})
    x = _x(T)
    cap = max(1, math.ceil(cf * T / 8))
    ids, ws = naive.switch_routes(state(layer), x, 8, cap)
    _, info = layer(x, return_info=True)
    assert info.load.dropped_tokens == sum(1 for r in ids if r == [-1])
    _check(layer, x, ids, ws)


def test_switch_capacity_overflow_drops_to_zero():
    layer = make_layer({"kind": "switch", "capacity": 1}, E=4)
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[2, 0] = 10.0  # everyone wants expert 2
    x = _x(5).abs()
    y, info = layer(x, return_info=True)
    assert info.expert_ids.squeeze(1).tolist() == [2, -1, -1, -1, -1]
    assert info.load.dropped_tokens == 4
    assert (y[1:] == 0).all() and (y[0] != 0).any()


def test_switch_capacity_per_sequence():
    layer = make_layer({"kind": "switch", "capacity": 2, "capacity_scope": "sequence"})
    x = _x(24).view(3, 8, 16)
    ids, ws = naive.switch_routes(state(layer), x.view(-1, 16), 8, 2, seq_len=8)
    _check(layer, x, ids, ws)


@pytest.mark.parametrize("cf,k,T", [(1.0, 1, 32), (2.0, 2, 17), (1.0, 8, 5), (0.25, 1, 64)])
def test_expert_choice_matches_naive(cf, k, T):
    layer = make_layer({"kind": "expert_choice", "k": k, "capacity_factor": cf})
    x = _x(T)
    cap = min(T, math.ceil(cf * T * k / 8))
    ids, ws = naive.expert_choice_routes(state(layer), x, 8, cap)
    _, info = layer(x, return_info=True)
    assert info.load.dropped_tokens == sum(1 for r in ids if not r)
    _check(layer, x, ids, ws)


def test_hash_routing_is_balanced_and_fixed():
    layer = make_layer({"kind": "hash", "vocab_size": 1000})
    table = layer.router.hash_table
    counts = torch.bincount(table, minlength=8)
    assert counts.max() - counts.min() <= 1
    tok = torch.tensor([5, 999, 0, 5])
    x = _x(4)
    ids = [[int(table[t])] for t in tok]
    _check(layer, x, ids, [[1.0]] * 4, token_ids=tok)


@pytest.mark.parametrize("chunk", [None, 4], ids=["one-chunk", "chunks-of-4"])
@pytest.mark.parametrize("bn", [False, True])
@pytest.mark.parametrize("T", [1, 13])
def test_product_key_matches_brute_force(bn, T, chunk, monkeypatch):
    if chunk:  # tokens scored 4 at a time (3 heads x 2 halves x 8 sub-keys each)
        monkeypatch.setattr(product_key, "SCORES_PER_CHUNK", chunk * 3 * 2 * 8)
    r = {"kind": "product_key", "heads": 3, "k": 4, "d_key": 8, "query_batchnorm": bn}
    layer = make_layer(r, E=64, kind="peer").eval()
    sd = state(layer)
    shift = torch.zeros(3 * 8)
    if bn:  # fold eval-mode batch norm into the brute force's query projection
        norm = layer.router.query_norm
        with torch.no_grad():
            norm.running_mean.normal_()
            norm.running_var.uniform_(0.5, 2.0)
            scale = norm.weight / torch.sqrt(norm.running_var + norm.eps)
            sd["router.query.weight"] = sd["router.query.weight"] * scale[:, None]
            shift = norm.bias - norm.running_mean * scale
    x = _x(T)
    ids, ws = naive.product_key_routes(sd, x, r["heads"], r["k"], r["d_key"], 8, shift=shift)
    _check(layer, x, ids, ws)


@pytest.mark.parametrize("G,kg,k", [(4, 1, 1), (4, 2, 2), (2, 2, 4)])
def test_hierarchical_matches_naive(G, kg, k):
    layer = make_layer({"kind": "hierarchical", "n_groups": G, "k_groups": kg, "k": k})
    x = _x(11)
    ids, ws = naive.hierarchical_routes(state(layer), x, 8, G, kg, k)
    _check(layer, x, ids, ws)


@pytest.mark.parametrize("per_expert", [1, 3])
@pytest.mark.parametrize("shape", [(1, 1), (2, 7), (3, 16)])
def test_soft_moe_matches_naive(per_expert, shape):
    layer = make_layer({"kind": "soft", "slots_per_expert": per_expert}, E=4, bias=True)
    x = torch.randn(*shape, 16, generator=torch.Generator().manual_seed(3))
    y, info = layer(x, return_info=True)
    sd = state(layer)
    fn = lambda e, xt: naive.ffn_expert(sd, e, xt, True, "silu")  # noqa: E731
    assert (y - naive.soft_moe(sd, x, fn, per_expert)).abs().max().item() <= 1e-5
    B, n = shape[0], 4 * per_expert  # one row per slot: its expert, weight 1
    assert info.expert_ids.view(-1).tolist() == [s // per_expert for s in range(n)] * B
    assert info.load.tokens_per_expert.tolist() == [B * per_expert] * 4


def test_soft_moe_backward_reaches_gate_and_experts():
    layer = make_layer({"kind": "soft", "slots_per_expert": 2}, E=4)
    x = torch.randn(2, 5, 16, requires_grad=True)
    layer(x).square().sum().backward()
    assert x.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in layer.parameters())


def test_soft_moe_refuses_flat_input_and_client_routes():
    from raymoe import InvalidInputError, ShapeError

    layer = make_layer({"kind": "soft"}, E=4)
    with pytest.raises(ShapeError, match=r"soft routing works per sequence"):
        layer(torch.randn(5, 16))
    with pytest.raises(InvalidInputError, match="no client routes"):
        layer(torch.randn(1, 5, 16), expert_ids=torch.zeros(5, 1).long(), weights=torch.ones(5, 1))
    assert layer(torch.zeros(0, 3, 16)).shape == (0, 3, 16)


@pytest.mark.parametrize(
    "routing",
    [
        {"kind": "switch", "capacity_factor": 1.25},
        {"kind": "switch", "capacity": 3},
        {"kind": "expert_choice", "k": 2, "capacity_factor": 1.5},
        {"kind": "topk", "k": 2, "renormalize": True},
        {"kind": "dense"},
    ],
    ids=lambda r: "-".join(str(v) for v in r.values()),
)
def test_a_removed_expert_is_as_if_deleted(routing):
    """Removing experts 1 and 5 of 8 gives the layer of the 6 others, ids mapped."""
    full = make_layer(routing, E=8)
    removed = PoolSpec.from_dict(
        {
            **full.spec.model_dump(mode="json"),
            "experts": {**full.spec.experts.model_dump(), "removed": [1, 5]},
        }
    )
    layer = MoELayer(removed)
    layer.load_state_dict(full.state_dict())
    keep = [0, 2, 3, 4, 6, 7]
    small = MoELayer(spec_dict(routing, E=6))
    small.load_state_dict({k: v[keep] for k, v in full.state_dict().items()})
    x = _x(23)
    y, info = layer(x, return_info=True)
    want, want_info = small(x, return_info=True)
    assert (y - want).abs().max().item() <= 1e-5
    mapped = torch.where(want_info.expert_ids >= 0, torch.tensor(keep)[want_info.expert_ids], -1)
    assert torch.equal(info.expert_ids[:, : mapped.shape[1]], mapped)
    assert not ((info.expert_ids == 1) | (info.expert_ids == 5)).any()


def test_shared_expert_with_gate_matches_naive():
    r = {"kind": "topk", "k": 2}
    layer = make_layer(r, shared={"hidden": 20, "gate": True})
    x = _x(6)
    sd = state(layer)
    ids, ws = naive.topk_routes(sd, x, r)
    y = layer(x)
    pad = torch.tensor(ids)
    routed = naive.combine(
        lambda e, xt: naive.ffn_expert(sd, e, xt, True, "silu"), x, pad, torch.tensor(ws)
    )
    assert (y - routed - naive.shared_expert(sd, x)).abs().max() <= 1e-5


def test_aux_losses_match_formulas():
    r = {"kind": "topk", "k": 2, "aux_loss_coef": 0.5, "z_loss_coef": 0.1}
    layer = make_layer(r)
    x = _x(32)
    _, info = layer(x, return_info=True)
    logits = x @ layer.router.weight.T
    probs = logits.softmax(-1)
    counts = torch.zeros(8)
    for row in info.expert_ids.tolist():
        for e in row:
            counts[e] += 1
    lb = 8 * sum((counts[i] / 32) * probs[:, i].mean() for i in range(8))
    z = torch.stack([torch.logsumexp(logits[t], -1) ** 2 for t in range(32)]).mean()
    torch.testing.assert_close(info.aux_losses["load_balancing"], 0.5 * lb)
    torch.testing.assert_close(info.aux_losses["z_loss"], 0.1 * z)
    torch.testing.assert_close(info.aux_loss, 0.5 * lb + 0.1 * z)
    assert info.load.tokens_per_expert.tolist() == counts.long().tolist()


def test_single_token_and_empty_batch():
    layer = make_layer({"kind": "topk", "k": 2})
    y, info = layer(torch.zeros(0, 16), return_info=True)
    assert y.shape == (0, 16) and info.expert_ids.shape == (0, 2)
    y3 = layer(torch.zeros(2, 0, 16))
    assert y3.shape == (2, 0, 16)


def test_groups_leaving_fewer_than_k_is_a_spec_error():
    from raymoe import ConfigError

    with pytest.raises(ConfigError, match="fewer than k=5"):
        PoolSpec.from_dict(spec_dict({"kind": "topk", "k": 5, "n_groups": 4, "topk_groups": 2}))


# --- removed experts: the gate behaves as if their rows were deleted ------------------------


@pytest.mark.parametrize(
    "case", ["softmax", "softmax-renorm", "sigmoid-scaled", "bias", "correction-bias"]
)
def test_topk_with_removed_experts_equals_deleted_gate_rows(case):
    r, removed = TOPK_CASES[case], [1, 4, 5]
    layer = make_layer(r, removed=removed)
    live = [e for e in range(8) if e not in removed]
    sub = {k: v[live] if k.startswith("router.") else v for k, v in state(layer).items()}
    x = _x(23)
    ids, ws = naive.topk_routes(sub, x, r)
    _check(layer, x, [[live[e] for e in row] for row in ids], ws)


def test_dense_with_removed_experts_mixes_only_live_ones():
    layer = make_layer({"kind": "dense"}, removed=[0, 6])
    live = [1, 2, 3, 4, 5, 7]
    x = _x(5)
    probs = torch.softmax(x @ state(layer)["router.weight"][live].T, -1)
    _check(layer, x, [live] * 5, probs.tolist())


def test_product_key_on_a_rectangular_grid_matches_brute_force():
    r = {"kind": "product_key", "heads": 2, "k": 4, "d_key": 8, "columns": 8}
    layer = make_layer(r, E=48, kind="peer").eval()  # 6 rows x 8 columns
    assert layer.router.keys.shape == (2, 2, 8, 4)
    x = _x(17)
    ids, ws = naive.product_key_routes(state(layer), x, 2, 4, 8, 8, rows=6, cols=8)
    _check(layer, x, ids, ws)


def test_product_key_never_selects_removed_experts():
    r = {"kind": "product_key", "heads": 2, "k": 4, "d_key": 8}
    full = make_layer(r, E=256, kind="peer").eval()
    x = _x(40)
    _, before = full(x, return_info=True)
    removed = sorted(set(before.expert_ids[0].tolist()))  # every choice of the first token
    layer = make_layer(r, E=256, kind="peer", removed=removed).eval()
    y, info = layer(x, return_info=True)
    assert not torch.isin(info.expert_ids, torch.tensor(removed)).any()
    assert torch.isfinite(y).all() and torch.isfinite(info.weights).all()
    untouched = ~torch.isin(before.expert_ids, torch.tensor(removed)).any(1)
    assert untouched.sum() > 10  # tokens that never chose a removed expert route as before
    assert torch.equal(info.expert_ids[untouched], before.expert_ids[untouched])


def test_client_routes_to_removed_experts_are_refused():
    from raymoe import ExpertIdError

    layer = make_layer({"kind": "topk", "k": 2}, removed=[3])
    ids = torch.tensor([[0, 3]])
    with pytest.raises(ExpertIdError, match="removed"):
        layer(_x(1), expert_ids=ids, weights=torch.ones(1, 2))


@pytest.mark.parametrize(
    "routing,removed,field",
    [
        ({"kind": "hierarchical", "n_groups": 2, "k": 2}, [0, 1, 2], "experts.removed"),
        ({"kind": "topk", "k": 2}, [9], "experts.removed"),  # out of range
        ({"kind": "topk", "k": 2}, [2, 1], "experts.removed"),  # unsorted
        ({"kind": "topk", "k": 3}, list(range(6)), "experts.removed"),  # fewer live than k
    ],
)
def test_bad_removed_lists_are_config_errors(routing, removed, field):
    from raymoe import ConfigError

    with pytest.raises(ConfigError) as e:
        PoolSpec.from_dict(spec_dict(routing, removed=removed))
    assert e.value.field == field, e.value
