"""The gateway over a fake pool, on real gRPC over loopback: auth, backpressure, deadlines,
stream order, error mapping, health, reflection, and the SDK's retries (no Ray)."""

from __future__ import annotations

import asyncio
import threading
import time

import grpc
import numpy as np
import pytest
import torch
from google.protobuf import message_factory
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

import raymoe
from raymoe import client as client_module
from raymoe._private.data import stats as S
from raymoe._private.data import wire
from raymoe._private.data.gateway import ADMIN_SERVICE_DESC, Gateway, GatewayThread, Tokens
from raymoe._private.metrics import RecordingMetrics
from raymoe.config import GatewaySpec, PoolSpec
from raymoe.errors import (
    AuthenticationError,
    ExpertIdError,
    PermissionDeniedError,
    PoolOverloadedError,
    PoolUnavailableError,
)
from raymoe.reports import Latency, OpReport, PoolDescription, PoolStats
from raymoe.v1 import admin_pb2, admin_pb2_grpc, pool_pb2, pool_pb2_grpc
from tests.helpers import free_port, spec_dict

SPEC = PoolSpec.from_dict(spec_dict({"kind": "topk", "k": 2}, E=8, d=4))
TOKENS = Tokens(data=b"data-secret-1", admin=b"admin-secret-2")


class FakePool:
    """Doubles its input; ``block`` holds forward calls until set; ``fail`` raises."""

    def __init__(self):
        self.block: threading.Event | None = None
        self.fail: BaseException | None = None
        self.ops: list = []
        self.layers: list = []  # the layer of each forward and operation

    async def forward(self, x, expert_ids, weights, token_ids, timeout_s, layer=0):
        self.layers.append(layer)
        if self.fail is not None:
            raise self.fail
        while self.block is not None and not self.block.is_set():
            await asyncio.sleep(0.005)
        if x.shape[-1] != 4:
            raise raymoe.ShapeError(f"x must have shape [..., 4], got {list(x.shape)}")
        return x * 2, 0

    async def stats(self, window_s, load_bins=0):
        return PoolStats(
            window_s=window_s,
            requests=3,
            tokens=12,
            tokens_per_s=0.2,
            latency=Latency(1.0, 2.0),
            batch_tokens_mean=4.0,
            batch_tokens_max=6,
            pairs_per_shard=(5, 7),
            imbalance=7 / 6,
            expert_load=np.arange(8),
            counters={"rejected": 1},
            load_map=np.full((2, min(load_bins, 8)), 0.5) if load_bins else None,
        )

    async def describe(self):
        return PoolDescription(
            name="fake",
            spec=SPEC.model_dump(mode="json"),
            placement_version=4,
            routing_version=1,
            shards=2,
            routers=1,
            experts=8,
            live_experts=8,
            replicas=9,
            experts_per_shard=(5, 4),
        )

    async def op(self, name, *args, layer=0):
        self.ops.append((name, *args))
        self.layers.append(layer)
        if name == "replicate" and args[0] >= 8:
            raise ExpertIdError(f"expert {args[0]} is not in [0, 8)")
        return OpReport(
            version=5, replicas_added=1, bytes_moved=10, imbalance_before=1.5, imbalance_after=1.0
        )

    async def ready(self):
        return True


@pytest.fixture
def pool():
    return FakePool()


def _gateway(pool, **config):
    cfg = GatewaySpec(enabled=True, host="127.0.0.1", port=0, **config)
    return GatewayThread(Gateway(SPEC, pool, TOKENS, config=cfg))


@pytest.fixture
def gateway(pool):
    with _gateway(pool) as g:
        yield g


def _md(token: bytes | str):
    return (("authorization", f"Bearer {token.decode() if isinstance(token, bytes) else token}"),)


def _x(n=3):
    return np.arange(4 * n, dtype=np.float32).reshape(n, 4)


