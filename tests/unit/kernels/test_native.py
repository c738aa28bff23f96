"""The C kernels against the torch code they stand in for, and against naive loops.

CI builds them (its machine has ``cc``): a test fails, not skips, where they cannot build.
"""

from __future__ import annotations

import logging
import os

import pytest
import torch

from raymoe import MoELayer, PoolSpec
from raymoe.kernels import native, tables
from raymoe.routing import select
from tests import naive


@pytest.fixture
def torch_only(monkeypatch):
    """The torch code everywhere, as where no C compiler is found."""
    monkeypatch.setattr(native, "library", lambda: None)


def _rows(R: int, M: int, ties: bool, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if ties:  # few distinct values: ties inside and across the k-th place
        return torch.randint(-3, 3, (R, M), generator=g).float()
    return torch.randn(R, M, generator=g)


def test_the_library_builds_here():
    assert native.library() is not None


@pytest.mark.parametrize("ties", [False, True], ids=["distinct", "ties"])
@pytest.mark.parametrize(
    ("R", "M", "k"),
    [(3, 8, 2), (5, 9, 8), (7, 33, 16), (4, 40, 17), (2, 64, 63), (300, 1024, 16), (90, 1000, 3)],
)
def test_topk_is_canonical(R, M, k, ties):
    s = _rows(R, M, ties, seed=R + M + k)
    vals, idx = native.topk(s, k)  # the big cases are split over threads
    assert torch.equal(idx, select._torch_topk(s.clone(), k))
    assert torch.equal(vals, s.gather(-1, idx))
    for r in range(0, R, max(1, R // 7)):
        assert idx[r].tolist() == naive.topk_list(s[r].tolist(), k)


def test_topk_with_inf_and_nan_stays_in_range():
    s = torch.randn(4, 50)
    s[0, :] = float("-inf")
    s[1, 3] = float("inf")
    s[2, ::3] = float("nan")
    s[3, :] = float("nan")
    _, idx = native.topk(s, 5)
    assert idx[0].tolist() == list(range(5))
    assert idx[1, 0] == 3
    assert bool(((idx >= 0) & (idx < 50)).all())
    assert all(len(set(row)) == 5 for row in idx.tolist())


def test_select_topk_takes_the_c_kernel_only_where_it_applies(monkeypatch):
    calls = []
    real = native.topk
    monkeypatch.setattr(native, "topk", lambda *a: calls.append(a) or real(*a))
    s = torch.randn(6, 20, requires_grad=True)
    vals, _idx = select.select_topk(s, 4)  # with gradients: values gathered from s
    vals.sum().backward()
    assert s.grad.sum() == 6 * 4 and len(calls) == 1
    assert native.topk(s.detach().double(), 4) is None  # fp64: torch's
    assert native.topk(s.detach().t(), 4) is None  # not contiguous: torch's


@pytest.mark.parametrize("ties", [False, True], ids=["distinct", "ties"])
@pytest.mark.parametrize(("R", "k"), [(5, 1), (9, 4), (40, 16), (3000, 16), (7, 17)])
def test_pk_pairs_equal_the_whole_grid(R, k, ties):
    v1 = _rows(R, k, ties, seed=k).sort(-1, descending=True).values
    v2 = _rows(R, k, ties, seed=k + 1).sort(-1, descending=True).values
    pos = native.pk_pairs(v1, v2)
    grid = (v1.unsqueeze(-1) + v2.unsqueeze(-2)).flatten(-2)
    assert pos.tolist() == [naive.topk_list(row, k) for row in grid.tolist()]


@pytest.mark.parametrize("act", sorted(native.ACTIVATIONS))
@pytest.mark.parametrize(("T", "S", "E", "d"), [(9, 7, 50, 16), (64, 40, 300, 70)])
def test_peer_equals_loops(act, T, S, E, d):
    g = torch.Generator().manual_seed(T)
    u, v = (torch.randn(E, d, generator=g) * d**-0.5 for _ in range(2))  # as seeded
    x = torch.randn(T, d, generator=g)
    ids = torch.randint(0, E, (T, S), generator=g)
    ids[torch.rand(T, S, generator=g) < 0.2] = -1
    w = torch.rand(T, S, generator=g)
    y = native.peer(x, ids, w, u, v, act)
    sd = {"experts.u": u, "experts.v": v}
    ref = naive.combine(lambda e, xt: naive.peer_expert(sd, e, xt, act), x, ids, w)
    assert (y - ref).abs().max() <= 1e-5


def _peer_spec(removed=()) -> PoolSpec:
    return PoolSpec.from_dict(
        {
            "d_model": 32,
            "experts": {"kind": "peer", "num_experts": 1024, "removed": list(removed)},
            "routing": {"kind": "product_key", "heads": 3, "k": 5, "d_key": 16},
        }
    )


@pytest.mark.parametrize("removed", [(), tuple(range(0, 1024, 3))], ids=["all", "removed"])
def test_product_key_layer_equals_the_torch_code(removed, monkeypatch):
    layer = MoELayer(_peer_spec(removed)).eval()
    x = torch.randn(300, 32)
    with torch.no_grad():
        y, info = layer(x, return_info=True)
        monkeypatch.setattr(native, "library", lambda: None)
        y_torch, info_torch = layer(x, return_info=True)
    assert torch.equal(info.expert_ids, info_torch.expert_ids)
    assert torch.equal(info.weights, info_torch.weights)
    assert (y - y_torch).abs().max() <= 1e-5


def test_product_key_gate_trains_through_the_c_kernels():
    layer = MoELayer(_peer_spec())
    layer(torch.randn(20, 32)).square().sum().backward()
    assert layer.router.query.weight.grad.abs().sum() > 0


def test_big_tables_are_zeros_on_huge_page_advice(monkeypatch):
    monkeypatch.setattr(tables, "HUGE_MIN_BYTES", 1 << 20)
    t = tables.zeros((1024, 512), torch.float32, "cpu")
    assert t.shape == (1024, 512) and t.is_contiguous() and not bool(t.any())
    t[7] = 1.0
    assert t.sum() == 512
    small = tables.zeros((4, 4), torch.float64, "cpu")
    assert small.dtype == torch.float64 and not bool(small.any())


def test_off_by_switch_or_without_a_compiler(monkeypatch, tmp_path, caplog):
    monkeypatch.setattr(native, "_tried", False)
    monkeypatch.setattr(native, "_lib", None)
    monkeypatch.setenv(native.SWITCH_ENV, "0")
    assert native.library() is None
    assert native.topk(torch.randn(3, 9), 2) is None
    monkeypatch.setattr(native, "_tried", False)
    monkeypatch.delenv(native.SWITCH_ENV)
    monkeypatch.setenv(native.DIR_ENV, str(tmp_path))
    monkeypatch.setattr(native, "FLAGS", ("-no-such-flag",))
    with caplog.at_level(logging.WARNING):
        assert native.library() is None
    assert "torch code runs" in caplog.text
    _, idx = select.select_topk(torch.tensor([[1.0, 3.0, 2.0]]), 2)  # the torch code
    assert idx.tolist() == [[1, 2]]


def test_torch_only_select_still_canonical(torch_only):
    s = _rows(50, 40, ties=True)
    _, idx = select.select_topk(s, 17)
    for r in range(50):
        assert idx[r].tolist() == naive.topk_list(s[r].tolist(), 17)


def test_a_forked_child_runs_the_threaded_kernels(monkeypatch):
    monkeypatch.setattr(native, "PARALLEL_MIN", 1)
    s = torch.randn(64, 100)
    want = native.topk(s, 5)[1]  # the parent's pool of threads exists now
    pid = os.fork()
    if pid == 0:  # the child: exits 0 only if the kernel answers the same
        ok = torch.equal(native.topk(s, 5)[1], want)
        os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_an_unwritable_cache_builds_in_the_temp_dir(monkeypatch, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    (home / ".cache").write_text("a file where the cache directory would go")
    monkeypatch.setattr(native.Path, "home", lambda: home)
    monkeypatch.setattr(native.tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    monkeypatch.delenv(native.DIR_ENV, raising=False)
    built = native._build()
    assert built.parent == tmp_path / "tmp" / "raymoe-native" and built.exists()
    assert list(built.parent.iterdir()) == [built]  # the build's own directory is gone
