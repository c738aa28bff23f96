"""The gateway of a real pool, over loopback: the SDK's answers equal MoELayer, streams,
health, deadlines, and a table of bad requests get clean statuses (the fuzz tests:
test_gateway_fuzz.py)."""

from __future__ import annotations

import time

import grpc
import numpy as np
import pytest
import ray
import torch

import raymoe
from raymoe._private.data import wire
from raymoe.v1 import admin_pb2, admin_pb2_grpc, pool_pb2_grpc, tensor_pb2
from tests.integration.gateway_common import (
    ADMIN,
    DATA,
    INVALID,
    MAX_TOKENS,
    D,
    E,
    bearer,
    fwd,
    gateway_spec,
    msg,
    want,
)

pytestmark = pytest.mark.integration


def test_client_forward_equals_moelayer(served):
    _, endpoint, layer = served
    with raymoe.Client(endpoint, token=DATA) as c:
        for n in (1, 7, 64):
            x = torch.randn(n, D, generator=torch.Generator().manual_seed(n))
            assert (c.forward(x) - want(layer, x)).abs().max() <= 1e-5
        x = np.random.default_rng(0).standard_normal((2, 5, D), dtype=np.float32)
        y = c.forward(x)
        assert isinstance(y, np.ndarray) and y.shape == x.shape
        assert np.abs(y - want(layer, x).numpy()).max() <= 1e-5
        ids = np.array([[0, 3], [5, -1], [7, 2]], np.int64)
        w = np.array([[0.25, 0.75], [1.0, 0.0], [0.5, 0.5]], np.float32)
        xr = x[0, :3]
        got = c.forward(xr, expert_ids=ids, weights=w)
        assert np.abs(got - want(layer, xr, expert_ids=ids, weights=w).numpy()).max() <= 1e-5
        assert c.stats().requests >= 5


def test_the_gateway_sends_small_requests_straight_to_the_shards(served):
    """As a ``PoolHandle`` does: they equal ``MoELayer`` and count in the pool's stats."""
    _, endpoint, layer = served
    with raymoe.Client(endpoint, token=DATA) as c:
        before = c.stats(window_s=3600).counters.get("direct_requests", 0)
        end = time.monotonic() + 30
        while c.stats(window_s=3600).counters.get("direct_requests", 0) < before + 20:
            assert time.monotonic() < end, "the gateway sent no request straight to the shards"
            for n in (1, 16):
                x = torch.randn(n, D)
                assert (c.forward(x) - want(layer, x)).abs().max() <= 1e-5


def test_stream_equals_moelayer(served):
    _, endpoint, layer = served
    xs = [torch.randn(n, D, generator=torch.Generator().manual_seed(n)) for n in range(1, 21)]
    with raymoe.Client(endpoint, token=DATA) as c:
        ys = list(c.forward_stream(xs))
    assert len(ys) == len(xs)
    errors = [(y - want(layer, x)).abs().max().item() for x, y in zip(xs, ys, strict=True)]
    assert max(errors) <= 1e-5


def test_async_client_equals_pool_handle(served):
    import asyncio

    pool, endpoint, _ = served
    x = torch.randn(32, D, generator=torch.Generator().manual_seed(3))

    async def go():
        async with raymoe.AsyncClient(endpoint, token=ADMIN) as c:
            return await c.forward(x), await c.describe()

    y, d = asyncio.run(go())
    assert torch.equal(y, pool.forward(x))
    want = pool.describe()
    assert d == want  # the SDK returns the handle's own typed values


# --- bad input over the gRPC boundary ------------------------------------------------------