def test_client_round_trip_keeps_the_tensor_kind(gateway):
    with raymoe.Client(gateway.endpoint, token="data-secret-1") as c:
        assert np.array_equal(c.forward(_x()), _x() * 2)
        y = c.forward(torch.from_numpy(_x()))
        assert isinstance(y, torch.Tensor) and torch.equal(y, torch.from_numpy(_x() * 2))
        s = c.stats(window_s=30)
        assert s.requests == 3 and s.imbalance == pytest.approx(7 / 6) and s.window_s == 30
        assert s.latency == Latency(1.0, 2.0) and s.pairs_per_shard == (5, 7)
        assert np.array_equal(s.expert_load, np.arange(8)) and s.load_map is None
        assert np.array_equal(c.stats(load_bins=4).load_map, np.full((2, 4), 0.5))
        for bad in (-1, S.MAX_LOAD_BINS + 1):
            with pytest.raises(raymoe.InvalidInputError, match="load_bins"):
                c.stats(load_bins=bad)


@pytest.mark.parametrize(
    "token,plane,error,match",
    [
        (None, "data", AuthenticationError, "missing bearer token"),
        ("nope", "data", AuthenticationError, "invalid bearer token"),
        ("data-secret-1", "admin", PermissionDeniedError, "may not use the admin plane"),
        (None, "admin", AuthenticationError, "missing"),
        ("nope", "admin", AuthenticationError, "invalid"),
    ],
)
def test_tokens_are_checked_per_plane(gateway, pool, token, plane, error, match):
    with (
        raymoe.Client(gateway.endpoint, token=token or "") as c,
        pytest.raises(error, match=match) as info,
    ):
        c.forward(_x()) if plane == "data" else c.rebalance()
    assert "secret" not in str(info.value) and "nope" not in str(info.value)
    assert pool.ops == []


@pytest.mark.parametrize(
    "token,code",
    [(None, grpc.StatusCode.UNAUTHENTICATED), (TOKENS.data, grpc.StatusCode.PERMISSION_DENIED)],
)
def test_every_admin_call_is_refused_without_the_admin_token(gateway, pool, token, code):
    channel = grpc.insecure_channel(gateway.endpoint)
    md = _md(token) if token else ()
    for method in ADMIN_SERVICE_DESC.methods:
        request = message_factory.GetMessageClass(method.input_type)()
        call = channel.unary_unary(
            f"/{ADMIN_SERVICE_DESC.full_name}/{method.name}",
            request_serializer=type(request).SerializeToString,
        )
        with pytest.raises(grpc.RpcError) as info:
            call(request, metadata=md)
        assert info.value.code() == code, method.name
        assert "secret" not in info.value.details()
    assert pool.ops == []


def test_admin_token_works_on_both_planes(gateway, pool):
    with raymoe.Client(gateway.endpoint, token="admin-secret-2") as c:
        assert np.array_equal(c.forward(_x()), _x() * 2)
        d = c.describe()
        assert d.placement_version == 4 and d.spec["d_model"] == 4 and d.experts_per_shard == (5, 4)
        r = c.replicate(3, 2)
        assert r.version == 5 and r.imbalance_after == 1.0
        with pytest.raises(ExpertIdError, match="not in"):
            c.replicate(9, 2)
    assert pool.ops == [("replicate", 3, 2), ("replicate", 9, 2)]


def test_admin_plane_is_closed_without_an_admin_token(pool):
    cfg = GatewaySpec(enabled=True, host="127.0.0.1", port=0)
    with (
        GatewayThread(Gateway(SPEC, pool, Tokens(), config=cfg)) as g,
        raymoe.Client(g.endpoint) as c,
    ):
        assert np.array_equal(c.forward(_x()), _x() * 2)  # data plane open
        with pytest.raises(PermissionDeniedError, match="disabled"):
            c.describe()


def test_tokens_are_read_from_files_and_env(tmp_path, monkeypatch):
    (tmp_path / "admin").write_text("  from-file\n")
    monkeypatch.setenv("MY_DATA_TOKEN", "from-env")
    t = Tokens.load(
        GatewaySpec(admin_token_file=str(tmp_path / "admin"), data_token_env="MY_DATA_TOKEN")
    )
    assert (t.data, t.admin) == (b"from-env", b"from-file")
    assert "from" not in repr(t)


