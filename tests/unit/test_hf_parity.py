"""MoELayer equals the MoE blocks of Hugging Face models built from tiny configs (no downloads).

Every parameter is re-drawn at random (HF zero-initialises some routers), copied into the
neutral names by :func:`raymoe.hf.from_hf_block`, and both outputs must agree to 1e-5 in fp32.
"""

from __future__ import annotations

import pytest
import torch
from transformers import (
    DeepseekV3Config,
    GptOssConfig,
    Llama4TextConfig,
    MixtralConfig,
    OlmoeConfig,
    Qwen2MoeConfig,
    Qwen3MoeConfig,
    SwitchTransformersConfig,
)
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE
from transformers.models.gpt_oss.modeling_gpt_oss import GptOssMLP
from transformers.models.llama4.modeling_llama4 import Llama4TextMoe
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
from transformers.models.olmoe.modeling_olmoe import OlmoeSparseMoeBlock
from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock
from transformers.models.switch_transformers.modeling_switch_transformers import (
    SwitchTransformersSparseMLP,
)

from raymoe import MoELayer
from raymoe.hf import from_hf_block

D, H, E = 32, 48, 8


def _randomise(block: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
        for name, b in block.named_buffers():
            if "correction_bias" in name:
                b.copy_(torch.rand(b.shape, generator=g) * 0.1)


MODELS = {
    "mixtral": lambda: (
        MixtralConfig(
            hidden_size=D, intermediate_size=H, num_local_experts=E, num_experts_per_tok=2
        ),
        MixtralSparseMoeBlock,
    ),
    "olmoe": lambda: (
        OlmoeConfig(
            hidden_size=D,
            intermediate_size=H,
            num_experts=E,
            num_experts_per_tok=2,
            norm_topk_prob=False,
        ),
        OlmoeSparseMoeBlock,
    ),
    "qwen2_moe": lambda: (
        Qwen2MoeConfig(
            hidden_size=D,
            moe_intermediate_size=H,
            num_experts=E,
            num_experts_per_tok=2,
            shared_expert_intermediate_size=40,
            norm_topk_prob=False,
        ),
        Qwen2MoeSparseMoeBlock,
    ),
    "qwen2_moe-renorm": lambda: (
        Qwen2MoeConfig(
            hidden_size=D,
            moe_intermediate_size=H,
            num_experts=E,
            num_experts_per_tok=3,
            shared_expert_intermediate_size=40,
            norm_topk_prob=True,
        ),
        Qwen2MoeSparseMoeBlock,
    ),
    "qwen3_moe": lambda: (
        Qwen3MoeConfig(
            hidden_size=D,
            moe_intermediate_size=H,
            num_experts=E,
            num_experts_per_tok=2,
            norm_topk_prob=True,
        ),
        Qwen3MoeSparseMoeBlock,
    ),
    "deepseek_v3": lambda: (
        DeepseekV3Config(
            hidden_size=D,
            moe_intermediate_size=H,
            n_routed_experts=16,
            n_shared_experts=2,
            num_experts_per_tok=4,
            n_group=4,
            topk_group=2,
            norm_topk_prob=True,
            routed_scaling_factor=2.5,
        ),
        DeepseekV3MoE,
    ),
    # a limit this low clamps many gate and up values, so the clamp is exercised
    "gpt_oss": lambda: (
        GptOssConfig(
            hidden_size=D,
            intermediate_size=H,
            num_local_experts=E,
            num_experts_per_tok=3,
            swiglu_limit=0.5,
        ),
        GptOssMLP,
    ),
    "llama4_text": lambda: (
        Llama4TextConfig(
            hidden_size=D, intermediate_size=H, num_local_experts=E, num_experts_per_tok=1
        ),
        Llama4TextMoe,
    ),
    "llama4_text-top2": lambda: (
        Llama4TextConfig(
            hidden_size=D, intermediate_size=H, num_local_experts=E, num_experts_per_tok=2
        ),
        Llama4TextMoe,
    ),
}


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("tokens", [(1, 1), (2, 9), (4, 33)])
def test_token_choice_blocks_match(name, tokens):
    config, cls = MODELS[name]()
    block = cls(config).eval()
    _randomise(block, seed=len(name))
    spec, sd = from_hf_block(block, config)
    layer = MoELayer(spec)
    layer.load_state_dict(sd)
    x = torch.randn(*tokens, D, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        want = block(x.clone())
        got = layer(x)
    if isinstance(want, tuple):  # GPT-OSS and Llama 4 return (hidden, router scores)
        want = want[0].reshape(got.shape)
    assert got.shape == want.shape
    assert (got - want).abs().max().item() <= 1e-5


@pytest.mark.parametrize("capacity", [64, 2])
def test_switch_transformers_block_matches(capacity):
    config = SwitchTransformersConfig(d_model=D, d_ff=H, num_experts=E, expert_capacity=capacity)
    block = SwitchTransformersSparseMLP(config).eval()
    _randomise(block, seed=3)
    spec, sd = from_hf_block(block, config)
    layer = MoELayer(spec)
    layer.load_state_dict(sd)
    x = torch.randn(3, 24, D, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want = block(x.clone())
        got, info = layer(x, return_info=True)
    assert (got - want).abs().max().item() <= 1e-5
    if capacity == 2:  # 24 tokens per sequence over 8 experts of capacity 2: drops happen
        assert info.load.dropped_tokens > 0
