"""The gateways as the controller keeps them (per node, across a controller restart, a taken
port), and last: tokens never reach a log."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import ray
import torch

import raymoe
from raymoe import MoELayer
from raymoe._private import actors
from tests.integration.gateway_common import (
    ADMIN,
    DATA,
    D,
    gateway_spec,
    want,
)

pytestmark = pytest.mark.integration


# --- the gateways as the controller keeps them ----------------------------------------------


def test_per_node_gateways_survive_a_controller_restart(ray_cluster, tokens):

    from raymoe._private import actors

    spec = gateway_spec("gw-nodes", tokens, per_node=True)
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
            assert (c.forward(x) - want(MoELayer(spec), x)).abs().max() <= 1e-5
    finally:
        pool.shutdown()
    assert actors.gateways("gw-nodes") == []


def test_per_node_gateways_follow_nodes_joining_and_leaving():
    """On a two-node cluster of its own (a subprocess: the session's cluster has one node)."""

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

    _, endpoint, _ = served
    port = int(endpoint.rsplit(":", 1)[1])  # taken by the other pool's gateway
    spec = gateway_spec("gw-clash", tokens, port=port)
    with pytest.raises(raymoe.PoolError, match="could not start"):
        raymoe.serve(spec)
    assert actors.gateways("gw-clash") == []
    with pytest.raises(ValueError):
        actors.get_controller("gw-clash")


# --- last: tokens never reach a log ---------------------------------------------------------


def test_tokens_never_reach_a_log(served):

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
