"""Training throughput through the pool vs in process, side by side in one run.

For each config (mixtral-tiny, peer-1m) and micro-batch size: forward+backward tokens/s of
``RemoteMoE`` over a served pool (gate here, experts on the shards, their gradients added up
there) vs the in-process ``MoELayer`` doing the same forward and backward. The loss is
``(y * g).sum() + aux_loss`` for a fixed random ``g``. Before timing, one step checks that the
input gradients agree (max abs difference printed). No optimizer step yet: the shards'
sparse optimizers are the training issue's next item.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_training.py [--sizes 1024 4096]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from _timing import median_time

import raymoe
from raymoe import MoELayer, PoolSpec, RemoteMoE

ROOT = Path(__file__).resolve().parents[1]


def step_fn(module, x: torch.Tensor, g: torch.Tensor, zero):
    def step():
        zero()
        xr = x.clone().requires_grad_()
        y, info = module(xr, return_info=True)
        ((y * g).sum() + info.aux_loss).backward()
        return xr.grad

    return step


def bench(name: str, sizes: list[int], reps: int, transport: str) -> list[dict]:
    data = PoolSpec.from_yaml(ROOT / "examples" / "configs" / f"{name}.yaml").model_dump(
        mode="json"
    )
    data["shards"]["transport"] = transport
    spec = PoolSpec.from_dict(data)
    layer = MoELayer(spec)
    pool = raymoe.serve(
        spec, weights={k: v.detach().numpy() for k, v in layer.state_dict().items()}
    )
    rows = []
    try:
        remote = RemoteMoE(pool)
        for T in sizes:
            gen = torch.Generator().manual_seed(T)
            x = torch.randn(T, spec.d_model, generator=gen)
            g = torch.randn(T, spec.d_model, generator=gen)
            local = step_fn(layer, x, g, lambda: layer.zero_grad(set_to_none=True))
            served = step_fn(remote, x, g, lambda: (remote.zero_grad(), pool.zero_grad()))
            err = float((local() - served()).abs().max())
            t_local = median_time(local, reps)
            t_served = median_time(served, reps)
            rows.append(
                {
                    "config": name,
                    "transport": transport,
                    "tokens": T,
                    "local": T / t_local,
                    "served": T / t_served,
                    "err": err,
                }
            )
            r = rows[-1]
            print(
                f"[{name}/{transport}] {T:>6} tokens: in-process {r['local']:>8,.0f} tok/s, "
                f"through the pool {r['served']:>8,.0f} ({r['served'] / r['local']:.2f}), "
                f"grad of x max diff {err:.1e}",
                flush=True,
            )
    finally:
        pool.shutdown()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--configs", nargs="+", default=["mixtral-tiny", "peer-1m"])
    ap.add_argument("--sizes", nargs="+", type=int, default=[1024, 4096])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--transports", nargs="+", default=["object_store", "grpc"])
    args = ap.parse_args()
    rows = [
        r
        for name in args.configs
        for t in args.transports
        for r in bench(name, args.sizes, args.reps, t)
    ]
    print("\nforward+backward tokens/s; target through the pool >= 0.7 of in-process at 4k")
    for r in rows:
        ratio = r["served"] / r["local"]
        print(
            f"{r['config']:<14}{r['transport']:<14}{r['tokens']:>7}{r['local']:>10,.0f}"
            f"{r['served']:>10,.0f}{ratio:>7.2f}{'  met' if ratio >= 0.7 else '  MISSED'}"
            f"  max diff {r['err']:.1e}"
        )


if __name__ == "__main__":
    main()
