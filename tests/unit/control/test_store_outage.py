"""The controller and a metadata store that goes away: changes refused before any side
effect, a change under way finished and saved once the store is back, the audit log kept."""

from __future__ import annotations

import pytest
import torch

from raymoe import StoreUnavailableError
from raymoe._private.control.goal import Goal
from raymoe.placement import contiguous
from raymoe.store import MemoryStore
from tests.unit.control.fakes import close, run, settle, setup, start


class FlakyStore(MemoryStore):
    """A MemoryStore that refuses every call while ``down``."""

    def __init__(self):
        super().__init__()
        self.down = False

    def _check(self):
        if self.down:
            raise StoreUnavailableError("the metadata store (test) is unreachable")

    def get(self, key):
        self._check()
        return super().get(key)

    def put(self, key, value):
        self._check()
        super().put(key, value)

    def append(self, key, entry, keep=10):
        self._check()
        super().append(key, entry, keep)


def test_a_change_before_the_outage_is_refused_and_changes_nothing():
    store = FlakyStore()
    ctl, _, layer, weights = setup(store)
    start(ctl, contiguous(8, 2), weights)
    store.down = True
    with pytest.raises(StoreUnavailableError):
        run(ctl.replicate(3, 2))
    with pytest.raises(StoreUnavailableError):
        run(ctl.pin(3, 2))
    assert ctl.placement.version == 1 and ctl.spec.pins == {}
    close(ctl, layer, torch.randn(9, 16))  # serving goes on


def test_a_change_under_way_is_saved_once_the_store_is_back():
    store = FlakyStore()
    ctl, cluster, layer, weights = setup(store)
    start(ctl, contiguous(8, 2), weights)

    async def outage():  # the store goes away after the pending change was saved
        store.down = True

    cluster.before["drained"] = outage
    report = run(ctl.replicate(3, 2))
    assert report.version == 2 and ctl.placement.replicas()[3] == 2
    assert any("metadata store" in p for p in ctl.describe().degraded)
    ctl.journal.audit({"op": "replicate"})  # kept in memory meanwhile
    del cluster.before["drained"]
    store.down = False
    assert Goal.load(store, ctl.spec.name).pending is not None  # not saved yet
    settle(ctl)
    saved = Goal.load(store, ctl.spec.name)
    assert saved.pending is None and saved.placement.version == 2
    assert ctl.describe().degraded == () and ctl.journal.tail()[-1]["op"] == "replicate"
    close(ctl, layer, torch.randn(9, 16))
