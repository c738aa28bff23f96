"""The gateway of a real pool, over loopback: the SDK's answers equal MoELayer, streams, the
admin CLI changes the running pool, a table of bad requests and a fuzz test get clean
statuses, TLS with a certificate made here, and tokens never reach a log."""

from __future__ import annotations

import collections
import datetime
import ipaddress
import json
import secrets
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import raymoe
from raymoe import MoELayer, PoolSpec
from raymoe._private.actors import RayPoolBackend
from raymoe._private.data import wire
from raymoe._private.data.gateway import Gateway, GatewayThread
from raymoe.cli import main
from raymoe.config import GatewaySpec
from raymoe.v1 import admin_pb2, admin_pb2_grpc, pool_pb2, pool_pb2_grpc, tensor_pb2
from tests.helpers import spec_dict

pytestmark = pytest.mark.integration

D, E, MAX_TOKENS = 16, 8, 256
DATA, ADMIN = secrets.token_urlsafe(16), secrets.token_urlsafe(16)


def _spec(name: str, tokens: Path, **gateway) -> PoolSpec:
    s = spec_dict({"kind": "topk", "k": 2}, E=E, d=D)
    s.update(
        name=name,
        shards={"count": 2},
        limits={"max_request_tokens": MAX_TOKENS, "max_batch_tokens": MAX_TOKENS},
        gateway={
            "enabled": True,
            "host": "127.0.0.1",
            "port": 0,
            "data_token_file": str(tokens / "data"),
            "admin_token_file": str(tokens / "admin"),
            **gateway,
        },
    )
    return PoolSpec.from_dict(s)


@pytest.fixture(scope="module")
def tokens(tmp_path_factory):
    d = tmp_path_factory.mktemp("tokens")
    (d / "data").write_text(DATA + "\n")
    (d / "admin").write_text(ADMIN + "\n")
    return d


@pytest.fixture(scope="module")
def served(ray_cluster, tokens):
    spec = _spec("gw", tokens)
    pool = raymoe.serve(spec)
    (endpoint,) = pool.gateways()
    yield pool, endpoint, MoELayer(spec)
    pool.shutdown()


def _want(layer, x, **routes):
    with torch.no_grad():
        return layer(torch.as_tensor(x), **{k: torch.as_tensor(v) for k, v in routes.items()})


def test_client_forward_equals_moelayer(served):
    _, endpoint, layer = served
    with raymoe.Client(endpoint, token=DATA) as c:
        for n in (1, 7, 64):
            x = torch.randn(n, D, generator=torch.Generator().manual_seed(n))
            assert (c.forward(x) - _want(layer, x)).abs().max() <= 1e-5
        x = np.random.default_rng(0).standard_normal((2, 5, D), dtype=np.float32)
        y = c.forward(x)
        assert isinstance(y, np.ndarray) and y.shape == x.shape
        assert np.abs(y - _want(layer, x).numpy()).max() <= 1e-5
        ids = np.array([[0, 3], [5, -1], [7, 2]], np.int64)
        w = np.array([[0.25, 0.75], [1.0, 0.0], [0.5, 0.5]], np.float32)
        xr = x[0, :3]
        got = c.forward(xr, expert_ids=ids, weights=w)
        assert np.abs(got - _want(layer, xr, expert_ids=ids, weights=w).numpy()).max() <= 1e-5
        assert c.stats().requests >= 5


def test_stream_equals_moelayer(served):
    _, endpoint, layer = served
    xs = [torch.randn(n, D, generator=torch.Generator().manual_seed(n)) for n in range(1, 21)]
    with raymoe.Client(endpoint, token=DATA) as c:
        ys = list(c.forward_stream(xs))
    assert len(ys) == len(xs)
    errors = [(y - _want(layer, x)).abs().max().item() for x, y in zip(xs, ys, strict=True)]
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
        stub.Forward(request, metadata=_bearer(DATA), timeout=10)
    e = info.value
    assert (e.code(), dict(e.trailing_metadata())["raymoe-error"]) == (code, kind), e.details()
    assert match in e.details()
    y = stub.Forward(_fwd(x=_t(X)), metadata=_bearer(DATA), timeout=10)
    assert np.abs(wire.from_tensor(y.y, "y") - _want(layer, X).numpy()).max() <= 1e-5


