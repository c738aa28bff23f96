"""The capacity experiment (issue 16, item 4): the same small decoder LM with four FFNs of the
same active parameters per token, trained on the same tokens:

- ``dense``: one FFN of H neurons;
- ``moe-top2``: 8 FFN experts of H/2 neurons, top-2 (coarse MoE);
- ``peer-65k``: 65,536 single-neuron experts, 4 heads x top-16 = H neurons (PEER), in process;
- ``peer-1m``: 1,048,576 single-neuron experts, the same routing, served by a raymoe pool
  (``RemoteMoE`` + ``PoolOptimizer``: the experts and their optimizer live on the shards).

Two tasks, their data made by ``corpus.py`` (no downloads): a facts corpus (language plus
many facts to remember) scored by validation perplexity, and a key -> value recall task
scored by the accuracy of recalled values. Each prints tokens/s and wall time, and the loss
curves go to a PNG.

    python examples/capacity/capacity.py             # about 35 min on a 2-core machine
    python examples/capacity/capacity.py --quick     # a minute: does it run
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
import corpus

import raymoe
from raymoe import MoELayer, PoolSpec, RemoteMoE
from raymoe.optim import ExpertOptimizer, PoolOptimizer

D, HEADS, H = 128, 4, 64  # width, attention heads, active FFN neurons per token
PEER_ROUTING = {"kind": "product_key", "heads": 4, "k": 16, "d_key": 64}
SPECS = {
    "moe-top2": {
        "experts": {"kind": "ffn", "num_experts": 8, "hidden": H // 2, "gated": False,
                    "activation": "gelu"},
        "routing": {"kind": "topk", "k": 2},
    },
    "peer-65k": {"experts": {"kind": "peer", "num_experts": 256**2}, "routing": PEER_ROUTING},
    "peer-1m": {
        "experts": {"kind": "peer", "num_experts": 1024**2},
        "routing": PEER_ROUTING,
        "shards": {"count": 2, "routers": 1},
    },
}  # fmt: skip
VARIANTS = ["dense", *SPECS]


class DenseFFN(nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(D, H), nn.Linear(H, D)

    def forward(self, x):
        return self.down(F.gelu(self.up(x))), x.new_zeros(())


class MoEFFN(nn.Module):
    """A raymoe layer (in process or served) as a block's FFN: -> (y, aux loss)."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        y, info = self.layer(x.reshape(-1, D), return_info=True)
        return y.view(x.shape), info.aux_loss


class Block(nn.Module):
    def __init__(self, ffn: nn.Module):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(D), nn.LayerNorm(D)
        self.qkv, self.out = nn.Linear(D, 3 * D), nn.Linear(D, D)
        self.ffn = ffn

    def forward(self, x):
        B, T, _ = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(B, T, 3, HEADS, D // HEADS).unbind(2)
        a = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)), is_causal=True)
        x = x + self.out(a.transpose(1, 2).reshape(B, T, D))
        y, aux = self.ffn(self.ln2(x))
        return x + y, aux


class LM(nn.Module):
    """Token and position embeddings, a dense block, a block with the FFN under test."""

    def __init__(self, vocab: int, seq: int, ffn: nn.Module):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, D), nn.Embedding(seq, D)
        self.blocks = nn.ModuleList([Block(DenseFFN()), Block(ffn)])
        self.ln, self.head = nn.LayerNorm(D), nn.Linear(D, vocab)

    def forward(self, x):
        h = self.tok(x) + self.pos(torch.arange(x.shape[1]))
        aux = h.new_zeros(())
        for block in self.blocks:
            h, a = block(h)
            aux = aux + a
        return self.head(self.ln(h)), aux


def build(variant: str, vocab: int, seq: int, lr: float):
    """-> (model, optimizers, pool or None). Expert banks get raymoe's row optimizer; the
    rest (attention, embeddings, gates, the dense FFN) torch's Adam."""
    pool, experts = None, None
    if variant == "dense":
        ffn = DenseFFN()
    else:
        spec = PoolSpec.from_dict({"name": f"capacity-{variant}", "d_model": D, **SPECS[variant]})
        if variant == "peer-1m":
            pool = raymoe.serve(spec)
            ffn = MoEFFN(RemoteMoE(pool))
            experts = PoolOptimizer(pool, "adam", lr=lr)
        else:
            layer = MoELayer(spec)
            ffn = MoEFFN(layer)
            experts = ExpertOptimizer(layer, "adam", lr=lr)
    model = LM(vocab, seq, ffn)
    bank = getattr(getattr(ffn, "layer", None), "experts", None)
    skip = {id(p) for p in bank.parameters()} if bank is not None else set()
    rest = torch.optim.Adam([p for p in model.parameters() if id(p) not in skip], lr=lr)
    return model, [o for o in (rest, experts) if o is not None], pool


