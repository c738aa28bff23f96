"""The controller's load window: pairs per expert, decayed with a half-life, and the token
rate decayed alike (what autoscaling and rebalancing plan with). Pure; the clock is
injectable."""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import numpy as np


class LoadWindow:
    """Shapes: E experts. ``load`` [E] is the decayed pairs per expert."""

    def __init__(
        self, num_experts: int, half_life_s: float, clock: Callable[[], float] = time.monotonic
    ):
        self.half_life_s = half_life_s
        self.clock = clock
        self.load = np.zeros(num_experts)
        self.rate = 0.0  # tokens/s
        self._t = clock()

    def add(self, counts: list[np.ndarray | None], removed, slots: int) -> np.ndarray:
        """Fold the routers' new per-expert counts in (None: a router that did not answer);
        -> the new counts alone."""
        now = self.clock()
        dt = max(now - self._t, 1e-3)
        decay = 0.5 ** (dt / self.half_life_s)
        self._t = now
        fresh = np.zeros_like(self.load)
        for c in counts:
            if c is not None:  # NOTE: lengths differ briefly while experts are added
                m = min(len(c), len(fresh))
                fresh[:m] += c[:m]
        fresh[list(removed)] = 0
        self.load = self.load * decay + fresh
        self.rate = decay * self.rate + (1 - decay) * fresh.sum() / max(slots, 1) / dt
        return fresh

    def per_second(self) -> np.ndarray:
        """[E] pairs per second: the decayed sum over its mean age (a steady rate r fills
        the window to r * half_life / ln 2)."""
        return self.load * math.log(2) / self.half_life_s

    def resize(self, num_experts: int, removed) -> None:
        """Experts were added (zero load) or removed (their load forgotten)."""
        grown = np.zeros(num_experts)
        grown[: min(len(self.load), num_experts)] = self.load[:num_experts]
        grown[list(removed)] = 0
        self.load = grown

    def or_uniform(self, removed) -> np.ndarray:
        """The window, or a uniform load over live experts when nothing was measured."""
        if self.load.sum() > 0:
            return self.load
        load = np.ones(len(self.load))
        load[list(removed)] = 0
        return load
