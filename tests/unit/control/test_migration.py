"""Make before break on its own (the Migrator's stages on in-process shards and routers),
and a change cut short by a controller crash, finished by the controller that restarts."""

from __future__ import annotations

import asyncio
import contextlib

import numpy as np
import torch

from raymoe._private.control.controller import Controller
from raymoe._private.control.goal import Goal
from raymoe._private.control.migration import Migrator
from raymoe.placement import contiguous, diff, realize
from raymoe.store import EmbeddedStore
from tests.unit.control.fakes import close, run, setup, start


def _moved(ctl):
    """A target that puts a second replica of expert 0 on shard 1 and moves expert 7 to 0."""
    p = ctl.placement
    e, s = p.pairs()
    s = s.copy()
    s[e == 7] = 0
    return realize(p, np.append(e, 0), np.append(s, 1))


def test_copy_puts_the_rows_of_the_source_replica_at_free_places_only():
    ctl, cluster, _layer, weights = setup()
    start(ctl, contiguous(8, 2), weights)
    old, new = ctl.placement, _moved(ctl)
    before = [sh.expert_ids.clone() for sh in ctl.shards]
    migrator = Migrator(cluster, ctl.expert_bytes)
    run(migrator.copy(old, diff(old, new), ctl.spec, ctl.shards, has_rows=True))
    added = diff(old, new).added
    for e, n, local in zip(*added, strict=True):
        sh = ctl.shards[int(n)]
        assert sh.expert_ids[int(local)] == e  # in place, at a place the old layout left free
        assert int(local) >= len(before[int(n)]) or before[int(n)][int(local)] == -1
        rows = sh.export_experts(np.array([e]))
        assert np.allclose(rows["w_gate"][0], weights["experts.w_gate"][e])
    for n, sh in enumerate(ctl.shards):  # every old place untouched
        assert torch.equal(sh.expert_ids[: len(before[n])], before[n])


def test_drain_waits_for_batches_of_older_versions_and_skips_dead_routers():
    ctl, cluster, _, weights = setup()
    start(ctl, contiguous(8, 2), weights)
    router = ctl.routers[0]
    router._running[1] += 1  # a batch still running under version 1
    cluster.dead.add(id(ctl.routers[1]))
    migrator = ctl.migrator

    async def main():
        waiting = asyncio.ensure_future(migrator.drain(ctl.routers, 2, timeout_s=5))
        await asyncio.sleep(0.05)
        assert not waiting.done()
        router._running[1] -= 1
        await asyncio.wait_for(waiting, 2)

    run(main())


def test_free_forgets_only_the_old_places():
    ctl, _, _, weights = setup()
    start(ctl, contiguous(8, 2), weights)
    old, new = ctl.placement, _moved(ctl)
    change = diff(old, new)
    run(ctl.migrator.copy(old, change, ctl.spec, ctl.shards, has_rows=True))
    run(ctl.migrator.free(change, ctl.shards))
    _, shard, local = diff(old, new).dropped
    for n, loc in zip(shard.tolist(), local.tolist(), strict=True):
        assert ctl.shards[n].expert_ids[loc] == -1
    assert sum(int((sh.expert_ids >= 0).sum()) for sh in ctl.shards) == new.num_replicas


def test_a_change_cut_short_by_a_crash_is_finished_by_the_restarted_controller(tmp_path):
    ctl, cluster, layer, weights = setup(EmbeddedStore(tmp_path), E=16)
    start(ctl, contiguous(16, 2), weights)
    crashed = []

    async def crash():  # the controller's process dies in the middle of copying
        crashed.append(True)
        raise asyncio.CancelledError

    cluster.before["place"] = crash
    with contextlib.suppress(asyncio.CancelledError):
        run(ctl.replicate(3, 2))
    assert crashed  # the fault was hit, mid-copy
    saved = Goal.load(EmbeddedStore(tmp_path), ctl.spec.name)
    assert saved.pending is not None and saved.placement.version == 1
    del cluster.before["place"]
    again = Controller(ctl.spec, cluster, EmbeddedStore(tmp_path))
    run(again.recover())
    assert again.describe().resumed_changes == 1
    assert again.placement.version == saved.pending.version
    assert again.placement.replicas()[3] == 2 and again.goal.pending is None
    assert Goal.load(EmbeddedStore(tmp_path), ctl.spec.name).pending is None
    close(again, layer, torch.randn(30, 16))


def test_free_on_a_shard_that_restarted_empty_changes_nothing():
    ctl, cluster, _, weights = setup()
    start(ctl, contiguous(8, 2), weights)
    old, new = ctl.placement, _moved(ctl)
    change = diff(old, new)
    run(ctl.migrator.copy(old, change, ctl.spec, ctl.shards, has_rows=True))
    ctl.roster.shards[1] = cluster.restart("shard", 1)  # restarted, not reloaded yet
    run(ctl.migrator.free(change, ctl.shards))  # no IndexError on the empty bank
    assert len(ctl.shards[1].expert_ids) == 0


def test_copy_reads_from_another_replica_when_the_first_is_down():
    ctl, cluster, _layer, weights = setup(shards=3)
    p = contiguous(8, 3)
    e, s = p.pairs()
    start(ctl, realize(p, np.append(e, 0), np.append(s, 2)), weights)  # expert 0 on 0 and 2
    cluster.dead.add(id(ctl.shards[0]))  # expert 0's first replica does not answer
    old = ctl.placement
    e, s = old.pairs()
    new = realize(old, np.append(e, 0), np.append(s, 1))  # a third replica, on shard 1
    run(ctl.migrator.copy(old, diff(old, new), ctl.spec, ctl.shards, has_rows=True))
    got = ctl.shards[1].export_experts(np.array([0]))
    want = ctl.shards[2].export_experts(np.array([0]))
    assert all(np.array_equal(got[k], want[k]) for k in want)
