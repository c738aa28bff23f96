"""The load window decays with its half-life (fake clock) and follows the expert count."""

from __future__ import annotations

import numpy as np
import pytest

from raymoe._private.control.load import LoadWindow


def test_load_decays_by_half_every_half_life_and_rate_follows():
    now = [0.0]
    w = LoadWindow(4, half_life_s=2.0, clock=lambda: now[0])
    now[0] = 1.0
    fresh = w.add([np.array([10, 0, 0, 0]), None], removed=(), slots=2)
    assert fresh.tolist() == [10, 0, 0, 0] and w.rate > 0
    now[0] = 3.0
    w.add([np.zeros(4)], removed=(), slots=2)
    assert w.load[0] == pytest.approx(5.0)


def test_removed_and_added_experts():
    w = LoadWindow(3, half_life_s=1.0, clock=lambda: 0.0)
    w.load[:] = [1, 2, 3]
    w.resize(5, removed=(1,))
    assert w.load.tolist() == [1, 0, 3, 0, 0]
    assert w.or_uniform(removed=(1,)).tolist() == [1, 0, 3, 0, 0]
    w.load[:] = 0
    assert w.or_uniform(removed=(1,)).tolist() == [1, 0, 1, 1, 1]
