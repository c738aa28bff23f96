"""Autoscaling with hysteresis (pure)."""

from __future__ import annotations

import numpy as np
import pytest

from raymoe.placement import bias_step, shards_for


@pytest.mark.parametrize("rate,shards,want", [
    (0, 4, 1),        # idle: down to the minimum
    (350, 4, 4),      # under the target per shard, but 3 shards would carry 117 > 60 each
    (400, 4, 4),      # exactly at the target: stay
    (401, 4, 6),      # above: grow to carry it at 80% of the target
    (170, 4, 3),      # one fewer would carry 57 <= 60 each: shrink to what fits at 80%
    (10_000, 4, 8),   # capped by hi
])  # fmt: skip
def test_shards_for_has_hysteresis(rate, shards, want):
    assert shards_for(rate, shards, target=100, down_below=0.6, lo=1, hi=8) == want


def test_shards_for_never_oscillates():
    for rate in np.linspace(0, 2000, 401):
        n = shards_for(rate, 4, target=100, down_below=0.6, lo=1, hi=32)
        assert shards_for(rate, n, target=100, down_below=0.6, lo=1, hi=32) == n, rate


def test_bias_step_moves_live_experts_towards_the_mean():
    counts = np.array([10.0, 0.0, 5.0, 99.0])
    live = np.array([True, True, True, False])
    out = bias_step(np.zeros(4), counts, 0.1, live)
    assert out.tolist() == [-0.1, 0.1, 0.0, 0.0]  # mean of the live ones: 5
