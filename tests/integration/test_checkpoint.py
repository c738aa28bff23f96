"""Checkpoints of a served pool: taken under traffic at one placement version, restored onto
another shard count with the same ids and bit-identical weights (experts added at runtime
included), and a corrupted checkpoint refused with nothing started."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

import raymoe
from raymoe import CheckpointError, MoEStack, PoolSpec
from raymoe import checkpoint as ck
from tests.helpers import randomized, spec_dict
from tests.integration.gateway_common import gateway_section

pytestmark = pytest.mark.integration


def test_save_under_traffic_and_restore_on_other_shards(ray_cluster, tmp_path):
    spec = PoolSpec.from_dict(
        {
            **spec_dict({"kind": "topk", "k": 2}, E=8),
            "name": "t-ck",
            "layers": 2,
            "shards": {"count": 2, "routers": 2},
        }
    )
    stack = randomized(MoEStack(spec).eval(), seed=0)
    g = torch.Generator().manual_seed(1)
    pool = raymoe.serve(spec, weights=stack.state_dict())
    new = {
        "experts.w_gate": torch.randn(2, 24, 16, generator=g),
        "experts.w_up": torch.randn(2, 24, 16, generator=g),
        "experts.w_down": torch.randn(2, 16, 24, generator=g),
        "router.weight": torch.randn(2, 16, generator=g),
    }
    stop, failures = threading.Event(), []

    def traffic():
        while not stop.is_set():
            try:
                pool.forward(torch.randn(16, 16), layer=int(np.random.randint(2)))
            except Exception as e:  # the test asserts there are none
                failures.append(e)

    t = threading.Thread(target=traffic)
    t.start()
    try:
        pool.add_experts(2, new, layer=1)
        pool.remove_experts([3], layer=0)
        pool.replicate(5, 2, layer=1)
        manifest = pool.save(tmp_path / "ck")
        d = pool.describe()
        x = torch.randn(2, 5, 16)
        want = [pool.forward(x, layer=i) for i in range(2)]
    finally:
        stop.set()
        t.join()
        pool.shutdown()
    assert not failures, failures[:1]
    assert manifest["placement_version"] == d.placement_version
    spec2, weights, _ = ck.read(tmp_path / "ck")
    assert spec2.removed_ids == d.removed and spec2.layer(1).num_experts == 10
    for k, v in new.items():  # the runtime-added experts' rows, bit for bit
        assert torch.equal(torch.as_tensor(weights[f"layers.1.{k}"][8:]), v), k
    live0 = [0, 1, 2, 4, 5, 6, 7]  # expert 3 of layer 0 was removed: no rows
    for k, v in stack.state_dict().items():  # every weight served from the start
        rows = live0 if k.startswith("layers.0.experts.") else slice(0, len(v))
        assert torch.equal(torch.as_tensor(weights[k])[rows], v[rows]), k

    restored = raymoe.serve(spec.with_shards(3), checkpoint=tmp_path / "ck")
    try:
        d2 = restored.describe()
        assert d2.shards == 3 and d2.removed == d.removed and d2.live_per_layer == (7, 10)
        for i in range(2):
            assert (restored.forward(x, layer=i) - want[i]).abs().max() <= 1e-5
    finally:
        restored.shutdown()


def test_a_corrupted_checkpoint_is_refused_and_nothing_starts(ray_cluster, tmp_path):
    spec = PoolSpec.from_dict(
        {**spec_dict({"kind": "topk", "k": 2}, E=8), "name": "t-ck-bad", "shards": {"count": 2}}
    )
    pool = raymoe.serve(spec)
    try:
        pool.save(tmp_path / "ck")
        v = pool.describe().placement_version
    finally:
        pool.shutdown()
    shard = tmp_path / "ck" / "shard-00000.safetensors"
    original = shard.read_bytes()
    flipped = bytearray(original)
    flipped[-3] ^= 0x01
    shard.write_bytes(bytes(flipped))
    with pytest.raises(CheckpointError, match="corrupted"):
        raymoe.serve(checkpoint=tmp_path / "ck")
    with pytest.raises(raymoe.PoolNotFoundError):
        raymoe.connect("t-ck-bad")
    other = PoolSpec.from_dict({**spec_dict({"kind": "topk", "k": 2}, E=8, d=32), "name": "x"})
    pool = raymoe.serve(spec)  # a running pool is untouched by a refused restore
    try:
        shard.write_bytes(original)  # whole again, but not the model of `other`
        with pytest.raises(CheckpointError, match="d_model"):
            raymoe.serve(other, checkpoint=tmp_path / "ck")
        assert pool.describe().placement_version == v
        assert pool.forward(torch.randn(3, 16)).shape == (3, 16)
    finally:
        pool.shutdown()


def test_cli_saves_through_the_gateway_and_verifies(
    ray_cluster, tokens, tmp_path, capsys, monkeypatch
):
    import json

    from raymoe.cli import main

    spec = PoolSpec.from_dict(
        {
            **spec_dict({"kind": "topk", "k": 2}, E=8),
            "name": "t-ck-cli",
            "shards": {"count": 2},
            "gateway": gateway_section(tokens),
        }
    )
    pool = raymoe.serve(spec)
    try:
        (endpoint,) = pool.gateways()
        target = ["--target", endpoint]
        path = str(tmp_path / "ck")
        data = ["--token-file", str(tokens / "data")]
        assert main(["checkpoint", "save", path, *target, *data]) == 4  # admin only
        admin = ["--token-file", str(tokens / "admin")]
        assert main(["checkpoint", "save", path, *target, *admin, "-o", "json"]) == 0
        out = json.loads(capsys.readouterr().out)
        assert out["placement_version"] == pool.describe().placement_version
        assert out["files"] == 3
        assert main(["checkpoint", "verify", path]) == 0
        assert "(verified)" in capsys.readouterr().out
        serve = ["serve", "--checkpoint", path, "--shards", "1", "--name", "t-ck-cli2"]
        assert main([*serve, "--duration", "1"]) == 0
        assert "serving pool 't-ck-cli2': 8 experts in 1 layer(s) on 1 shards" in (
            capsys.readouterr().out
        )
        (tmp_path / "ck" / "gate.safetensors").write_bytes(b"")
        assert main(["checkpoint", "verify", path]) == 2
        assert "gate.safetensors is truncated" in capsys.readouterr().err
        monkeypatch.chdir(tmp_path)
        assert main(["checkpoint", "save", "again", *target, *admin]) == 0  # made absolute
        assert (tmp_path / "again" / "manifest.json").is_file()
    finally:
        pool.shutdown()
