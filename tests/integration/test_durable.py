"""Durable state on real parts: a real redis-server, real Ray clusters.

- a whole-cluster restart (two Ray clusters, one after the other, sharing only Redis and the
  weight files) brings a pool back with the same ids, pins, placement version and
  bit-identical weights, runtime-added experts included;
- Redis stopped for 10 s under 8 clients: no request fails, admin calls fail fast with a
  clear error, and nothing is lost when it returns;
- a restarted shard reloads its rows from the weight files (the controller holds none).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import ray
import torch

import raymoe
from raymoe import MoELayer, PoolSpec, StoreUnavailableError
from raymoe._private.control.goal import Goal
from raymoe.store import open_store
from tests.helpers import randomized, spec_dict

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def test_a_pool_comes_back_whole_after_its_cluster_restarts(redis_server, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(redis_server.env(), RAYMOE_WEIGHTS_DIR=str(tmp_path / "weights"))
    env["RAYMOE_STORE_DIR"] = str(tmp_path / "unused")  # Redis, not this, holds the state
    for mode in ("first", "second"):
        subprocess.run(
            [sys.executable, "-m", "tests.integration._restart", mode, str(tmp_path)],
            cwd=ROOT,
            env=env,
            check=True,
            timeout=300,
        )
    before, after = (json.loads((tmp_path / f"{t}.json").read_text()) for t in ("before", "after"))
    assert before == after and len(before["pinned"]) == 1 and before["removed"] == [3]
    assert before["live_per_layer"] == [8, 10]
    ys0, ys1 = np.load(tmp_path / "before.npz"), np.load(tmp_path / "after.npz")
    for k in ys0.files:
        assert np.array_equal(ys0[k], ys1[k]), k
    assert not (tmp_path / "unused").exists() or not any((tmp_path / "unused").iterdir())


def _spec(name: str, **extra) -> PoolSpec:
    return PoolSpec.from_dict(
        {**spec_dict({"kind": "topk", "k": 2}, E=8), "name": name, "shards": {"count": 2}, **extra}
    )


def test_redis_down_for_10_s_under_8_clients(redis_server, ray_cluster, monkeypatch):
    for k, v in redis_server.env().items():
        monkeypatch.setenv(k, v)
    spec = _spec("t-redis-out", shards={"count": 2, "routers": 2})
    pool = raymoe.serve(spec)
    ref = MoELayer(spec).eval()
    store = open_store()
    stop, failures, done = threading.Event(), [], [0] * 8

    def client(i: int) -> None:
        rng = np.random.default_rng(i)
        while not stop.is_set():
            x = rng.standard_normal((8, 16)).astype(np.float32)
            try:
                y = pool.forward(x)
                with torch.no_grad():
                    assert np.abs(y - ref(torch.from_numpy(x)).numpy()).max() <= 1e-5
                done[i] += 1
            except Exception as e:  # the test asserts there are none
                failures.append(e)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    try:
        pool.pin(2, 2)
        version = pool.describe().placement_version
        for t in threads:
            t.start()
        redis_server.stop()
        t0 = time.monotonic()
        with pytest.raises(StoreUnavailableError, match="unreachable"):
            pool.replicate(4, 2)
        with pytest.raises(StoreUnavailableError):
            pool.add_experts(1)
        assert time.monotonic() - t0 < 5  # fail fast
        assert pool.describe().placement_version == version  # refused calls changed nothing
        time.sleep(max(0.0, 10 - (time.monotonic() - t0)))
        served = sum(done)
        redis_server.start()
        report = pool.replicate(4, 2)
        assert report.version > version
    finally:
        stop.set()
        for t in threads:
            t.join()
    try:
        assert not failures, failures[:1]
        assert served > 0 and all(done)
        saved = Goal.load(store, spec.name)
        assert saved.spec.pins == {2: 2} and saved.placement.version == report.version
        assert int(saved.placement.replicas()[4]) == 2
        ops = [e["op"] for e in pool.audit(10)]
        assert ops[-2:] == ["pin", "replicate"] and ops.count("replicate") == 1
    finally:
        pool.shutdown()
    assert store.keys(f"{spec.name}/") == []


def test_a_restarted_shard_reloads_its_rows_from_the_weight_files(ray_cluster, tmp_path):
    spec = _spec("t-reload")
    layer = randomized(MoELayer(spec).eval(), seed=3)
    g = torch.Generator().manual_seed(4)
    pool = raymoe.serve(spec, weights=layer.state_dict())
    try:
        new = {  # scaled as trained weights are (outputs of order 1: fp32 error ~1e-7)
            "experts.w_gate": torch.randn(2, 24, 16, generator=g) * 0.3,
            "experts.w_up": torch.randn(2, 24, 16, generator=g) * 0.3,
            "experts.w_down": torch.randn(2, 16, 24, generator=g) * 0.3,
            "router.weight": torch.randn(2, 16, generator=g),
        }
        pool.add_experts(2, new)
        grown = MoELayer(spec.with_experts_added(2)).eval()
        state = {k: v.clone() for k, v in layer.state_dict().items()}
        for k, v in new.items():
            state[k] = torch.cat([state[k], v])
        grown.load_state_dict(state)
        for n in range(2):  # every shard dies; each comes back empty and reloads
            ray.kill(ray.get_actor(f"t-reload:shard:{n}", namespace="raymoe"), no_restart=False)
        x = torch.randn(32, 16)
        deadline = time.monotonic() + 60
        while True:
            try:
                y = pool.forward(x, timeout_s=10)
                break
            except raymoe.PoolError as e:
                assert time.monotonic() < deadline, f"still failing: {e!r}"
                time.sleep(0.2)  # the shards are reloading
        with torch.no_grad():
            assert (y - grown(x)).abs().max() <= 1e-5
    finally:
        pool.shutdown()


def test_a_shard_that_dies_with_the_controller_reloads_itself(ray_cluster, tmp_path):
    """Regression (issue 15): a shard that died while its controller was down stayed
    empty until the controller came back and noticed. A restarted shard now reads the
    saved goal and its rows itself; forwards succeed again within seconds, equal to
    MoELayer, with the controller still restarting."""
    spec = _spec("t-selfload")
    layer = randomized(MoELayer(spec).eval(), seed=5)
    pool = raymoe.serve(spec, weights=layer.state_dict())
    try:
        shard = ray.get_actor("t-selfload:shard:1", namespace="raymoe")
        ray.kill(ray.get_actor("t-selfload:controller:0", namespace="raymoe"), no_restart=False)
        ray.kill(shard, no_restart=False)
        t0, x = time.monotonic(), torch.randn(32, 16)
        while True:
            try:
                y = pool.forward(x, timeout_s=5)
                break
            except raymoe.PoolError:
                assert time.monotonic() - t0 < 30
                time.sleep(0.2)
        with torch.no_grad():
            assert (y - layer(x)).abs().max() <= 1e-5
        status = ray.get(shard.status.remote())
        assert status["ready"] and status["loaded_by"] == "self", status
    finally:
        pool.shutdown()