X = np.ones((3, D), np.float32)
IDS = np.array([[0, 1]] * 3, np.int64)
W = np.full((3, 2), 0.5, np.float32)
BAD_FORWARD = {
    "no x": (fwd(), INVALID, "InvalidInputError", "x: required"),
    "int x": (fwd(x=msg(X.astype(np.int32))), INVALID, "DTypeError", "float32"),
    "unknown dtype": (
        fwd(x=tensor_pb2.Tensor(dtype=42, shape=[1, D], data=b"\0" * 4 * D)),
        INVALID,
        "DTypeError",
        "unsupported dtype",
    ),
    "bytes disagree": (
        fwd(x=tensor_pb2.Tensor(dtype=1, shape=[3, D], data=b"\0" * 10)),
        INVALID,
        "InvalidInputError",
        "needs 192 bytes, got 10",
    ),
    "huge shape": (
        fwd(x=tensor_pb2.Tensor(dtype=1, shape=[2**20, 2**20], data=b"")),
        INVALID,
        "RequestTooLargeError",
        "limit",
    ),
    "huge dimension": (
        fwd(x=tensor_pb2.Tensor(dtype=1, shape=[2**63 - 1, D], data=b"")),
        INVALID,
        "ShapeError",
        "dimension over",
    ),
    "zero and huge dimensions": (
        fwd(x=tensor_pb2.Tensor(dtype=1, shape=[0, 2**62], data=b"")),
        INVALID,
        "ShapeError",
        "dimension over",
    ),
    "negative dim": (
        fwd(x=tensor_pb2.Tensor(dtype=1, shape=[-3, D], data=b"")),
        INVALID,
        "ShapeError",
        "negative",
    ),
    "wrong width": (
        fwd(x=msg(np.ones((3, D + 1), np.float32))),
        INVALID,
        "ShapeError",
        "16",
    ),
    "nan": (
        fwd(x=msg(np.full((2, D), np.nan, np.float32))),
        INVALID,
        "NonFiniteError",
        "NaN",
    ),
    "inf": (
        fwd(x=msg(np.full((2, D), np.inf, np.float32))),
        INVALID,
        "NonFiniteError",
        "Inf",
    ),
    "too many tokens": (
        fwd(x=msg(np.ones((MAX_TOKENS + 1, D), np.float32))),
        INVALID,
        "RequestTooLargeError",
        str(MAX_TOKENS),
    ),
    "expert id too big": (
        fwd(x=msg(X), expert_ids=msg(IDS + E), weights=msg(W)),
        INVALID,
        "ExpertIdError",
        "out of range [0, 8)",
    ),
    "negative expert id": (
        fwd(x=msg(X), expert_ids=msg(IDS - 5), weights=msg(W)),
        INVALID,
        "ExpertIdError",
        "out of range [0, 8)",
    ),
    "weights without ids": (
        fwd(x=msg(X), weights=msg(W)),
        INVALID,
        "InvalidInputError",
        "weights given without expert_ids",
    ),
    "routes of other rows": (
        fwd(x=msg(X), expert_ids=msg(IDS[:2]), weights=msg(W[:2])),
        INVALID,
        "ShapeError",
        "expert_ids must have shape [3, S], got [2, 2]",
    ),
    "float expert ids": (
        fwd(x=msg(X), expert_ids=msg(IDS.astype(np.float32)), weights=msg(W)),
        INVALID,
        "DTypeError",
        "expert_ids",
    ),
    "empty x": (
        fwd(x=msg(np.ones((0, D + 1), np.float32))),
        INVALID,
        "ShapeError",
        "16",
    ),
}


@pytest.mark.parametrize("case", list(BAD_FORWARD))
def test_bad_forward_requests(served, case):
    _, endpoint, layer = served
    request, code, kind, match = BAD_FORWARD[case]
    stub = pool_pb2_grpc.PoolServiceStub(grpc.insecure_channel(endpoint))
    with pytest.raises(grpc.RpcError) as info:
        stub.Forward(request, metadata=bearer(DATA), timeout=10)
    e = info.value
    assert (e.code(), dict(e.trailing_metadata())["raymoe-error"]) == (code, kind), e.details()
    assert match in e.details()
    y = stub.Forward(fwd(x=msg(X)), metadata=bearer(DATA), timeout=10)
    assert np.abs(wire.from_tensor(y.y, "y") - want(layer, X).numpy()).max() <= 1e-5


def test_oversize_message_is_refused_by_size(served):
    _, endpoint, _ = served
    big = np.ones((64 * MAX_TOKENS, D), np.float64)  # 2 MB: beyond the message limit
    with raymoe.Client(endpoint, token=DATA) as c, pytest.raises(raymoe.RequestTooLargeError):
        c.forward(big)
    stub = pool_pb2_grpc.PoolServiceStub(grpc.insecure_channel(endpoint))
    with pytest.raises(grpc.RpcError) as info:
        stub.Forward(fwd(x=msg(big)), metadata=bearer(DATA), timeout=10)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