def test_oversize_message_is_refused_by_size(served):
    _, endpoint, _ = served
    big = np.ones((64 * MAX_TOKENS, D), np.float64)  # 2 MB: beyond the message limit
    with raymoe.Client(endpoint, token=DATA) as c, pytest.raises(raymoe.RequestTooLargeError):
        c.forward(big)
    stub = pool_pb2_grpc.PoolServiceStub(grpc.insecure_channel(endpoint))
    with pytest.raises(grpc.RpcError) as info:
        stub.Forward(_fwd(x=_t(big)), metadata=_bearer(DATA), timeout=10)
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
    md = (("authorization", f"Basic {ADMIN}"),) if case == "basic auth" else _bearer(token)
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
    channel = _channel(endpoint)
    token = data.draw(auth)
    try:
        if data.draw(st.integers(0, 9)) == 0:  # bytes that may not even parse
            channel.unary_unary("/raymoe.v1.PoolService/Forward")(
                data.draw(raw), metadata=_bearer(token), timeout=10
            )
        else:
            req = data.draw(requests)
            pool_pb2_grpc.PoolServiceStub(channel).Forward(req, metadata=_bearer(token), timeout=10)
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
        assert (c.forward(x) - _want(layer, x)).abs().max() <= 1e-5
        assert c.health() == "SERVING"
    assert pool.describe().degraded == ()


_CHANNELS: dict = {}


def _channel(endpoint):
    if endpoint not in _CHANNELS:
        _CHANNELS[endpoint] = grpc.insecure_channel(endpoint)
    return _CHANNELS[endpoint]


def _bearer(token):
    return (("authorization", f"Bearer {token}"),) if token is not None else ()


# --- admin CLI -----------------------------------------------------------------------------


@pytest.fixture
def cli_pool(ray_cluster, tokens):
    pool = raymoe.serve(_spec("gw-cli", tokens))
    (endpoint,) = pool.gateways()
    yield pool, ["--target", endpoint, "--token-file", str(tokens / "admin")]
    pool.shutdown()


def _cli(capsys, *argv) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def test_cli_admin_changes_the_running_pool(cli_pool, capsys):
    pool, conn = cli_pool
    rc, out, _ = _cli(capsys, "status", *conn, "-o", "json")
    assert rc == 0 and json.loads(out)["pool"]["shards"] == 2

    rc, out, _ = _cli(capsys, "experts", "replicate", "3", "2", *conn, "-o", "json")
    assert rc == 0 and json.loads(out)["replicas_added"] == 1
    assert pool.describe().replicas == E + 1

    rc, out, _ = _cli(capsys, "experts", "add", "2", *conn, "-o", "json")
    assert rc == 0 and json.loads(out)["expert_ids"] == [E, E + 1]
    assert pool.describe().experts == E + 2

    v = pool.describe().placement_version
    rc, _, err = _cli(capsys, "experts", "remove", str(E + 1), *conn)  # stdin is no terminal
    assert rc == 5 and "--yes" in err
    assert pool.describe().placement_version == v
    rc, out, _ = _cli(capsys, "experts", "remove", str(E + 1), *conn, "--yes", "-o", "json")
    assert rc == 0 and json.loads(out)["removed"] == [E + 1]
    assert pool.describe().removed == (E + 1,)

    rc, out, _ = _cli(capsys, "rebalance", "--dry-run", *conn)
    assert rc == 0 and "dry run" in out
    rc, _, _ = _cli(capsys, "shards", "scale", "3", *conn)
    assert rc == 0 and pool.describe().shards == 3
    rc, _, _ = _cli(capsys, "shards", "drain", "2", *conn, "--yes")
    assert rc == 0 and pool.describe().experts_per_shard[2] == 0
    rc, out, _ = _cli(capsys, "experts", "pin", "0", "2", *conn, "-o", "json")
    assert rc == 0 and json.loads(out)["pinned"] == {"0": 2}
    rc, out, _ = _cli(capsys, "experts", "unpin", "0", *conn, "-o", "json")
    assert rc == 0 and json.loads(out)["pinned"] == {}
    rc, out, _ = _cli(capsys, "top", "--iterations", "2", "--interval", "0.1", *conn)
    assert rc == 0 and out.count("SHARD") == 2


def test_cli_exit_codes(cli_pool, tokens, capsys):
    _, conn = cli_pool
    target = conn[:2]
    assert _cli(capsys, "experts", "replicate", "99", "1", *conn)[0] == 2
    rc, _, err = _cli(capsys, "status", *target, "--token-file", str(tokens / "data"))
    assert rc == 4 and "admin plane" in err and DATA not in err
    assert _cli(capsys, "status", *target)[0] == 4
    assert _cli(capsys, "status", "--target", "127.0.0.1:1", "--timeout", "1")[0] == 3
    assert _cli(capsys, "status", *target, "--token-file", "/nonexistent")[0] == 2


# --- TLS -----------------------------------------------------------------------------------


