"""The controller's automatic rules, run every ``timeouts.LOAD_INTERVAL_S``: collect the
routers' load; move the selection bias towards balance (DeepSeek-V3's aux-loss-free rule);
autoscale the shard count from the token rate (hysteresis, cooldown); rebalance when the
imbalance passes the target. Each rule is a pure function of :mod:`raymoe.placement`; this
class decides when to run them, through the controller's public operations."""

from __future__ import annotations

import logging
import math
import time
from typing import TYPE_CHECKING

import numpy as np

from raymoe.placement import shards_for

if TYPE_CHECKING:
    from raymoe._private.control.controller import Controller

log = logging.getLogger(__name__)


class ControlLoop:
    def __init__(self, controller: Controller):
        self.ctl = controller
        self._last_rebalance = time.monotonic()
        self._last_scale = -math.inf

    async def step(self) -> None:
        """One control step; never raises (a failed step is logged, the next starts afresh)."""
        ctl = self.ctl
        try:
            counts = await ctl.collect_load()
            ctl.record_state()
            c = ctl.spec.control
            if c.bias_update_rate > 0 and counts.sum() > 0:
                await ctl.update_bias(counts)
            if c.autoscale and not ctl.ops.locked():
                await self.autoscale()
            due = time.monotonic() - self._last_rebalance >= c.rebalance_interval_s
            if c.auto_rebalance and due and not ctl.ops.locked():
                self._last_rebalance = time.monotonic()
                if ctl.imbalance() > c.target_imbalance:
                    await ctl.rebalance(trigger="auto")
        except Exception:
            log.exception("control step failed; retrying on the next pass")

    async def autoscale(self):
        """Scale the shard count for the measured token rate (hysteresis and a cooldown)."""
        ctl = self.ctl
        c = ctl.spec.control
        if time.monotonic() - self._last_scale < c.scale_cooldown_s:
            return None
        live, n = ctl.spec.live_experts, ctl.placement.num_shards
        rate = ctl.load.rate
        want = shards_for(
            rate,
            n,
            target=c.target_tokens_per_shard_s,
            down_below=c.scale_down_below,
            lo=min(c.min_shards, live),
            hi=min(c.max_shards or live, live),
        )
        if want == n:
            return None
        log.info("autoscaling from %d to %d shards at %.0f tokens/s", n, want, rate)
        self._last_scale = time.monotonic()
        return await ctl.scale_shards(want, max_shards=c.max_shards)


def live_mask(num_experts: int, removed) -> np.ndarray:
    live = np.ones(num_experts, bool)
    live[list(removed)] = False
    return live