def test_backpressure_is_resource_exhausted_not_a_queue(pool):
    pool.block = threading.Event()
    with _gateway(pool, max_inflight=2) as g, raymoe.Client(g.endpoint, token="data-secret-1") as c:
        held = [threading.Thread(target=c.forward, args=(_x(),)) for _ in range(2)]
        for t in held:
            t.start()
        _until(lambda: g.gateway._inflight == 2)
        t0 = time.monotonic()
        with pytest.raises(PoolOverloadedError, match="in flight"):
            c.forward(_x())
        assert time.monotonic() - t0 < 1.0  # refused at once, not queued
        pool.block.set()
        for t in held:
            t.join()
        assert np.array_equal(c.forward(_x()), _x() * 2)


def test_deadline_reaches_the_pool_and_ends_the_call(gateway, pool):
    pool.block = threading.Event()
    with raymoe.Client(gateway.endpoint, token="data-secret-1") as c:
        t0 = time.monotonic()
        with pytest.raises(raymoe.DeadlineExceededError):
            c.forward(_x(), timeout_s=0.3)
        assert time.monotonic() - t0 < 2.0
    _until(lambda: gateway.gateway._inflight == 0)  # the gateway let go of it too


def test_the_gateway_bounds_the_load_map(gateway):
    stub = pool_pb2_grpc.PoolServiceStub(grpc.insecure_channel(gateway.endpoint))
    big = pool_pb2.StatsRequest(load_bins=S.MAX_LOAD_BINS + 1)
    with pytest.raises(grpc.RpcError) as info:
        stub.Stats(big, metadata=_md(TOKENS.data))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "load_bins" in info.value.details()


def test_unexpected_errors_are_internal_without_detail(gateway, pool):
    pool.fail = KeyError("secret internals")
    stub = pool_pb2_grpc.PoolServiceStub(grpc.insecure_channel(gateway.endpoint))
    with pytest.raises(grpc.RpcError) as info:
        stub.Forward(pool_pb2.ForwardRequest(x=wire.to_tensor(_x())), metadata=_md(TOKENS.data))
    assert info.value.code() == grpc.StatusCode.INTERNAL
    assert "KeyError" in info.value.details() and "secret" not in info.value.details()


def test_stream_answers_in_order_and_survives_a_bad_request(gateway):
    stub = pool_pb2_grpc.PoolServiceStub(grpc.insecure_channel(gateway.endpoint))
    reqs = [pool_pb2.ForwardRequest(x=wire.to_tensor(_x(n)), request_id=n) for n in (1, 2, 3)]
    reqs.insert(
        1, pool_pb2.ForwardRequest(x=wire.to_tensor(np.zeros((2, 5), np.float32)), request_id=99)
    )
    replies = list(stub.ForwardStream(iter(reqs), metadata=_md(TOKENS.data)))
    assert [r.request_id for r in replies] == [1, 99, 2, 3]
    assert replies[1].error.type == "ShapeError"
    assert replies[1].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    for r, n in zip([replies[0], *replies[2:]], (1, 2, 3), strict=True):
        assert np.array_equal(wire.from_tensor(r.y, "y"), _x(n) * 2)


def test_stream_in_lock_step(gateway):
    """A client that waits for each reply before sending the next one is answered."""
    with raymoe.Client(gateway.endpoint, token="data-secret-1") as c:
        sent = []

        def batches():
            for n in range(1, 6):
                sent.append(n)
                yield _x(n)
                _until(lambda n=n: len(got) == n)

        got = []
        for y in c.forward_stream(batches()):
            got.append(y)
        assert [len(y) for y in got] == [1, 2, 3, 4, 5]


def test_async_client(gateway):
    async def go():
        async with raymoe.AsyncClient(gateway.endpoint, token="admin-secret-2") as c:
            y = await c.forward(_x())
            ys = [y async for y in c.forward_stream([_x(1), _x(2)])]
            d = await c.describe()
            with pytest.raises(ExpertIdError):
                await c.replicate(9, 1)
            return y, ys, d

    y, ys, d = asyncio.run(go())
    assert np.array_equal(y, _x() * 2) and [len(a) for a in ys] == [1, 2]
    assert d.name == "fake"


