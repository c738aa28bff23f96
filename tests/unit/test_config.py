"""Specs: the example configs load; bad YAML and impossible specs get one clear ConfigError."""

from __future__ import annotations

from pathlib import Path

import pytest

from raymoe import ConfigError, PoolSpec
from tests.helpers import spec_dict

CONFIGS = sorted((Path(__file__).parents[2] / "examples" / "configs").glob("*.yaml"))


def test_there_are_example_configs():
    names = {p.name for p in CONFIGS}
    assert {"mixtral-tiny.yaml", "deepseek-tiny.yaml", "switch-tiny.yaml", "peer-1m.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_example_configs_load_and_round_trip(path):
    spec = PoolSpec.from_yaml(path)
    assert PoolSpec.from_yaml(spec.to_yaml()) == spec


def test_peer_1m_is_a_million_experts():
    spec = PoolSpec.from_yaml(Path(CONFIGS[0]).parent / "peer-1m.yaml")
    assert spec.num_experts == 1_048_576 and spec.d_model == 256
    assert spec.routing.heads == 8 and spec.routing.k == 16 and spec.slots == 128


def _bad(routing=None, **top):
    d = spec_dict(routing or {"kind": "topk", "k": 2})
    d.update(top)
    return d


BAD = [
    ("k > E", _bad({"kind": "topk", "k": 9}), "routing", "k=9 exceeds"),
    ("unknown kind", _bad({"kind": "toppk", "k": 2}), "routing", "'topk'"),
    ("non-square", _bad({"kind": "product_key", "k": 2, "d_key": 4}), "routing", "square"),
    (
        "odd d_key",
        {**spec_dict({"kind": "product_key", "k": 2, "d_key": 5}, E=16)},
        "routing",
        "even",
    ),
    (
        "pk k > sqrt",
        {**spec_dict({"kind": "product_key", "k": 5, "d_key": 4}, E=16)},
        "routing",
        "sub-keys",
    ),
    (
        "groups",
        _bad({"kind": "topk", "k": 2, "n_groups": 3, "topk_groups": 1}),
        "routing",
        "divide",
    ),
    ("groups alone", _bad({"kind": "topk", "k": 2, "n_groups": 2}), "routing", "together"),
    ("negative d", _bad(d_model=-1), "d_model", "greater than 0"),
    ("unknown field", _bad(colour="red"), "colour", "Extra inputs"),
    ("bad dtype", _bad(dtype="float8"), "dtype", "float32"),
    ("shards > experts", _bad(shards={"count": 9}), "shards.count", "9 shards exceed"),
    (
        "bad activation",
        {**spec_dict({"kind": "topk", "k": 1}, activation="tanh")},
        "experts.activation",
        "silu",
    ),
    (
        "soft with shared",
        {**spec_dict({"kind": "soft"}, shared={"hidden": 8})},
        "shared",
        "no shared experts",
    ),
    (
        "clamped plain FFN",
        {**spec_dict({"kind": "topk", "k": 1}, gated=False, clamped_swiglu={"limit": 7.0})},
        "experts",
        "needs gated",
    ),
    (
        "clamp limit",
        {**spec_dict({"kind": "topk", "k": 1}, clamped_swiglu={"limit": 0})},
        "experts.clamped_swiglu.limit",
        "greater than 0",
    ),
    (
        "hierarchical k",
        _bad({"kind": "hierarchical", "n_groups": 4, "k": 3}),
        "routing",
        "experts per group",
    ),
    (
        "switch both",
        _bad({"kind": "switch", "capacity": 2, "capacity_factor": 1.0}),
        "routing",
        "not both",
    ),
]


@pytest.mark.parametrize("name,data,field,msg", BAD, ids=[b[0] for b in BAD])
def test_impossible_specs_name_the_field(name, data, field, msg):
    with pytest.raises(ConfigError, match=msg) as e:
        PoolSpec.from_dict(data)
    if field:
        assert e.value.field.startswith(field)
        assert str(e.value).startswith(e.value.field)


@pytest.mark.parametrize(
    "text,msg",
    [
        ("d_model: [1, 2", "malformed YAML at line"),
        ("- 1\n- 2\n", "mapping"),
        ("", "mapping"),
        ("d_model: 4\nexperts: {kind: ffn}\n", "experts.num_experts"),
    ],
)
def test_malformed_yaml(text, msg):
    with pytest.raises(ConfigError, match=msg):
        PoolSpec.from_yaml(text + "\n")


def test_missing_file():
    with pytest.raises(ConfigError, match="cannot read"):
        PoolSpec.from_yaml("/nonexistent/spec.yaml")
