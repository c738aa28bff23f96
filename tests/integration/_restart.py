"""Run as a subprocess by test_durable.py, twice, each time with a Ray cluster of its own
(a whole-cluster restart between the two): ``first`` serves a pool with its weights, changes
it (experts added with their weights before and after a checkpoint, one removed, a pin) and
records what it serves; ``second`` brings it back with ``raymoe serve --resume`` and checks the same
ids, pins, placement version and bit-identical weights.

    python -m tests.integration._restart first|second OUT_DIR
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import ray
import torch

import raymoe
from raymoe import MoEStack, PoolSpec
from raymoe import checkpoint as ck
from tests.helpers import spec_dict

NAME = "t-restart"


def model():
    """(spec, weights, rows added to layer 1, rows added to layer 0): all seeded."""
    spec = PoolSpec.from_dict(
        {
            **spec_dict({"kind": "topk", "k": 2}, E=8),
            "name": NAME,
            "layers": 2,
            "shards": {"count": 2},
        }
    )
    g = torch.Generator().manual_seed(0)
    stack = MoEStack(spec)
    weights = {k: torch.randn(v.shape, generator=g) * 0.3 for k, v in stack.state_dict().items()}

    def rows(n):
        return {
            "experts.w_gate": torch.randn(n, 24, 16, generator=g),
            "experts.w_up": torch.randn(n, 24, 16, generator=g),
            "experts.w_down": torch.randn(n, 16, 24, generator=g),
            "router.weight": torch.randn(n, 16, generator=g),
        }

    return spec, weights, rows(2), rows(1)


def record(pool, out: Path, tag: str) -> None:
    d = pool.describe()
    x = torch.randn(6, 16, generator=torch.Generator().manual_seed(1))
    ys = {f"y{i}": pool.forward(x, layer=i).numpy() for i in range(2)}
    np.savez(out / f"{tag}.npz", **ys)
    facts = {
        "version": d.placement_version,
        "removed": list(d.removed),
        "live_per_layer": list(d.live_per_layer),
        "pinned": {str(k): v for k, v in d.pinned.items()},
        "experts": d.experts,
    }
    (out / f"{tag}.json").write_text(json.dumps(facts, sort_keys=True))


def first(out: Path) -> None:
    spec, weights, new1, new0 = model()
    pool = raymoe.serve(spec, weights=weights)
    pool.add_experts(2, new1, layer=1)
    pool.save(out / "ck")  # the pool reloads from here on ...
    pool.add_experts(1, new0, layer=0)  # ... and from the file of this one, written first
    pool.remove_experts([3], layer=0)
    pool.pin(5, 2, layer=1)
    record(pool, out, "before")
    # the cluster goes away with this driver: no shutdown, the pool's state stays saved


def second(out: Path) -> None:
    from raymoe.cli import main

    _, weights, new1, new0 = model()
    assert main(["serve", "--resume", NAME, "--keep", "--duration", "0"]) == 0
    pool = raymoe.connect(NAME)
    try:
        record(pool, out, "after")
        pool.save(out / "again")
    finally:
        pool.shutdown()
    _, got, _ = ck.read(out / "again")
    want = {k: v.numpy() for k, v in weights.items()}
    for k, v in new1.items():  # layer 1 grew 8 -> 10; layer 0 8 -> 9 (3 removed)
        name = f"layers.1.{k}"
        want[name] = np.concatenate([want[name], v.numpy()])
    for k, v in new0.items():
        name = f"layers.0.{k}"
        want[name] = np.concatenate([want[name], v.numpy()])
    for k, v in want.items():
        rows = [0, 1, 2, 4, 5, 6, 7, 8] if k.startswith("layers.0.experts.") else slice(None)
        assert np.array_equal(got[k][rows], v[rows]), f"{k} differs after the restart"


if __name__ == "__main__":
    mode, where = sys.argv[1], Path(sys.argv[2])
    ray.init(num_cpus=2, namespace="raymoe", include_dashboard=False, log_to_driver=False)
    {"first": first, "second": second}[mode](where)
    ray.shutdown()
