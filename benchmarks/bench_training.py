"""Training throughput through the pool vs in process, side by side in one run.

For each config (mixtral-tiny, peer-1m) and micro-batch size: training tokens/s of
``RemoteMoE`` over a served pool (gate here, experts on the shards, their gradients added up
and stepped there by ``PoolOptimizer``) vs the in-process ``MoELayer`` with the same
optimizer (``ExpertOptimizer``); the gate's optimizer is ``torch.optim`` of the same kind on
both sides. A timed step is forward + backward + optimizer step (``--optimizer none``:
forward + backward only). The loss is ``(y * g).sum() + aux_loss`` for a fixed random ``g``.
The pool's shards either keep each forward's activations for its backward (``keep``) or
recompute the forward in the backward (``recompute``); both are timed, each beside its own
in-process run, so that both sides always take the same steps: after the timed ones, the max
abs difference of their outputs is printed, and the bytes of the experts' optimizer state
beside the rows it covers (lazy: rows touched, not experts).

    PYTHONPATH=. .venv/bin/python benchmarks/bench_training.py [--sizes 1024 4096]
"""

from __future__ import annotations

import argparse
import gc
import itertools
from pathlib import Path

import torch
from _timing import interleaved_medians

import raymoe
from raymoe import MoELayer, PoolSpec, RemoteMoE
from raymoe.optim import ExpertOptimizer, PoolOptimizer

ROOT = Path(__file__).resolve().parents[1]


TORCH = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}


def step_fn(module, x: torch.Tensor, g: torch.Tensor, optimizers: list):
    """One training step of ``module``; ``optimizers``: (experts', gate's), or none."""

    def step():
        xr = x.clone().requires_grad_()
        y, info = module(xr, return_info=True)
        ((y * g).sum() + info.aux_loss).backward()
        for opt in optimizers:
            opt.step()
        for opt in optimizers:
            opt.zero_grad()
        return xr.grad

    return step


def bench(
    name: str, sizes: list[int], reps: int, transport: str, kind: str, modes: list[str], layout
) -> list[dict]:
    data = PoolSpec.from_yaml(ROOT / "examples" / "configs" / f"{name}.yaml").model_dump(
        mode="json"
    )
    data["shards"]["transport"] = transport
    if layout is not None:  # shards x threads each, in place of the config's
        data["shards"]["count"], data["shards"]["shard_threads"] = layout
    spec = PoolSpec.from_dict(data)
    layer = MoELayer(spec)
    pool = raymoe.serve(
        spec, weights={k: v.detach().numpy() for k, v in layer.state_dict().items()}
    )
    rows = []
    try:
        remote = RemoteMoE(pool)
        local_opts, pool_opts = [], []
        if kind != "none":
            lr = 1e-3
            local_opts = [
                ExpertOptimizer(layer, kind, lr=lr),
                TORCH[kind](layer.router.parameters(), lr=lr),
            ]
            pool_opts = [
                PoolOptimizer(pool, kind, lr=lr),
                TORCH[kind](remote.gate.parameters(), lr=lr),
            ]
        for T, mode in itertools.product(sizes, modes):
            remote.keep_activations = mode == "keep"
            gen = torch.Generator().manual_seed(T)
            x = torch.randn(T, spec.d_model, generator=gen)
            g = torch.randn(T, spec.d_model, generator=gen)
            local = step_fn(layer, x, g, local_opts)
            served = step_fn(remote, x, g, pool_opts)
            if kind == "none":
                layer.zero_grad(set_to_none=True)
                pool.zero_grad()
            t_local, t_served = interleaved_medians([local, served], reps)
            with torch.no_grad():  # both took the same steps
                err = float((layer(x) - remote(x)).abs().max())
            state = local_opts[0].state if local_opts else None
            rows.append(
                {
                    "config": name,
                    "transport": transport,
                    "mode": mode,
                    "tokens": T,
                    "local": T / t_local,
                    "served": T / t_served,
                    "err": err,
                    "state_rows": len(state) if state is not None else 0,
                    "state_mb": state.nbytes() / 2**20 if state is not None else 0.0,
                    "dense_mb": 0.0 if state is None else _dense_mb(layer, kind),
                }
            )
            r = rows[-1]
            print(
                f"[{name}/{transport}/{kind}/{mode}] {T:>6} tokens: "
                f"in-process {r['local']:>8,.0f} tok/s, "
                f"through the pool {r['served']:>8,.0f} ({r['served'] / r['local']:.2f}), "
                f"output max diff after the steps {err:.1e}; optimizer state "
                f"{r['state_rows']:,} rows, {r['state_mb']:.1f} MB (dense: {r['dense_mb']:.0f} MB)",
                flush=True,
            )
    finally:
        pool.shutdown()
    return rows


def bench_collected(*args) -> list[dict]:
    """:func:`bench`, and let what it held go before the next pool starts (PEER-1M: GBs of
    layer and state; two at once run this machine out of memory)."""
    rows = bench(*args)
    gc.collect()
    return rows


def _dense_mb(layer: MoELayer, kind: str) -> float:
    """What ``torch.optim`` of ``kind`` would hold for every expert."""
    per = {"sgd": 1, "adam": 2, "adamw": 2}[kind]
    return per * sum(p.numel() * p.element_size() for p in layer.experts.parameters()) / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--configs", nargs="+", default=["mixtral-tiny", "peer-1m"])
    ap.add_argument("--sizes", nargs="+", type=int, default=[1024, 4096])
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--transports", nargs="+", default=["object_store", "grpc"])
    ap.add_argument("--optimizer", default="adam", choices=["none", *TORCH])
    ap.add_argument("--modes", nargs="+", default=["keep", "recompute"])
    ap.add_argument(
        "--layout", type=int, nargs=2, metavar=("SHARDS", "THREADS"), help="shards, threads each"
    )
    args = ap.parse_args()
    rows = [
        r
        for name in args.configs
        for t in args.transports
        for r in bench_collected(
            name, args.sizes, args.reps, t, args.optimizer, args.modes, args.layout
        )
    ]
    what = "forward+backward" + ("" if args.optimizer == "none" else f"+{args.optimizer} step")
    print(f"\n{what} tokens/s; target through the pool >= 0.7 of in-process at 4k")
    for r in rows:
        ratio = r["served"] / r["local"]
        print(
            f"{r['config']:<14}{r['transport']:<14}{r['mode']:<11}{r['tokens']:>7}"
            f"{r['local']:>10,.0f}"
            f"{r['served']:>10,.0f}{ratio:>7.2f}{'  met' if ratio >= 0.7 else '  MISSED'}"
            f"  max diff {r['err']:.1e}  state {r['state_mb']:.1f} MB / dense {r['dense_mb']:.0f}"
        )


if __name__ == "__main__":
    main()
