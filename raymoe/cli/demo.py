"""Run the demo: MoE layers on the example configs, checked and timed."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from raymoe.config import PoolSpec

CONFIG_DIR = Path(__file__).resolve().parents[2] / "examples" / "configs"
DEMO_CONFIGS = ("mixtral-tiny", "peer-1m")


def add_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--configs", nargs="+", default=list(DEMO_CONFIGS),
                   help="example config names or YAML paths")  # fmt: skip
    p.add_argument("--tokens", type=int, default=1024, help="tokens per batch")
    p.add_argument("--batches", type=int, default=4)
    p.set_defaults(run=run)


def resolve(name: str) -> PoolSpec:
    path = Path(name)
    if not path.suffix:
        path = CONFIG_DIR / f"{name}.yaml"
    return PoolSpec.from_yaml(path)


def run(args: argparse.Namespace) -> int:
    from raymoe.layer import MoELayer

    rows = []
    for name in args.configs:
        spec = resolve(name)
        print(f"[{spec.name}] building {spec.num_experts:,} {spec.experts.kind} experts ...",
              flush=True)  # fmt: skip
        layer = MoELayer(spec).eval()
        g = torch.Generator().manual_seed(0)
        x = torch.randn(args.tokens, spec.d_model, generator=g, dtype=spec.torch_dtype)
        with torch.no_grad():
            layer(x)  # warm-up
            t0 = time.perf_counter()
            for i in range(args.batches):
                _, info = layer(x, return_info=True)
                print(f"\r[{spec.name}] batch {i + 1}/{args.batches}", end="", flush=True)
            dt = time.perf_counter() - t0
        print()
        rows.append((spec.name, spec.num_experts, args.tokens * args.batches / dt,
                     info.load.imbalance))  # fmt: skip
    print(f"\n{'pool':<16}{'experts':>12}{'tokens/s':>12}{'imbalance':>11}")
    for name, n, tps, imb in rows:
        print(f"{name:<16}{n:>12,}{tps:>12,.0f}{imb:>11.2f}")
    return 0
