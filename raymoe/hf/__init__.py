"""Hugging Face ``transformers`` models and raymoe.

- :func:`from_hf_block`: one MoE block -> ``(spec_dict, state_dict)`` in neutral names
  (:mod:`raymoe.hf.blocks`; the families are the keys of :data:`CONVERTERS`);
- :func:`from_pretrained`: a local checkpoint directory -> ``(multi-layer spec, weights)``;
- :func:`attach` / :func:`detach`: a loaded model's MoE blocks call a pool, or not
  (:mod:`raymoe.hf.models`).
"""

from raymoe.hf.blocks import CONVERTERS, from_hf_block
from raymoe.hf.models import BLOCKS, PoolMoE, attach, detach, from_pretrained, load_model

__all__ = [
    "BLOCKS",
    "CONVERTERS",
    "PoolMoE",
    "attach",
    "detach",
    "from_hf_block",
    "from_pretrained",
    "load_model",
]