def windows(stream: np.ndarray, mask, seq: int, batch: int, rng) -> tuple:
    """``batch`` random windows: (inputs [B, seq], targets [B, seq], scored [B, seq])."""
    at = rng.integers(0, len(stream) - seq - 1, batch)[:, None] + np.arange(seq + 1)
    tokens = torch.from_numpy(stream[at].astype(np.int64))
    scored = torch.ones_like(tokens[:, 1:], dtype=torch.bool)
    if mask is not None:
        scored = torch.from_numpy(mask[at][:, 1:])
    return tokens[:, :-1], tokens[:, 1:], scored


def train(model, opts, data, args, rng) -> dict:
    stream, mask = data
    curve, seen, start = [], 0, time.perf_counter()
    for step in range(args.steps):
        x, y, scored = windows(stream, mask, args.seq, args.batch, rng)
        logits, aux = model(x)
        loss = F.cross_entropy(logits[scored], y[scored])
        (loss + 0.01 * aux).backward()
        for opt in opts:
            opt.step()
        for opt in opts:
            opt.zero_grad()
        seen += x.numel()
        if step % max(1, args.steps // 50) == 0 or step == args.steps - 1:
            curve.append((seen, loss.item()))
    wall = time.perf_counter() - start
    return {"curve": curve, "wall_s": wall, "tokens_per_s": seen / wall, "tokens": seen}


@torch.no_grad()
def evaluate(model, data, args, rng, batches: int = 24) -> dict:
    """Mean cross-entropy (nats per scored token) and the accuracy of greedy predictions."""
    model.eval()
    stream, mask = data
    loss, right, n = 0.0, 0, 0
    for _ in range(batches):
        x, y, scored = windows(stream, mask, args.seq, args.batch, rng)
        logits, _ = model(x)
        loss += float(F.cross_entropy(logits[scored], y[scored], reduction="sum"))
        right += int((logits[scored].argmax(-1) == y[scored]).sum())
        n += int(scored.sum())
    model.train()
    return {"loss": loss / n, "ppl": math.exp(loss / n), "accuracy": right / n}


def tasks(quick: bool) -> dict:
    text = corpus.facts(sentences=20_000 if quick else 120_000)
    cut = int(len(text) * 0.95)
    keys, values = corpus.recall_pairs()
    train_kv = corpus.recall_stream(keys, values, 200_000, seed=2)
    test_kv = corpus.recall_stream(keys, values, 20_000, seed=3)  # the same pairs, new order
    print(f"facts corpus: {corpus.describe(text)}; recall: {len(keys)} pairs, "
          f"{corpus.describe(train_kv[0])}")  # fmt: skip
    return {
        "facts": (256, (text[:cut], None), (text[cut:], None)),
        "recall": (corpus.RECALL_SYMBOLS + 2, train_kv, test_kv),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variants", nargs="+", default=VARIANTS, choices=VARIANTS)
    ap.add_argument("--steps", type=int, default=1200)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    ap.add_argument("--quick", action="store_true", help="a few steps: does it run")
    args = ap.parse_args()
    if args.quick:
        args.steps = 20
    torch.manual_seed(0)
    results = {}
    for task, (vocab, train_data, test_data) in tasks(args.quick).items():
        for variant in args.variants:
            model, opts, pool = build(variant, vocab, args.seq, args.lr)
            try:
                run = train(model, opts, train_data, args, np.random.default_rng(4))
                run.update(evaluate(model, test_data, args, np.random.default_rng(5)))
            finally:
                if pool is not None:
                    pool.shutdown()
            results[f"{task}/{variant}"] = run
            print(f"{task:<7}{variant:<10} loss {run['loss']:.3f}  ppl {run['ppl']:7.2f}  "
                  f"accuracy {run['accuracy']:.3f}  {run['tokens_per_s']:>7,.0f} tok/s  "
                  f"{run['wall_s']:6.0f} s", flush=True)  # fmt: skip
    report(results, args)


def report(results: dict, args) -> None:
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "capacity.json").write_text(json.dumps(results, indent=1))
    lines = [
        f"{args.steps} steps x {args.batch} x {args.seq} tokens per variant; active FFN "
        f"neurons per token: {H}",
        "",
        "| task | variant | val ppl | val accuracy | tokens/s | wall s |",
        "|---|---|---|---|---|---|",
    ]
    for key, r in results.items():
        task, variant = key.split("/")
        lines.append(
            f"| {task} | {variant} | {r['ppl']:.2f} | {r['accuracy']:.3f} "
            f"| {r['tokens_per_s']:,.0f} | {r['wall_s']:.0f} |"
        )
    (args.out / "capacity.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(no matplotlib: no plot; pip install 'raymoe[plot]')")
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, task in zip(axes, ("facts", "recall"), strict=True):
        for key, r in results.items():
            if key.startswith(task + "/"):
                seen, loss = zip(*r["curve"], strict=True)
                ax.plot(seen, loss, label=key.split("/")[1])
        ax.set(title=task, xlabel="training tokens", ylabel="training loss (nats/token)")
        ax.legend()
    fig.tight_layout()
    fig.savefig(args.out / "capacity.png", dpi=90)


if __name__ == "__main__":
    main()
