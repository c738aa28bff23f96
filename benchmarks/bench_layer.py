"""In-process MoELayer throughput vs physical references measured in the same run.

For each example config and batch size: tokens/s forward and forward+backward, the useful
GFLOP/s that implies (as a share of this machine's fp32 matmul GFLOP/s) and, for PEER, the
gathered bytes/s (as a share of memory bandwidth). Each config runs in its own process so its
peak memory (max RSS) is its own. Prints a table; writes JSON (``--out``).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
from _timing import median_time

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ["mixtral-tiny", "deepseek-tiny", "switch-tiny", "peer-1m"]


def references() -> dict:
    a = torch.randn(2048, 2048)
    mm = median_time(lambda: a @ a, 5)
    big = torch.randn(64 * 2**20)  # 256 MB
    out = torch.empty_like(big)
    cp = median_time(lambda: out.copy_(big), 5)
    return {"matmul_gflops": 2 * 2048**3 / mm / 1e9, "bandwidth_gbs": 2 * big.nbytes / cp / 1e9}


def work_per_token(spec) -> tuple[float, float]:
    """(useful FLOPs, gathered bytes) per token of one forward pass."""
    d, E, r = spec.d_model, spec.num_experts, spec.routing
    if spec.experts.kind == "ffn":
        proj = 3 if spec.experts.gated else 2
        k = {"topk": getattr(r, "k", 1), "switch": 1}.get(r.kind, 1)
        flops = k * proj * 2 * d * spec.experts.hidden + 2 * d * E
        if spec.shared:
            flops += 3 * 2 * d * spec.shared.hidden
        return flops, 0.0
    n = int(E**0.5)
    routing = 2 * d * r.heads * r.d_key + 2 * r.heads * n * r.d_key
    slots = r.heads * r.k
    return routing + slots * 4 * d, slots * 2 * d * spec.torch_dtype.itemsize


def worker(name: str, batches: list[int], reps: int, backward: bool) -> dict:
    from raymoe import MoELayer, PoolSpec

    spec = PoolSpec.from_yaml(ROOT / "examples" / "configs" / f"{name}.yaml")
    t = time.perf_counter()
    layer = MoELayer(spec)
    build_s = time.perf_counter() - t
    flops, nbytes = work_per_token(spec)
    rows = []
    for T in batches:
        x = torch.randn(T, spec.d_model)
        layer.eval()
        with torch.no_grad():
            fwd = median_time(lambda: layer(x), reps)  # noqa: B023
        row = {"tokens": T, "fwd_tok_s": T / fwd}
        if backward:
            layer.train()

            def step():
                layer.zero_grad(set_to_none=True)
                y, info = layer(x, return_info=True)  # noqa: B023
                (y.square().mean() + info.aux_loss).backward()

            row["fwdbwd_tok_s"] = T / median_time(step, max(1, reps // 2))
        rows.append(row)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KB -> GB
    return {
        "config": name,
        "experts": spec.num_experts,
        "build_s": build_s,
        "flops_per_token": flops,
        "bytes_per_token": nbytes,
        "peak_rss_gb": peak,
        "rows": rows,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--configs", nargs="+", default=CONFIGS)
    p.add_argument("--batches", nargs="+", type=int, default=[256, 1024, 4096, 8192])
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--no-backward", action="store_true")
    p.add_argument("--quick", action="store_true", help="batches 256 and 1024, 3 reps")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "layer.json"))
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.quick:
        args.batches, args.reps = [256, 1024], 3
    if args.worker:
        print(json.dumps(worker(args.worker, args.batches, args.reps, not args.no_backward)))
        return
    ref = references()
    print(
        f"machine: matmul {ref['matmul_gflops']:.0f} GFLOP/s fp32, memory bandwidth "
        f"{ref['bandwidth_gbs']:.1f} GB/s, {torch.get_num_threads()} threads"
    )
    results = []
    for name in args.configs:
        cmd = [sys.executable, __file__, "--worker", name, "--reps", str(args.reps)]
        cmd += ["--batches", *map(str, args.batches)]
        cmd += ["--no-backward"] if args.no_backward else []
        print(f"  running {name} ...", flush=True)
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        results.append(json.loads(out.strip().splitlines()[-1]))
    head = (
        f"{'config':<14}{'experts':>10}{'tokens':>7}{'fwd tok/s':>11}{'GFLOP/s':>9}"
        f"{'/matmul':>8}{'GB/s':>7}{'/bw':>6}{'f+b tok/s':>11}{'peak GB':>8}"
    )
    print("\n" + head + "\n" + "-" * len(head))
    for r in results:
        for row in r["rows"]:
            gf = row["fwd_tok_s"] * r["flops_per_token"] / 1e9
            gb = row["fwd_tok_s"] * r["bytes_per_token"] / 1e9
            row.update(
                gflops=gf,
                gflops_ratio=gf / ref["matmul_gflops"],
                gbs=gb,
                bw_ratio=gb / ref["bandwidth_gbs"],
            )
            fb = row.get("fwdbwd_tok_s")
            print(
                f"{r['config']:<14}{r['experts']:>10,}{row['tokens']:>7}"
                f"{row['fwd_tok_s']:>11,.0f}{gf:>9.1f}{row['gflops_ratio']:>8.2f}"
                f"{gb:>7.1f}{row['bw_ratio']:>6.2f}"
                f"{(f'{fb:,.0f}' if fb else '-'):>11}{r['peak_rss_gb']:>8.2f}"
            )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"reference": ref, "results": results}, indent=1))
    print(f"\nwritten {args.out}")


if __name__ == "__main__":
    main()
