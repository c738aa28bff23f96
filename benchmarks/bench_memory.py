"""Memory of a served pool given its weights, by proportional set size (PSS), against the
bytes of its experts: no process may hold a second copy of the weights.

Side by side in one run, on one local Ray cluster started here:

1. the fixed overhead: the same pool shape (PEER, the same shards, routers and controller)
   with 1,024 experts, given its weights: Ray's own processes and every pool actor's
   interpreter, Torch and buffers, whatever the expert count;
2. PEER-1M (``examples/configs/peer-1m.yaml``: 1,048,576 experts, d=256, 2.15 GB of
   experts) given its weights: PSS sampled while it loads (the peak) and in steady state
   after traffic.

PSS counts shared pages (the object store, memory maps) once across processes, unlike RSS.
The processes counted are the Ray cluster's (every descendant of this driver), not the
driver itself: it holds the caller's copy of the weights it passes to ``serve``. The
target (issue 14): total <= 1.25 x expert bytes x replicas + the fixed overhead.

    .venv/bin/python benchmarks/bench_memory.py [--experts N]
"""

from __future__ import annotations

import argparse
import os
import threading
import time
from pathlib import Path

import numpy as np
import ray
import torch

import raymoe
from raymoe import MoELayer, PoolSpec

ROOT = Path(__file__).resolve().parents[1]
TARGET = 1.25


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (from /proc; children files need no psutil)."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def pss_bytes(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def cluster_pss() -> int:
    """PSS of the Ray cluster's processes (this driver's descendants)."""
    return sum(pss_bytes(p) for p in descendants(os.getpid()))


class Sampler:
    """The largest cluster PSS seen while the block runs (every 0.25 s)."""

    def __enter__(self):
        self.peak, self._stop = 0, threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, cluster_pss())
            self._stop.wait(0.25)

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, cluster_pss())


def peer_spec(experts: int, name: str) -> PoolSpec:
    spec = PoolSpec.from_yaml(ROOT / "examples" / "configs" / "peer-1m.yaml")
    d = spec.model_dump(mode="json")
    d["experts"]["num_experts"] = experts
    d["name"] = name
    return PoolSpec.from_dict(d)


def weights_of(spec: PoolSpec) -> dict[str, np.ndarray]:
    """Expert weights unlike the seeded init (nothing could be re-drawn instead of loaded),
    the gate's as seeded."""
    g = torch.Generator().manual_seed(1)
    out = {}
    for k, v in MoELayer(spec).state_dict().items():
        fresh = k.startswith("experts.")
        out[k] = (torch.randn(v.shape, generator=g) * 0.05).numpy() if fresh else v.numpy()
    return out


def measure(spec: PoolSpec, traffic: int) -> dict:
    weights = weights_of(spec)
    expert_bytes = sum(v.nbytes for k, v in weights.items() if k.startswith("experts."))
    before = cluster_pss()
    t = time.perf_counter()
    with Sampler() as load:
        pool = raymoe.serve(spec, weights=weights)
    load_s = time.perf_counter() - t
    x = np.random.default_rng(0).standard_normal((256, spec.d_model)).astype(np.float32)
    want = MoELayer(spec).eval()
    want.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()})
    with torch.no_grad():
        err = float(np.abs(pool.forward(x) - want(torch.from_numpy(x)).numpy()).max())
    del weights, want  # the driver's copy: not the pool's
    for _ in range(traffic):
        pool.forward(x)
    time.sleep(2)
    steady = cluster_pss()
    pool.shutdown()
    time.sleep(2)
    return {
        "expert_bytes": expert_bytes,
        "replicas": pool_replicas(spec),
        "before": before,
        "load_peak": load.peak,
        "steady": steady,
        "load_s": load_s,
        "max_abs_err": err,
    }


def pool_replicas(spec: PoolSpec) -> float:
    return 1.0  # PEER pools hold one replica of each expert until a rebalance adds some


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--experts", type=int, default=1 << 20)
    ap.add_argument("--traffic", type=int, default=20, help="256-token requests before steady")
    args = ap.parse_args()
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, namespace="raymoe")
    small = measure(peer_spec(1024, "mem-small"), args.traffic)
    big = measure(peer_spec(args.experts, "mem-big"), args.traffic)
    gb = 1e9
    overhead = max(small["load_peak"], small["steady"]) - small["expert_bytes"]
    B = big["expert_bytes"] * big["replicas"]
    print(f"expert bytes: {B / gb:.2f} GB ({args.experts:,} PEER experts, one replica each)")
    print(
        f"fixed overhead (same pool, 1,024 experts): {overhead / gb:.2f} GB "
        f"(load peak {small['load_peak'] / gb:.2f}, steady {small['steady'] / gb:.2f})"
    )
    print(f"served vs in-process max abs error: {big['max_abs_err']:.2e}")
    ok = True
    for what in ("load_peak", "steady"):
        total = big[what]
        ratio = (total - overhead) / B
        ok &= ratio <= TARGET
        print(
            f"{what:>9}: {total / gb:6.2f} GB total = overhead + {ratio:.2f} x expert bytes "
            f"(target <= {TARGET}; total / expert bytes {total / B:.2f}x)"
        )
    print(f"load time: {big['load_s']:.1f} s (writing the initial checkpoint included)")
    print("PASS" if ok else "MISS")
    ray.shutdown()


if __name__ == "__main__":
    main()
