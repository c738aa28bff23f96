"""raymoe's in-process PEER layer vs the ``PEER-pytorch`` package, same config, same run.

Config (DESIGN §5): 1,048,576 single-neuron experts, d = 256, 8 heads x top-16, softmax
over each head's 16 scores, product keys of 2 x 64 per head, GELU. peer-pytorch is built with
``non_competing_scores=False`` (its default keeps only the top-1 per head) and no pre-norm.

What is compared: forward tokens/s (no autograd), and forward+backward tokens/s. The
gradients differ by design: raymoe's PEER bank gives *sparse* expert gradients (only the
selected experts' rows; ``sparse_grad: true``, the default), peer-pytorch *dense* ones (its
embedding tables). Both are shown: raymoe sparse vs peer-pytorch (what a user of each gets)
and raymoe dense vs peer-pytorch (like for like).
Needs the ``bench`` extra: ``.venv/bin/pip install -e '.[bench]'``.
"""

from __future__ import annotations

import argparse

import torch
from _timing import median_time

from raymoe import MoELayer, PoolSpec


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--experts", type=int, default=1 << 20)
    p.add_argument("--tokens", type=int, default=1024)
    p.add_argument("--reps", type=int, default=5)
    args = p.parse_args()
    try:
        from PEER_pytorch import PEER
    except ImportError as e:
        raise SystemExit("install the bench extra: .venv/bin/pip install -e '.[bench]'") from e

    d, heads, k = 256, 8, 16
    spec = PoolSpec.from_dict(
        {
            "d_model": d,
            "experts": {"kind": "peer", "num_experts": args.experts, "activation": "gelu"},
            "routing": {"kind": "product_key", "heads": heads, "k": k, "d_key": 128},
        }
    )
    ours = MoELayer(spec)
    dense = MoELayer(
        {**spec.model_dump(), "experts": {**spec.experts.model_dump(), "sparse_grad": False}}
    )
    theirs = PEER(
        d,
        heads=heads,
        num_experts=args.experts,
        num_experts_per_head=k,
        dim_key=64,
        non_competing_scores=False,
    )
    x = torch.randn(args.tokens, d)
    rows = []
    impls = [
        ("raymoe (sparse grads)", ours, lambda: ours(x)),
        ("raymoe (dense grads)", dense, lambda: dense(x)),
        ("peer-pytorch (dense)", theirs, lambda: theirs(x[None])),
    ]
    for name, module, fwd in impls:
        with torch.no_grad():
            t_f = median_time(fwd, args.reps)

        def step(fwd=fwd, module=module):
            module.zero_grad(set_to_none=True)
            fwd().square().mean().backward()

        t_b = median_time(step, max(1, args.reps // 2))
        rows.append((name, args.tokens / t_f, args.tokens / t_b))
    print(f"PEER {args.experts:,} experts, d={d}, {heads} heads x top-{k}, {args.tokens} tokens")
    print(f"{'impl':<24}{'fwd tok/s':>12}{'fwd+bwd tok/s':>15}")
    for name, f, b in rows:
        print(f"{name:<24}{f:>12,.0f}{b:>15,.0f}")
    (_, f0, b0), (_, _, bd), (_, f1, b1) = rows
    print(
        f"ratio raymoe/peer-pytorch: forward {f0 / f1:.2f}x; forward+backward {b0 / b1:.2f}x "
        f"with sparse gradients, {bd / b1:.2f}x with dense gradients (like for like)"
    )


if __name__ == "__main__":
    main()