def _certificates(d: Path) -> dict[str, str]:
    """A CA, a server certificate for 127.0.0.1/localhost and a client certificate."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)

    def cert(name, key, issuer, issuer_key, ca=False, sans=()):
        b = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(issuer)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if sans:
            b = b.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
        return b.sign(issuer_key, hashes.SHA256())

    def write(name, key, crt):
        (d / f"{name}.key").write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        (d / f"{name}.pem").write_bytes(crt.public_bytes(serialization.Encoding.PEM))

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "raymoe test CA")])
    ca = cert("raymoe test CA", ca_key, ca_name, ca_key, ca=True)
    write("ca", ca_key, ca)
    sans = (x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1")))
    for name in ("server", "client"):
        key = ec.generate_private_key(ec.SECP256R1())
        write(name, key, cert(name, key, ca_name, ca_key, sans=sans if name == "server" else ()))
    return {n: str(d / n) for n in ("ca", "server", "client")}


def test_mutual_tls_with_a_certificate_made_here(served, tmp_path):
    pool, _, layer = served
    c = _certificates(tmp_path)
    spec = PoolSpec.from_dict(pool.describe().spec)
    cfg = GatewaySpec(
        enabled=True,
        host="127.0.0.1",
        port=0,
        data_token_file=None,
        tls_cert_file=c["server"] + ".pem",
        tls_key_file=c["server"] + ".key",
        tls_client_ca_file=c["ca"] + ".pem",
    )
    x = torch.randn(4, D, generator=torch.Generator().manual_seed(4))
    with GatewayThread(Gateway(spec, RayPoolBackend(spec.name), config=cfg)) as g:
        tls = raymoe.TLS(
            ca_file=c["ca"] + ".pem", cert_file=c["client"] + ".pem", key_file=c["client"] + ".key"
        )
        with raymoe.Client(g.endpoint, tls=tls) as client:
            assert (client.forward(x) - _want(layer, x)).abs().max() <= 1e-5
        no_cert = raymoe.TLS(ca_file=c["ca"] + ".pem")
        for refused in (no_cert, None):  # no client certificate; no TLS at all
            with (
                raymoe.Client(g.endpoint, tls=refused, retries=0, timeout_s=5) as client,
                pytest.raises(raymoe.PoolUnavailableError),
            ):
                client.forward(x)


# --- the gateways as the controller keeps them ----------------------------------------------


def test_per_node_gateways_survive_a_controller_restart(ray_cluster, tokens):
    import ray

    from raymoe._private import actors

    spec = _spec("gw-nodes", tokens, per_node=True)
    pool = raymoe.serve(spec)
    try:
        nodes = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
        (endpoint,) = pool.gateways()
        named = {a["name"] for a in ray.util.list_named_actors(all_namespaces=True)}
        assert {f"gw-nodes:gateway:{n}" for n in nodes} <= named  # one on each node, by id
        ray.kill(actors.get_controller("gw-nodes"), no_restart=False)
        assert pool.gateways() == [endpoint]  # found again, not started anew
        assert len(actors.gateways("gw-nodes")) == len(nodes)
        x = torch.randn(4, D, generator=torch.Generator().manual_seed(4))
        with raymoe.Client(endpoint, token=DATA) as c:
            assert (c.forward(x) - _want(MoELayer(spec), x)).abs().max() <= 1e-5
    finally:
        pool.shutdown()
    assert actors.gateways("gw-nodes") == []


def test_per_node_gateways_follow_nodes_joining_and_leaving():
    """On a two-node cluster of its own (a subprocess: the session's cluster has one node)."""
    import subprocess
    import sys

    root = Path(__file__).parents[2]
    run = subprocess.run(
        [sys.executable, "-m", "tests.integration._multinode"],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stderr[-3000:]


def test_a_gateway_that_cannot_start_fails_serve_and_leaves_nothing(ray_cluster, tokens, served):
    from raymoe._private import actors

    _, endpoint, _ = served
    port = int(endpoint.rsplit(":", 1)[1])  # taken by the other pool's gateway
    spec = _spec("gw-clash", tokens, port=port)
    with pytest.raises(raymoe.PoolError, match="could not start"):
        raymoe.serve(spec)
    assert actors.gateways("gw-clash") == []
    with pytest.raises(ValueError):
        actors.get_controller("gw-clash")


# --- last: tokens never reach a log ---------------------------------------------------------


def test_tokens_never_reach_a_log(served):
    import ray

    session = Path(ray._private.worker._global_node.get_session_dir_path())
    hits = []
    for path in (session / "logs").rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            hits += [path.name for t in (DATA, ADMIN) if t.encode() in data]
    assert hits == []
    assert any((session / "logs").rglob("*gateway*")) or any(
        b"raymoe gateway for pool" in p.read_bytes()
        for p in (session / "logs").rglob("worker-*")
        if p.is_file()
    )
