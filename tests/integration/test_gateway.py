"""The gateway of a real pool, over loopback: the SDK's answers equal MoELayer, streams,
health, deadlines, a table of bad requests and a fuzz test get clean statuses."""

from __future__ import annotations

import collections
import time

import grpc
import numpy as np
import pytest
import ray
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import raymoe
from raymoe._private.data import wire
from raymoe.v1 import admin_pb2, admin_pb2_grpc, pool_pb2, pool_pb2_grpc, tensor_pb2
from tests.integration.gateway_common import (
    ADMIN,
    DATA,
    MAX_TOKENS,
    D,
    E,
    bearer,
    channel,
    gateway_spec,
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


def _t(a) -> tensor_pb2.Tensor:
    return wire.to_tensor(np.asarray(a))


def _fwd(**fields) -> pool_pb2.ForwardRequest:
    return pool_pb2.ForwardRequest(**fields)


X = np.ones((3, D), np.float32)
IDS = np.array([[0, 1]] * 3, np.int64)
W = np.full((3, 2), 0.5, np.float32)
INVALID = grpc.StatusCode.INVALID_ARGUMENT
BAD_FORWARD = {
    "no x": (_fwd(), INVALID, "InvalidInputError", "x: required"),
    "int x": (_fwd(x=_t(X.astype(np.int32))), INVALID, "DTypeError", "float32"),
    "unknown dtype": (
        _fwd(x=tensor_pb2.Tensor(dtype=42, shape=[1, D], data=b"\0" * 4 * D)),
        INVALID,
        "DTypeError",
        "unsupported dtype",
    ),
    "bytes disagree": (
        _fwd(x=tensor_pb2.Tensor(dtype=1, shape=[3, D], data=b"\0" * 10)),
        INVALID,
        "InvalidInputError",
        "needs 192 bytes, got 10",
    ),
    "huge shape": (
        _fwd(x=tensor_pb2.Tensor(dtype=1, shape=[2**20, 2**20], data=b"")),
        INVALID,
        "RequestTooLargeError",
        "limit",
    ),
    "huge dimension": (
        _fwd(x=tensor_pb2.Tensor(dtype=1, shape=[2**63 - 1, D], data=b"")),
        INVALID,
        "ShapeError",
        "dimension over",
    ),
    "zero and huge dimensions": (
        _fwd(x=tensor_pb2.Tensor(dtype=1, shape=[0, 2**62], data=b"")),
        INVALID,
        "ShapeError",
        "dimension over",
    ),
    "negative dim": (
        _fwd(x=tensor_pb2.Tensor(dtype=1, shape=[-3, D], data=b"")),
        INVALID,
        "ShapeError",
        "negative",
    ),
    "wrong width": (_fwd(x=_t(np.ones((3, D + 1), np.float32))), INVALID, "ShapeError", "16"),
    "nan": (_fwd(x=_t(np.full((2, D), np.nan, np.float32))), INVALID, "NonFiniteError", "NaN"),
    "inf": (_fwd(x=_t(np.full((2, D), np.inf, np.float32))), INVALID, "NonFiniteError", "Inf"),
    "too many tokens": (
        _fwd(x=_t(np.ones((MAX_TOKENS + 1, D), np.float32))),
        INVALID,
        "RequestTooLargeError",
        str(MAX_TOKENS),
    ),
    "expert id too big": (
        _fwd(x=_t(X), expert_ids=_t(IDS + E), weights=_t(W)),
        INVALID,
        "ExpertIdError",
        "out of range [0, 8)",
    ),
    "negative expert id": (
        _fwd(x=_t(X), expert_ids=_t(IDS - 5), weights=_t(W)),
        INVALID,
        "ExpertIdError",
        "out of range [0, 8)",
    ),
    "weights without ids": (
        _fwd(x=_t(X), weights=_t(W)),
        INVALID,
        "InvalidInputError",
        "weights given without expert_ids",
    ),
    "routes of other rows": (
        _fwd(x=_t(X), expert_ids=_t(IDS[:2]), weights=_t(W[:2])),
        INVALID,
        "ShapeError",
        "expert_ids must have shape [3, S], got [2, 2]",
    ),
    "float expert ids": (
        _fwd(x=_t(X), expert_ids=_t(IDS.astype(np.float32)), weights=_t(W)),
        INVALID,
        "DTypeError",
        "expert_ids",
    ),
    "empty x": (_fwd(x=_t(np.ones((0, D + 1), np.float32))), INVALID, "ShapeError", "16"),
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
    y = stub.Forward(_fwd(x=_t(X)), metadata=bearer(DATA), timeout=10)
    assert np.abs(wire.from_tensor(y.y, "y") - want(layer, X).numpy()).max() <= 1e-5


def test_oversize_message_is_refused_by_size(served):
    _, endpoint, _ = served
    big = np.ones((64 * MAX_TOKENS, D), np.float64)  # 2 MB: beyond the message limit
    with raymoe.Client(endpoint, token=DATA) as c, pytest.raises(raymoe.RequestTooLargeError):
        c.forward(big)
    stub = pool_pb2_grpc.PoolServiceStub(grpc.insecure_channel(endpoint))
    with pytest.raises(grpc.RpcError) as info:
        stub.Forward(_fwd(x=_t(big)), metadata=bearer(DATA), timeout=10)
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
            count=1, weights={"experts.w_up": _t(np.ones((3, 3), np.float32))}
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


# --- fuzz ----------------------------------------------------------------------------------

CLEAN = {"INVALID_ARGUMENT", "UNAUTHENTICATED", "RESOURCE_EXHAUSTED"}
dims = st.one_of(st.integers(0, 4), st.just(D), st.sampled_from([-1, 2**20, 2**30, 2**31, 2**62]))
tensors = st.builds(
    tensor_pb2.Tensor,
    dtype=st.sampled_from([0, 1, 1, 1, 2, 3, 4, 5, 6, 77]),
    shape=st.lists(dims, max_size=4),
    data=st.one_of(
        st.binary(max_size=64),
        st.integers(0, 8).map(lambda n: np.full((n, D), np.nan, np.float32).tobytes()),
        st.integers(0, 8).map(lambda n: np.ones((n, D), np.float32).tobytes()),
    ),
)
good_x = st.integers(1, 8).map(lambda n: _t(np.ones((n, D), np.float32)))
ids = st.lists(
    st.lists(st.integers(-(2**40), 2**40) | st.integers(-2, E + 2), min_size=2, max_size=2),
    min_size=1,
    max_size=8,
).map(lambda rows: _t(np.array(rows, np.int64)))
wild = st.builds(
    _fwd,
    x=st.one_of(tensors, good_x, st.none()),
    expert_ids=st.one_of(st.none(), ids, tensors),
    weights=st.one_of(
        st.none(), tensors, st.integers(1, 8).map(lambda n: _t(np.full((n, 2), 0.5, np.float32)))
    ),
    token_ids=st.one_of(st.none(), tensors),
)
values = st.sampled_from([0.0, 1.0, -2.5, 1e30, np.nan, np.inf, -np.inf])


@st.composite
def routed(draw):
    """Well-formed tensors with adversarial values: NaN/Inf, any expert ids and weights."""
    n = draw(st.integers(1, 6))
    x = np.full((n, D), draw(values), np.float32)
    x[:, 0] = draw(st.floats(-10, 10, width=32))
    if not draw(st.booleans()):
        return _fwd(x=_t(x))
    id_values = st.integers(-3, E + 3) | st.integers(-(2**62), 2**62)
    routes = np.array(draw(st.lists(id_values, min_size=2 * n, max_size=2 * n)), np.int64)
    w = np.full((n, 2), draw(values), np.float32)
    return _fwd(x=_t(x), expert_ids=_t(routes.reshape(n, 2)), weights=_t(w))


requests = st.one_of(wild, routed())
auth = st.sampled_from([DATA] * 6 + [ADMIN, None, "wrong", ""])
raw = st.binary(max_size=96)


def fuzz_once(endpoint: str, data, outcomes: collections.Counter) -> None:
    """One wild request; every reply must be OK or a clean, typed refusal."""
    chan = channel(endpoint)
    token = data.draw(auth)
    try:
        if data.draw(st.integers(0, 9)) == 0:  # bytes that may not even parse
            chan.unary_unary("/raymoe.v1.PoolService/Forward")(
                data.draw(raw), metadata=bearer(token), timeout=10
            )
        else:
            req = data.draw(requests)
            pool_pb2_grpc.PoolServiceStub(chan).Forward(req, metadata=bearer(token), timeout=10)
        outcomes["OK"] += 1
    except grpc.RpcError as e:
        outcomes[e.code().name] += 1
        outcomes[dict(e.trailing_metadata() or ()).get("raymoe-error")] += 1
        assert e.code().name in CLEAN, (e.code(), e.details())
        assert e.details() and "Traceback" not in e.details()
        md = dict(e.trailing_metadata() or ())
        assert md.get("raymoe-error"), e.details()


def test_fuzz_gateway_never_breaks_and_the_pool_serves_after_it(served):
    """2,000 derandomized wild requests get clean statuses, reach every check, and leave
    the pool serving correct answers."""
    pool, endpoint, layer = served
    outcomes: collections.Counter = collections.Counter()

    @settings(
        max_examples=2000,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(data=st.data())
    def fuzz(data):
        fuzz_once(endpoint, data, outcomes)

    fuzz()
    kinds = (
        "OK",
        "UNAUTHENTICATED",
        "DTypeError",
        "ShapeError",
        "RequestTooLargeError",
        "NonFiniteError",
        "ExpertIdError",
        "InvalidInputError",
    )
    assert all(outcomes[k] >= 5 for k in kinds), outcomes  # the fuzz reached every check
    x = torch.randn(16, D, generator=torch.Generator().manual_seed(9))
    with raymoe.Client(endpoint, token=DATA) as c:
        assert (c.forward(x) - want(layer, x)).abs().max() <= 1e-5
        assert c.health() == "SERVING"
    assert pool.describe().degraded == ()


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


wild_ints = st.sampled_from([-(2**63), -(2**31), -1, 0, 9, 2**31, 2**62, 2**63 - 1])
ints = st.one_of(st.integers(0, 3), wild_ints)  # valid calls too, about half of the time
ADMIN_CALLS = {
    "Replicate": st.builds(admin_pb2.ReplicaRequest, expert_id=ints, replicas=ints, layer=ints),
    "Pin": st.builds(admin_pb2.ReplicaRequest, expert_id=ints, replicas=ints, layer=ints),
    "Unpin": st.builds(admin_pb2.ExpertRequest, expert_id=ints, layer=ints),
    "DrainShard": st.builds(admin_pb2.DrainShardRequest, shard=ints),
    "ScaleShards": st.builds(admin_pb2.ScaleShardsRequest, count=ints),
    "AddExperts": st.builds(admin_pb2.AddExpertsRequest, count=ints, layer=ints),
    "RemoveExperts": st.builds(
        admin_pb2.RemoveExpertsRequest, expert_ids=st.lists(ints, max_size=4), layer=ints
    ),
    "Rebalance": st.builds(admin_pb2.RebalanceRequest, dry_run=st.booleans()),
}


def test_fuzz_admin_calls_with_the_admin_token(ray_cluster, tokens):
    """Every admin method with the admin token and wild numbers (huge counts and ids,
    negative ones, 2^63 - 1): each reply is OK or a clean, typed refusal; afterwards the
    pool answers equal to MoELayer of its current spec, and health is SERVING."""
    spec = gateway_spec("gw-admin-fuzz", tokens)
    pool = raymoe.serve(spec)
    outcomes: collections.Counter = collections.Counter()
    try:
        (endpoint,) = pool.gateways()
        stub = admin_pb2_grpc.AdminServiceStub(channel(endpoint))

        @settings(
            max_examples=50,
            deadline=None,
            derandomize=True,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        @given(data=st.data())
        def fuzz(data):
            method = data.draw(st.sampled_from(sorted(ADMIN_CALLS)))
            req = data.draw(ADMIN_CALLS[method])
            try:
                getattr(stub, method)(req, metadata=bearer(ADMIN), timeout=60)
                outcomes["OK"] += 1
            except grpc.RpcError as e:
                outcomes[e.code().name] += 1
                assert e.code().name in CLEAN | {"NOT_FOUND"}, (method, req, e.details())
                assert e.details() and "Traceback" not in e.details()

        fuzz()
        assert outcomes["OK"] >= 3 and outcomes["INVALID_ARGUMENT"] >= 5, outcomes
        now = raymoe.PoolSpec.from_dict(pool.describe().spec)
        x = torch.randn(16, D, generator=torch.Generator().manual_seed(4))
        with raymoe.Client(endpoint, token=DATA) as c:
            assert (c.forward(x) - want(raymoe.MoELayer(now).eval(), x)).abs().max() <= 1e-5
            assert c.health() == "SERVING"
        assert pool.describe().degraded == ()
    finally:
        pool.shutdown()
