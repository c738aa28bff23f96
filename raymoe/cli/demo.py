"""Run the demo: MoE layers on the example configs, checked and timed."""

from __future__ import annotations

import argparse
import math
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
                print(f"\r[{spec.name}] batch {i + 1}/{args.batches} ", end="", flush=True)
            dt = time.perf_counter() - t0
        print()
        per_shard = shard_load(spec, info.load.tokens_per_expert)
        rows.append((spec.name, spec.num_experts, args.tokens * args.batches / dt,
                     per_shard.max().item() / per_shard.mean().item()))  # fmt: skip
    print(f"\n{'pool':<16}{'experts':>12}{'tokens/s':>12}{'shard imbalance':>17}")
    for name, n, tps, imb in rows:
        print(f"{name:<16}{n:>12,}{tps:>12,.0f}{imb:>17.2f}")
    print(
        "(shard imbalance: max/mean (token, expert) pairs per shard under the spec's default"
        " placement)"
    )
    return 0


def shard_load(spec: PoolSpec, tokens_per_expert: torch.Tensor) -> torch.Tensor:
    """[shards] float: pairs each shard would get under the default contiguous placement."""
    from raymoe._private.placement import contiguous

    align = math.isqrt(spec.num_experts) if spec.routing.kind == "product_key" else 1
    placement = contiguous(spec.num_experts, spec.shards.count, align=align)
    return torch.zeros(spec.shards.count).index_add_(
        0, placement.shard, tokens_per_expert.double().float()
    )
