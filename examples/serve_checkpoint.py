"""Serve a Hugging Face checkpoint's experts and generate through the pool.

    .venv/bin/python examples/serve_checkpoint.py [CHECKPOINT_DIR]

Without a directory, a tiny random Qwen3-MoE model is written to a temporary one first (no
downloads). The model's dense parts run here; its MoE layers run in one raymoe pool.
"""

import sys
import tempfile

import torch

import raymoe
from raymoe import hf
from raymoe.hf.tiny import greedy, prompts, tiny_model


def main(path: str) -> None:
    spec, weights = hf.from_pretrained(path, name="checkpoint", shards={"count": 2})
    print(f"{spec.num_layers} MoE layers, {spec.num_experts} experts in all")
    pool = raymoe.serve(spec, weights=weights)
    try:
        model = hf.load_model(path)
        inputs = prompts()
        local = greedy(model, inputs, new_tokens=16)
        hf.attach(model, pool)
        served = greedy(model, inputs, new_tokens=16)
        print("through the pool:", served[0, -16:].tolist())
        print("same as in process:", torch.equal(local, served))
        print(pool.describe().experts_per_shard, "experts per shard")
    finally:
        pool.shutdown()


if __name__ == "__main__":
    if len(sys.argv) > 1:
        main(sys.argv[1])
    else:
        with tempfile.TemporaryDirectory() as d:
            tiny_model("qwen3_moe", layers=4, experts=8).save_pretrained(d)
            main(d)
