"""raymoe's in-process PEER layer vs the ``PEER-pytorch`` package, same config, same run.

Config (DESIGN §5): 1,048,576 single-neuron experts, d = 256, 8 heads x top-16, softmax
over each head's 16 scores, product keys of 2 x 64 per head, GELU. peer-pytorch is built with
``non_competing_scores=False`` (its default keeps only the top-1 per head) and no pre-norm.

What is compared: forward tokens/s (no autograd), and forward+backward tokens/s. The
gradients differ by design: raymoe's PEER bank gives *sparse* expert gradients (only the
selected experts' rows; ``sparse_grad: true``, the default), peer-pytorch *dense* ones (its
embedding tables). Both are shown: raymoe sparse vs peer-pytorch (what a user of each gets)
and raymoe dense vs peer-pytorch (like for like).

How: each implementation runs alone in a fresh process (a 1M-expert layer holds 1-2 GB, and
one layer's allocations slow the next one's: run in one process, call by call interleaved,
peer-pytorch's forward fell from ~4,500 to ~1,000 tokens/s). The processes alternate for
``--rounds`` rounds; each reports its median, the table shows the median over rounds and
the ratios per round.
Needs the ``bench`` extra: ``.venv/bin/pip install -e '.[bench]'``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

import torch
from _timing import median_time

IMPLS = ["raymoe (sparse grads)", "raymoe (dense grads)", "peer-pytorch (dense)"]
D, HEADS, K = 256, 8, 16


def build(impl: str, experts: int):
    """The module and its forward on ``x`` [T, d]."""
    if impl.startswith("peer-pytorch"):
        from PEER_pytorch import PEER

        theirs = PEER(
            D,
            heads=HEADS,
            num_experts=experts,
            num_experts_per_head=K,
            dim_key=64,
            non_competing_scores=False,
        )
        return theirs, lambda x: theirs(x[None])
    from raymoe import MoELayer, PoolSpec

    spec = PoolSpec.from_dict(
        {
            "d_model": D,
            "experts": {
                "kind": "peer",
                "num_experts": experts,
                "activation": "gelu",
                "sparse_grad": "sparse" in impl,
            },
            "routing": {"kind": "product_key", "heads": HEADS, "k": K, "d_key": 128},
        }
    )
    ours = MoELayer(spec)
    return ours, ours


def worker(impl: str, experts: int, tokens: int, reps: int) -> dict:
    module, fwd = build(impl, experts)
    x = torch.randn(tokens, D)
    with torch.no_grad():
        t_f = median_time(lambda: fwd(x), reps)

    def step():
        module.zero_grad(set_to_none=True)
        fwd(x).square().mean().backward()

    t_b = median_time(step, max(1, reps // 2))
    return {"fwd": tokens / t_f, "fwdbwd": tokens / t_b}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--experts", type=int, default=1 << 20)
    p.add_argument("--tokens", type=int, default=1024)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--worker", choices=IMPLS, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.experts, args.tokens, args.reps)))
        return
    try:
        import PEER_pytorch  # noqa: F401
    except ImportError as e:
        raise SystemExit("install the bench extra: .venv/bin/pip install -e '.[bench]'") from e
    runs: dict[str, list[dict]] = {impl: [] for impl in IMPLS}
    for _ in range(args.rounds):
        for impl in IMPLS:
            cmd = [sys.executable, __file__, "--worker", impl]
            cmd += ["--experts", str(args.experts), "--tokens", str(args.tokens)]
            cmd += ["--reps", str(args.reps)]
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode:
                raise SystemExit(out.stderr)
            runs[impl].append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"PEER {args.experts:,} experts, d={D}, {HEADS} heads x top-{K}, {args.tokens} tokens")
    print(f"{'impl (median of rounds)':<24}{'fwd tok/s':>12}{'fwd+bwd tok/s':>15}")
    for impl, rs in runs.items():
        f = statistics.median(r["fwd"] for r in rs)
        b = statistics.median(r["fwdbwd"] for r in rs)
        print(f"{impl:<24}{f:>12,.0f}{b:>15,.0f}")
    sparse, dense, theirs = (runs[i] for i in IMPLS)
    for n in range(args.rounds):
        fwd = sparse[n]["fwd"] / theirs[n]["fwd"]
        print(
            f"round {n + 1}: raymoe/peer-pytorch forward {fwd:.2f}x;"
            f" forward+backward {sparse[n]['fwdbwd'] / theirs[n]['fwdbwd']:.2f}x with sparse "
            f"gradients, {dense[n]['fwdbwd'] / theirs[n]['fwdbwd']:.2f}x with dense (like for like)"
        )


if __name__ == "__main__":
    main()
