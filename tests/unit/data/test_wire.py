"""Tensors on the wire: round trips, and every malformed message is a typed error."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from raymoe._private.data.transport import compute_request
from raymoe._private.data.wire import encode_message, from_tensor, to_tensor
from raymoe.errors import DTypeError, InvalidInputError, RequestTooLargeError, ShapeError
from raymoe.v1 import shard_pb2, tensor_pb2

ROOT = Path(__file__).parents[3]


@pytest.mark.parametrize("dtype", ["float32", "float64", "float16", "int64", "int32"])
def test_roundtrip(dtype):
    a = (np.arange(24).reshape(2, 3, 4) - 7).astype(dtype)
    b = from_tensor(tensor_pb2.Tensor.FromString(to_tensor(a).SerializeToString()), "a")
    assert b.dtype == a.dtype and b.shape == a.shape and np.array_equal(a, b)


def test_big_endian_input_is_sent_little_endian():
    a = np.arange(5, dtype=">f4")
    t = to_tensor(a)
    assert t.data == np.arange(5, dtype="<f4").tobytes()
    assert np.array_equal(from_tensor(t, "a"), a)


@pytest.mark.parametrize(
    "msg,err,match",
    [
        (tensor_pb2.Tensor(dtype=0, shape=[1], data=b"\0" * 4), DTypeError, "UNSPECIFIED"),
        (tensor_pb2.Tensor(dtype=99, shape=[1], data=b"\0" * 4), DTypeError, "99"),
        (tensor_pb2.Tensor(dtype=4, shape=[1], data=b"\0" * 2), DTypeError, "BFLOAT16"),
        (tensor_pb2.Tensor(dtype=1, shape=[2, 3], data=b"\0" * 20), InvalidInputError, "24"),
        (tensor_pb2.Tensor(dtype=1, shape=[-1, 4], data=b""), ShapeError, "negative"),
        (tensor_pb2.Tensor(dtype=1, shape=[1] * 9, data=b"\0" * 4), ShapeError, "dimensions"),
        (tensor_pb2.Tensor(dtype=1, shape=[2**40, 2**40], data=b""), ShapeError, "dimension over"),
        (tensor_pb2.Tensor(dtype=1, shape=[0, 2**62], data=b""), ShapeError, "dimension over"),
        (tensor_pb2.Tensor(dtype=1, shape=[0, 2**63 - 1], data=b""), ShapeError, "over"),
        (tensor_pb2.Tensor(dtype=1, shape=[2**20, 2**20], data=b""), RequestTooLargeError, "limit"),
    ],
)
def test_malformed_tensors_are_typed_errors(msg, err, match):
    with pytest.raises(err, match=match):
        from_tensor(msg, "x", max_bytes=1 << 20)


def test_unsupported_numpy_dtype():
    with pytest.raises(DTypeError):
        to_tensor(np.array(["a"]))


@settings(max_examples=300, deadline=None)
@given(
    dtype=st.integers(-3, 10),
    shape=st.lists(st.integers(-5, 2**33), max_size=10),
    data=st.binary(max_size=256),
)
def test_fuzz_decode_never_crashes(dtype, shape, data):
    msg = tensor_pb2.Tensor(dtype=max(dtype, 0), shape=shape, data=data)
    try:
        a = from_tensor(msg, "x", max_bytes=1 << 16)
    except InvalidInputError:
        return
    assert a.nbytes == len(data)


def test_committed_stubs_match_the_protos(tmp_path):
    subprocess.run(
        [str(ROOT / "scripts" / "gen_protos.sh"), str(tmp_path)],
        check=True,
        env={"PYTHON": sys.executable, "PATH": "/usr/bin:/bin"},
    )
    generated = sorted(p.relative_to(tmp_path) for p in (tmp_path / "raymoe" / "v1").iterdir())
    committed = sorted(p.relative_to(ROOT) for p in (ROOT / "raymoe" / "v1").glob("*_pb2*"))
    assert generated == committed
    for rel in generated:
        assert (tmp_path / rel).read_bytes() == (ROOT / rel).read_bytes(), f"{rel} is stale"


@pytest.mark.parametrize(
    ("digest", "keep", "routing"),
    [
        (123, None, None),
        (-5, 7, 3),
        (None, None, None),
        (0, 0, 0),
        (-(1 << 63), 2**64 - 1, 2**63 - 1),
    ],
)
def test_a_hand_encoded_compute_request_is_what_protobuf_writes(digest, keep, routing):
    g = np.random.default_rng(0)
    x = g.standard_normal((5, 8)).astype(np.float32)
    ids = g.integers(-1, 1 << 40, (5, 3))
    w = g.random((5, 3)).astype(np.float32)
    got = compute_request(x, ids, w, digest, keep=keep, routing=routing)
    want = shard_pb2.ComputeRequest(
        x=to_tensor(x),
        local_ids=to_tensor(ids),
        weights=to_tensor(w),
        places_digest=digest,
        keep=keep,
        routing_version=routing,
    )
    assert got == want.SerializeToString()
    back = shard_pb2.ComputeRequest.FromString(got)
    assert np.array_equal(from_tensor(back.local_ids, "local_ids"), ids)


@pytest.mark.parametrize(
    "a",
    [
        np.zeros((0, 4), np.float32),
        np.arange(3, dtype=">f8"),
        np.float32(2.0).reshape(()),
        np.zeros((2, 0), np.int32),
        np.arange(12, dtype=np.int64).reshape(3, 4)[:, ::2],  # not contiguous
    ],
)
def test_hand_encoded_tensors_of_every_shape(a):
    got = encode_message({1: a}, {})
    assert got == shard_pb2.ComputeReply(y=to_tensor(a)).SerializeToString()
    with pytest.raises(DTypeError):
        encode_message({1: a.astype(np.uint8)}, {})
