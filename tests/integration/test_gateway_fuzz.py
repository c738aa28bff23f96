"""Fuzzing the gateway of a real pool: random (mostly malformed) data-plane and admin
requests get clean statuses, never break it, and the pool serves after them."""

from __future__ import annotations

import collections

import grpc
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import raymoe
from raymoe.v1 import admin_pb2, admin_pb2_grpc, pool_pb2_grpc, tensor_pb2
from tests.integration.gateway_common import (
    ADMIN,
    DATA,
    D,
    E,
    bearer,
    channel,
    fwd,
    gateway_spec,
    msg,
    want,
)

pytestmark = pytest.mark.integration


CLEAN = {"INVALID_ARGUMENT", "UNAUTHENTICATED", "RESOURCE_EXHAUSTED"}
# reproducible runs, no example database, no deadline (each example is a gRPC call)
FUZZ = {
    "deadline": None,
    "derandomize": True,
    "database": None,
    "suppress_health_check": list(HealthCheck),
}
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
good_x = st.integers(1, 8).map(lambda n: msg(np.ones((n, D), np.float32)))
ids = st.lists(
    st.lists(st.integers(-(2**40), 2**40) | st.integers(-2, E + 2), min_size=2, max_size=2),
    min_size=1,
    max_size=8,
).map(lambda rows: msg(np.array(rows, np.int64)))
wild = st.builds(
    fwd,
    x=st.one_of(tensors, good_x, st.none()),
    expert_ids=st.one_of(st.none(), ids, tensors),
    weights=st.one_of(
        st.none(),
        tensors,
        st.integers(1, 8).map(lambda n: msg(np.full((n, 2), 0.5, np.float32))),
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
        return fwd(x=msg(x))
    id_values = st.integers(-3, E + 3) | st.integers(-(2**62), 2**62)
    routes = np.array(draw(st.lists(id_values, min_size=2 * n, max_size=2 * n)), np.int64)
    w = np.full((n, 2), draw(values), np.float32)
    return fwd(x=msg(x), expert_ids=msg(routes.reshape(n, 2)), weights=msg(w))


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

    @settings(max_examples=2000, **FUZZ)
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

        @settings(max_examples=50, **FUZZ)
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
