"""Whole Hugging Face checkpoints as multi-layer specs, without Ray: ``from_pretrained`` of a
saved tiny model of every family gives a ``MoEStack`` that, attached in place of the model's
MoE blocks, generates exactly the same tokens; ``detach`` puts the blocks back; broken
checkpoints are refused with errors naming the problem."""

from __future__ import annotations

import json

import pytest
import torch

from raymoe import ConfigError, MoEStack, hf
from raymoe.hf.tiny import FAMILIES, greedy, prompts, tiny_model


class InProcess:
    """A "pool" computing in this process: what ``attach`` needs is ``forward(x, layer)``."""

    def __init__(self, stack: MoEStack):
        self.stack, self.calls = stack, []

    def forward(self, x, layer=0):
        self.calls.append(layer)
        with torch.no_grad():
            return self.stack(x, layer=layer)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_checkpoint_served_by_its_stack_generates_the_same_tokens(family, tmp_path):
    tiny_model(family, layers=3).save_pretrained(tmp_path)
    spec, weights = hf.from_pretrained(tmp_path, name="m")
    assert spec.num_layers == 3 and spec.name == "m"
    stack = MoEStack(spec).eval()
    stack.load_state_dict(weights, strict=True)
    model = hf.load_model(tmp_path)
    own = [b for _, _, b in hf.models.moe_blocks(model)]
    inputs = prompts()
    want = greedy(model, inputs)
    with torch.no_grad():
        logits = model(**inputs).logits
    pool = InProcess(stack)
    hf.attach(model, pool)
    assert not hf.models.moe_blocks(model)
    got = greedy(model, inputs)
    with torch.no_grad():
        assert (model(**inputs).logits - logits).abs().max() <= 1e-4
    assert torch.equal(got, want)
    assert set(pool.calls) == {0, 1, 2}
    hf.detach(model)
    assert [b for _, _, b in hf.models.moe_blocks(model)] == own


def test_deepseek_dense_layers_take_no_pool_layer(tmp_path):
    model = tiny_model("deepseek_v3", layers=2)  # 3 decoder layers, the first dense
    assert model.config.num_hidden_layers == 3
    model.save_pretrained(tmp_path)
    spec, weights = hf.from_pretrained(tmp_path)
    assert spec.num_layers == 2
    assert spec.layer(1).routing.n_groups == 2 and spec.layer(0).shared is not None
    assert "layers.1.router.correction_bias" in weights


def test_broken_checkpoints_name_the_problem(tmp_path):
    with pytest.raises(ConfigError, match=r"no config\.json"):
        hf.from_pretrained(tmp_path)
    sharded = tmp_path / "sharded"
    tiny_model("mixtral").save_pretrained(sharded, max_shard_size="20KB")
    files = sorted(sharded.glob("model-*.safetensors"))
    files[-1].unlink()
    with pytest.raises(ConfigError, match=files[-1].name):
        hf.from_pretrained(sharded)
    (sharded / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(ConfigError, match="malformed"):
        hf.from_pretrained(sharded)
    other = tmp_path / "other"
    tiny_model("olmoe").save_pretrained(other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    with pytest.raises(ConfigError, match="'llama' is not supported; supported: "):
        hf.from_pretrained(other)
