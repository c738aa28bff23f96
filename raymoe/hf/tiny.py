"""Tiny random causal LMs of every MoE family raymoe serves, built from small configs (no
downloads): what the demo, the decode benchmark and the tests generate with."""

from __future__ import annotations

import torch

V, D = 96, 32
_COMMON = {
    "vocab_size": V,
    "hidden_size": D,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "tie_word_embeddings": False,
}


def _configs(layers: int) -> dict:
    from transformers import (
        DeepseekV3Config,
        GptOssConfig,
        Llama4TextConfig,
        MixtralConfig,
        OlmoeConfig,
        Qwen2MoeConfig,
        Qwen3MoeConfig,
    )

    n = {"num_hidden_layers": layers}
    return {
        "mixtral": lambda: MixtralConfig(
            **_COMMON, **n, intermediate_size=48, num_local_experts=4, num_experts_per_tok=2
        ),
        "qwen2_moe": lambda: Qwen2MoeConfig(
            **_COMMON,
            **n,
            intermediate_size=48,
            moe_intermediate_size=24,
            shared_expert_intermediate_size=32,
            num_experts=6,
            num_experts_per_tok=2,
            norm_topk_prob=False,
        ),
        "qwen3_moe": lambda: Qwen3MoeConfig(
            **_COMMON,
            **n,
            head_dim=8,
            intermediate_size=48,
            moe_intermediate_size=24,
            num_experts=6,
            num_experts_per_tok=2,
            norm_topk_prob=True,
        ),
        "deepseek_v3": lambda: DeepseekV3Config(
            **{**_COMMON, "num_key_value_heads": 4},
            num_hidden_layers=layers + 1,  # the first layer stays dense
            first_k_dense_replace=1,
            intermediate_size=48,
            moe_intermediate_size=16,
            n_routed_experts=8,
            n_shared_experts=1,
            num_experts_per_tok=2,
            n_group=2,
            topk_group=1,
            q_lora_rank=None,
            kv_lora_rank=16,
            qk_rope_head_dim=4,
            qk_nope_head_dim=8,
            v_head_dim=8,
            routed_scaling_factor=1.5,
        ),
        "olmoe": lambda: OlmoeConfig(
            **_COMMON, **n, intermediate_size=24, num_experts=6, num_experts_per_tok=2
        ),
        "gpt_oss": lambda: GptOssConfig(
            **{**_COMMON, "max_position_embeddings": 131072},  # its YaRN's own context
            **n,
            head_dim=8,
            intermediate_size=24,
            num_local_experts=4,
            num_experts_per_tok=2,
            sliding_window=16,
            swiglu_limit=2.0,
        ),
        "llama4_text": lambda: Llama4TextConfig(
            **_COMMON,
            **n,
            head_dim=8,
            intermediate_size=24,
            intermediate_size_mlp=48,
            num_local_experts=4,
            num_experts_per_tok=1,
            interleave_moe_layer_step=1,
        ),
    }


FAMILIES = tuple(_configs(1))
# the config field holding the number of routed experts
_EXPERTS = {
    "mixtral": "num_local_experts",
    "gpt_oss": "num_local_experts",
    "llama4_text": "num_local_experts",
    "deepseek_v3": "n_routed_experts",
}


def tiny_model(
    family: str, layers: int = 2, seed: int = 0, experts: int | None = None
) -> torch.nn.Module:
    """A random fp32 causal LM of ``family`` with ``layers`` MoE layers of ``experts``
    routed experts each (default: a handful), in eval mode."""
    from transformers import AutoModelForCausalLM

    config = _configs(layers)[family]()
    if experts is not None:
        setattr(config, _EXPERTS.get(family, "num_experts"), experts)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # HF zero-initialises some routers: draw everything
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.15)
        for name, b in model.named_buffers():
            if "correction_bias" in name:
                b.copy_(torch.rand(b.shape, generator=g) * 0.1)
    return model.eval()


def prompts(batch: int = 3, seed: int = 0) -> dict:
    """``batch`` prompts of different lengths, left-padded (as for generation)."""
    g = torch.Generator().manual_seed(seed)
    lengths = [5 + 3 * i for i in range(batch)]
    L = max(lengths)
    ids = torch.zeros(batch, L, dtype=torch.long)
    mask = torch.zeros(batch, L, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, L - n :] = torch.randint(1, V, (n,), generator=g)
        mask[i, L - n :] = 1
    return {"input_ids": ids, "attention_mask": mask}


def greedy(model, inputs: dict, new_tokens: int = 32) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(
            **inputs, max_new_tokens=new_tokens, do_sample=False, pad_token_id=0, eos_token_id=None
        )
