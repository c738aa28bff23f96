"""The in-process FFN expert bank at decode-sized batches vs its physical floors, same run.

For T = 1, 16, 64 tokens of ``mixtral-tiny`` (8 gated experts, d=256, H=512, top-2):
the bank's forward time with each layout of its grouped projections (``segments``: one
``grouped_mm`` over the sorted pairs; ``padded``: one ``bmm`` over a zero-padded
``[E, M, d]`` block; ``chosen``: what ``FFNBank`` picks), beside

- the memory floor: bytes of the experts the batch touches / memory bandwidth, both measured
  here (a 256 MB copy), and
- the FLOP floor: the useful FLOPs / this machine's fp32 matmul GFLOP/s (a 2048² matmul).

Ratios are time / floor. Issue 13 asks for the bank within 3x of the memory floor. The
variants are interleaved call by call so a noisy neighbour hits them alike.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from _timing import median_time

from raymoe import MoELayer, PoolSpec
from raymoe.kernels import ffn

ROOT = Path(__file__).resolve().parents[1]
LAYOUTS = {"segments": 0.0, "padded": float("inf"), "chosen": ffn.PAD_RATIO}


def floors() -> dict:
    a = torch.randn(2048, 2048)
    mm = median_time(lambda: a @ a, 7)
    big = torch.randn(64 * 2**20)
    out = torch.empty_like(big)
    cp = median_time(lambda: out.copy_(big), 7)
    return {"gflops": 2 * 2048**3 / mm / 1e9, "gbs": 2 * big.nbytes / cp / 1e9}


def routes(T: int, E: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
    return ids, torch.rand(T, k, generator=g).softmax(-1)


def interleaved(fns: dict, reps: int) -> dict[str, float]:
    """Median ms of each fn, calls interleaved."""
    times = {name: [] for name in fns}
    for fn in fns.values():
        fn()
    for _ in range(reps):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - t) * 1e3)
    return {name: sorted(ts)[len(ts) // 2] for name, ts in times.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--config", default="mixtral-tiny")
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 16, 64])
    p.add_argument("--reps", type=int, default=400)
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    spec = PoolSpec.from_yaml(ROOT / "examples" / "configs" / f"{args.config}.yaml")
    bank = MoELayer(spec).eval().experts
    E, d, H, k = spec.num_experts, spec.d_model, spec.experts.hidden, spec.routing.k
    per_expert = bank.row_bytes()
    ref = floors()
    print(
        f"{args.config}: {E} experts of {per_expert / 2**20:.2f} MB, top-{k}; this run: "
        f"matmul {ref['gflops']:.0f} GFLOP/s, memory {ref['gbs']:.1f} GB/s"
    )
    head = f"{'T':>4} {'touched':>7} " + " ".join(f"{n + ' ms':>12}" for n in LAYOUTS)
    print(head + f" {'mem floor':>10} {'flop floor':>10} {'chosen/mem':>10} {'chosen/roof':>11}")
    rows = []
    for T in args.tokens:
        ids, w = routes(T, E, k, seed=T)
        x = torch.randn(T, d)
        touched = int(ids.unique().numel())
        mem_ms = touched * per_expert / (ref["gbs"] * 1e9) * 1e3
        proj = 3 if spec.experts.gated else 2
        flop_ms = T * k * proj * 2 * d * H / (ref["gflops"] * 1e9) * 1e3

        def run(ratio: float):
            def call():
                ffn.PAD_RATIO = ratio
                with torch.no_grad():
                    bank(x, ids, w)  # noqa: B023

            return call

        ms = interleaved({name: run(r) for name, r in LAYOUTS.items()}, args.reps)
        ffn.PAD_RATIO = LAYOUTS["chosen"]
        row = {
            "tokens": T,
            "touched": touched,
            **{f"{n}_ms": v for n, v in ms.items()},
            "mem_floor_ms": mem_ms,
            "flop_floor_ms": flop_ms,
            "over_mem": ms["chosen"] / mem_ms,
            "over_roofline": ms["chosen"] / max(mem_ms, flop_ms),
        }
        rows.append(row)
        print(
            f"{T:>4} {touched:>7} "
            + " ".join(f"{ms[n]:>12.3f}" for n in LAYOUTS)
            + f" {mem_ms:>10.3f} {flop_ms:>10.3f} {row['over_mem']:>10.1f}x"
            f" {row['over_roofline']:>10.1f}x"
        )
    if args.out:
        args.out.write_text(json.dumps({"floors": ref, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
