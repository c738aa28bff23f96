"""The weight ledger: what a restarted shard reloads stays bounded and right."""

from __future__ import annotations

import torch

from raymoe.placement import contiguous
from tests.unit.control.fakes import close, run, settle, setup


def test_weight_increments_stay_bounded_and_reload_a_shard():
    """Many changes: what the controller keeps to reload a shard stays within twice the
    rows the shard holds, and a shard restarted afterwards serves the right weights."""
    ctl, cluster, layer, weights = setup()
    run(ctl.start(contiguous(8, 2), weights))
    for i in range(12):
        run(ctl.replicate(i % 8, 2))
        run(ctl.replicate(i % 8, 1))
    for n in range(2):
        assert ctl.ledger.size(n) <= 2 * len(ctl.placement.shard_experts(n))
    ctl.roster.shards[0] = cluster.restart("shard", 0)
    settle(ctl)
    close(ctl, layer, torch.randn(9, 16))