BAD_ADMIN = {
    "no token": ("Describe", admin_pb2.DescribeRequest(), None, "UNAUTHENTICATED"),
    "data token": ("Describe", admin_pb2.DescribeRequest(), DATA, "PERMISSION_DENIED"),
    "wrong token": ("Rebalance", admin_pb2.RebalanceRequest(), "x" + ADMIN, "UNAUTHENTICATED"),
    "basic auth": ("Rebalance", admin_pb2.RebalanceRequest(), None, "UNAUTHENTICATED"),
    "unknown expert": (
        "Replicate",
        admin_pb2.ReplicaRequest(expert_id=E, replicas=1),
        ADMIN,
        "INVALID_ARGUMENT",
    ),
    "zero replicas": (
        "Pin",
        admin_pb2.ReplicaRequest(expert_id=0, replicas=0),
        ADMIN,
        "INVALID_ARGUMENT",
    ),
    "zero shards": (
        "ScaleShards",
        admin_pb2.ScaleShardsRequest(count=0),
        ADMIN,
        "INVALID_ARGUMENT",
    ),
    "too many shards": (
        "ScaleShards",
        admin_pb2.ScaleShardsRequest(count=E + 1),
        ADMIN,
        "INVALID_ARGUMENT",
    ),
    "bad shard": ("DrainShard", admin_pb2.DrainShardRequest(shard=7), ADMIN, "INVALID_ARGUMENT"),
    "remove all": (
        "RemoveExperts",
        admin_pb2.RemoveExpertsRequest(expert_ids=range(E)),
        ADMIN,
        "INVALID_ARGUMENT",
    ),
    "remove unknown": (
        "RemoveExperts",
        admin_pb2.RemoveExpertsRequest(expert_ids=[-1]),
        ADMIN,
        "INVALID_ARGUMENT",
    ),
    "add none": ("AddExperts", admin_pb2.AddExpertsRequest(count=0), ADMIN, "INVALID_ARGUMENT"),
    "add bad weights": (
        "AddExperts",
        admin_pb2.AddExpertsRequest(
            count=1, weights={"experts.w_up": msg(np.ones((3, 3), np.float32))}
        ),
        ADMIN,
        "INVALID_ARGUMENT",
    ),
    "unknown policy": (
        "Rebalance",
        admin_pb2.RebalanceRequest(policy="best"),
        ADMIN,
        "INVALID_ARGUMENT",
    ),
}


@pytest.mark.parametrize("case", list(BAD_ADMIN))
def test_bad_admin_requests_change_nothing(served, case):
    pool, endpoint, _ = served
    method, request, token, code = BAD_ADMIN[case]
    before = pool.describe()
    stub = admin_pb2_grpc.AdminServiceStub(grpc.insecure_channel(endpoint))
    md = (("authorization", f"Basic {ADMIN}"),) if case == "basic auth" else bearer(token)
    with pytest.raises(grpc.RpcError) as info:
        getattr(stub, method)(request, metadata=md, timeout=30)
    assert info.value.code().name == code, info.value.details()
    assert DATA not in info.value.details() and ADMIN not in info.value.details()
    assert pool.describe() == before


def test_a_call_deadline_reaches_the_routers_of_a_real_pool(ray_cluster, tokens):
    """Every shard gone for good: a call with a 1 s deadline ends as DEADLINE_EXCEEDED in
    about 1 s (not the pool's 60 s request timeout), and the router did try again."""
    spec = gateway_spec("gw-deadline", tokens)
    pool = raymoe.serve(spec)
    try:
        (endpoint,) = pool.gateways()
        for n in range(spec.shards.count):
            ray.kill(ray.get_actor(f"gw-deadline:shard:{n}", namespace="raymoe"), no_restart=True)
        with raymoe.Client(endpoint, token=DATA, retries=0) as c:
            assert c.health() == "SERVING"  # the routers are up; their shards are not
            t0 = time.monotonic()
            with pytest.raises(raymoe.DeadlineExceededError):
                c.forward(torch.randn(8, D), timeout_s=1.0)
            assert time.monotonic() - t0 < 3.0
        end = time.monotonic() + 10
        while pool.stats(window_s=60).counters.get("deadline_exceeded", 0) < 1:
            assert time.monotonic() < end, "the router never gave up at the deadline"
            time.sleep(0.1)
        assert pool.stats(window_s=60).counters.get("retries", 0) > 0
    finally:
        pool.shutdown()


def test_health_tells_the_truth_through_a_full_outage(ray_cluster, tokens):
    """Health on a real pool: SERVING while a router can serve; every router killed for
    good is a full outage (NOT_SERVING, within the gateway's check interval); the
    controller starts new routers, and health is SERVING again, the SDK and the
    PoolHandle answering, equal to MoELayer."""
    spec = gateway_spec("gw-outage", tokens)
    pool = raymoe.serve(spec)
    layer = raymoe.MoELayer(spec).eval()
    try:
        (endpoint,) = pool.gateways()
        x = torch.randn(8, D)
        with raymoe.Client(endpoint, token=DATA, retries=0) as c:
            assert c.health() == "SERVING"
            for i in range(spec.shards.routers):
                ray.kill(
                    ray.get_actor(f"gw-outage:router:{i}", namespace="raymoe"), no_restart=True
                )
            went_down, end = False, time.monotonic() + 30
            while True:
                health = c.health()
                went_down |= health == "NOT_SERVING"
                if went_down and health == "SERVING":
                    break
                assert time.monotonic() < end, f"health: {health}, went down: {went_down}"
                time.sleep(0.05)
        with raymoe.Client(endpoint, token=DATA) as c:
            assert (c.forward(x) - want(layer, x)).abs().max() <= 1e-5
        assert (pool.forward(x) - want(layer, x)).abs().max() <= 1e-5  # the handle refetched
    finally:
        pool.shutdown()
