"""Decoding through the pool vs in process, side by side in one run.

A tiny random 4-MoE-layer model of two families (``raymoe.hf.tiny``) generates 64 new tokens
greedily at batch 1, 8 and 64: in process, then with its MoE blocks attached to a served pool
(``raymoe.hf.attach``) over the Ray object store, over the gRPC shard transport, and through
the SDK (``raymoe.Client``) over the pool's gateway. Every served run must produce the same
token ids as the in-process one. Prints tokens/s, the served/in-process ratio, and the
per-layer hop (one MoE layer's call to the pool) p50/p99; writes JSON with ``--out``.
"""

from __future__ import annotations

import argparse
import json
import secrets
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import raymoe
from raymoe import hf
from raymoe.hf.tiny import V, tiny_model

FAMILIES = ("mixtral", "qwen3_moe")
LAYERS, NEW_TOKENS, PROMPT = 4, 64, 8


class Timed:
    """A pool (or client) whose every forward call is timed."""

    def __init__(self, pool):
        self.pool, self.hops = pool, []

    def forward(self, x, layer=0):
        t = time.perf_counter()
        y = self.pool.forward(x, layer=layer)
        self.hops.append(time.perf_counter() - t)
        return y


def generate(model, batch: int) -> tuple[torch.Tensor, float]:
    g = torch.Generator().manual_seed(batch)
    ids = torch.randint(1, V, (batch, PROMPT), generator=g)
    t = time.perf_counter()
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=NEW_TOKENS,
            min_new_tokens=NEW_TOKENS,
            do_sample=False,
            pad_token_id=0,
            eos_token_id=None,
        )
    return out, time.perf_counter() - t


def run_family(family: str, batches: list[int], tokens_dir: Path) -> list[dict]:
    path = tokens_dir / family
    tiny_model(family, layers=LAYERS).save_pretrained(path)
    model = hf.load_model(path)
    rows = []
    base = {}
    for b in batches:
        generate(model, b)  # warm-up
        base[b] = generate(model, b)
        rows.append(_row(family, "in-process", b, base[b][1], None, True))
    data, admin = secrets.token_urlsafe(12), secrets.token_urlsafe(12)
    (tokens_dir / "data").write_text(data)
    (tokens_dir / "admin").write_text(admin)
    for transport in ("object_store", "grpc"):
        gateway = transport == "object_store"
        spec, weights = hf.from_pretrained(
            path,
            name=f"bench-decode-{family}-{transport}".replace("_", "-"),
            shards={"count": 2, "transport": transport},
            gateway={
                "enabled": gateway,
                "host": "127.0.0.1",
                "port": 0,
                "data_token_file": str(tokens_dir / "data"),
                "admin_token_file": str(tokens_dir / "admin"),
            },
        )
        pool = raymoe.serve(spec, weights=weights)
        try:
            paths = [(f"pool ({transport})", pool)]
            if gateway:
                (endpoint,) = pool.gateways()
                paths.append(("SDK (gateway)", raymoe.Client(endpoint, token=data)))
            for label, target in paths:
                timed = Timed(target)
                hf.attach(model, timed)
                for b in batches:
                    generate(model, b)  # warm-up
                    timed.hops.clear()
                    out, seconds = generate(model, b)
                    same = torch.equal(out, base[b][0])
                    rows.append(_row(family, label, b, seconds, timed.hops, same, base[b][1]))
                hf.detach(model)
        finally:
            pool.shutdown()
    return rows


def _row(family, path, batch, seconds, hops, same, base_s=None) -> dict:
    row = {
        "family": family,
        "path": path,
        "batch": batch,
        "tokens_per_s": batch * NEW_TOKENS / seconds,
        "ratio": (base_s / seconds) if base_s else 1.0,
        "same_tokens": bool(same),
    }
    if hops:
        ms = np.asarray(hops) * 1e3
        row.update(hop_p50_ms=float(np.percentile(ms, 50)), hop_p99_ms=float(np.percentile(ms, 99)))
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", default="1,8,64")
    p.add_argument("--families", default=",".join(FAMILIES))
    p.add_argument("--out", type=Path, help="write the rows as JSON here")
    args = p.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for family in args.families.split(","):
            rows += run_family(family, batches, Path(d))
    print(f"\n{LAYERS} MoE layers, {NEW_TOKENS} new tokens, greedy; ratio = served / in-process")
    head = f"{'family':<10}{'path':<22}{'batch':>6}{'tokens/s':>11}{'ratio':>8}"
    print(head + f"{'hop p50':>10}{'hop p99':>10}  same tokens")
    for r in rows:
        hop = (
            f"{r['hop_p50_ms']:>8.2f}ms{r['hop_p99_ms']:>8.2f}ms" if "hop_p50_ms" in r else " " * 20
        )
        print(
            f"{r['family']:<10}{r['path']:<22}{r['batch']:>6}{r['tokens_per_s']:>11,.0f}"
            f"{r['ratio']:>8.2f}{hop}  {'yes' if r['same_tokens'] else 'NO'}"
        )
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1))
    if not all(r["same_tokens"] for r in rows):
        raise SystemExit("served generation differed from in-process generation")


if __name__ == "__main__":
    main()
