"""Hugging Face models generating through a served pool: for every family, a tiny random
model is saved with ``save_pretrained``, its experts served from the checkpoint directory
(``raymoe.hf.from_pretrained``), and greedy ``generate()`` of 32 new tokens for 3 prompts of
different lengths gives exactly the token ids it gives without the pool (logits within
1e-4), over both transports and through the SDK; ``raymoe serve --hf`` serves a checkpoint.
(Broken checkpoints: ``tests/unit/test_hf_models.py``.)"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import torch

import raymoe
from raymoe import hf
from raymoe.cli import main
from raymoe.hf.tiny import FAMILIES, greedy, prompts, tiny_model
from tests.integration.gateway_common import DATA, gateway_section

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """family -> a checkpoint directory of a tiny random model of it."""
    root = tmp_path_factory.mktemp("hf")
    out = {}
    for family in FAMILIES:
        out[family] = root / family
        tiny_model(family).save_pretrained(out[family])
    return out


def _generate_through(pool_or_client, path) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(tokens without the pool, tokens with it, max logit difference)."""
    model = hf.load_model(path)
    inputs = prompts()
    want = greedy(model, inputs)
    with torch.no_grad():
        logits = model(**inputs).logits
    hf.attach(model, pool_or_client)
    got = greedy(model, inputs)
    with torch.no_grad():
        served = model(**inputs).logits
    hf.detach(model)
    return want, got, (logits - served).abs().max().item()


@pytest.mark.parametrize("transport", ["object_store", "grpc"])
@pytest.mark.parametrize("family", FAMILIES)
def test_generate_through_a_served_pool_equals_in_process(
    ray_cluster, checkpoints, family, transport
):
    spec, weights = hf.from_pretrained(
        checkpoints[family],
        name=f"t-hf-{family}-{transport}".replace("_", "-"),
        shards={"count": 2, "transport": transport},
    )
    assert spec.num_layers == 2
    pool = raymoe.serve(spec, weights=weights)
    try:
        want, got, logit_error = _generate_through(pool, checkpoints[family])
        assert got.shape == want.shape and want.shape[1] >= 32
        assert torch.equal(got, want), family
        assert logit_error <= 1e-4
        assert pool.stats().requests >= 2 * 32  # every MoE layer of every step went there
    finally:
        pool.shutdown()


def test_generate_through_the_sdk(ray_cluster, checkpoints, tokens):
    spec, weights = hf.from_pretrained(
        checkpoints["qwen2_moe"],
        name="t-hf-sdk",
        shards={"count": 2},
        gateway=gateway_section(tokens),
    )
    pool = raymoe.serve(spec, weights=weights)
    try:
        (endpoint,) = pool.gateways()
        with raymoe.Client(endpoint, token=DATA) as client:
            want, got, logit_error = _generate_through(client, checkpoints["qwen2_moe"])
        assert torch.equal(got, want) and logit_error <= 1e-4
    finally:
        pool.shutdown()


def test_raymoe_serve_hf_serves_a_checkpoint(ray_cluster, checkpoints, capsys):
    path = checkpoints["mixtral"]
    argv = ["serve", "--hf", str(path), "--name", "t-hf-cli", "--duration", "20"]
    rc: list[int] = []
    t = threading.Thread(target=lambda: rc.append(main(argv)))
    t.start()
    try:
        for _ in range(300):
            try:
                pool = raymoe.connect("t-hf-cli")
                if pool.describe().routers and pool.forward(torch.zeros(1, 32)) is not None:
                    break
            except raymoe.PoolError:  # not there yet, or starting
                time.sleep(0.2)
        want, got, _ = _generate_through(pool, path)
        assert torch.equal(got, want)
        assert pool.describe().layers == 2
    finally:
        t.join(timeout=90)  # serve shuts its pool down after --duration
    assert rc == [0] and "2 layer(s)" in capsys.readouterr().out


def test_the_checkpoint_example_runs(ray_cluster, checkpoints, capsys):
    import runpy

    example = runpy.run_path(str(Path(__file__).parents[2] / "examples" / "serve_checkpoint.py"))
    example["main"](str(checkpoints["llama4_text"]))
    out = capsys.readouterr().out
    assert "same as in process: True" in out and "2 MoE layers" in out
