"""Small requests sent from the caller straight to the shards (``limits.direct_max_tokens``)
on real pools: every routing kind equals ``MoEStack`` (<= 1e-5) over both transports, the
load the controller balances counts them, and they go on through placement changes and a
shard's SIGKILL without a failed request (what the direct path misses, a router serves)."""

from __future__ import annotations

import os
import signal
import threading
import time

import numpy as np
import pytest
import ray
import torch

import raymoe
from raymoe import MoELayer, MoEStack, NonFiniteError, PoolSpec
from tests.helpers import spec_dict
from tests.integration.test_layers import D, every_kind_spec, inputs, random_weights

pytestmark = pytest.mark.integration


def direct_ready(pool, d: int = D) -> None:
    """Wait (bounded) until the handle holds a router's publication: small requests go
    straight to the shards from then on."""
    end = time.monotonic() + 30
    while time.monotonic() < end:
        if pool.forward(torch.randn(2, d), return_info=True)[1].direct:
            return
        time.sleep(0.05)
    raise AssertionError("no request went straight to the shards in 30 s")


def counted(pool, name: str, at_least: int) -> int:
    """Wait (bounded) until the pool's stats count ``at_least`` of counter ``name``: a
    handle hands its direct requests' traffic to a router within a second, with no more
    requests (read from another handle: a handle's own stats() hands it over first)."""
    other = raymoe.connect(pool.name)
    end = time.monotonic() + 30
    while time.monotonic() < end:
        got = other.stats(window_s=3600).counters.get(name, 0)
        if got >= at_least:
            return got
        time.sleep(0.2)
    raise AssertionError(f"{name} stayed under {at_least}")


@pytest.mark.parametrize("transport", ["object_store", "grpc"])
def test_every_routing_kind_served_straight_to_the_shards_equals_moestack(ray_cluster, transport):
    spec = every_kind_spec(f"t-direct-{transport}", transport)
    stack = MoEStack(spec).eval()
    pool = raymoe.serve(spec, weights=random_weights(stack, 3))
    try:
        direct_ready(pool)
        load = pool.stats(window_s=3600).expert_load.sum()
        sent = 0
        for layer in range(spec.num_layers):
            for seed in range(3):
                kw = inputs(spec, layer, seed)
                with torch.no_grad():
                    want = stack(kw["x"], layer=layer, token_ids=kw.get("token_ids"))
                got, info = pool.forward(**kw, layer=layer, return_info=True)
                assert info.direct, (layer, spec.layer(layer).routing.kind)
                assert (got - want).abs().max().item() <= 1e-5, (layer, spec.layer(layer).routing)
                sent += 1
        x = torch.randn(5, D)
        with torch.no_grad():
            want = stack(x, layer=0)
            _, routes = stack.layers[0](x, return_info=True)
        got = pool.forward(x.numpy(), layer=0)  # numpy in, numpy out
        assert isinstance(got, np.ndarray) and np.abs(got - want.numpy()).max() <= 1e-5
        got, info = pool.forward(
            x, layer=0, expert_ids=routes.expert_ids, weights=routes.weights, return_info=True
        )  # client routes
        assert info.direct and (got - want).abs().max().item() <= 1e-5
        big = torch.randn(spec.limits.direct_max_tokens + 1, D)
        with torch.no_grad():
            want = stack(big, layer=0)
        got, info = pool.forward(big, layer=0, return_info=True)
        assert not info.direct and (got - want).abs().max().item() <= 1e-5  # a router's
        with pytest.raises(NonFiniteError):  # bad input: the router's typed error
            pool.forward(torch.full((2, D), float("nan")))
        counted(pool, "direct_requests", sent + 2)
        assert pool.stats(window_s=3600).expert_load.sum() > load  # their pairs count as load
    finally:
        pool.shutdown()


@pytest.mark.parametrize("transport", ["object_store", "grpc"])
def test_direct_requests_through_a_drain_a_rebalance_and_a_shard_kill(ray_cluster, transport):
    data = spec_dict({"kind": "topk", "k": 2}, E=8, shared={"hidden": 8})
    layout = {"count": 3, "routers": 2, "transport": transport, "replicas": {0: 2, 5: 2}}
    spec = PoolSpec.from_dict({**data, "name": f"t-direct-ops-{transport}", "shards": layout})
    layer = MoELayer(spec).eval()
    pool = raymoe.serve(spec, weights=random_weights(layer, 5))
    xs = [torch.randn(16, D, generator=torch.Generator().manual_seed(i)) for i in range(8)]
    with torch.no_grad():
        wants = [layer(x) for x in xs]
    stop, errors, failures, direct = threading.Event(), [], [], []

    def client():
        i = 0
        while not stop.is_set():
            try:
                got, info = pool.forward(xs[i % 8], return_info=True)
                errors.append((got - wants[i % 8]).abs().max().item())
                direct.append((time.monotonic(), info.direct))
            except BaseException as e:  # the test asserts there are none
                failures.append(e)
            i += 1

    try:
        direct_ready(pool)
        thread = threading.Thread(target=client)
        thread.start()
        version = pool.describe().placement_version
        pool.drain_shard(1)
        pool.rebalance()
        shard = ray.get_actor(f"{pool.name}:shard:0", namespace="raymoe")
        pid = ray.get(shard.__ray_call__.remote(lambda self: os.getpid()), timeout=60)
        os.kill(pid, signal.SIGKILL)
        time.sleep(2.0)  # requests meet the dead shard meanwhile
        end = time.monotonic() + 60
        while pool.describe().degraded:
            assert time.monotonic() < end, "the killed shard did not come back"
            time.sleep(0.2)
        assert ray.get(shard.__ray_call__.remote(lambda self: os.getpid()), timeout=60) != pid
        after = time.monotonic()
        time.sleep(3.0)  # past faults.suspect_s: small requests go straight again
        stop.set()
        thread.join(timeout=60)
        assert not failures, failures[:1]
        assert max(errors) <= 1e-5 and len(errors) > 50
        assert pool.describe().placement_version > version
        assert any(d for t, d in direct if t > after), "no direct request after the kill"
    finally:
        stop.set()
        pool.shutdown()
