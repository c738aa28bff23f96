"""Hugging Face ``transformers`` MoE blocks -> raymoe spec + neutral-name state dict.

``from_hf_block(block, config)`` reads a (v5-layout) MoE block's parameters and its config and
returns ``(spec_dict, state_dict)`` for :class:`raymoe.MoELayer` or a served pool. transformers
is not imported here: the functions only read attributes, so any object with the same layout
works. Supported ``config.model_type`` values are the keys of :data:`CONVERTERS`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

State = dict[str, torch.Tensor]


def _split_gate_up(experts: Any, sd: State) -> None:
    """v5 stacked experts: ``gate_up_proj`` [E, 2H, d], ``down_proj`` [E, d, H]."""
    gate_up = experts.gate_up_proj.detach()
    H = gate_up.shape[1] // 2
    sd["experts.w_gate"] = gate_up[:, :H].clone()
    sd["experts.w_up"] = gate_up[:, H:].clone()
    sd["experts.w_down"] = experts.down_proj.detach().clone()


def _mlp(prefix: str, mlp: Any, sd: State) -> None:
    sd[f"{prefix}.w_gate"] = mlp.gate_proj.weight.detach().clone()
    sd[f"{prefix}.w_up"] = mlp.up_proj.weight.detach().clone()
    sd[f"{prefix}.w_down"] = mlp.down_proj.weight.detach().clone()


def _ffn(config: Any, num_experts: int, hidden: int) -> dict:
    return {
        "kind": "ffn",
        "num_experts": num_experts,
        "hidden": hidden,
        "gated": True,
        "activation": _act(config.hidden_act),
    }


def _act(name: str) -> str:
    return {
        "silu": "silu",
        "swish": "silu",
        "gelu": "gelu",
        "relu": "relu",
        "gelu_new": "gelu_tanh",
        "gelu_pytorch_tanh": "gelu_tanh",
    }[name]


def _topk_softmax(block: Any, config: Any, renormalize: bool) -> tuple[dict, State]:
    E = block.gate.weight.shape[0]
    sd = {"router.weight": block.gate.weight.detach().clone()}
    _split_gate_up(block.experts, sd)
    spec = {
        "d_model": config.hidden_size,
        "experts": _ffn(config, E, sd["experts.w_gate"].shape[1]),
        "routing": {
            "kind": "topk",
            "k": config.num_experts_per_tok,
            "score": "softmax",
            "renormalize": renormalize,
        },
    }
    return spec, sd


def mixtral(block: Any, config: Any) -> tuple[dict, State]:
    return _topk_softmax(block, config, renormalize=True)


def olmoe(block: Any, config: Any) -> tuple[dict, State]:
    return _topk_softmax(block, config, renormalize=bool(config.norm_topk_prob))


def qwen2_moe(block: Any, config: Any) -> tuple[dict, State]:
    spec, sd = _topk_softmax(block, config, renormalize=bool(config.norm_topk_prob))
    _mlp("shared", block.shared_expert, sd)
    sd["shared_gate.weight"] = block.shared_expert_gate.weight.detach().clone()
    spec["shared"] = {"hidden": sd["shared.w_gate"].shape[0], "gate": True}
    return spec, sd


def deepseek_v3(block: Any, config: Any) -> tuple[dict, State]:
    gate = block.gate
    E = gate.weight.shape[0]
    sd = {
        "router.weight": gate.weight.detach().clone(),
        "router.correction_bias": gate.e_score_correction_bias.detach().clone(),
    }
    _split_gate_up(block.experts, sd)
    _mlp("shared", block.shared_experts, sd)
    spec = {
        "d_model": config.hidden_size,
        "experts": _ffn(config, E, sd["experts.w_gate"].shape[1]),
        "routing": {
            "kind": "topk",
            "k": config.num_experts_per_tok,
            "score": "sigmoid",
            "renormalize": bool(config.norm_topk_prob),
            "scaling": config.routed_scaling_factor,
            "correction_bias": True,
            "n_groups": config.n_group,
            "topk_groups": config.topk_group,
            "group_score": "top2_sum",
        },
        "shared": {"hidden": sd["shared.w_gate"].shape[0]},
    }
    return spec, sd


def gpt_oss(block: Any, config: Any) -> tuple[dict, State]:
    """GPT-OSS: router with a bias, top-k of the logits then softmax over the k (= softmax
    then renormalise); experts with biases and a clamped SwiGLU over interleaved gate/up
    columns, stored (in, out): ``gate_up_proj`` [E, d, 2H], ``down_proj`` [E, H, d]."""
    router, experts = block.router, block.experts
    gate_up = experts.gate_up_proj.detach()
    gate_up_bias = experts.gate_up_proj_bias.detach()
    sd = {
        "router.weight": router.weight.detach().clone(),
        "router.bias": router.bias.detach().clone(),
        "experts.w_gate": gate_up[:, :, 0::2].transpose(1, 2).contiguous(),
        "experts.w_up": gate_up[:, :, 1::2].transpose(1, 2).contiguous(),
        "experts.b_gate": gate_up_bias[:, 0::2].clone(),
        "experts.b_up": gate_up_bias[:, 1::2].clone(),
        "experts.w_down": experts.down_proj.detach().transpose(1, 2).contiguous(),
        "experts.b_down": experts.down_proj_bias.detach().clone(),
    }
    E, H = sd["experts.w_gate"].shape[:2]
    spec = {
        "d_model": config.hidden_size,
        "experts": {
            "kind": "ffn",
            "num_experts": E,
            "hidden": H,
            "gated": True,
            "bias": True,
            "clamped_swiglu": {"alpha": config.swiglu_alpha, "limit": config.swiglu_limit},
        },
        "routing": {
            "kind": "topk",
            "k": config.num_experts_per_tok,
            "score": "softmax",
            "renormalize": True,
            "bias": True,
        },
    }
    return spec, sd


def llama4_text(block: Any, config: Any) -> tuple[dict, State]:
    """Llama 4: sigmoid of the top-k logits scales each expert's *input*; a shared expert.
    Experts stored (in, out) with gate and up concatenated: ``gate_up_proj`` [E, d, 2H]."""
    gate_up = block.experts.gate_up_proj.detach()
    H = gate_up.shape[2] // 2
    sd = {
        "router.weight": block.router.weight.detach().clone(),
        "experts.w_gate": gate_up[:, :, :H].transpose(1, 2).contiguous(),
        "experts.w_up": gate_up[:, :, H:].transpose(1, 2).contiguous(),
        "experts.w_down": block.experts.down_proj.detach().transpose(1, 2).contiguous(),
    }
    _mlp("shared", block.shared_expert, sd)
    spec = {
        "d_model": config.hidden_size,
        "experts": {**_ffn(config, sd["experts.w_gate"].shape[0], H), "weight_input": True},
        "routing": {"kind": "topk", "k": config.num_experts_per_tok, "score": "sigmoid"},
        "shared": {"hidden": sd["shared.w_gate"].shape[0]},
    }
    return spec, sd


def switch_transformers(block: Any, config: Any) -> tuple[dict, State]:
    """Switch: per-sequence fixed capacity; the layer's input must be [B, L, d]."""
    E = config.num_experts
    experts = [block.experts[f"expert_{i}"] for i in range(E)]
    sd = {
        "router.weight": block.router.classifier.weight.detach().clone(),
        "experts.w_in": torch.stack([e.wi.weight.detach() for e in experts]),
        "experts.w_out": torch.stack([e.wo.weight.detach() for e in experts]),
    }
    spec = {
        "d_model": config.d_model,
        "experts": {
            "kind": "ffn",
            "num_experts": E,
            "hidden": config.d_ff,
            "gated": False,
            "activation": _act(config.dense_act_fn),
        },
        "routing": {
            "kind": "switch",
            "capacity": config.expert_capacity,
            "capacity_scope": "sequence",
        },
    }
    return spec, sd


CONVERTERS: dict[str, Callable[[Any, Any], tuple[dict, State]]] = {
    "mixtral": mixtral,
    "olmoe": olmoe,
    "qwen2_moe": qwen2_moe,
    "qwen3_moe": olmoe,  # same block as OLMoE: softmax top-k, optional renormalisation
    "deepseek_v3": deepseek_v3,
    "switch_transformers": switch_transformers,
    "gpt_oss": gpt_oss,
    "llama4_text": llama4_text,
}


def from_hf_block(block: Any, config: Any) -> tuple[dict, State]:
    """``(spec_dict, state_dict)`` for one HF MoE block; raises ValueError for unknown models."""
    try:
        convert = CONVERTERS[config.model_type]
    except KeyError:
        raise ValueError(
            f"no converter for model_type {config.model_type!r}; valid: {sorted(CONVERTERS)}"
        ) from None
    return convert(block, config)