def test_health_and_reflection_need_no_token(gateway):
    channel = grpc.insecure_channel(gateway.endpoint)
    health = health_pb2_grpc.HealthStub(channel)
    _until(
        lambda: (
            health.Check(health_pb2.HealthCheckRequest(service="")).status
            == health_pb2.HealthCheckResponse.SERVING
        )
    )
    refl = reflection_pb2_grpc.ServerReflectionStub(channel)
    reply = next(
        refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    )
    names = {s.name for s in reply.list_services_response.service}
    assert {"raymoe.v1.PoolService", "raymoe.v1.AdminService", "grpc.health.v1.Health"} <= names


def test_admin_stub_reports_round_trip(gateway):
    stub = admin_pb2_grpc.AdminServiceStub(grpc.insecure_channel(gateway.endpoint))
    r = stub.Rebalance(admin_pb2.RebalanceRequest(dry_run=True), metadata=_md(TOKENS.admin))
    assert r.version == 5 and r.bytes_moved == 10


def test_client_retries_while_the_gateway_is_unavailable(pool, monkeypatch):
    port = free_port()
    with raymoe.Client(f"127.0.0.1:{port}", token="x", retries=1, timeout_s=5) as c, \
            pytest.raises(PoolUnavailableError):  # fmt: skip
        c.stats()
    cfg = GatewaySpec(enabled=True, host="127.0.0.1", port=port)
    started: list = []
    sleep = time.sleep

    def backoff(seconds):  # the gateway comes up during the client's first backoff
        if not started:
            started.append(GatewayThread(Gateway(SPEC, pool, TOKENS, config=cfg)))
        sleep(seconds)

    monkeypatch.setattr(client_module.time, "sleep", backoff)
    try:
        with raymoe.Client(f"127.0.0.1:{port}", token="data-secret-1", retries=8) as c:
            assert c.stats().requests == 3  # came up while the client backed off
        assert started  # the first attempt failed: it really retried
    finally:
        for g in started:
            g.stop()


def _until(cond, timeout_s: float = 10.0):
    end = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < end, "condition not met in time"
        time.sleep(0.01)


@pytest.mark.parametrize(
    "method", ["/raymoe.v1.PoolService/Forward", "/raymoe.v1.AdminService/Rebalance"]
)
def test_malformed_protobuf_is_invalid_argument(gateway, method):
    call = grpc.insecure_channel(gateway.endpoint).unary_unary(method)
    with pytest.raises(grpc.RpcError) as info:
        call(b"\xff\xff\xff\xff", metadata=_md(TOKENS.admin))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "malformed" in info.value.details()


def test_every_call_is_counted_by_method_and_status(pool):
    metrics = RecordingMetrics()
    cfg = GatewaySpec(enabled=True, host="127.0.0.1", port=0)
    with GatewayThread(Gateway(SPEC, pool, TOKENS, config=cfg, metrics=metrics)) as g:
        channel = grpc.insecure_channel(g.endpoint)
        stub = pool_pb2_grpc.PoolServiceStub(channel)
        req = pool_pb2.ForwardRequest(x=wire.to_tensor(_x()))
        stub.Forward(req, metadata=_md(TOKENS.data))
        with pytest.raises(grpc.RpcError):
            stub.Forward(req, metadata=_md("wrong"))
        bad = pool_pb2.ForwardRequest(x=wire.to_tensor(np.zeros((2, 5), np.float32)))
        with pytest.raises(grpc.RpcError):
            stub.Forward(bad, metadata=_md(TOKENS.data))
        assert len(list(stub.ForwardStream(iter([req, req]), metadata=_md(TOKENS.data)))) == 2
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest())
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        watch.cancel()
        _until(lambda: metrics.total("raymoe_gateway_calls_total", method="Watch") == 1)
    calls = {tuple(v for _, v in t): n for (_, t), n in metrics.totals.items()}
    assert calls == {
        ("OK", "Forward"): 1,
        ("UNAUTHENTICATED", "Forward"): 1,
        ("INVALID_ARGUMENT", "Forward"): 1,
        ("OK", "ForwardStream"): 1,
        ("CANCELLED", "Watch"): 1,
    }
