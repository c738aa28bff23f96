"""The dispatch stage's failure rules (``spec.faults``) on a router over in-process shards
(no Ray): hedging past a silent shard, suspects, failing or degrading when every replica of
an expert is unreachable."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch

from raymoe._private.data.attempts import Suspects
from raymoe.errors import DeadlineExceededError
from tests.unit.data.test_router import LocalShards, make, run

ALL_TWICE = {e: 2 for e in range(8)}


class SilentShards(LocalShards):
    """Shards ``silent`` never answer (as on a node that died: no error, no reply)."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.silent: set[int] = set()

    async def compute(self, shard, x, local_ids, weights, digest):
        if shard in self.silent:
            self.calls[shard] += 1
            await asyncio.Event().wait()
        return await super().compute(shard, x, local_ids, weights, digest)


def silent_router(faults: dict, replicas=None, shards=2):
    router, layer, local = make({"kind": "topk", "k": 2}, shards=shards, replicas=replicas)
    transport = SilentShards.__new__(SilentShards)
    transport.__dict__.update(local.__dict__, silent=set())
    router.shards = transport
    router.attempts.faults = router.spec.faults.model_copy(update=faults)
    return router, layer, transport


def test_a_silent_shard_is_hedged_to_other_replicas_and_then_avoided():
    router, layer, transport = silent_router({"hedge_after_s": 0.02}, replicas=ALL_TWICE)
    transport.silent.add(1)
    x = torch.randn(20, 16)
    y = run(router.forward(x.numpy(), timeout_s=5))
    with torch.no_grad():
        want = layer(x).numpy()
    assert np.abs(y - want).max() <= 1e-5
    assert router.stats()["counters"]["hedges"] == 1
    calls = transport.calls[1]
    y = run(router.forward(x.numpy(), timeout_s=5))  # shard 1 is suspect: nothing goes there
    assert np.abs(y - want).max() <= 1e-5
    assert transport.calls[1] == calls and router.stats()["counters"]["hedges"] == 1


def test_calls_waiting_on_a_shard_another_actor_now_serves_go_to_it():
    """Shard 1 (no replica) silent, as a call queued on a restarting actor is; then a spare
    serves shard 1: the waiting call is sent again, to it, long before the deadline."""
    router, layer, transport = silent_router({"hedge_after_s": 0.02})
    transport.silent.add(1)
    x = torch.randn(20, 16)

    async def main():
        call = asyncio.ensure_future(router.forward(x.numpy(), timeout_s=2))
        await asyncio.sleep(0.15)
        transport.silent.discard(1)  # the spare answers
        router.attempts.redirected(1)
        return await call

    y = run(main())
    with torch.no_grad():
        assert np.abs(y - layer(x).numpy()).max() <= 1e-5


def test_pairs_with_nowhere_to_go_move_once_a_replica_is_back():
    """Shard 0 silent, shard 1 failing when the hedge comes (so it is suspect): the pairs
    wait on shard 0, and move to shard 1 once it is no longer suspect."""
    faults = {"hedge_after_s": 0.02, "suspect_s": 0.2}
    router, layer, transport = silent_router(faults, replicas=ALL_TWICE)
    transport.silent.add(0)
    transport.down[1] = 1
    x = torch.randn(20, 16)
    y = run(router.forward(x.numpy(), timeout_s=2))
    with torch.no_grad():
        assert np.abs(y - layer(x).numpy()).max() <= 1e-5


def test_a_silent_only_replica_fails_the_request_at_its_deadline_by_default():
    router, _, transport = silent_router({"hedge_after_s": 0.02})
    transport.silent.update({0, 1})
    with pytest.raises(DeadlineExceededError):
        run(router.forward(np.ones((4, 16), np.float32), timeout_s=0.3))


@pytest.mark.parametrize("renormalise", [True, False])
@pytest.mark.parametrize("failure", ["down", "silent"])
def test_degrade_drops_unreachable_experts_and_renormalises_the_rest(failure, renormalise):
    faults = {"on_unreachable": "degrade", "degrade_after_s": 0.05, "hedge_after_s": 0.02}
    faults["renormalise"] = renormalise
    router, layer, transport = silent_router(faults)
    if failure == "down":
        transport.down[1] = 10**9
    else:
        transport.silent.add(1)
    x = torch.randn(24, 16)
    y, info = run(router.forward(x.numpy(), timeout_s=5, info=True))
    with torch.no_grad():
        _, route = layer(x, return_info=True)
        ids, w = route.expert_ids, route.weights
        t = router.table
        on_1 = t.shard[t.ptr[:-1]][ids] == 1  # the pairs whose expert lives on shard 1
        kept = torch.where(on_1, 0.0, w)
        total, left = w.sum(1, keepdim=True), kept.sum(1, keepdim=True)
        scaled = torch.where(left > 0, kept * total / left.clamp(min=1e-30), 0.0)
        weights = scaled if renormalise else kept
        want = layer(x, expert_ids=torch.where(on_1, -1, ids), weights=weights).numpy()
    assert np.abs(y - want).max() <= 1e-5
    lost = int(on_1.any(1).sum())
    assert lost > 0 and info == {"degraded_tokens": lost}
    c = router.stats()["counters"]
    assert c["degraded_requests"] == 1 and c["degraded_rows"] == lost
    assert c["dropped_pairs"] == int(on_1.sum())


def test_suspects_expire_and_clear_on_an_answer():
    now = [0.0]
    s = Suspects(clock=lambda: now[0])
    s.mark(1, 2.0)
    assert s.mask(3).tolist() == [False, True, False]
    now[0] = 2.5
    assert s.mask(3) is None
    s.mark(2, 1.0)
    s.clear(2)
    assert s.mask(3) is None
