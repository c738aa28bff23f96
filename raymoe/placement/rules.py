"""The controller's automatic rules, as pure functions: how many shards for a token rate
(autoscaling with hysteresis), and DeepSeek-V3's aux-loss-free selection-bias step."""

from __future__ import annotations

import math

import numpy as np


def shards_for(
    rate: float, shards: int, *, target: float, down_below: float, lo: int, hi: int
) -> int:
    """The shard count for ``rate`` tokens/s, with hysteresis: above ``target`` per shard,
    grow to the count that carries the rate at 80% of the target; shrink only when one shard
    fewer would carry at most ``down_below`` x target each. Always within [lo, hi]."""
    fit = max(1, math.ceil(rate / (0.8 * target)))
    if rate > target * shards:
        want = fit
    elif shards > 1 and rate <= down_below * target * (shards - 1):
        want = min(fit, shards - 1)
    else:
        want = shards
    return int(min(max(want, lo), hi))


def bias_step(bias: np.ndarray, counts: np.ndarray, rate: float, live: np.ndarray) -> np.ndarray:
    """DeepSeek-V3's aux-loss-free update: each live expert's selection bias moves by ``rate``
    towards balance (up when it got fewer pairs than the mean, down when more)."""
    mean = counts[live].mean() if live.any() else 0.0
    out = bias.copy()
    out[live] += rate * np.sign(mean - counts[live])
    return out
