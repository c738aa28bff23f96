"""Notebook-style: put a running pool under a transformers model, cell by cell.

    .venv/bin/python examples/attach_pool.py

Each "# %%" block is a notebook cell (VS Code and Jupytext run them as such).
"""

# %% A model (any of raymoe.hf.BLOCKS' families; here a tiny random GPT-OSS) and its checkpoint
import tempfile

import torch

import raymoe
from raymoe import hf
from raymoe.hf.tiny import V, tiny_model

checkpoint = tempfile.mkdtemp()
tiny_model("gpt_oss", layers=3).save_pretrained(checkpoint)
model = hf.load_model(checkpoint)

# %% Its experts in one pool (start it once; connect to it from other notebooks/jobs)
spec, weights = hf.from_pretrained(checkpoint, name="notebook", shards={"count": 2})
pool = raymoe.serve(spec, weights=weights)  # later: pool = raymoe.connect("notebook")

# %% Attach: the MoE blocks call the pool; the rest of the model stays here
hf.attach(model, pool)
ids = torch.randint(1, V, (1, 8))
with torch.no_grad():
    logits = model(input_ids=ids).logits
print(logits.shape, "next token:", int(logits[0, -1].argmax()))

# %% Watch the pool work, then change it while it serves
print(pool.stats(window_s=30).requests, "requests in the last 30 s")
print(pool.replicate(0, 2, layer=1))  # a second replica of expert 0 of layer 1

# %% Detach (the model computes its own experts again) and shut the pool down
hf.detach(model)
pool.shutdown()
