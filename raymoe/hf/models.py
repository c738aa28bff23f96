"""Whole Hugging Face models through one pool: a checkpoint's MoE layers as one multi-layer
spec (:func:`from_pretrained`), and a loaded model whose MoE blocks call the pool
(:func:`attach`, undone by :func:`detach`).

Pool layer ``i`` is the model's ``i``-th MoE block in module order (dense layers, such as
DeepSeek-V3's first ones or Llama 4's interleaved ones, stay in the model and take no layer).
Only local checkpoint directories are read (``config.json`` and safetensors, as
``save_pretrained`` writes them); nothing is downloaded.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from raymoe.config import PoolSpec
from raymoe.errors import ConfigError
from raymoe.hf.blocks import from_hf_block

# model_type -> the class name of its MoE block, and whether that block returns a tuple
# (output, router logits) rather than the output alone
BLOCKS: dict[str, tuple[str, bool]] = {
    "mixtral": ("MixtralSparseMoeBlock", False),
    "olmoe": ("OlmoeSparseMoeBlock", False),
    "qwen2_moe": ("Qwen2MoeSparseMoeBlock", False),
    "qwen3_moe": ("Qwen3MoeSparseMoeBlock", False),
    "deepseek_v3": ("DeepseekV3MoE", False),
    "gpt_oss": ("GptOssMLP", True),
    "llama4_text": ("Llama4TextMoe", True),
}
_TEMPLATE = ("experts", "routing", "shared")


def moe_blocks(model: nn.Module) -> list[tuple[nn.Module, str, nn.Module]]:
    """``(parent, attribute, block)`` of each MoE block of ``model``, in module order."""
    block_cls, _ = _family(model.config)
    found = []
    for parent in model.modules():
        for attr, child in parent.named_children():
            if type(child).__name__ == block_cls:
                found.append((parent, attr, child))
    return found


def from_pretrained(path: str | Path, **spec_fields: Any) -> tuple[PoolSpec, dict]:
    """``(spec, weights)`` of a local checkpoint directory's MoE layers: a multi-layer spec
    (``spec_fields`` set its other fields: ``name``, ``shards``, ``limits``, ...) and
    every layer's weights by the names of :class:`~raymoe.layer.MoEStack`.

    A missing ``config.json`` or safetensors file, or a model family without MoE support,
    is a :class:`ConfigError` naming it; nothing is loaded half-way.
    """
    model = load_model(path)
    return model_spec(model, **spec_fields)


def load_model(path: str | Path) -> nn.Module:
    """The causal LM saved in ``path`` (fp32), after checking the directory is whole."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path = _check_dir(path)
    config = AutoConfig.from_pretrained(path)
    _family(config)
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def model_spec(model: nn.Module, **spec_fields: Any) -> tuple[PoolSpec, dict]:
    """:func:`from_pretrained` of a model already loaded."""
    blocks = moe_blocks(model)
    if not blocks:
        raise ConfigError(f"no MoE blocks found in the {model.config.model_type} model")
    layers = [from_hf_block(b, model.config) for _, _, b in blocks]
    first = layers[0][0]
    overrides = []
    for i, (spec, _) in enumerate(layers):
        if spec["d_model"] != first["d_model"] or _shape(spec) != _shape(first):
            raise ConfigError(f"MoE layer {i} has other expert shapes than layer 0")
        own = {}
        if spec["experts"]["num_experts"] != first["experts"]["num_experts"]:
            own["num_experts"] = spec["experts"]["num_experts"]
        for key in ("routing", "shared"):
            if spec.get(key) != first.get(key) and spec.get(key) is not None:
                own[key] = spec[key]
        overrides.append(own)
    data = {**{k: first[k] for k in ("d_model", *_TEMPLATE) if k in first}, "layers": overrides}
    spec = PoolSpec.from_dict({**data, **spec_fields})
    weights = {f"layers.{i}.{k}": v for i, (_, sd) in enumerate(layers) for k, v in sd.items()}
    return spec, weights


class PoolMoE(nn.Module):
    """Stands in for a model's MoE block: its hidden states go through layer ``layer`` of
    a pool (a :class:`~raymoe.PoolHandle` or a :class:`~raymoe.Client`)."""

    def __init__(self, pool: Any, layer: int, original: nn.Module, returns_tuple: bool):
        super().__init__()
        self.pool, self.layer, self.returns_tuple = pool, layer, returns_tuple
        self._original = [original]  # NOTE: a list, so it is not a submodule (no weights)

    @property
    def original(self) -> nn.Module:
        return self._original[0]

    def forward(self, hidden_states: torch.Tensor):
        shape = hidden_states.shape
        flat = hidden_states.reshape(-1, shape[-1])
        y = self.pool.forward(flat, layer=self.layer).view(shape)
        return (y, None) if self.returns_tuple else y


def attach(model: nn.Module, pool: Any) -> nn.Module:
    """Replace every MoE block of ``model`` by a :class:`PoolMoE` calling ``pool`` (block
    ``i`` -> layer ``i``); the dense parts stay in this process. -> ``model``."""
    _, returns_tuple = _family(model.config)
    for i, (parent, attr, block) in enumerate(moe_blocks(model)):
        setattr(parent, attr, PoolMoE(pool, i, block, returns_tuple))
    return model


def detach(model: nn.Module) -> nn.Module:
    """Undo :func:`attach`: the model's own MoE blocks back in place. -> ``model``."""
    for parent in list(model.modules()):
        for attr, child in list(parent.named_children()):
            if isinstance(child, PoolMoE):
                setattr(parent, attr, child.original)
    return model


def _family(config: Any) -> tuple[str, bool]:
    kind = getattr(config, "model_type", None)
    if kind not in BLOCKS:
        raise ConfigError(
            f"model family {kind!r} is not supported; supported: {sorted(BLOCKS)}", "model_type"
        )
    return BLOCKS[kind]


def _shape(spec: dict) -> dict:
    return {k: v for k, v in spec["experts"].items() if k != "num_experts"}


def _check_dir(path: str | Path) -> Path:
    """``path`` if it holds a config and every safetensors file its index names."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise ConfigError(f"{path} has no config.json (not a checkpoint directory)", "path")
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError) as e:
            raise ConfigError(f"{index} is malformed: {e}", "path") from None
    else:
        files = ["model.safetensors"]
    missing = [f for f in files if not (path / f).is_file()]
    if missing:
        raise ConfigError(f"{path} lacks weight files {missing[:5]}", "path")
    return path
