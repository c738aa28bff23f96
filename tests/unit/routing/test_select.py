"""Canonical top-k: the k largest, ties towards the lower index, ordered (score desc, index asc)."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from raymoe.routing import select_topk
from tests.naive import topk_list


@settings(max_examples=200, deadline=None)
@given(
    rows=st.lists(
        st.lists(
            st.sampled_from([-1.0, 0.0, 0.5, 1.0, 2.0, float("-inf")]), min_size=6, max_size=6
        ),
        min_size=1,
        max_size=5,
    ),
    k=st.integers(1, 6),
)
def test_select_topk_equals_sorted_reference(rows, k):
    s = torch.tensor(rows)
    vals, idx = select_topk(s, k)
    for r, row in enumerate(rows):
        want = topk_list(row, k)
        assert idx[r].tolist() == want
        assert vals[r].tolist() == [row[i] for i in want]


def test_select_topk_keeps_leading_dims_and_gradients():
    s = torch.randn(2, 3, 10, requires_grad=True)
    vals, idx = select_topk(s, 4)
    assert vals.shape == idx.shape == (2, 3, 4)
    vals.sum().backward()
    assert s.grad.sum() == 2 * 3 * 4


def test_select_topk_ties_beyond_the_fast_topk_range():
    row = [1.0] * 10 + [2.0] * 12 + [0.5] * 20 + [1.0] * 10
    _, idx = select_topk(torch.tensor([row, row[::-1]]), 17)
    for r, data in enumerate([row, row[::-1]]):
        assert idx[r].tolist() == topk_list(data, 17)
