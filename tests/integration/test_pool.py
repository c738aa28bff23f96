"""A served pool equals MoELayer (fp32, 1e-5) on a real local Ray cluster."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import raymoe
from raymoe import ExpertIdError, MoELayer, PoolSpec, ShapeError
from tests.helpers import spec_dict

pytestmark = pytest.mark.integration

CASES = {
    "topk-3shards-2routers": (spec_dict({"kind": "topk", "k": 2, "renormalize": True}, E=8,
                                        shared={"hidden": 8, "gate": True}), 3, 2),
    "product_key-2shards": (spec_dict({"kind": "product_key", "heads": 2, "k": 3, "d_key": 8},
                                      E=64, kind="peer"), 2, 1),
    "switch-1shard": (spec_dict({"kind": "switch", "capacity_factor": 1.0}, E=8), 1, 1),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(CASES))
def test_pool_equals_layer(ray_cluster, case):
    data, shards, routers = CASES[case]
    spec = PoolSpec.from_dict({**data, "name": f"t-{case}",
                               "shards": {"count": shards, "routers": routers}})  # fmt: skip
    layer = MoELayer(spec).eval()
    with torch.no_grad():  # the pool gets weights that differ from its seeded init
        for p in layer.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    pool = raymoe.serve(spec, weights=layer.state_dict())
    try:
        assert pool.describe()["shards"] == shards
        x = torch.randn(33, 16)
        with torch.no_grad():
            want, info = layer(x, return_info=True)
        for _ in range(routers):  # every router replica
            assert (pool.forward(x) - want).abs().max().item() <= 1e-5
        got = pool.forward(x, expert_ids=info.expert_ids, weights=info.weights)
        assert (got - want).abs().max().item() <= 1e-5
        assert isinstance(pool.forward(x.numpy()), np.ndarray)
        other = raymoe.connect(spec.name)
        assert (other.forward(x) - want).abs().max().item() <= 1e-5
    finally:
        pool.shutdown()


def test_bad_input_through_the_handle_is_typed_and_pool_keeps_serving(ray_cluster):
    spec = PoolSpec.from_dict({**spec_dict({"kind": "topk", "k": 2}, E=4), "name": "t-bad"})
    pool = raymoe.serve(spec)
    try:
        with pytest.raises(ShapeError, match="16"):
            pool.forward(torch.randn(3, 15))
        with pytest.raises(ExpertIdError):
            pool.forward(torch.randn(2, 16), expert_ids=torch.tensor([[0, 9]] * 2),
                         weights=torch.ones(2, 2))  # fmt: skip
        x = torch.randn(4, 16)
        assert (pool.forward(x) - MoELayer(spec)(x)).abs().max().item() <= 1e-5
    finally:
        pool.shutdown()


def test_connect_to_unknown_pool(ray_cluster):
    with pytest.raises(raymoe.PoolNotFoundError):
        raymoe.connect("no-such-pool")


def test_demo_serves_checks_and_prints_a_table(ray_cluster, capsys):
    from raymoe.cli import main

    argv = ["demo", "--configs", "mixtral-tiny", "--clients", "2", "--requests", "2",
            "--tokens", "32"]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("mixtral-tiny"))
    assert float(row.split()[7]) <= 1e-5  # max err column: served vs MoELayer


def test_killed_shard_comes_back_and_no_request_fails(ray_cluster):
    import threading

    import ray

    spec = PoolSpec.from_dict({**spec_dict({"kind": "topk", "k": 3}, E=8), "name": "t-kill",
                               "shards": {"count": 3, "routers": 2}})  # fmt: skip
    layer = MoELayer(spec).eval()
    with torch.no_grad():
        for p in layer.experts.parameters():
            p.mul_(1.5)  # weights unlike the seeded init: a restart must reload these
    pool = raymoe.serve(spec, weights=layer.state_dict())
    xs = [torch.randn(24, 16, generator=torch.Generator().manual_seed(i)) for i in range(8)]
    with torch.no_grad():
        wants = [layer(x) for x in xs]
    errors: list[float] = []
    failures: list[BaseException] = []
    started = threading.Barrier(9)

    def client(i):
        started.wait()
        for _ in range(6):
            try:
                errors.append((pool.forward(xs[i]) - wants[i]).abs().max().item())
            except BaseException as e:  # the test asserts there are none
                failures.append(e)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    try:
        for t in threads:
            t.start()
        started.wait()
        ray.kill(pool._shards[1], no_restart=False)
        for t in threads:
            t.join(timeout=120)
        assert not failures, failures[:1]
        assert len(errors) == 48 and max(errors) <= 1e-5
        after = pool.forward(xs[0])  # the shard is back, with its experts' weights
        assert (after - wants[0]).abs().max().item() <= 1e-5
    finally:
        pool.shutdown()


def test_cli_serve_runs_for_a_bounded_time(ray_cluster, capsys, tmp_path):
    from raymoe.cli import main

    cfg = tmp_path / "pool.yaml"
    cfg.write_text(PoolSpec.from_dict(spec_dict({"kind": "topk", "k": 2}, E=4)).to_yaml())
    assert main(["serve", "-c", str(cfg), "--name", "t-cli", "--interval", "0.2",
                 "--duration", "0.5"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "serving pool 't-cli'" in out and "shard imbalance" in out
    with pytest.raises(raymoe.PoolNotFoundError):
        raymoe.connect("t-cli")  # shut down on exit
