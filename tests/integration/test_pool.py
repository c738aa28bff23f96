"""A served pool equals MoELayer (fp32, 1e-5) on a real local Ray cluster."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import ray
import torch

import raymoe
from raymoe import (
    DTypeError,
    ExpertIdError,
    InvalidInputError,
    MoELayer,
    NonFiniteError,
    PoolSpec,
    RequestTooLargeError,
    ShapeError,
)
from tests.helpers import spec_dict

pytestmark = pytest.mark.integration

ROUTINGS = {
    "topk": spec_dict(
        {"kind": "topk", "k": 2, "renormalize": True}, E=8, shared={"hidden": 8, "gate": True}
    ),
    "groups": spec_dict(
        {
            "kind": "topk",
            "k": 2,
            "score": "sigmoid",
            "n_groups": 4,
            "topk_groups": 2,
            "correction_bias": True,
        },
        E=16,
    ),
    "dense": spec_dict({"kind": "dense"}, E=8),
    "switch": spec_dict({"kind": "switch", "capacity_factor": 0.5}, E=8),
    "expert_choice": spec_dict({"kind": "expert_choice", "k": 2}, E=8),
    "hash": spec_dict({"kind": "hash", "vocab_size": 100}, E=8),
    "product_key": spec_dict(
        {"kind": "product_key", "heads": 2, "k": 3, "d_key": 8}, E=64, kind="peer"
    ),
    "hierarchical": spec_dict({"kind": "hierarchical", "n_groups": 4, "k_groups": 2, "k": 2}, E=16),
    # GPT-OSS (a limit this low clamps) and Llama 4 (the weight scales the expert's input)
    "gpt_oss": spec_dict(
        {"kind": "topk", "k": 2, "renormalize": True, "bias": True},
        E=8,
        bias=True,
        clamped_swiglu={"limit": 0.3},
    ),
    "llama4": spec_dict(
        {"kind": "topk", "k": 1, "score": "sigmoid"},
        E=8,
        weight_input=True,
        shared={"hidden": 8},
    ),
}
CONFIGS = Path(__file__).parents[2] / "examples" / "configs"

# (routing or example config, shards, routers, replicated): every routing kind and example
# config; every shard count 1/2/3/8, with and without replicas, 1 and 3 routers among them.
MATRIX = [
    ("topk", 1, 1, False),
    ("topk", 2, 3, True),
    ("topk", 3, 1, True),
    ("topk", 8, 3, True),
    ("groups", 3, 3, True),
    ("dense", 2, 1, False),
    ("switch", 3, 3, True),
    ("expert_choice", 2, 1, True),
    ("hash", 8, 1, False),
    ("product_key", 2, 3, True),
    ("hierarchical", 1, 3, False),
    ("gpt_oss", 2, 1, True),
    ("llama4", 3, 1, True),
    ("mixtral-tiny", 2, 1, True),
    ("deepseek-tiny", 3, 3, True),
    ("switch-tiny", 2, 1, False),
]


# every routing kind again over the gRPC transport (routers -> shards on loopback)
GRPC_MATRIX = [(kind, 2, 1, kind in ("topk", "product_key")) for kind in sorted(ROUTINGS)]


def _spec(case: str, shards: int, routers: int, replicated: bool, transport="object_store"):
    if case in ROUTINGS:
        data = dict(ROUTINGS[case])
    else:
        data = PoolSpec.from_yaml(CONFIGS / f"{case}.yaml").model_dump(mode="json")
    E = PoolSpec.from_dict(data).num_experts
    layout = {"count": shards, "routers": routers, "transport": transport}
    if replicated and shards > 1:
        layout["replicas"] = {0: shards, E // 2: 2, E - 1: 2}
    name = f"t-{case}-{shards}-{routers}-{transport}"
    return PoolSpec.from_dict({**data, "name": name, "shards": layout})


def _perturbed(spec: PoolSpec) -> MoELayer:
    layer = MoELayer(spec).eval()
    with torch.no_grad():  # the pool gets weights that differ from its seeded init
        for p in layer.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return layer


CASES = [(*m, "object_store") for m in MATRIX] + [(*m, "grpc") for m in GRPC_MATRIX]


@pytest.mark.parametrize(
    "case,shards,routers,replicated,transport",
    CASES,
    ids=[f"{c}-{s}shards-{r}routers{'-replicas' if p else ''}-{t}" for c, s, r, p, t in CASES],
)
def test_pool_equals_layer(ray_cluster, case, shards, routers, replicated, transport):
    spec = _spec(case, shards, routers, replicated, transport)
    layer = _perturbed(spec)
    pool = raymoe.serve(spec, weights=layer.state_dict())
    try:
        d = pool.describe()
        assert d.shards == shards and d.routers == routers
        assert d.replicas > d.experts if replicated and shards > 1 else True
        hashed = spec.routing.kind == "hash"
        g = torch.Generator().manual_seed(0)
        xs = [torch.randn(1 + (7 * i) % 23, spec.d_model, generator=g) for i in range(32)]
        toks = [torch.randint(0, 100, (len(x),), generator=g) if hashed else None for x in xs]
        with torch.no_grad():
            wants = [layer(x, token_ids=t) for x, t in zip(xs, toks, strict=True)]
        # 32 concurrent callers: requests are coalesced, each caller gets exactly its rows
        refs = [pool.forward_async(x, token_ids=t) for x, t in zip(xs, toks, strict=True)]
        for ref, want in zip(refs, wants, strict=True):
            assert np.abs(ray.get(ref) - want.numpy()).max() <= 1e-5
        x, tok, want = xs[-1], toks[-1], wants[-1]
        with torch.no_grad():
            _, info = layer(x, token_ids=tok, return_info=True)
        got = pool.forward(x, expert_ids=info.expert_ids, weights=info.weights)  # client routes
        assert (got - want).abs().max().item() <= 1e-5
        assert isinstance(pool.forward(x.numpy(), token_ids=tok), np.ndarray)
        other = raymoe.connect(spec.name)
        assert (other.forward(x, token_ids=tok) - want).abs().max().item() <= 1e-5
        st = pool.stats()
        assert st.counters["batches"] < st.requests  # batching happened
    finally:
        pool.shutdown()


@pytest.mark.parametrize("transport", ["object_store", "grpc"])
def test_soft_moe_pool_equals_layer(ray_cluster, transport):
    """Soft routing: the routers mix each sequence into slots, shards compute the slots, the
    routers mix them back; concurrent requests of different shapes get exactly their rows."""
    data = spec_dict({"kind": "soft", "slots_per_expert": 2}, E=8, bias=True)
    layout = {"count": 3, "routers": 2, "transport": transport, "replicas": {0: 3, 5: 2}}
    spec = PoolSpec.from_dict({**data, "name": f"t-soft-{transport}", "shards": layout})
    layer = _perturbed(spec)
    pool = raymoe.serve(spec, weights=layer.state_dict())
    try:
        g = torch.Generator().manual_seed(0)
        shapes = [(1 + i % 3, 1 + (5 * i) % 11) for i in range(24)]
        xs = [torch.randn(*shape, spec.d_model, generator=g) for shape in shapes]
        with torch.no_grad():
            wants = [layer(x) for x in xs]
        refs = [pool.forward_async(x) for x in xs]
        for ref, want in zip(refs, wants, strict=True):
            assert np.abs(ray.get(ref) - want.numpy()).max() <= 1e-5
        with pytest.raises(ShapeError, match="per sequence"):
            pool.forward(torch.randn(4, spec.d_model))
        with pytest.raises(InvalidInputError, match="no client routes"):
            ids, w = torch.zeros(4, 1, dtype=torch.long), torch.ones(4, 1)
            pool.forward(torch.randn(1, 4, spec.d_model), expert_ids=ids, weights=w)
        assert (pool.forward(xs[-1]) - wants[-1]).abs().max().item() <= 1e-5  # still serving
        assert pool.stats().expert_load.sum() > 0
    finally:
        pool.shutdown()


def test_bad_input_through_the_handle_is_typed_and_pool_keeps_serving(ray_cluster):
    limits = {"max_request_tokens": 64, "max_batch_tokens": 64}
    spec = PoolSpec.from_dict(
        {**spec_dict({"kind": "topk", "k": 2}, E=4), "name": "t-bad", "limits": limits}
    )
    pool = raymoe.serve(spec)
    layer = MoELayer(spec)
    nan = torch.randn(2, 16)
    nan[1, 3] = float("nan")
    bad = [
        (ShapeError, "16", dict(x=torch.randn(3, 15))),
        (DTypeError, "float32", dict(x=torch.randn(3, 16, dtype=torch.float64))),
        (NonFiniteError, "NaN|finite", dict(x=nan)),
        (RequestTooLargeError, "64", dict(x=torch.randn(65, 16))),
        (
            ExpertIdError,
            "9|range",
            dict(
                x=torch.randn(2, 16),
                expert_ids=torch.tensor([[0, 9]] * 2),
                weights=torch.ones(2, 2),
            ),
        ),
        (
            ExpertIdError,
            None,
            dict(
                x=torch.randn(2, 16),
                expert_ids=torch.tensor([[0, -2]] * 2),
                weights=torch.ones(2, 2),
            ),
        ),
        (
            ShapeError,
            None,
            dict(
                x=torch.randn(2, 16),
                expert_ids=torch.tensor([[0, 1]] * 2),
                weights=torch.ones(2, 3),
            ),
        ),
        (
            InvalidInputError,
            None,
            dict(x=torch.randn(2, 16), expert_ids=torch.tensor([[0, 1]] * 2)),
        ),
    ]
    try:
        good = torch.randn(4, 16)
        pending = [pool.forward_async(good) for _ in range(8)]  # other callers, in flight
        for cls, msg, kw in bad:
            with pytest.raises(cls, match=msg):
                pool.forward(kw.pop("x"), **kw)
        with torch.no_grad():
            want = layer(good).numpy()
        for ref in pending:
            assert np.abs(ray.get(ref) - want).max() <= 1e-5
        assert np.abs(pool.forward(good.numpy()) - want).max() <= 1e-5
        with pytest.raises(raymoe.PoolExistsError):
            raymoe.serve(spec)
    finally:
        pool.shutdown()


def test_connect_to_unknown_pool(ray_cluster):
    with pytest.raises(raymoe.PoolNotFoundError):
        raymoe.connect("no-such-pool")


def test_demo_tells_its_story_serves_checks_and_prints_tables(ray_cluster, capsys):
    """The main job: the model story (generation through the pool equal to in process, then
    the pool reacting to a shifted load with no failed request) and the example pools."""
    from raymoe.cli import main

    argv = [
        "demo",
        "--configs",
        "mixtral-tiny",
        "--clients",
        "2",
        "--requests",
        "2",
        "--tokens",
        "32",
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("mixtral-tiny"))
    assert float(row.split()[7]) <= 1e-5  # max err column: served vs MoELayer
    assert "identical to in-process generation: yes" in out
    assert "failed requests: 0;" in out
    steps = [line for line in out.splitlines() if line.startswith(("hot set", "after the auto"))]
    before, after = (float(line.split()[-4]) for line in steps)
    assert after < before  # the automatic rebalance happened and helped


def _traffic(pool, layer, kill, clients=8, rounds=6):
    """``clients`` threads send ``rounds`` requests each while ``kill()`` runs; returns
    (max abs error of every answer, failures)."""
    import threading

    xs = [torch.randn(24, 16, generator=torch.Generator().manual_seed(i)) for i in range(clients)]
    with torch.no_grad():
        wants = [layer(x) for x in xs]
    errors: list[float] = []
    failures: list[BaseException] = []
    started = threading.Barrier(clients + 1)

    def client(i):
        started.wait()
        for _ in range(rounds):
            try:
                errors.append((pool.forward(xs[i]) - wants[i]).abs().max().item())
            except BaseException as e:  # the tests assert there are none
                failures.append(e)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    started.wait()
    kill()
    for t in threads:
        t.join(timeout=120)
    assert len(errors) + len(failures) == clients * rounds
    return max(errors, default=0.0), failures


def _pool_with_weights(name, shards=3, routers=2, transport="object_store"):
    layout = {"count": shards, "routers": routers, "transport": transport}
    spec = PoolSpec.from_dict(
        {**spec_dict({"kind": "topk", "k": 3}, E=8), "name": name, "shards": layout}
    )
    layer = MoELayer(spec).eval()
    with torch.no_grad():
        for p in layer.experts.parameters():
            p.mul_(1.5)  # weights unlike the seeded init: a restart must reload these
    return raymoe.serve(spec, weights=layer.state_dict()), layer


@pytest.mark.parametrize(
    "role,transport",
    [
        ("shard", "object_store"),
        ("shard", "grpc"),
        ("router", "object_store"),
        ("controller", "object_store"),
    ],
)
def test_killed_actor_comes_back_and_no_request_fails(ray_cluster, role, transport):
    pool, layer = _pool_with_weights(f"t-kill-{role}-{transport}", transport=transport)
    index = 1 if role != "controller" else 0
    victim = ray.get_actor(f"{pool.name}:{role}:{index}", namespace="raymoe")
    try:
        pid = _pid(victim)
        retries = pool.stats(window_s=3600).counters.get("retries", 0)
        err, failures = _traffic(pool, layer, lambda: ray.kill(victim, no_restart=False))
        assert not failures, failures[:1]
        assert err <= 1e-5
        assert _pid(victim) != pid  # the actor really died and came back
        if role == "shard":  # requests met the dead shard and were sent again
            assert pool.stats(window_s=3600).counters.get("retries", 0) > retries
        x = torch.randn(16, 16)
        with torch.no_grad():
            want = layer(x)
        for _ in range(4):  # every router, every shard is back with its experts' weights
            assert (pool.forward(x) - want).abs().max().item() <= 1e-5
        assert pool.describe().degraded == ()
        if role == "controller":  # the restarted controller still recovers shards
            shard = ray.get_actor(f"{pool.name}:shard:2", namespace="raymoe")
            err, failures = _traffic(pool, layer, lambda: ray.kill(shard, no_restart=False))
            assert not failures and err <= 1e-5
    finally:
        pool.shutdown()


def _pid(actor) -> int:
    return ray.get(actor.__ray_call__.remote(lambda self: __import__("os").getpid()), timeout=60)


def test_deadline_is_a_typed_error(ray_cluster):
    pool, _ = _pool_with_weights("t-deadline", shards=2, routers=1)
    try:
        shard = ray.get_actor(f"{pool.name}:shard:0", namespace="raymoe")
        ray.kill(shard, no_restart=True)  # gone for good: its experts cannot be reached
        t0 = time.monotonic()
        with pytest.raises(raymoe.DeadlineExceededError):
            pool.forward(torch.randn(64, 16), timeout_s=1.0)
        assert time.monotonic() - t0 < 5.0
        assert pool.stats(window_s=60).counters.get("retries", 0) > 0  # it did try again
    finally:
        pool.shutdown()


def test_cli_serve_runs_for_a_bounded_time(ray_cluster, capsys, tmp_path):
    from raymoe.cli import main

    cfg = tmp_path / "pool.yaml"
    cfg.write_text(PoolSpec.from_dict(spec_dict({"kind": "topk", "k": 2}, E=4)).to_yaml())
    assert (
        main(["serve", "-c", str(cfg), "--name", "t-cli", "--interval", "0.2", "--duration", "0.5"])
        == 0
    )
    out = capsys.readouterr().out
    assert "serving pool 't-cli'" in out and "shard imbalance" in out
    with pytest.raises(raymoe.PoolNotFoundError):
        raymoe.connect("t-cli")  # shut down on exit


def test_cli_serve_keep_then_attach(ray_cluster, capsys, tmp_path):
    """A driver that restarts (a Kubernetes sidecar) attaches to the pool it left running."""
    from raymoe.cli import main

    cfg = tmp_path / "pool.yaml"
    cfg.write_text(PoolSpec.from_dict(spec_dict({"kind": "topk", "k": 2}, E=4)).to_yaml())
    argv = ["serve", "-c", str(cfg), "--name", "t-keep", "--interval", "0.2", "--duration", "0.3"]
    assert main([*argv, "--keep"]) == 0
    pool = raymoe.connect("t-keep")  # still serving
    before = pool.describe()
    assert main(argv) == 1  # a second deploy of that name is refused...
    assert "already runs" in capsys.readouterr().err
    assert main([*argv, "--attach"]) == 0  # ...unless it attaches, then shuts down on exit
    out = capsys.readouterr().out
    assert "attached to the running pool 't-keep'" in out and "pool 't-keep' shut down" in out
    assert before.placement_version == 1
    with pytest.raises(raymoe.PoolNotFoundError):
        raymoe.connect("t-keep")
